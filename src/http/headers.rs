//! Rate-limit response headers and the bodies of 429, 403 and key-error responses.

use std::time::Duration;

use ::http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use ::http::{HeaderMap, Response, StatusCode};
use bytes::{Bytes, BytesMut};

use super::policy_header::PolicyHeaders;
use crate::config::{BodyStyle, HeaderStyle, Limit};
use crate::Decision;

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `X-RateLimit-Limit` (legacy).
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining` (legacy).
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (legacy; seconds from now).
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The problem type of a 429 in `application/problem+json`.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Whole seconds, rounded up: a wait of 1 ns is 1 s, never 0.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The `Retry-After` value of a denial: its wait rounded up to whole seconds, at least 1.
pub fn retry_after_secs(d: &Decision) -> u64 {
    d.retry_after().map_or(1, ceil_secs).max(1)
}

fn number(n: u64) -> HeaderValue {
    HeaderValue::from(n)
}

/// Headers computed before the inner service runs, added to its response. Kept small: it
/// lives in the response future, which is moved several times on its way to the executor.
#[derive(Default)]
pub(crate) struct Attach {
    /// The draft headers' values, cut from one buffer: `RateLimit-Policy` (the first
    /// `policy_len` bytes; none when 0), then `RateLimit`.
    draft: Option<Bytes>,
    policy_len: usize,
    legacy: Option<Box<[HeaderValue; 3]>>,
}

impl Attach {
    /// The headers for `decision`, taken against `applied` (the limits the request passed
    /// through, in order, named in `text`), whose `RateLimit-Policy` value is `policy`.
    pub(crate) fn new(
        style: HeaderStyle,
        policy: Option<&HeaderValue>,
        text: &PolicyHeaders,
        applied: &[&Limit],
        d: &Decision,
    ) -> Attach {
        if applied.is_empty() {
            return Attach::default();
        }
        let mut out = Attach::default();
        let reset = ceil_secs(d.reset_after());
        let remaining = d.remaining();
        // Limiter names are interned: the deciding limit is the one with the same name pointer.
        let own = applied.iter().find(|l| std::ptr::eq(l.name(), d.policy()));
        if matches!(style, HeaderStyle::Draft | HeaderStyle::Both) {
            // Copied rather than shared: a shared value's reference count would be written by
            // every request on every core.
            let policy = policy.map_or(&[][..], HeaderValue::as_bytes);
            let quoted = own.and_then(|l| text.quoted(l));
            out.draft = Some(draft_values(policy, quoted, remaining, reset));
            out.policy_len = policy.len();
        }
        if matches!(style, HeaderStyle::Legacy | HeaderStyle::Both) {
            let limit = own.map_or(d.limit(), |l| l.limiter.policy().points());
            out.legacy = Some(Box::new([number(limit), number(remaining), number(reset)]));
        }
        out
    }

    /// True when there is no header to add.
    pub(crate) fn is_empty(&self) -> bool {
        self.draft.is_none() && self.legacy.is_none()
    }

    pub(crate) fn apply(self, headers: &mut HeaderMap) {
        if let Some(mut state) = self.draft {
            if self.policy_len > 0 {
                let policy = state.split_to(self.policy_len);
                // SAFETY: these bytes are a copy of a `HeaderValue` (see `draft_values`).
                headers.insert(RATELIMIT_POLICY.clone(), unsafe {
                    HeaderValue::from_maybe_shared_unchecked(policy)
                });
            }
            // SAFETY: see `draft_values`.
            headers.insert(RATELIMIT.clone(), unsafe {
                HeaderValue::from_maybe_shared_unchecked(state)
            });
        }
        if let Some([l, r, t]) = self.legacy.map(|b| *b) {
            headers.insert(X_RATELIMIT_LIMIT.clone(), l);
            headers.insert(X_RATELIMIT_REMAINING.clone(), r);
            headers.insert(X_RATELIMIT_RESET.clone(), t);
        }
    }
}

/// The longest `;r=<remaining>;t=<reset>`.
const STATE_PARAMS: usize = 2 * (3 + 20);

/// The `RateLimit-Policy` value `policy` (the bytes of a `HeaderValue`, or none) followed by
/// the `RateLimit` value: `"name";r=<remaining>;t=<reset>` for a name already quoted (a
/// structured-field string) and checked valid in a header value, or `invalid` when there is
/// no such name.
fn draft_values(policy: &[u8], quoted: Option<&[u8]>, remaining: u64, reset: u64) -> Bytes {
    let Some(quoted) = quoted else {
        return cut(&[policy, b"invalid"]);
    };
    let mut params = [0u8; STATE_PARAMS];
    params[..3].copy_from_slice(b";r=");
    let end = write_digits(&mut params, 3, remaining);
    params[end..end + 3].copy_from_slice(b";t=");
    let end = write_digits(&mut params, end + 3, reset);
    cut(&[policy, quoted, &params[..end]])
}

/// Values cut from one buffer share its allocation (freed with the last of them).
const CHUNK: usize = 4096;

thread_local! {
    /// What is left of the thread's current buffer.
    static CHUNKS: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// The concatenation of `parts`, cut from the thread's buffer: a copy and a reference count
/// instead of an allocation per value.
fn cut(parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let concat = |buf: &mut BytesMut| {
        for p in parts {
            buf.extend_from_slice(p);
        }
    };
    if len <= CHUNK / 8 {
        let cut = CHUNKS.try_with(|c| {
            let mut c = c.borrow_mut();
            if c.capacity() - c.len() < len {
                *c = BytesMut::with_capacity(CHUNK);
            }
            concat(&mut c);
            c.split().freeze()
        });
        if let Ok(b) = cut {
            return b;
        }
    }
    let mut buf = BytesMut::with_capacity(len);
    concat(&mut buf);
    buf.freeze()
}

/// `00`, `01`, ... `99`.
const PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// Writes `n` in decimal at `out[at..]` and returns where it ends (at most 20 digits).
fn write_digits(out: &mut [u8; STATE_PARAMS], at: usize, mut n: u64) -> usize {
    let end = at + n.checked_ilog10().map_or(1, |l| l as usize + 1);
    let mut i = end;
    while n >= 100 {
        let p = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        out[i..i + 2].copy_from_slice(&PAIRS[p..p + 2]);
    }
    if n >= 10 {
        let p = n as usize * 2;
        out[i - 2..i].copy_from_slice(&PAIRS[p..p + 2]);
    } else {
        out[i - 1] = b'0' + n as u8;
    }
    end
}

fn json_response(status: StatusCode, content_type: &'static str, body: serde_json::Value) -> Response<Bytes> {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut r = Response::new(Bytes::from(bytes));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The 429 for a denial by `layer`.
pub(crate) fn too_many_requests(body: BodyStyle, layer: &str, d: &Decision, attach: Attach) -> Response<Bytes> {
    let secs = retry_after_secs(d);
    let message = format!("Too many requests. Please retry after {secs} seconds.");
    let mut r = match body {
        BodyStyle::Json => json_response(
            StatusCode::TOO_MANY_REQUESTS,
            "application/json",
            serde_json::json!({
                "error": "Rate limit exceeded",
                "message": message,
                "retry_after": secs,
                "layer": layer,
                "policy": d.policy(),
            }),
        ),
        BodyStyle::Problem => json_response(
            StatusCode::TOO_MANY_REQUESTS,
            "application/problem+json",
            serde_json::json!({
                "type": QUOTA_EXCEEDED,
                "title": "Request cannot be satisfied as assigned quota has been exceeded",
                "status": 429,
                "detail": message,
                "violated-policies": [d.policy()],
                "retry_after": secs,
                "layer": layer,
            }),
        ),
    };
    r.headers_mut().insert(RETRY_AFTER, number(secs));
    attach.apply(r.headers_mut());
    r
}

/// The 403 for a deny-listed client.
pub(crate) fn forbidden(body: BodyStyle) -> Response<Bytes> {
    let message = "This client is not allowed to use this service.";
    match body {
        BodyStyle::Json => json_response(
            StatusCode::FORBIDDEN,
            "application/json",
            serde_json::json!({"error": "Forbidden", "message": message, "layer": "deny"}),
        ),
        BodyStyle::Problem => json_response(
            StatusCode::FORBIDDEN,
            "application/problem+json",
            serde_json::json!({"title": "Forbidden", "status": 403, "detail": message, "layer": "deny"}),
        ),
    }
}

/// The answer when the client address is unknown (no `ConnectInfo` or `PeerAddr`).
pub(crate) fn key_error(status: u16) -> Response<Bytes> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        "application/json",
        serde_json::json!({
            "error": status.canonical_reason().unwrap_or("Error"),
            "message": "The rate limiter could not determine the client address.",
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::super::policy_header::quoted_name;
    use super::*;

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        let state = |name: &str, r, t| draft_values(b"", Some(&quoted_name(name).unwrap()), r, t);
        assert_eq!(state(r#"a"b\c"#, 1, 2), r#""a\"b\\c";r=1;t=2"#);
        assert_eq!(
            state("user:free", 0, 12345678901234),
            r#""user:free";r=0;t=12345678901234"#
        );
        assert_eq!(state("x", u64::MAX, 7), r#""x";r=18446744073709551615;t=7"#);
        assert_eq!(
            quoted_name("caf\u{e9}\u{7f}"),
            None,
            "DEL cannot appear in a header value"
        );
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            101,
            999,
            1000,
            65535,
            999_999_999,
            1_000_000_000,
            u64::MAX,
        ] {
            let mut out = [b'x'; STATE_PARAMS];
            let end = write_digits(&mut out, 3, n);
            assert_eq!(&out[3..end], n.to_string().as_bytes());
            assert_eq!(out[..3], *b"xxx");
        }
        // Values cut from the thread's buffers stay intact across buffers, long ones too.
        let values: Vec<(String, Bytes)> = (0..2000u64)
            .map(|i| {
                let text = format!("\"v{i}\";r={};t={}", i * 7, i % 60);
                let cut = cut(&[text.as_bytes()]);
                (text, cut)
            })
            .collect();
        assert!(values.iter().all(|(text, cut)| text.as_bytes() == cut.as_ref()));
        let big = "b".repeat(CHUNK);
        assert_eq!(cut(&[big.as_bytes(), b"!"]).as_ref(), format!("{big}!").as_bytes());
        let long = format!("endpoint:GET /{}", "a".repeat(300));
        assert_eq!(state(&long, 3, 4), format!("\"{long}\";r=3;t=4").as_str());
        let max = u64::MAX;
        assert_eq!(state("x", max, max), format!("\"x\";r={max};t={max}").as_str());
    }

    #[test]
    fn draft_values_split_into_policy_and_state() {
        let attached = |policy: &[u8], quoted: Option<&[u8]>| {
            let mut headers = HeaderMap::new();
            Attach {
                draft: Some(draft_values(policy, quoted, 4, 60)),
                policy_len: policy.len(),
                legacy: None,
            }
            .apply(&mut headers);
            headers
        };
        let h = attached(br#""ip";q=5;w=60"#, Some(br#""ip""#));
        assert_eq!(h[&RATELIMIT_POLICY], r#""ip";q=5;w=60"#);
        assert_eq!(h[&RATELIMIT], r#""ip";r=4;t=60"#);
        let h = attached(b"", Some(br#""ip""#));
        assert!(!h.contains_key(&RATELIMIT_POLICY));
        assert_eq!(h[&RATELIMIT], r#""ip";r=4;t=60"#);
        let h = attached(br#""ip";q=5;w=60"#, None);
        assert_eq!(h[&RATELIMIT], "invalid");
        assert_eq!(h.len(), 2);
    }
}
