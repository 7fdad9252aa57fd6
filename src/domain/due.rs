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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EXAMPLE_CONFIG};
    use crate::domain::lifecycle::{AccountState, EpisodeFacts, SuspensionFacts};
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
    }

    fn policies() -> (Policy, Policy) {
        let c = Config::from_toml(EXAMPLE_CONFIG, "test", &[]).unwrap();
        (
            c.products["lcic"].policy.clone(),
            c.products["sa"].policy.clone(),
        )
    }

    fn debtor(accepted: Option<DateTime<Utc>>) -> AccountFacts {
        AccountFacts {
            cash_balance: -100,
            credit_quota: 0,
            state: AccountState::InArrears,
            arrears_since: Some(t0()),
            episode: Some(EpisodeFacts {
                no: 1,
                opened_at: t0(),
                first_overdue_alert_at: accepted,
                suspended_at: None,
            }),
            episodes: 1,
            compliance_locked: false,
            legal_hold: false,
        }
    }

    fn res(mode: BillingMode) -> ResourceFacts {
        ResourceFacts {
            id: "r".into(),
            billing_mode: mode,
            state: ResourceState::Active,
            package_quota: (mode == BillingMode::Package).then_some(1000),
            package_used: 0,
            package_expires_at: (mode == BillingMode::Package).then(|| t0() + Duration::days(40)),
            payg_enabled: false,
            term_ends_at: (mode == BillingMode::Prepaid).then(|| t0() + Duration::days(20)),
            suspended_at: None,
            suspension: None,
        }
    }

    #[test]
    fn enforcement_is_due_at_the_deadline_the_expiry_or_now() {
        let (lcic, sa) = policies();
        let now = t0() + Duration::hours(2);
        let cases: Vec<(
            &str,
            AccountFacts,
            ResourceFacts,
            &Policy,
            Option<DateTime<Utc>>,
        )> = vec![
            (
                "lcic without an accepted alert: no clock",
                debtor(None),
                res(BillingMode::PayPerUse),
                &lcic,
                None,
            ),
            (
                "lcic: 24 h from the accepted alert",
                debtor(Some(t0() + Duration::hours(1))),
                res(BillingMode::PayPerUse),
                &lcic,
                Some(t0() + Duration::hours(25)),
            ),
            (
                "sa: 15 days from the start",
                debtor(None),
                res(BillingMode::PayPerUse),
                &sa,
                Some(t0() + Duration::days(15)),
            ),
            (
                "sa prepaid: its term end comes first",
                debtor(None),
                res(BillingMode::Prepaid),
                &sa,
                Some(t0() + Duration::days(15)),
            ),
            (
                "a package: its expiry, arrears or not",
                AccountFacts {
                    cash_balance: 10,
                    episode: None,
                    state: AccountState::Good,
                    ..debtor(None)
                },
                res(BillingMode::Package),
                &lcic,
                Some(t0() + Duration::days(40)),
            ),
            (
                "grace over: due now",
                debtor(Some(t0() - Duration::days(2))),
                res(BillingMode::PayPerUse),
                &lcic,
                Some(now),
            ),
            (
                "in arrears without an episode: one opens now",
                AccountFacts {
                    episode: None,
                    ..debtor(None)
                },
                res(BillingMode::PayPerUse),
                &lcic,
                Some(now),
            ),
        ];
        for (name, a, r, p, want) in cases {
            assert_eq!(enforce_due(&a, &[(r, p)], now), want, "{name}");
        }
    }

    #[test]
    fn release_is_due_when_it_can_pass_or_once_to_say_why_it_cannot() {
        let (lcic, _) = policies();
        let susp_at = t0();
        let release_at = t0() + Duration::days(60);
        let r = ResourceFacts {
            state: ResourceState::Suspended(Reason::Arrears),
            suspended_at: Some(susp_at),
            suspension: Some(SuspensionFacts {
                no: 4,
                reason: Reason::Arrears,
                episode: Some(1),
                started_at: susp_at,
                release_at: Some(release_at),
            }),
            ..res(BillingMode::PayPerUse)
        };
        let w = |lead: i64, at: DateTime<Utc>, no: i32| AcceptedWarning {
            suspension: no,
            lead_seconds: lead * 86_400,
            release_at: Some(release_at),
            accepted_at: at,
        };
        let day = Duration::hours(24);
        let both = vec![
            w(7, release_at - Duration::days(7), 4),
            w(1, release_at - Duration::hours(20), 4),
        ];
        let a = debtor(Some(t0()));
        let due = |a: &AccountFacts, ws: &[AcceptedWarning], now| {
            release_due(a, &[(r.clone(), &lcic, ws)], day, now)
        };
        // Both accepted, the last 20 h before release: due a day after it.
        assert_eq!(due(&a, &both, t0()), Some(release_at + Duration::hours(4)));
        assert_eq!(
            due(&a, &both, release_at + Duration::hours(5)),
            Some(release_at + Duration::hours(5))
        );
        // A warning missing, or another suspension's: once at the release instant, then never.
        let other = vec![
            w(7, release_at - Duration::days(7), 3),
            w(1, release_at - Duration::days(1), 3),
        ];
        assert_eq!(due(&a, &other, t0()), Some(release_at));
        assert_eq!(due(&a, &other, release_at), None);
        // Legal hold: the same.
        let held = AccountFacts {
            legal_hold: true,
            ..a.clone()
        };
        assert_eq!(due(&held, &both, t0()), Some(release_at));
        assert_eq!(due(&held, &both, release_at + day), None);
        // Paid: never released (enforcement restores it).
        let paid = AccountFacts {
            cash_balance: 0,
            ..a.clone()
        };
        assert_eq!(due(&paid, &both, t0()), None);
    }
}
