//! A test PKI made with `openssl` in a temporary directory: two CAs and leaf certificates.
//! Needs `redis_server.rs` beside it as module `redis_server`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::redis_server::RedisServer;

/// A temporary directory of PEM files, removed on drop.
pub struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("timeout")
        .arg("30")
        .arg("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// Two unrelated CAs (`ca`, `other-ca`) and, signed by `ca`: `server` (for 127.0.0.1 and
    /// localhost), `wrong-name` (for wrong.example only) and `client` (a client certificate).
    /// The server certificates allow client authentication too, for the `redis-cli` of the
    /// test helper.
    pub fn new() -> Pki {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("tollgate-tls-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        for ca in ["ca", "other-ca"] {
            openssl(
                &pki.dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=tollgate test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                ],
            );
        }
        pki.leaf(
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth",
        );
        pki.leaf(
            "wrong-name",
            "subjectAltName=DNS:wrong.example\nextendedKeyUsage=serverAuth,clientAuth",
        );
        pki.leaf("client", "extendedKeyUsage=clientAuth");
        pki
    }

    /// A key and a certificate signed by `ca`, with these extensions.
    pub fn leaf(&self, name: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}\n"),
        )
        .unwrap();
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN=tollgate test {name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("{}", 1000 + name.len()),
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn file(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_string()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// A TLS-only server presenting `<cert>.crt`.
    pub fn server(&self, cert: &str, extra: &[&str]) -> RedisServer {
        RedisServer::start_tls(
            &self.file(&format!("{cert}.crt")),
            &self.file(&format!("{cert}.key")),
            &self.file("ca.crt"),
            extra,
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
