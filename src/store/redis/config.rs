//! [`RedisConfig`]: how to reach Redis (URL, timeouts, TLS options), the one place that turns
//! it into a `redis::Client`, and the password kept out of its `Debug`.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use super::error::config_error;
use super::tls::{CaSource, TlsOptions};
#[cfg(doc)]
use crate::store::ErrorClass;
use crate::store::StoreError;

/// How to reach Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    url: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    reconnect_retries: usize,
    tls: TlsOptions,
}

impl RedisConfig {
    /// A `redis://[user:password@]host[:port][/db]` URL, or `rediss://` (TLS: feature
    /// `redis-tls`; the server's certificate chain and host name are verified, against the
    /// system's root certificates unless [`tls_ca_pem`](Self::tls_ca_pem) or
    /// [`tls_ca_file`](Self::tls_ca_file) names a CA). Timeouts default to 1 s.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            reconnect_retries: 0,
            tls: TlsOptions::default(),
        }
    }

    /// Bound on each connection attempt.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on each call: a sync that takes longer fails as [`ErrorClass::Transient`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How many times a reconnection is retried (with exponential backoff) before a call fails;
    /// the next call starts over. Default 0: a node's circuit breaker paces reconnection, and
    /// a call that waits for retries would only run into the sync timeout.
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// `rediss://` only (feature `redis-tls`): trust the CA certificate(s) in `pem` (one or
    /// more PEM `CERTIFICATE` blocks) instead of the system's root certificates. The server's
    /// certificate must chain to one of them and name the URL's host (a DNS name, or an IP
    /// address in its subjectAltName). Replaces an earlier [`tls_ca_file`](Self::tls_ca_file).
    ///
    /// Invalid PEM is an [`ErrorClass::Config`] error when the store connects.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca = Some(CaSource::Pem(pem.into()));
        self
    }

    /// Like [`tls_ca_pem`](Self::tls_ca_pem), with the PEM read from `path` when the store
    /// connects (and again when it builds a new client): a missing, unreadable or invalid file
    /// is an [`ErrorClass::Config`] error that names the path.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca = Some(CaSource::File(path.into()));
        self
    }

    /// `rediss://` only (feature `redis-tls`): present this client certificate (PEM, the
    /// chain with the leaf first) and its private key (PEM: PKCS#8, PKCS#1 or SEC1) to
    /// servers that require one (Redis `tls-auth-clients yes`). Invalid PEM is an
    /// [`ErrorClass::Config`] error when the store connects.
    pub fn tls_client_cert(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.client_cert = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// `rediss://` only (feature `redis-tls`). **Development only; dangerous.** With `true`,
    /// the server's certificate is not verified at all: any certificate, from any issuer, for
    /// any host name, expired or not, is accepted. The connection is still encrypted, but
    /// anyone who can intercept the traffic can impersonate the server, read the password and
    /// every key, and answer claims as they like (granting unlimited quota). Use a CA
    /// ([`tls_ca_file`](Self::tls_ca_file)) for self-signed or private certificates instead.
    ///
    /// Default `false`: the certificate chain and the host name are verified. (The URL form
    /// `rediss://host:port/#insecure` does the same as `true`.)
    pub fn tls_insecure_skip_verify(mut self, insecure: bool) -> Self {
        self.tls.insecure = insecure;
        self
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    pub(crate) fn response_timeout_value(&self) -> Duration {
        self.response_timeout
    }

    pub(super) fn reconnect_retries_value(&self) -> usize {
        self.reconnect_retries
    }

    /// Builds the `redis::Client` for this configuration: the one place that does, so that
    /// the TLS parameters live in the client's connection info (a client for another node of
    /// the same deployment can be made from a copy of it with another address).
    pub(super) fn client(&self) -> Result<redis::Client, StoreError> {
        let tls_url = is_tls_url(&self.url);
        if !cfg!(feature = "redis-tls") && (tls_url || self.tls.is_set()) {
            return Err(config_error(
                "`rediss://` URLs and TLS options need tollgate's `redis-tls` feature",
            ));
        }
        if self.tls.is_set() && !tls_url {
            return Err(config_error(format!(
                "TLS options ({}) need a `rediss://` URL",
                self.tls.names()
            )));
        }
        let client = redis::Client::open(self.url.as_str()).map_err(|e| config_error(e.to_string()))?;
        if !matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { .. }
        ) {
            return Ok(client);
        }
        #[cfg(feature = "redis-tls")]
        return super::tls::client(client, &self.tls);
        #[cfg(not(feature = "redis-tls"))]
        Err(config_error("`rediss://` URLs need tollgate's `redis-tls` feature"))
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ca = match &self.tls.ca {
            None => None,
            Some(CaSource::Pem(_)) => Some("<pem>".to_string()),
            Some(CaSource::File(p)) => Some(p.display().to_string()),
        };
        f.debug_struct("RedisConfig")
            .field("url", &redact_password(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("reconnect_retries", &self.reconnect_retries)
            .field("tls_ca", &ca)
            .field("tls_client_cert", &self.tls.client_cert.as_ref().map(|_| "<redacted>"))
            .field("tls_insecure_skip_verify", &self.tls.insecure)
            .finish()
    }
}

/// The URL with the password (if any) replaced, for `Debug`.
fn redact_password(url: &str) -> Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(url);
    };
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let Some(at) = url[start..end].rfind('@').map(|i| start + i) else {
        return Cow::Borrowed(url);
    };
    match url[start..at].find(':') {
        Some(colon) => Cow::Owned(format!("{}:<redacted>{}", &url[..start + colon], &url[at..])),
        // `redis://password@host` is not a password in redis URLs, but is kept out all the same.
        None => Cow::Owned(format!("{}<redacted>{}", &url[..start], &url[at..])),
    }
}

