//! `check`: a tiers file validated without serving it, and a description of the limits it puts
//! in force, per tier, layer and endpoint (what `nginx -t` does for nginx).

use std::fmt;

use super::{Config, ConfigError, IpScope, Rules};
use crate::{ManualClock, Policy, PolicySpec};

/// The limits a valid tiers file puts in force: what [`check`] returns. Its `Display` is the
/// description, one limit a line.
#[derive(Clone, Debug)]
pub struct Report {
    config: Config,
}

impl Report {
    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// True when the ip layer counts requests of `tier`.
    fn ip_counts(&self, tier: &str) -> bool {
        let c = &self.config;
        c.layers.ip.is_some()
            && match &c.layers.ip_applies_to {
                IpScope::All => true,
                IpScope::Tiers(names) => !c.layers.user || names.contains(tier),
            }
    }

    /// The line of one tier: its roles and the limits of its requests.
    fn tier_line(&self, f: &mut fmt::Formatter<'_>, name: &str, p: &Policy) -> fmt::Result {
        let c = &self.config;
        let mut roles = Vec::new();
        if *name == c.anonymous_tier {
            roles.push("requests without an identity");
        }
        if *name == c.default_tier {
            roles.push("identified requests without a known tier");
        }
        write!(f, "  {name}")?;
        if !roles.is_empty() {
            write!(f, " ({})", roles.join("; "))?;
        }
        f.write_str(":")?;
        let mut sep = " ";
        if let (Some(ip), true) = (&c.layers.ip, self.ip_counts(name)) {
            f.write_str(sep)?;
            policy(f, "ip", ip, "client address")?;
            sep = "; ";
        }
        if c.layers.user {
            f.write_str(sep)?;
            policy(f, "user", p, "identity")?;
            sep = "; ";
        }
        if sep == " " {
            f.write_str(" no limit")?;
        }
        writeln!(f)
    }

    /// The endpoint lines: one per endpoint, or that the layer is off.
    fn endpoint_lines(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        if c.layers.endpoint && !c.endpoints.is_empty() {
            writeln!(f, "and per endpoint (the first that matches):")?;
            for e in &c.endpoints {
                write!(f, "  {}", e.route())?;
                if e.method == "GET" {
                    f.write_str(" (and HEAD)")?;
                }
                f.write_str(": ")?;
                policy(f, "endpoint", &e.policy, "identity")?;
                writeln!(f)?;
            }
        } else if !c.endpoints.is_empty() {
            writeln!(
                f,
                "endpoint layer off: {} endpoints listed, not limited",
                c.endpoints.len()
            )?;
        }
        Ok(())
    }
}

/// Validates a tiers file's text: every problem as `path: reason` lines (the error's
/// `Display`), or a [`Report`] of the limits per tier, layer and endpoint. The limiters are
/// built too (in local mode, on a clock of their own), so a file that passes is one a server
/// accepts.
///
/// ```
/// use tollgate::config::check;
///
/// let report = check(r#"{"anonymous": {"points": 20, "duration": 60},
///                        "free": {"points": 100, "duration": 60}}"#).unwrap();
/// let text = report.to_string();
/// assert!(text.contains("  free (identified requests without a known tier): user 100 per 60 s"), "{text}");
///
/// let problems = check(r#"{"tiers": {"free": {"points": 0, "duration": 60}}, "shadw": true}"#)
///     .unwrap_err();
/// assert_eq!(problems.to_string(), "shadw: unknown field `shadw`, expected one of `tiers`, \
///     `default_tier`, `anonymous_tier`, `layers`, `endpoints`, `client_ip`, `api_key`, `allow`, \
///     `deny`, `block_duration`, `shadow`, `response`, `failure_policy`, `redis`, `max_keys`");
/// ```
pub fn check(text: &str) -> Result<Report, ConfigError> {
    let config = Config::from_json(text)?;
    let settings = super::rules::BuildSettings {
        clock: Some(ManualClock::new().clock()),
        node: None,
    };
    let rules = Rules::build(config, &settings, None)?;
    Ok(Report {
        config: rules.config.clone(),
    })
}

fn policy(f: &mut fmt::Formatter<'_>, layer: &str, p: &Policy, per: &str) -> fmt::Result {
    write!(f, "{layer} {p}")?;
    if let Some(b) = PolicySpec::from(p.clone()).block_duration {
        write!(f, ", blocked {b} s after a refusal")?;
    }
    write!(f, " per {per}")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "valid: {} tiers, {} endpoints{}",
            c.tiers.len(),
            c.endpoints.len(),
            if c.shadow {
                "; shadow mode: nothing is refused"
            } else {
                ""
            }
        )?;
        writeln!(f, "limits per request, by tier (every layer must admit it):")?;
        for (name, p) in &c.tiers {
            self.tier_line(f, name, p)?;
        }
        if !c.layers.user {
            if let Some(ip) = &c.layers.ip {
                write!(f, "  every request: ")?;
                policy(f, "ip", ip, "client address")?;
                writeln!(f)?;
            }
        }
        self.endpoint_lines(f)?;
        match &c.api_key {
            Some(a) => writeln!(
                f,
                "API keys: header {}, an identity only when the application's validator accepts the key",
                a.header
            )?,
            None => writeln!(f, "API keys: none (identities come from the application)")?,
        }
        if !c.allow.is_empty() || !c.deny.is_empty() {
            writeln!(
                f,
                "allow list: {} address ranges, {} users; deny list (403): {} address ranges, {} users",
                c.allow.ips.len(),
                c.allow.users.len(),
                c.deny.ips.len(),
                c.deny.users.len()
            )?;
        }
        write!(f, "each limiter tracks at most {} keys", c.max_keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_every_limit_per_tier_layer_and_endpoint() {
        let text = check(include_str!("../../rate-limit-tiers.json")).unwrap().to_string();
        let want = [
            "valid: 4 tiers, 3 endpoints",
            "  anonymous (requests without an identity): ip 1000 per 60 s (token_bucket) per client address; \
             user 20 per 60 s (token_bucket) per identity",
            "  enterprise: user 10000 per 60 s (token_bucket) per identity",
            "  free (identified requests without a known tier): ip 1000 per 60 s (token_bucket) per client \
             address; user 100 per 60 s (token_bucket) per identity",
            "  POST /api/ai/generate: endpoint 10 per 3600 s (token_bucket) per identity",
            "  GET /api/export/large (and HEAD): endpoint 20 per 3600 s (token_bucket) per identity",
            "API keys: header x-api-key, an identity only when the application's validator accepts the key",
        ];
        for line in want {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn every_problem_is_a_line() {
        let err = check(r#"{"tiers": {"free": {"points": 0, "duration": 60}, "pro": {"points": 1}}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tiers.free.points: must be > 0 (got 0)\ntiers.pro.duration: missing (the period, in seconds)"
        );
    }
}
