//! The due-work index as pure decisions: for an account at an instant, the next instant at
//! which `enforce_suspensions` and `release_resources` have something to do for it without
//! new input (`send_alerts`' is `alerts::next_due`). `now` itself when something is due
//! already; `None` when nothing will be until an input changes (a payment, an accepted
//! notice, an operator action, a new bill), which then marks the account due again.

use chrono::{DateTime, Duration, Utc};

use crate::domain::lifecycle::{
    evaluate, grace_deadline, release_due_at, AcceptedWarning, AccountFacts, BillingMode, Reason,
    ResourceFacts, ResourceState,
};
use crate::domain::policy::{Policy, SuspendScope};

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `enforce_suspensions`: now when an evaluation would change something; else the earliest
/// grace deadline of the open episode, prepaid term end (sa freezes prepaid resources at
/// their term end once grace is over) or package expiry still to come.
pub fn enforce_due(
    account: &AccountFacts,
    resources: &[(ResourceFacts, &Policy)],
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if !evaluate(account, resources, now).is_empty() {
        return Some(now);
    }
    let future = |t: Option<DateTime<Utc>>| t.filter(|t| *t > now);
    let mut next = None;
    let owing = account.in_arrears() && account.episode.is_some() && !account.compliance_locked;
    for (r, p) in resources.iter().filter(|(r, _)| r.is_live()) {
        if owing && r.state != ResourceState::Suspended(Reason::Arrears) {
            next = earliest(next, future(grace_deadline(account, p)));
            if p.suspend_scope == SuspendScope::PayPerUseOnly
                && r.billing_mode == BillingMode::Prepaid
            {
                next = earliest(next, future(r.term_ends_at));
            }
        }
        if r.billing_mode == BillingMode::Package {
            next = earliest(next, future(r.package_expires_at));
        }
    }
    next
}

/// `release_resources`: the earliest `release_due_at` of the account's resources.
pub fn release_due(
    account: &AccountFacts,
    resources: &[(ResourceFacts, &Policy, &[AcceptedWarning])],
    warning_min_age: Duration,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    resources
        .iter()
        .filter_map(|(r, p, w)| release_due_at(account, r, p, w, warning_min_age, now))
        .min()
}
