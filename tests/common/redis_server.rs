//! A `redis-server` child process on an ephemeral loopback port, stopped by its pid on drop.
//! Shared by the integration tests and the benches (`#[path]`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    /// The port clients connect to (the TLS port of a TLS-only server).
    pub port: u16,
    extra: Vec<String>,
    /// TLS only (no plain port, `port` is the TLS port): the certificate and key files, which
    /// `redis-cli` also presents as a client certificate.
    tls: Option<(String, String)>,
}

impl RedisServer {
    /// Starts `redis-server` with no persistence, bound to 127.0.0.1.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts `redis-server` with extra arguments (for example `--requirepass x`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_inner(extra, None)
    }

    /// Starts a TLS-only `redis-server` (`--port 0 --tls-port <port>`) with this certificate,
    /// key and CA (PEM files); clients need no certificate unless `extra` says
    /// `--tls-auth-clients yes` (the certificate must then allow client authentication too:
    /// [`cli`](Self::cli) presents it). [`url`](Self::url) is then `rediss://127.0.0.1:<port>/`.
    pub fn start_tls(cert: &str, key: &str, ca: &str, extra: &[&str]) -> RedisServer {
        let mut args = vec![
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
            "--tls-auth-clients",
            "no",
        ];
        args.extend_from_slice(extra);
        Self::start_inner(&args, Some((cert.to_string(), key.to_string())))
    }

    fn start_inner(extra: &[&str], tls: Option<(String, String)>) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut server = RedisServer {
                child: spawn(port, &extra, tls.is_some()),
                port,
                extra: extra.clone(),
                tls: tls.clone(),
            };
            if server.wait_ready() {
                return server;
            }
            // The port was taken in the meantime, or a slow start: try another port.
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!("redis-server did not answer PING on a loopback port after 5 attempts");
    }

    /// Starts `redis-server` on `port` (127.0.0.1) with extra arguments; `None` if it does not
    /// answer (the port is taken).
    pub fn start_on(port: u16, extra: &[&str]) -> Option<RedisServer> {
        Self::start_on_with(port, extra, None)
    }

    /// [`start_on`](Self::start_on), TLS-only when `tls` (certificate and key files, which
    /// `extra` must name too) is given.
    pub fn start_on_with(port: u16, extra: &[&str], tls: Option<(String, String)>) -> Option<RedisServer> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut server = RedisServer {
            child: spawn(port, &extra, tls.is_some()),
            port,
            extra,
            tls,
        };
        if server.wait_ready() {
            return Some(server);
        }
        let _ = server.child.kill();
        let _ = server.child.wait();
        None
    }

    /// Kills the server (SIGKILL): everything it held is lost.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same arguments (empty: no
    /// persistence). Panics if it does not come up within a few attempts.
    pub fn restart(&mut self) {
        self.kill();
        for _attempt in 0..20 {
            self.child = spawn(self.port, &self.extra, self.tls.is_some());
            if self.wait_ready() {
                return;
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// Sends a signal to the server process (`STOP` hangs it with its sockets open, `CONT`
    /// resumes it).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {} failed", self.pid());
    }

    /// Runs `redis-cli` against the server (bounded to 10 s) and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_auth(None, args)
    }

    /// [`cli`](Self::cli) with a password.
    pub fn cli_auth(&self, password: Option<&str>, args: &[&str]) -> String {
        let mut cmd = Command::new("timeout");
        cmd.args(["10", "redis-cli", "--no-auth-warning", "-p", &self.port.to_string()]);
        if let Some((cert, key)) = &self.tls {
            // Only for driving the test's own server: the tests check verification themselves.
            cmd.args(["--tls", "--insecure", "--cert", cert, "--key", key]);
        }
        if let Some(p) = password {
            cmd.args(["-a", p]);
        }
        let out = cmd
            .args(args)
            .output()
            .expect("redis-cli (apt-get install redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.tls.is_some() {
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.cli(&["PING"]) == "PONG" {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 64];
                // PING works without a password; NOAUTH also proves the server is up, and so
                // does LOADING (a restart still reading its snapshot).
                if s.write_all(b"PING\r\n").is_ok() {
                    if let Ok(n) = s.read(&mut buf) {
                        let r = &buf[..n];
                        if r.starts_with(b"+PONG") || r.starts_with(b"-NOAUTH") || r.starts_with(b"-LOADING") {
                            return true;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn spawn(port: u16, extra: &[String], tls: bool) -> Child {
    let port = port.to_string();
    // A TLS-only server has no plain port.
    let ports = if tls {
        vec!["--port", "0", "--tls-port", &port]
    } else {
        vec!["--port", &port]
    };
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1"])
        .args(ports)
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => c,
        Err(e) => panic!("cannot start redis-server ({e}): install it (apt-get install redis-server redis-tools)"),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped (SIGSTOP) server dies of SIGKILL all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
