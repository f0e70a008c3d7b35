//! A limiter's distributed setup: whether its policy can be shared through the store, the
//! store form of the policy and the namespace of its keys.

use std::sync::Arc;
use std::time::Duration;

use super::claims::DistKeys;
use super::identifier::Identifier;
use super::node::NodeInner;
use crate::consts::MIN_CLAIM_SPAN;
use crate::intern::intern;
use crate::policy::{Algorithm, Policy, PolicyError};
use crate::store::{Limits, LimitsError};

/// Why a limiter's keys could not be shared through a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SetupError {
    /// The policy cannot be shared through the store: the field, and why.
    Policy(PolicyError),
    /// A live limiter of the node already shares a limit under this name and policy.
    NameInUse(String),
}

/// The claims of a limiter named `name` (interned) with `policy` and at most `max_keys` keys,
/// registered with `node`. Logs the [`sizing_advice`] when the policy breaks the sizing rule.
pub(crate) fn dist_keys<K>(
    node: &Arc<NodeInner>,
    name: &'static str,
    policy: &Policy,
    max_keys: usize,
) -> Result<Arc<DistKeys<K>>, SetupError>
where
    K: std::hash::Hash + Eq + Send + Sync + Clone + Identifier + 'static,
{
    let invalid = |field: &'static str, reason: String| SetupError::Policy(PolicyError { field, reason });
    if policy.get_block_duration().is_some() {
        return Err(invalid("block_duration", "not available in distributed mode".into()));
    }
    let limits = Limits::from_policy(policy, node.timing().lease())
        .map_err(|e| invalid(limits_field(&e, policy), e.to_string()))?;
    if let Some(advice) = sizing_advice(policy, node.timing().interval()) {
        tracing::warn!(limiter = name, "{advice}");
    }
    if policy.get_algorithm() != Algorithm::TokenBucket && policy.duration() < MIN_CLAIM_SPAN {
        return Err(invalid(
            "duration",
            format!(
                "a window must be at least {} ms in distributed mode",
                MIN_CLAIM_SPAN.as_millis()
            ),
        ));
    }
    let rule = policy.compile().map_err(SetupError::Policy)?;
    DistKeys::new(node.clone(), namespace(name, policy), limits, rule, max_keys).map_err(SetupError::NameInUse)
}

/// The store key names the policy too: a changed policy starts from fresh state instead of
/// reading another algorithm's state.
fn namespace(name: &str, policy: &Policy) -> &'static str {
    intern(&format!(
        "{name}/{}/{}/{}/{}",
        policy.get_algorithm().as_str(),
        policy.points(),
        policy.duration().as_millis(),
        policy.capacity()
    ))
}

/// The policy field a store limit's error is about.
fn limits_field(e: &LimitsError, policy: &Policy) -> &'static str {
    match e {
        LimitsError::Capacity(_) | LimitsError::Span if policy.get_algorithm() == Algorithm::TokenBucket => "burst",
        LimitsError::Capacity(_) | LimitsError::Span | LimitsError::Points => "points",
        LimitsError::Window | LimitsError::Lease => "duration",
    }
}

/// The sizing rule of distributed mode: a key can use its whole rate only when its capacity
/// covers what refills during two sync intervals; otherwise the bucket overflows between
/// syncs. Returns the advice when `policy` breaks the rule.
pub fn sizing_advice(policy: &Policy, sync_interval: Duration) -> Option<String> {
    if policy.get_algorithm() != Algorithm::TokenBucket {
        return None;
    }
    let needed = (policy.points() as f64 * 2.0 * sync_interval.as_secs_f64() / policy.duration().as_secs_f64()).ceil();
    ((policy.capacity() as f64) < needed).then(|| {
        format!(
            "capacity {} is below 2 x rate x sync_interval = {needed:.0}: the bucket overflows between syncs and \
             utilization drops; raise burst to at least {needed:.0} or shorten the sync interval",
            policy.capacity()
        )
    })
}