/// True for the URL schemes redis-rs connects to with TLS.
fn is_tls_url(url: &str) -> bool {
    let scheme = url.split("://").next().unwrap_or_default();
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

impl From<&str> for RedisConfig {
    fn from(url: &str) -> Self {
        RedisConfig::new(url)
    }
}

impl From<String> for RedisConfig {
    fn from(url: String) -> Self {
        RedisConfig::new(url)
    }
}

impl From<&String> for RedisConfig {
    fn from(url: &String) -> Self {
        RedisConfig::new(url.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ErrorClass;

    #[test]
    fn passwords_stay_out_of_debug() {
        for (url, shown) in [
            ("redis://u:p4ss@host:1/0", "redis://u:<redacted>@host:1/0"),
            ("rediss://:p4ss@host", "rediss://:<redacted>@host"),
            ("redis://p4ss@host/", "redis://<redacted>@host/"),
            ("redis://host:1/#a@b", "redis://host:1/#a@b"),
            ("redis://u:p@4ss@host", "redis://u:<redacted>@host"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_password(url), shown);
        }
        let debug = format!("{:?}", RedisConfig::new("redis://u:p4ss@h").tls_client_cert("c", "KEY"));
        assert!(!debug.contains("p4ss") && !debug.contains("KEY"), "{debug}");
    }

    #[test]
    fn tls_needs_a_tls_url_and_the_feature() {
        let config_err = |c: RedisConfig| c.client().unwrap_err();
        let e = config_err(RedisConfig::new("redis://127.0.0.1:1").tls_insecure_skip_verify(true));
        assert_eq!(e.class(), ErrorClass::Config);
        let needle = if cfg!(feature = "redis-tls") {
            "tls_insecure_skip_verify"
        } else {
            "redis-tls"
        };
        assert!(e.message().contains(needle), "{e}");
        assert!(RedisConfig::new("redis://127.0.0.1:1")
            .tls_insecure_skip_verify(false)
            .client()
            .is_ok());
        let tls = RedisConfig::new("REDISS://127.0.0.1:1");
        if cfg!(feature = "redis-tls") {
            assert!(tls.client().is_ok());
        } else {
            let e = config_err(tls);
            assert_eq!(e.class(), ErrorClass::Config);
            assert!(e.message().contains("redis-tls"), "{e}");
        }
    }
}
