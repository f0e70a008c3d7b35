//! `rediss://`: the TLS options of a [`RedisConfig`](super::RedisConfig), and (feature
//! `redis-tls`) the TLS clients built from them. Telling a refused certificate from a network
//! failure is error classification: see `error.rs`.

use std::path::PathBuf;

#[cfg(feature = "redis-tls")]
use rustls::pki_types::pem::PemObject;
#[cfg(feature = "redis-tls")]
use rustls::pki_types::CertificateDer;

#[cfg(feature = "redis-tls")]
use super::error::config_error;
#[cfg(feature = "redis-tls")]
use crate::store::StoreError;

/// Where the CA to trust comes from.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum CaSource {
    Pem(Vec<u8>),
    File(PathBuf),
}

/// The TLS options of a `rediss://` connection.
#[derive(Clone, Default, PartialEq, Eq)]
pub(super) struct TlsOptions {
    pub(super) ca: Option<CaSource>,
    /// Client certificate chain and private key, PEM.
    pub(super) client_cert: Option<(Vec<u8>, Vec<u8>)>,
    pub(super) insecure: bool,
}

impl TlsOptions {
    /// Whether any TLS option is set.
    pub(super) fn is_set(&self) -> bool {
        self.ca.is_some() || self.client_cert.is_some() || self.insecure
    }

    /// The names of the options that are set, for error messages.
    pub(super) fn names(&self) -> String {
        let mut names = Vec::new();
        match self.ca {
            Some(CaSource::Pem(_)) => names.push("tls_ca_pem"),
            Some(CaSource::File(_)) => names.push("tls_ca_file"),
            None => {}
        }
        if self.client_cert.is_some() {
            names.push("tls_client_cert");
        }
        if self.insecure {
            names.push("tls_insecure_skip_verify");
        }
        names.join(", ")
    }
}

/// Adds the TLS options to a client of a `rediss://` URL.
#[cfg(feature = "redis-tls")]
pub(super) fn client(client: redis::Client, tls: &TlsOptions) -> Result<redis::Client, StoreError> {
    // The process may have chosen a provider already; otherwise use ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = client;
    if tls.ca.is_some() || tls.client_cert.is_some() {
        let root_cert = match &tls.ca {
            None => None,
            Some(CaSource::Pem(pem)) => Some(check_ca(pem.clone(), "tls_ca_pem")?),
            Some(CaSource::File(path)) => {
                let what = format!("TLS CA file {}", path.display());
                let pem = std::fs::read(path).map_err(|e| config_error(format!("{what}: {e}")))?;
                Some(check_ca(pem, &what)?)
            }
        };
        let client_tls = tls.client_cert.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        });
        let certificates = redis::TlsCertificates { client_tls, root_cert };
        client = redis::Client::build_with_tls(client.get_connection_info().clone(), certificates)
            .map_err(|e| config_error(format!("TLS client certificate or key: {e}")))?;
    }
    if tls.insecure {
        let info = client.get_connection_info().clone();
        let addr = match info.addr().clone() {
            redis::ConnectionAddr::TcpTls {
                host, port, tls_params, ..
            } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params,
            },
            other => other,
        };
        client = redis::Client::open(info.set_addr(addr)).map_err(|e| config_error(e.to_string()))?;
    }
    Ok(client)
}

/// The PEM of a CA, once it is known to hold at least one usable certificate.
#[cfg(feature = "redis-tls")]
fn check_ca(pem: Vec<u8>, what: &str) -> Result<Vec<u8>, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| config_error(format!("{what}: invalid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| config_error(format!("{what}: not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(config_error(format!("{what}: no PEM CERTIFICATE block")));
    }
    Ok(pem)
}
