//! Policies: what is limited, and the one place where limits are validated.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::algorithm::Rule;
use crate::consts::{MAX_CAPACITY, MAX_DURATION, MAX_RATE_PER_SEC, MAX_TIME_NS, MIN_DURATION};

/// How a policy counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// A token bucket in GCRA form: `points` tokens per `duration`, refilled continuously, holding
    /// at most `burst` (default `points`). Smooth, and the default.
    #[default]
    TokenBucket,
    /// `points` per window, with the previous window's count weighted by how much of it the
    /// sliding interval still covers.
    SlidingWindow,
    /// `points` per aligned window; the count resets at each window boundary.
    FixedWindow,
}

impl Algorithm {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
        }
    }
}

/// A rate limit: `points` per `duration`, counted by an [`Algorithm`].
///
/// Built in code or read from the configuration vocabulary
/// (`{"points": 100, "duration": 60}`, `duration` in seconds). Nothing is checked until
/// [`Policy::validate`] (which the limiter builder calls), so every error is reported in one place
/// with the field it concerns.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Algorithm, Policy};
///
/// let p = Policy::per_minute(100).burst(20).block_duration(Duration::from_secs(60));
/// assert!(p.validate().is_ok());
///
/// let p: Policy = serde_json::from_str(r#"{"points": 100, "duration": 60}"#).unwrap();
/// assert_eq!(p, Policy::per_minute(100));
///
/// let err = serde_json::from_str::<Policy>(r#"{"points": -5, "duration": 60}"#).unwrap_err();
/// assert!(err.to_string().contains("points: must be > 0"), "{err}");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicySpec", into = "PolicySpec")]
pub struct Policy {
    algorithm: Algorithm,
    points: u64,
    duration: Duration,
    burst: Option<u64>,
    block_duration: Option<Duration>,
}

impl Policy {
    /// `points` per `duration`, token bucket.
    pub fn new(points: u64, duration: Duration) -> Self {
        Policy {
            algorithm: Algorithm::TokenBucket,
            points,
            duration,
            burst: None,
            block_duration: None,
        }
    }

    /// `points` per second.
    pub fn per_second(points: u64) -> Self {
        Self::new(points, Duration::from_secs(1))
    }

    /// `points` per minute.
    pub fn per_minute(points: u64) -> Self {
        Self::new(points, Duration::from_secs(60))
    }

    /// `points` per hour.
    pub fn per_hour(points: u64) -> Self {
        Self::new(points, Duration::from_secs(3600))
    }

    /// Chooses the algorithm.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Token bucket only: the most tokens the bucket holds (default `points`). The rate stays
    /// `points / duration`.
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// After a denial, deny the key for this long (rounded up to the end of a window for the
    /// window algorithms), then let it refill from empty.
    pub fn block_duration(mut self, block: Duration) -> Self {
        self.block_duration = Some(block);
        self
    }

    /// The algorithm.
    pub fn get_algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The block duration, if any.
    pub fn get_block_duration(&self) -> Option<Duration> {
        self.block_duration
    }

    /// Points per duration.
    pub fn points(&self) -> u64 {
        self.points
    }

    /// The duration `points` refer to (the window length for window algorithms).
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The most a key can spend at once: `burst` for a token bucket, else `points`.
    pub fn capacity(&self) -> u64 {
        self.burst.unwrap_or(self.points)
    }

