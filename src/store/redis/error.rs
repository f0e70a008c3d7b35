//! Error classification: every failure of a Redis exchange becomes a [`StoreError`] of the
//! [`ErrorClass`] that tells a node what to do about it (retry, rethink the topology, stop and
//! fix the configuration). The same rules hold for a command's error and for an error reply
//! inside a pipeline or a script reply, on a single server and on a cluster.

use redis::RedisError;

use crate::store::{ErrorClass, StoreError};

/// A [`ErrorClass::Config`] error: settings that no retry will fix.
pub(super) fn config_error(message: impl Into<String>) -> StoreError {
    StoreError::new(ErrorClass::Config, message)
}

/// Classifies an error reply by its code and detail: the same rules for a command's error and
/// for an error inside a pipeline or a script reply (a cluster's pipelines).
pub(super) fn server_error(code: &str, detail: Option<&str>, message: String) -> StoreError {
    // Redis refuses large requests before authentication with this instead of NOAUTH.
    if code == "ERR" && detail.is_some_and(|d| d.contains("unauthenticated")) {
        return StoreError::new(ErrorClass::Config, message);
    }
    // Redis 7.0 refuses a command a script sends that the ACL user may not run with this
    // instead of NOPERM.
    if code == "ERR" && detail.is_some_and(|d| d.contains("user executing the script can't")) {
        return StoreError::new(
            ErrorClass::Config,
            format!("NOPERM: the ACL user may not run a command of tollgate's scripts: {message}"),
        );
    }
    StoreError::from_code(code, message)
}

/// [`server_error`] for an error reply inside a pipeline or a script reply.
pub(super) fn reply_error(e: &redis::ServerError) -> StoreError {
    server_error(
        e.code(),
        e.details(),
        format!("{} {}", e.code(), e.details().unwrap_or_default()),
    )
}

/// Classifies a client error.
pub(super) fn classify(e: &RedisError) -> StoreError {
    let message = e.to_string();
    if let Some(code) = e.code() {
        return server_error(code, e.detail(), message);
    }
    // A refused certificate is an I/O error to the client, but no retry will fix it.
    #[cfg(feature = "redis-tls")]
    if let Some(refused) = handshake_refusal(e) {
        return refused;
    }
    if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        return StoreError::new(ErrorClass::Transient, message);
    }
    let class = match e.kind() {
        redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig => ErrorClass::Config,
        redis::ErrorKind::Io | redis::ErrorKind::ClusterConnectionNotFound => ErrorClass::Transient,
        _ => ErrorClass::Protocol,
    };
    StoreError::new(class, message)
}

/// The rustls error inside a client I/O error, if the TLS handshake failed.
#[cfg(feature = "redis-tls")]
fn rustls_error(e: &RedisError) -> Option<&rustls::Error> {
    use std::error::Error;
    // redis-rs keeps the `io::Error` (which tokio-rustls made from the rustls error) in an
    // `Arc`; `io::Error::source` skips its payload, so the chain is walked by hand.
    let inner = e.source()?;
    let io = match inner.downcast_ref::<std::sync::Arc<dyn Error + Send + Sync>>() {
        Some(arc) => (**arc).downcast_ref::<std::io::Error>(),
        None => inner.downcast_ref::<std::io::Error>(),
    }?;
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A TLS handshake the certificates decided: a [`ErrorClass::Config`] error.
#[cfg(feature = "redis-tls")]
fn handshake_refusal(e: &RedisError) -> Option<StoreError> {
    use rustls::{AlertDescription as A, CertificateError as C};
    let err = rustls_error(e)?;
    let message = match err {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!("TLS: the server's certificate was refused: it is not valid for the host name in the URL ({err})")
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => format!(
            "TLS: the server's certificate was refused: it is not signed by a trusted CA (see tls_ca_file) ({err})"
        ),
        rustls::Error::InvalidCertificate(_) => format!("TLS: the server's certificate was refused ({err})"),
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired,
        ) => format!("TLS: the server refused this client's certificate (see tls_client_cert) ({err})"),
        other => format!("TLS handshake failed (is the port a TLS port?) ({other})"),
    };
    Some(StoreError::new(ErrorClass::Config, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_classified() {
        use crate::store::classify_code;
        for (code, class) in [
            ("LOADING", ErrorClass::Transient),
            ("BUSY", ErrorClass::Transient),
            ("TRYAGAIN", ErrorClass::Transient),
            ("CLUSTERDOWN", ErrorClass::Transient),
            ("READONLY", ErrorClass::Topology),
            ("MOVED", ErrorClass::Topology),
            ("NOAUTH", ErrorClass::Config),
            ("WRONGPASS", ErrorClass::Config),
            ("NOPERM", ErrorClass::Config),
            ("OOM", ErrorClass::Resource),
            ("ERR", ErrorClass::Protocol),
        ] {
            assert_eq!(classify_code(code), class, "{code}");
        }
    }
}
