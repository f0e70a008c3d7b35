//! Refusals in gRPC's terms. A gRPC client does not read an HTTP 429: it reads the
//! `grpc-status` of a response that is HTTP 200. Requests whose `content-type` is
//! `application/grpc` (or `application/grpc+proto`, ...) are refused with a trailers-only
//! response: status 200, no body, and in its headers `grpc-status`, `grpc-message` and, for a
//! limit, `grpc-retry-pushback-ms` (the retry delay gRPC's retry policy reads), along with the
//! rate-limit headers and `Retry-After` the HTTP refusal has.

use std::time::Duration;

use ::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use ::http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use bytes::Bytes;

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-retry-pushback-ms`: how long the client should wait before retrying.
pub static GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// gRPC status codes the layer answers with.
const RESOURCE_EXHAUSTED: u8 = 8;
const PERMISSION_DENIED: u8 = 7;
const INTERNAL: u8 = 13;
const UNAVAILABLE: u8 = 14;

/// Why a request was refused, in the terms a gRPC answer needs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refused {
    /// A limit (HTTP 429).
    Limit {
        policy: &'static str,
        retry_after: Option<Duration>,
    },
    /// The deny list (HTTP 403).
    Denied,
    /// The client address is unknown (`response.key_error_status`).
    NoClient { status: u16 },
}

/// True for a gRPC request: `content-type: application/grpc`, with or without a `+format`
/// or parameters.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%`.
fn percent_encode(s: &str) -> HeaderValue {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("request refused"))
}

/// The gRPC answer to a request the layer refused with `http`: the same headers, except the
/// body's, with the gRPC status; status 200 and no body.
pub(crate) fn response(why: Refused, http: Response<Bytes>) -> Response<Bytes> {
    let (mut parts, _) = http.into_parts();
    parts.status = StatusCode::OK;
    let h = &mut parts.headers;
    h.remove(CONTENT_LENGTH);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let (code, message) = match why {
        Refused::Limit { policy, retry_after } => {
            let ms = retry_after.map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64);
            h.insert(&GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(ms));
            // As `Retry-After` (`headers::retry_after_secs`): whole seconds, never 0.
            let secs = retry_after.map_or(1, super::ceil_secs).max(1);
            (
                RESOURCE_EXHAUSTED,
                format!("rate limit exceeded ({policy}); retry after {secs} s"),
            )
        }
        Refused::Denied => (
            PERMISSION_DENIED,
            "this client is not allowed to use this service".to_owned(),
        ),
        Refused::NoClient { status } => (
            if status == 503 { UNAVAILABLE } else { INTERNAL },
            "the server could not determine the client address".to_owned(),
        ),
    };
    h.insert(&GRPC_STATUS, HeaderValue::from(u16::from(code)));
    h.insert(&GRPC_MESSAGE, percent_encode(&message));
    Response::from_parts(parts, Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message's wait agrees with `Retry-After`: whole seconds rounded up, never 0 (a
    /// wait under a second, or none known, reads 1 s).
    #[test]
    fn the_message_names_the_retry_after_seconds() {
        let message = |retry_after: Option<Duration>| {
            let r = response(
                Refused::Limit {
                    policy: "p",
                    retry_after,
                },
                Response::new(Bytes::new()),
            );
            r.headers()[&GRPC_MESSAGE].to_str().unwrap().to_owned()
        };
        assert_eq!(
            message(Some(Duration::from_millis(200))),
            "rate limit exceeded (p); retry after 1 s"
        );
        assert_eq!(message(None), "rate limit exceeded (p); retry after 1 s");
        assert_eq!(
            message(Some(Duration::from_millis(2001))),
            "rate limit exceeded (p); retry after 3 s"
        );
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(CONTENT_TYPE, HeaderValue::from_static(v));
            m
        };
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;x=1",
        ] {
            assert!(is_grpc(&h(yes)), "{yes}");
        }
        for no in [
            "application/json",
            "application/grpc-web",
            "application/grpcx",
            "text/plain",
        ] {
            assert!(!is_grpc(&h(no)), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% off: é"), "50%25 off: %C3%A9");
    }
}