    /// Checks every field and returns the first problem, naming the field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.compile().map(|_| ())
    }

    pub(crate) fn compile(&self) -> Result<Rule, PolicyError> {
        self.check_points()?;
        let duration_ns = self.check_duration()?;
        let block_ns = self.check_block_duration()?;
        match self.algorithm {
            Algorithm::TokenBucket => self.token_bucket_rule(duration_ns, block_ns),
            Algorithm::FixedWindow | Algorithm::SlidingWindow => self.window_rule(duration_ns, block_ns),
        }
    }

    /// `points`, on its own: above 0 and at most [`MAX_CAPACITY`].
    fn check_points(&self) -> Result<(), PolicyError> {
        if self.points == 0 {
            return invalid("points", "must be > 0".into());
        }
        if self.points > MAX_CAPACITY {
            return invalid("points", format!("must be <= {MAX_CAPACITY} (got {})", self.points));
        }
        Ok(())
    }

    /// `duration`, between [`MIN_DURATION`] and [`MAX_DURATION`]; returns it in nanoseconds.
    fn check_duration(&self) -> Result<u64, PolicyError> {
        if self.duration < MIN_DURATION {
            return invalid(
                "duration",
                format!(
                    "must be >= {} s (got {} s)",
                    MIN_DURATION.as_secs_f64(),
                    self.duration.as_secs_f64()
                ),
            );
        }
        if self.duration > MAX_DURATION {
            return invalid(
                "duration",
                format!(
                    "must be <= {} s (one year; got {} s)",
                    MAX_DURATION.as_secs(),
                    self.duration.as_secs_f64()
                ),
            );
        }
        Ok(self.duration.as_nanos() as u64)
    }

    /// `block_duration`, if set: above 0 and at most [`MAX_DURATION`]; returns it in
    /// nanoseconds (0 when not set).
    fn check_block_duration(&self) -> Result<u64, PolicyError> {
        if let Some(block) = self.block_duration {
            if block.is_zero() || block > MAX_DURATION {
                return invalid(
                    "block_duration",
                    format!(
                        "must be > 0 and <= {} s (got {} s)",
                        MAX_DURATION.as_secs(),
                        block.as_secs_f64()
                    ),
                );
            }
        }
        Ok(self.block_duration.map_or(0, |b| b.as_nanos() as u64))
    }

    /// The token bucket's rule: its rate, its burst, and the time to refill the burst.
    fn token_bucket_rule(&self, duration_ns: u64, block_ns: u64) -> Result<Rule, PolicyError> {
        let rate_per_sec = self.points as u128 * 1_000_000_000 / duration_ns as u128;
        if rate_per_sec > MAX_RATE_PER_SEC as u128 {
            return invalid(
                "points",
                format!("rate must be <= {MAX_RATE_PER_SEC} per second (got {rate_per_sec})"),
            );
        }
        let burst = self.burst.unwrap_or(self.points);
        if burst == 0 {
            return invalid("burst", "must be > 0".into());
        }
        if burst > MAX_CAPACITY {
            return invalid("burst", format!("must be <= {MAX_CAPACITY} (got {burst})"));
        }
        let rule = Rule::token_bucket(burst, duration_ns, self.points, block_ns);
        if rule.aux > MAX_TIME_NS {
            return invalid(
                "burst",
                format!(
                    "refilling {burst} tokens at {} per {} s takes over 2^62 ns",
                    self.points,
                    self.duration.as_secs_f64()
                ),
            );
        }
        Ok(rule)
    }

    /// A window algorithm's rule: no burst, and `points` within what a key's state word holds.
    fn window_rule(&self, duration_ns: u64, block_ns: u64) -> Result<Rule, PolicyError> {
        if self.burst.is_some() {
            return invalid(
                "burst",
                format!(
                    "only token_bucket has a burst; {} allows `points` per window",
                    self.algorithm.as_str()
                ),
            );
        }
        let rule = if self.algorithm == Algorithm::FixedWindow {
            Rule::fixed_window(self.points, duration_ns, block_ns)
        } else {
            Rule::sliding_window(self.points, duration_ns, block_ns)
        };
        let max = rule.max_window_capacity();
        if self.points > max {
            return invalid(
                "points",
                format!(
                    "must be <= {max} for a {} of {} s (the state of a key is one 64-bit word)",
                    self.algorithm.as_str(),
                    self.duration.as_secs_f64()
                ),
            );
        }
        Ok(rule)
    }
}

/// The error for `field`, rejected for `reason`.
fn invalid<T>(field: &'static str, reason: String) -> Result<T, PolicyError> {
    Err(PolicyError { field, reason })
}

/// A policy field that is out of range, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The field (`points`, `duration`, `burst`, `block_duration`, `algorithm`).
    pub field: &'static str,
    /// Why it was rejected.
    pub reason: String,
}

impl PolicyError {
    /// The same error with its field placed under a path, e.g. `tiers.free`.
    pub fn at(&self, path: &str) -> String {
        if path.is_empty() {
            self.to_string()
        } else {
            format!("{path}.{self}")
        }
    }
}

/// The serialized form of a [`Policy`]: numbers as JSON has them, checked on conversion.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// `token_bucket` (default), `sliding_window` or `fixed_window`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// How many per `duration`; a whole number.
    pub points: f64,
    /// Seconds.
    pub duration: f64,
    /// Token bucket only; a whole number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<f64>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_duration: Option<f64>,
}

fn whole(field: &'static str, v: f64) -> Result<u64, PolicyError> {
    let e = |reason: String| PolicyError { field, reason };
    if !v.is_finite() {
        return Err(e(format!("must be a finite number (got {v})")));
    }
    if v <= 0.0 {
        return Err(e(format!("must be > 0 (got {v})")));
    }
    if v.fract() != 0.0 {
        return Err(e(format!("must be a whole number (got {v})")));
    }
    if v > MAX_CAPACITY as f64 {
        return Err(e(format!("must be <= {MAX_CAPACITY} (got {v})")));
    }
    Ok(v as u64)
}

