//! The text of the policies in headers: the `RateLimit-Policy` value of every combination of
//! limits a request can be counted against, and each limit's name as a structured-field
//! string, the start of its `RateLimit` value (draft-ietf-httpapi-ratelimit-headers-10). Built
//! once per [`Rules`], beside them in the layer's snapshot.

use ::http::HeaderValue;

use crate::config::{Limit, Rules};
use crate::Policy;

/// The header text of one set of rules.
pub(crate) struct PolicyHeaders {
    /// The rules have an ip layer.
    has_ip: bool,
    /// The number of endpoint limits + 1.
    stride: usize,
    /// `RateLimit-Policy` at [`policy_index`].
    values: Vec<Option<HeaderValue>>,
    /// At each limit's [`Limit::index`]: its name as a structured-field string, when valid in
    /// a header value.
    quoted: Vec<Option<Box<[u8]>>>,
}

/// Where the `RateLimit-Policy` value of a request is: by the user layer limit's index (0:
/// none), endpoint (index + 1, or 0) and whether the ip layer counted it.
fn policy_index(stride: usize, with_ip: bool, tier: Option<&Limit>, endpoint: usize) -> usize {
    (tier.map_or(0, |l| l.index) * stride + endpoint) * 2 + usize::from(with_ip)
}

impl PolicyHeaders {
    /// The text of `rules`.
    pub(super) fn new(rules: &Rules) -> Self {
        let limits = || rules.ip.iter().chain(rules.tiers.values()).chain(&rules.endpoints);
        let count = limits().map(|l| l.index + 1).max().unwrap_or(0);
        let mut items = vec![String::new(); count];
        let mut quoted = vec![None; count];
        for l in limits() {
            items[l.index] = policy_item(l.name(), l.limiter.policy());
            quoted[l.index] = quoted_name(l.name());
        }
        let stride = rules.endpoints.len() + 1;
        let mut values = vec![None; (rules.tiers.len() + 1) * stride * 2];
        let tier_options = std::iter::once(None).chain(rules.tiers.values().map(Some));
        for tier in tier_options {
            for e in 0..stride {
                for with_ip in [false, true] {
                    let listed: Vec<&str> = rules
                        .ip
                        .iter()
                        .filter(|_| with_ip)
                        .chain(tier)
                        .chain(e.checked_sub(1).map(|i| &rules.endpoints[i]))
                        .map(|l| items[l.index].as_str())
                        .collect();
                    values[policy_index(stride, with_ip, tier, e)] = HeaderValue::from_str(&listed.join(", ")).ok();
                }
            }
        }
        PolicyHeaders {
            has_ip: rules.ip.is_some(),
            stride,
            values,
            quoted,
        }
    }

    /// The `RateLimit-Policy` value of a request checked against the ip layer (when
    /// `with_ip`), the user layer limit `tier` and the endpoint `endpoint` of the rules.
    pub(crate) fn value(&self, with_ip: bool, tier: Option<&Limit>, endpoint: Option<usize>) -> Option<&HeaderValue> {
        let i = policy_index(self.stride, with_ip && self.has_ip, tier, endpoint.map_or(0, |i| i + 1));
        self.values.get(i)?.as_ref()
    }

    /// The name of `limit` as a structured-field string, when it is valid in a header value.
    pub(crate) fn quoted(&self, limit: &Limit) -> Option<&[u8]> {
        self.quoted.get(limit.index)?.as_deref()
    }
}

/// `s` as a structured-field string.
fn sf_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    push_sf_string(&mut out, s);
    // Escaping ASCII bytes in a `&str` keeps it UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// `"name";q=..;w=..`, an item of `RateLimit-Policy`: the points per window, the window in
/// whole seconds (rounded up, at least 1).
fn policy_item(name: &str, p: &Policy) -> String {
    let secs = p.duration().as_secs_f64().ceil().max(1.0) as u64;
    format!("{};q={};w={}", sf_string(name), p.points(), secs)
}

/// `name` as a structured-field string, when its bytes may appear in a header value.
pub(super) fn quoted_name(name: &str) -> Option<Box<[u8]>> {
    let mut out = Vec::with_capacity(name.len() + 2);
    push_sf_string(&mut out, name);
    HeaderValue::from_bytes(&out).ok()?;
    Some(out.into_boxed_slice())
}

/// Appends `s` as a structured-field string: quoted, with `"` and `\\` escaped.
fn push_sf_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for b in s.bytes() {
        if matches!(b, b'"' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LiveConfig};

    fn policy_of(text: &PolicyHeaders, rules: &Rules, tier: &str) -> String {
        let value = text.value(true, rules.tiers.get(tier), None).expect("a policy value");
        value.to_str().unwrap().to_owned()
    }

    #[test]
    fn the_text_follows_the_rules_it_was_built_from() {
        let live = LiveConfig::new(
            Config::from_json(
                r#"{"tiers": {"free": {"points": 5, "duration": 60}}, "layers": {"ip": {"points": 9, "duration": 1}}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let old = live.rules();
        let text = PolicyHeaders::new(&old);
        assert_eq!(policy_of(&text, &old, "free"), r#""ip";q=9;w=1, "user:free";q=5;w=60"#);
        let quoted = text.quoted(old.tiers.get("free").unwrap()).map(<[u8]>::to_vec);
        assert_eq!(quoted.as_deref(), Some(&br#""user:free""#[..]));

        live.replace_json(r#"{"tiers": {"free": {"points": 7, "duration": 0.5}}}"#)
            .unwrap();
        let new = live.rules();
        assert_eq!(
            policy_of(&PolicyHeaders::new(&new), &new, "free"),
            r#""user:free";q=7;w=1"#
        );
        // The old text stays the old rules' (a request that began before the reload).
        assert_eq!(policy_of(&text, &old, "free"), r#""ip";q=9;w=1, "user:free";q=5;w=60"#);
    }
}
