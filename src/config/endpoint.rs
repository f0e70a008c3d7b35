//! Endpoint policies: a method and a path pattern, and how a request is matched against them.

use crate::Policy;

/// One segment of an endpoint path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Segment {
    Literal(String),
    /// `*`, `{name}` or `:name`: any one segment.
    Any,
    /// `**` (last only): the rest of the path, possibly empty.
    Rest,
}

/// An endpoint policy: a method and a path pattern, limited per client identity.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Endpoint {
    /// `*` or a method name (`POST`).
    pub method: String,
    /// The pattern: `/` separated; a segment `*`, `{name}` or `:name` matches any one segment,
    /// a final `**` the rest of the path. Matched against the raw request path, exactly.
    pub path: String,
    /// The policy.
    pub policy: Policy,
    pub(super) segments: Vec<Segment>,
}

impl Endpoint {
    /// True when a request with this method and path belongs to the endpoint. A `GET`
    /// endpoint includes `HEAD`: servers (axum's `get`, hyper) answer `HEAD` by running the
    /// `GET` handler.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let same = self.method == method || (self.method == "GET" && method == "HEAD");
        if self.method != "*" && !same {
            return false;
        }
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// `METHOD path`, the endpoint's name in headers and bodies.
    pub fn route(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// The segments of a path pattern, or why it is not one.
pub(super) fn parse_pattern(path: &str) -> Result<Vec<Segment>, String> {
    if !path.starts_with('/') {
        return Err(format!("must start with '/' (got {path:?})"));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic() || *c == '"' || *c == '\\') {
        return Err(format!(
            "must be visible ASCII without quotes or backslashes (found {c:?})"
        ));
    }
    let body = &path[1..];
    let raw: Vec<&str> = body.split('/').collect();
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let seg = if *s == "**" {
            if i + 1 != raw.len() {
                return Err("'**' may only be the last segment".into());
            }
            Segment::Rest
        } else if *s == "*"
            || (s.starts_with('{') && s.ends_with('}') && s.len() > 2)
            || (s.starts_with(':') && s.len() > 1)
        {
            Segment::Any
        } else if s.contains('*') || s.contains('{') || s.contains('}') {
            return Err(format!("segment {s:?}: a wildcard must be a whole segment"));
        } else {
            Segment::Literal((*s).to_owned())
        };
        out.push(seg);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn patterns_match() {
        let c = Config::from_json(
            r#"{"tiers": {"free": {"points": 1, "duration": 1}}, "endpoints": [
                {"method": "POST", "path": "/api/ai/generate", "policy": {"points": 1, "duration": 1}},
                {"path": "/items/{id}/edit", "policy": {"points": 1, "duration": 1}},
                {"method": "GET", "path": "/files/**", "policy": {"points": 1, "duration": 1}}
            ]}"#,
        )
        .unwrap();
        let e = &c.endpoints;
        assert!(e[0].matches("POST", "/api/ai/generate"));
        assert!(!e[0].matches("GET", "/api/ai/generate"));
        assert!(!e[0].matches("HEAD", "/api/ai/generate"));
        assert!(e[2].matches("HEAD", "/files/a"), "a GET endpoint includes HEAD");
        assert!(!e[0].matches("POST", "/api/ai/generate/"));
        assert!(!e[0].matches("POST", "/api/ai"));
        assert!(e[1].matches("PUT", "/items/42/edit"));
        assert!(!e[1].matches("PUT", "/items/42"));
        assert!(e[2].matches("GET", "/files/a/b/c"));
        assert!(e[2].matches("GET", "/files/"));
        assert!(!e[2].matches("GET", "/filesx"));
    }
}