fn seconds(field: &'static str, v: f64) -> Result<Duration, PolicyError> {
    let e = |reason: String| PolicyError { field, reason };
    if !v.is_finite() {
        return Err(e(format!("must be a finite number of seconds (got {v})")));
    }
    if v <= 0.0 {
        return Err(e(format!("must be > 0 (got {v})")));
    }
    if v > MAX_DURATION.as_secs_f64() {
        return Err(e(format!(
            "must be <= {} s (one year; got {v})",
            MAX_DURATION.as_secs()
        )));
    }
    let d = Duration::from_secs_f64(v);
    if d < MIN_DURATION {
        return Err(e(format!("must be >= {} s (got {v})", MIN_DURATION.as_secs_f64())));
    }
    Ok(d)
}

impl TryFrom<PolicySpec> for Policy {
    type Error = PolicyError;
    fn try_from(s: PolicySpec) -> Result<Self, PolicyError> {
        let p = Policy {
            algorithm: s.algorithm,
            points: whole("points", s.points)?,
            duration: seconds("duration", s.duration)?,
            burst: s.burst.map(|b| whole("burst", b)).transpose()?,
            block_duration: s.block_duration.map(|b| seconds("block_duration", b)).transpose()?,
        };
        p.validate()?;
        Ok(p)
    }
}

impl From<Policy> for PolicySpec {
    fn from(p: Policy) -> Self {
        PolicySpec {
            algorithm: p.algorithm,
            points: p.points as f64,
            duration: p.duration.as_secs_f64(),
            burst: p.burst.map(|b| b as f64),
            block_duration: p.block_duration.map(|b| b.as_secs_f64()),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} per {} s ({})",
            self.points,
            self.duration.as_secs_f64(),
            self.algorithm.as_str()
        )?;
        if let Some(b) = self.burst {
            write!(f, ", burst {b}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Policy, String> {
        serde_json::from_str::<Policy>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn every_invalid_field_is_named() {
        let cases = [
            (r#"{"points": 0, "duration": 60}"#, "points: must be > 0"),
            (r#"{"points": -5, "duration": 60}"#, "points: must be > 0"),
            (r#"{"points": 1.5, "duration": 60}"#, "points: must be a whole number"),
            (r#"{"points": 1e30, "duration": 60}"#, "points: must be <="),
            (r#"{"points": 10, "duration": 0}"#, "duration: must be > 0"),
            (r#"{"points": 10, "duration": -1}"#, "duration: must be > 0"),
            (r#"{"points": 10, "duration": 5e-324}"#, "duration: must be >= 0.001 s"),
            (r#"{"points": 10, "duration": 1e12}"#, "duration: must be <="),
            (r#"{"points": 10, "duration": 60, "burst": 0}"#, "burst: must be > 0"),
            (
                r#"{"points": 10, "duration": 60, "block_duration": 0}"#,
                "block_duration: must be > 0",
            ),
            (
                r#"{"points": 10, "duration": 60, "algorithm": "fixed_window", "burst": 5}"#,
                "burst: only token_bucket",
            ),
            (
                r#"{"points": 4000000000, "duration": 1, "algorithm": "sliding_window"}"#,
                "points: must be <=",
            ),
            (
                r#"{"points": 4000000000, "duration": 0.001}"#,
                "points: rate must be <=",
            ),
        ];
        for (json, want) in cases {
            let got = parse(json).expect_err(json);
            assert!(got.contains(want), "{json}: got {got:?}, want {want:?}");
        }
        assert!(parse(r#"{"points": 10, "duration": 60, "pionts": 3}"#)
            .unwrap_err()
            .contains("unknown field"));
        assert!(parse(r#"{"points": 10, "duration": 60, "algorithm": "leaky"}"#)
            .unwrap_err()
            .contains("unknown variant"));
    }

    #[test]
    fn builder_values_are_validated_in_the_same_place() {
        assert_eq!(Policy::per_second(0).validate().unwrap_err().field, "points");
        assert_eq!(
            Policy::new(1, Duration::from_nanos(10)).validate().unwrap_err().field,
            "duration"
        );
        assert_eq!(
            Policy::per_second(5).burst(u64::MAX).validate().unwrap_err().field,
            "burst"
        );
        assert_eq!(
            Policy::per_second(5)
                .block_duration(Duration::ZERO)
                .validate()
                .unwrap_err()
                .field,
            "block_duration"
        );
        assert_eq!(
            PolicyError {
                field: "points",
                reason: "must be > 0".into()
            }
            .at("tiers.free"),
            "tiers.free.points: must be > 0"
        );
    }

    #[test]
    fn seed_vocabulary_round_trips() {
        for json in [
            r#"{"points":20,"duration":60}"#,
            r#"{"algorithm":"sliding_window","points":1000,"duration":60}"#,
            r#"{"algorithm":"token_bucket","points":10,"duration":3600,"burst":2,"block_duration":30.5}"#,
        ] {
            let p = parse(json).unwrap();
            let back = serde_json::to_string(&p).unwrap();
            assert_eq!(parse(&back).unwrap(), p, "{json} -> {back}");
        }
    }
}
