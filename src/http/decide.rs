//! The decision on a plan, and what it adds to the response or answers instead.

use ::http::StatusCode;

use super::future::Finish;
use super::grpc::Refused;
use super::headers::{self, Attach};
use super::plan::{Plan, Refusal};
use super::shared::{bump, Shared, Snapshot};
use super::ShadowVerdict;
use crate::config::{Config, HeaderStyle, Limit, PolicyHeader};
use crate::{check_all_async, Decision};

/// A decision carried out: the request goes through, with what to add to its response, or is
/// refused (boxed: rare, and large).
pub(super) enum Action {
    Pass(Finish),
    Refuse(Box<Refusal>),
}

impl Shared {
    /// The decision in local mode: made now.
    pub(super) fn decide(&self, snap: &Snapshot, plan: &Plan<'_>) -> Action {
        let d = if plan.len() == 1 {
            // One layer (the common anonymous case): bound alone, nothing else to set up.
            crate::limiter::check_layers(1, &[&plan.first_bound()])
        } else {
            let bound = plan.bound();
            crate::limiter::check_layers(1, &[&bound[0], &bound[1], &bound[2]][..plan.len()])
        };
        self.act(snap, plan, d.expect("a cost of 1 always fits a valid policy"))
    }

    /// The decision in distributed mode: it may wait for a claim.
    pub(super) async fn decide_async(&self, snap: &Snapshot, plan: &Plan<'_>) -> Action {
        let bound = plan.bound();
        let dyns: [&(dyn crate::layers::Layer + Sync); 3] = [&bound[0], &bound[1], &bound[2]];
        let d = check_all_async(1, &dyns[..plan.len()]).await;
        self.act(snap, plan, d.expect("a cost of 1 always fits a valid policy"))
    }

    fn act(&self, snap: &Snapshot, plan: &Plan<'_>, d: Decision) -> Action {
        let config = snap.rules.config();
        if d.is_allowed() && config.response.headers == HeaderStyle::None {
            return Action::Pass(Finish::default());
        }
        let applied = plan.limits();
        let text = &snap.text;
        let policy = match config.response.policy_header {
            PolicyHeader::Denials if d.is_allowed() => None,
            _ => text.value(plan.has_ip(), plan.tier(), plan.endpoint()),
        };
        let attach = Attach::new(config.response.headers, policy, text, applied, &d);
        if d.is_allowed() {
            return Action::Pass(Finish::new(attach, None));
        }
        self.refuse(config, applied, &d, attach)
    }

    /// A refusal by a limit of `applied`: a 429, or in shadow mode the request goes through
    /// with its verdict.
    #[cold]
    #[inline(never)]
    fn refuse(&self, config: &Config, applied: &[&Limit], d: &Decision, attach: Attach) -> Action {
        let layer = applied.iter().find(|l| l.name() == d.policy()).map_or("", |l| l.layer);
        if config.shadow {
            bump(&self.counters.shadow_denied);
            #[cfg(feature = "metrics")]
            crate::metrics::shadow_would_block();
            return Action::Pass(Finish::new(
                attach,
                Some(ShadowVerdict {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    layer,
                    policy: d.policy(),
                    retry_after: d.retry_after(),
                }),
            ));
        }
        bump(&self.counters.denied);
        Action::Refuse(Box::new(Refusal {
            http: headers::too_many_requests(config.response.body, layer, d, attach),
            why: Refused::Limit {
                policy: d.policy(),
                retry_after: d.retry_after(),
            },
        }))
    }
}
