//! The timed customer notices of R7 and R8 as pure decisions: which notices are due for an
//! account at an instant (overdue, overdue reminders, suspension imminent, release warnings,
//! balance low) and when the next one falls due. Each notice is about something (`Topic`):
//! an episode, a reminder of an episode, a deadline of an episode, a suspension's release
//! instant and lead. A topic is written once; what is already written is an input, so that
//! the same function tells what to write now and, once it is written, when to look again.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::calendar::format_instant;
use crate::domain::lifecycle::{
    grace_deadline, AccountFacts, AccountState, Reason, ResourceFacts, ResourceState,
};
use crate::domain::money::format_scaled;
use crate::domain::notice::NoticeKind;
use crate::domain::policy::Policy;

/// What a timed notice is about. Stored with the notice (its `_about`), so that a later
/// decision knows it was written and delivery knows what must still hold for it to be true.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "topic", rename_all = "snake_case")]
pub enum Topic {
    /// The first alert of an episode.
    Overdue { episode: i32 },
    /// The `n`th reminder of an episode (every `overdue_reminder_every` after the first
    /// accepted alert, until the grace deadline).
    Reminder { episode: i32, n: i64 },
    /// "Your services will be suspended at `deadline`".
    Imminent {
        episode: i32,
        deadline: DateTime<Utc>,
    },
    /// "This resource will be released at `release_at`", `lead_seconds` before it.
    Warning {
        suspension: i32,
        lead_seconds: i64,
        release_at: DateTime<Utc>,
    },
}

/// R7's inputs: the threshold, whether the alert is armed, and the coupons that count as funds;
/// and whether the account can be reached at all (an address or a number): a notice to an
/// account that has neither is nothing to do.
#[derive(Debug, Clone, Default)]
pub struct BalanceFacts {
    pub reachable: bool,
    pub threshold: Option<i64>,
    pub armed: bool,
    /// (remaining, expires_at) of each coupon with something left.
    pub coupons: Vec<(i64, DateTime<Utc>)>,
}

impl BalanceFacts {
    /// Cash + credit quota + unexpired coupons at `now`.
    pub fn funds(&self, account: &AccountFacts, now: DateTime<Utc>) -> i64 {
        let coupons: i64 = self
            .coupons
            .iter()
            .filter(|(_, exp)| *exp > now)
            .map(|(rem, _)| *rem)
            .sum();
        account
            .cash_balance
            .saturating_add(account.credit_quota)
            .saturating_add(coupons)
    }
}

/// The settings the notices depend on besides the products' policies.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub imminent_lead: Duration,
    pub currency: String,
    pub minor_unit_digits: u32,
    /// R9: how long before a release each warning must have been accepted
    /// (`lifecycle.warning_min_age`): a late warning quotes the release no earlier than this
    /// after it is sent.
    pub warning_min_age: Duration,
}

/// One notice to write now: its kind, the period that makes its dedupe key, the template
/// variables it adds to the account's, and what it is about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedNotice {
    pub kind: NoticeKind,
    pub period: String,
    pub vars: serde_json::Value,
    pub episode: Option<i32>,
    /// The first suspension a release warning is about (all are in `topics`).
    pub suspension: Option<i32>,
    pub topics: Vec<Topic>,
    /// Why, in words (dry runs print it).
    pub why: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AlertPlan {
    pub notices: Vec<PlannedNotice>,
    /// R7: funds crossed below the threshold: alert and disarm.
    pub disarm: bool,
    /// R7: funds are back at or above the threshold: re-arm.
    pub rearm: bool,
}

impl AlertPlan {
    pub fn is_empty(&self) -> bool {
        self.notices.is_empty() && !self.disarm && !self.rearm
    }
}

/// A window in which a topic is due: from `start` until before `end`.
struct Window {
    topic: Topic,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
}

impl Window {
    fn active(&self, now: DateTime<Utc>) -> bool {
        self.start <= now && self.end.is_none_or(|e| now < e)
    }
}

/// The windows of the account's timed notices that are active at `now` or start later.
fn windows(
    account: &AccountFacts,
    resources: &[(ResourceFacts, &Policy)],
    settings: &AlertSettings,
    now: DateTime<Utc>,
) -> Vec<Window> {
    let mut out = Vec::new();
    if account.compliance_locked {
        return out;
    }
    let live: Vec<&(ResourceFacts, &Policy)> =
        resources.iter().filter(|(r, _)| r.is_live()).collect();
    let all_released = live.is_empty() && !resources.is_empty();
    if let (true, Some(ep), false) = (account.in_arrears(), &account.episode, all_released) {
        out.push(Window {
            topic: Topic::Overdue { episode: ep.no },
            start: ep.opened_at,
            end: None,
        });
        let suspended = ep.suspended_at.is_some() || account.state == AccountState::Suspended;
        let deadline = live
            .iter()
            .filter_map(|(_, p)| grace_deadline(account, p))
            .min();
        if !suspended {
            // Reminders, counted from the first accepted alert, stop at the deadline: from
            // then on the suspension notice speaks.
            let cadence = live
                .iter()
                .map(|(_, p)| p.overdue_reminder_every.to_chrono())
                .min()
                .filter(|c| c.num_seconds() > 0);
            if let (Some(first), Some(c)) = (ep.first_overdue_alert_at, cadence) {
                let n = if now >= first {
                    (now - first).num_seconds() / c.num_seconds()
                } else {
                    0
                };
                for k in [n, n + 1] {
                    let start = first + c * k as i32;
                    if k < 1 || deadline.is_some_and(|d| start >= d) {
                        continue;
                    }
                    let end = start + c;
                    out.push(Window {
                        topic: Topic::Reminder {
                            episode: ep.no,
                            n: k,
                        },
                        start,
                        end: Some(deadline.map_or(end, |d| end.min(d))),
                    });
                }
            }
            if let Some(d) = deadline {
                out.push(Window {
                    topic: Topic::Imminent {
                        episode: ep.no,
                        deadline: d,
                    },
                    start: d - settings.imminent_lead,
                    end: Some(d),
                });
            }
        }
    }
    if !account.legal_hold {
        for (r, p) in &live {
            let (ResourceState::Suspended(reason), Some(s)) = (r.state, r.suspension.as_ref())
            else {
                continue;
            };
            // An arrears suspension of a paid-up account is restored, not released.
            if reason == Reason::Arrears && !account.in_arrears() {
                continue;
            }
            let Some(release_at) = s.release_at else {
                continue;
            };
            // A warning's window stays open past the release instant: a warning that was not
            // written in time (no send_alerts run in its window, a legal hold lifted after it)
            // is sent late rather than never, since without it the resource could never be
            // released (R9); the release then waits for it (`release_check`), and the notice
            // quotes the later instant (`plan`).
            for lead in &p.release_warnings {
                out.push(Window {
                    topic: Topic::Warning {
                        suspension: s.no,
                        lead_seconds: lead.seconds(),
                        release_at,
                    },
                    start: release_at - lead.to_chrono(),
                    end: None,
                });
            }
        }
    }
    out
}

/// The notices due for the account at `now` that `written` does not hold yet, and R7's
/// crossing. `tz` is the account's zone, for the instants the notices quote.
pub fn plan(
    account: &AccountFacts,
    balance: &BalanceFacts,
    resources: &[(ResourceFacts, &Policy)],
    written: &HashSet<Topic>,
    settings: &AlertSettings,
    tz: &str,
    now: DateTime<Utc>,
) -> AlertPlan {
    let mut plan = AlertPlan::default();
    let due: Vec<Topic> = windows(account, resources, settings, now)
        .into_iter()
        .filter(|w| balance.reachable && w.active(now) && !written.contains(&w.topic))
        .map(|w| w.topic)
        .collect();
    let live: Vec<&(ResourceFacts, &Policy)> =
        resources.iter().filter(|(r, _)| r.is_live()).collect();
    // The deadline the overdue notices quote: the grace deadline, or, before lcic's clock has
    // started, a grace period from now.
    let deadline = live
        .iter()
        .filter_map(|(_, p)| grace_deadline(account, p))
        .min();
    let min_grace = live
        .iter()
        .map(|(_, p)| p.grace.to_chrono())
        .min()
        .unwrap_or(Duration::hours(24));
    let shown =
        serde_json::json!({ "deadline": format_instant(deadline.unwrap_or(now + min_grace), tz) });
    // Release warnings of one lead and release instant go out as one notice.
    let mut warnings: BTreeMap<(i64, DateTime<Utc>), Vec<Topic>> = BTreeMap::new();
    for topic in due {
        match &topic {
            Topic::Overdue { episode } => plan.notices.push(PlannedNotice {
                kind: NoticeKind::Overdue,
                period: format!("e{episode}"),
                vars: shown.clone(),
                episode: Some(*episode),
                suspension: None,
                why: format!("episode {episode} is in arrears and has had no overdue alert"),
                topics: vec![topic.clone()],
            }),
            Topic::Reminder { episode, n } => plan.notices.push(PlannedNotice {
                kind: NoticeKind::OverdueReminder,
                period: format!("e{episode}:{n}"),
                vars: shown.clone(),
                episode: Some(*episode),
                suspension: None,
                why: format!("reminder {n} of episode {episode}: still in arrears"),
                topics: vec![topic.clone()],
            }),
            Topic::Imminent { episode, deadline } => plan.notices.push(PlannedNotice {
                kind: NoticeKind::SuspensionImminent,
                period: format!("e{episode}:{}", deadline.to_rfc3339()),
                vars: serde_json::json!({ "deadline": format_instant(*deadline, tz) }),
                episode: Some(*episode),
                suspension: None,
                why: format!("the grace period of episode {episode} ends at {deadline}"),
                topics: vec![topic.clone()],
            }),
            Topic::Warning {
                lead_seconds,
                release_at,
                ..
            } => warnings
                .entry((*lead_seconds, *release_at))
                .or_default()
                .push(topic.clone()),
        }
    }
    for ((lead_seconds, release_at), topics) in warnings {
        let nos: Vec<i32> = topics
            .iter()
            .filter_map(|t| match t {
                Topic::Warning { suspension, .. } => Some(*suspension),
                _ => None,
            })
            .collect();
        let lead = crate::domain::policy::PolicyDuration(lead_seconds).to_string();
        let episode = live.iter().find_map(|(r, _)| {
            r.suspension
                .as_ref()
                .filter(|s| nos.contains(&s.no))
                .and_then(|s| s.episode)
        });
        let resources: Vec<&str> = live
            .iter()
            .filter(|(r, _)| r.suspension.as_ref().is_some_and(|s| nos.contains(&s.no)))
            .map(|(r, _)| r.id.as_str())
            .collect();
        let list: Vec<String> = nos.iter().map(|n| format!("s{n}")).collect();
        // Sent less than warning_min_age before the release instant (late), the warning
        // quotes when the release can happen: that long after it is sent.
        let quoted = release_at.max(now + settings.warning_min_age);
        plan.notices.push(PlannedNotice {
            kind: NoticeKind::ReleaseWarning,
            period: format!(
                "{}:{lead_seconds}:{}:{}",
                episode.map_or("-".to_string(), |e| format!("e{e}")),
                release_at.to_rfc3339(),
                list.join(",")
            ),
            vars: serde_json::json!({
                "release_at": format_instant(quoted, tz),
                "lead": lead,
                "resources": resources,
            }),
            episode,
            suspension: nos.first().copied(),
            why: if quoted == release_at {
                format!(
                    "{} will be released at {release_at}: the {lead} warning",
                    resources.join(", ")
                )
            } else {
                format!(
                    "{} were due for release at {release_at}; the {lead} warning was not sent \
                     in time, so they are released no earlier than {quoted}",
                    resources.join(", ")
                )
            },
            topics,
        });
    }
    if let (Some(threshold), false) = (balance.threshold, account.compliance_locked) {
        let funds = balance.funds(account, now);
        if funds < threshold && balance.armed {
            let (d, cur) = (settings.minor_unit_digits, &settings.currency);
            plan.disarm = true;
            plan.notices.push(PlannedNotice {
                kind: NoticeKind::BalanceLow,
                period: now.to_rfc3339(),
                vars: serde_json::json!({
                    "funds": format!("{} {cur}", format_scaled(funds, d)),
                    "threshold": format!("{} {cur}", format_scaled(threshold, d)),
                }),
                episode: None,
                suspension: None,
                why: "funds fell below the account's threshold".into(),
                topics: vec![],
            });
        } else if funds >= threshold && !balance.armed {
            plan.rearm = true;
        }
    }
    plan
}

/// When `send_alerts` next has something to do for the account: `now` when `plan` is not
/// empty, else the start of the next notice window, or a coupon's expiry that can take funds
/// below the threshold. `None`: nothing until an input changes.
pub fn next_due(
    account: &AccountFacts,
    balance: &BalanceFacts,
    resources: &[(ResourceFacts, &Policy)],
    written: &HashSet<Topic>,
    settings: &AlertSettings,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if !plan(account, balance, resources, written, settings, "UTC", now).is_empty() {
        return Some(now);
    }
    let mut next = windows(account, resources, settings, now)
        .into_iter()
        .filter(|w| balance.reachable && w.start > now && !written.contains(&w.topic))
        .map(|w| w.start)
        .min();
    if balance.threshold.is_some() && balance.armed && !account.compliance_locked {
        let expiry = balance
            .coupons
            .iter()
            .filter(|(rem, exp)| *rem > 0 && *exp > now)
            .map(|(_, exp)| *exp)
            .min();
        next = match (next, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EXAMPLE_CONFIG};
    use crate::domain::lifecycle::{BillingMode, EpisodeFacts, SuspensionFacts};
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
    }
    fn h(n: i64) -> Duration {
        Duration::hours(n)
    }
    fn d(n: i64) -> Duration {
        Duration::days(n)
    }

    fn policies() -> (Policy, Policy) {
        let c = Config::from_toml(EXAMPLE_CONFIG, "test", &[]).unwrap();
        (
            c.products["lcic"].policy.clone(),
            c.products["sa"].policy.clone(),
        )
    }

    fn settings() -> AlertSettings {
        AlertSettings {
            imminent_lead: h(6),
            currency: "CNY".into(),
            minor_unit_digits: 2,
            warning_min_age: h(24),
        }
    }

    /// In arrears since t0 (episode 3), alert accepted at `accepted`.
    fn debtor(accepted: Option<DateTime<Utc>>) -> AccountFacts {
        AccountFacts {
            cash_balance: -100,
            credit_quota: 0,
            state: AccountState::InArrears,
            arrears_since: Some(t0()),
            episode: Some(EpisodeFacts {
                no: 3,
                opened_at: t0(),
                first_overdue_alert_at: accepted,
                suspended_at: None,
            }),
            episodes: 3,
            compliance_locked: false,
            legal_hold: false,
        }
    }

    fn ppu(id: &str) -> ResourceFacts {
        ResourceFacts {
            id: id.into(),
            billing_mode: BillingMode::PayPerUse,
            state: ResourceState::Active,
            package_quota: None,
            package_used: 0,
            package_expires_at: None,
            payg_enabled: false,
            term_ends_at: None,
            suspended_at: None,
            suspension: None,
        }
    }

    fn suspended(id: &str, no: i32, at: DateTime<Utc>, release_at: DateTime<Utc>) -> ResourceFacts {
        ResourceFacts {
            state: ResourceState::Suspended(Reason::Arrears),
            suspended_at: Some(at),
            suspension: Some(SuspensionFacts {
                no,
                reason: Reason::Arrears,
                episode: Some(3),
                started_at: at,
                release_at: Some(release_at),
            }),
            ..ppu(id)
        }
    }

    fn reachable() -> BalanceFacts {
        BalanceFacts {
            reachable: true,
            ..Default::default()
        }
    }

    #[test]
    fn an_account_that_cannot_be_reached_has_no_notice_due() {
        let (lcic, _) = policies();
        let res = vec![(ppu("r"), &lcic)];
        let s = settings();
        let a = debtor(Some(t0()));
        let b = BalanceFacts::default();
        assert!(plan(&a, &b, &res, &HashSet::new(), &s, "UTC", t0()).is_empty());
        assert_eq!(next_due(&a, &b, &res, &HashSet::new(), &s, t0()), None);
    }

    fn kinds(p: &AlertPlan) -> Vec<&'static str> {
        p.notices.iter().map(|n| n.kind.as_str()).collect()
    }

    #[test]
    fn lcic_overdue_then_imminent_counted_from_the_accepted_alert() {
        let (lcic, _) = policies();
        let none = HashSet::new();
        let res = vec![(ppu("r"), &lcic)];
        let b = reachable();
        let s = settings();
        // At the episode's start: the overdue alert, quoting a deadline a grace period away.
        let a = debtor(None);
        let p = plan(&a, &b, &res, &none, &s, "UTC", t0());
        assert_eq!(kinds(&p), vec!["overdue"]);
        assert_eq!(p.notices[0].period, "e3");
        assert_eq!(p.notices[0].vars["deadline"], "2026-11-02 00:00 (UTC)");
        // Written, and no alert accepted: nothing is ever due (R9: no clock).
        let written: HashSet<Topic> = p.notices[0].topics.iter().cloned().collect();
        assert_eq!(next_due(&a, &b, &res, &written, &s, t0()), None);
        // Accepted an hour in: the deadline is 24 h later, suspension imminent 6 h before it.
        let a = debtor(Some(t0() + h(1)));
        let deadline = t0() + h(25);
        assert_eq!(
            next_due(&a, &b, &res, &written, &s, t0() + h(2)),
            Some(deadline - h(6))
        );
        let p = plan(&a, &b, &res, &written, &s, "UTC", deadline - h(6));
        assert_eq!(kinds(&p), vec!["suspension_imminent"]);
        assert_eq!(p.notices[0].period, format!("e3:{}", deadline.to_rfc3339()));
        let mut w = written.clone();
        w.extend(p.notices[0].topics.iter().cloned());
        assert_eq!(next_due(&a, &b, &res, &w, &s, deadline - h(6)), None);
        // A second before the window, nothing; at the deadline, nothing (the suspension speaks).
        assert!(plan(
            &a,
            &b,
            &res,
            &written,
            &s,
            "UTC",
            deadline - h(6) - Duration::seconds(1)
        )
        .is_empty());
        assert!(plan(&a, &b, &res, &written, &s, "UTC", deadline).is_empty());
    }

    #[test]
    fn sa_reminders_on_the_cadence_until_the_deadline_each_once() {
        let (_, sa) = policies();
        let res = vec![(ppu("r"), &sa)];
        let b = reachable();
        let s = settings();
        let a = debtor(Some(t0()));
        let mut written: HashSet<Topic> = [Topic::Overdue { episode: 3 }].into();
        // Reminders every 72 h from the accepted alert: 1 at 72 h, 2 at 144 h, ...
        assert_eq!(
            next_due(&a, &b, &res, &written, &s, t0()),
            Some(t0() + h(72))
        );
        let p = plan(&a, &b, &res, &written, &s, "UTC", t0() + h(80));
        assert_eq!(kinds(&p), vec!["overdue_reminder"]);
        assert_eq!(p.notices[0].period, "e3:1");
        written.extend(p.notices[0].topics.iter().cloned());
        assert!(plan(&a, &b, &res, &written, &s, "UTC", t0() + h(100)).is_empty());
        assert_eq!(
            next_due(&a, &b, &res, &written, &s, t0() + h(80)),
            Some(t0() + h(144))
        );
        // Missed reminders collapse into the current one.
        let p = plan(&a, &b, &res, &written, &s, "UTC", t0() + d(13));
        assert_eq!(p.notices[0].period, "e3:4");
        // The last window ends at the deadline (15 days).
        assert!(plan(&a, &b, &res, &written, &s, "UTC", t0() + d(15))
            .notices
            .iter()
            .all(|n| n.kind != NoticeKind::OverdueReminder));
    }

    #[test]
    fn release_warnings_belong_to_their_suspension_and_release_instant() {
        let (lcic, _) = policies();
        let b = reachable();
        let s = settings();
        let mut a = debtor(Some(t0()));
        a.episode.as_mut().unwrap().suspended_at = Some(t0() + d(1));
        let r_at = t0() + d(61);
        // Two resources suspended at one instant: one notice per lead, about both.
        let res = vec![
            (suspended("a", 7, t0() + d(1), r_at), &lcic),
            (suspended("b", 8, t0() + d(1), r_at), &lcic),
        ];
        let written: HashSet<Topic> = [Topic::Overdue { episode: 3 }].into();
        assert_eq!(
            next_due(&a, &b, &res, &written, &s, t0() + d(2)),
            Some(r_at - d(7))
        );
        let p = plan(&a, &b, &res, &written, &s, "UTC", r_at - d(7));
        assert_eq!(kinds(&p), vec!["release_warning"]);
        let n = &p.notices[0];
        assert_eq!(n.period, format!("e3:604800:{}:s7,s8", r_at.to_rfc3339()));
        assert_eq!(n.vars["lead"], "7d");
        assert_eq!(n.topics.len(), 2);
        // What was written for suspension 7 is not written for a later suspension 9 of the
        // same resource, even with the same release instant.
        let mut w = written.clone();
        w.extend(n.topics.iter().cloned());
        let later = vec![
            (suspended("a", 9, t0() + d(1), r_at), &lcic),
            (suspended("b", 8, t0() + d(1), r_at), &lcic),
        ];
        let p = plan(&a, &b, &later, &w, &s, "UTC", r_at - d(6));
        assert_eq!(p.notices.len(), 1);
        assert_eq!(p.notices[0].suspension, Some(9));
        // A moved release instant needs new warnings too.
        let moved = vec![(suspended("a", 7, t0() + d(1), r_at + d(30)), &lcic)];
        assert_eq!(
            next_due(&a, &b, &moved, &w, &s, r_at - d(6)),
            Some(r_at + d(23))
        );
        // Legal hold or compliance: no warnings.
        let held = AccountFacts {
            legal_hold: true,
            ..a.clone()
        };
        assert!(plan(&held, &b, &res, &written, &s, "UTC", r_at - d(7)).is_empty());
        let locked = AccountFacts {
            compliance_locked: true,
            ..a.clone()
        };
        assert!(plan(&locked, &b, &res, &HashSet::new(), &s, "UTC", r_at - d(7)).is_empty());
        // Paid: an arrears suspension is restored, never warned about.
        let paid = AccountFacts {
            cash_balance: 0,
            episode: None,
            ..a.clone()
        };
        assert!(plan(&paid, &b, &res, &HashSet::new(), &s, "UTC", r_at - d(7)).is_empty());
    }

    #[test]
    fn a_release_warning_missed_in_its_window_is_sent_late_quoting_the_later_release() {
        let (lcic, _) = policies();
        let b = reachable();
        let s = settings();
        let mut a = debtor(Some(t0()));
        a.episode.as_mut().unwrap().suspended_at = Some(t0() + d(1));
        let r_at = t0() + d(61);
        let res = vec![(suspended("a", 7, t0() + d(1), r_at), &lcic)];
        let mut written: HashSet<Topic> = [Topic::Overdue { episode: 3 }].into();
        // The 7-day warning went out on time; no run came in the 1-day window.
        let p = plan(&a, &b, &res, &written, &s, "UTC", r_at - d(7));
        assert_eq!(p.notices[0].vars["release_at"], format_instant(r_at, "UTC"));
        written.extend(p.notices[0].topics.iter().cloned());
        let late = r_at + h(30);
        // After the release instant the missing warning is still due (not dropped for good),
        // and quotes a release no earlier than warning_min_age after it is sent.
        assert_eq!(next_due(&a, &b, &res, &written, &s, late), Some(late));
        let p = plan(&a, &b, &res, &written, &s, "UTC", late);
        assert_eq!(kinds(&p), vec!["release_warning"]);
        let n = &p.notices[0];
        assert_eq!(n.vars["lead"], "24h");
        assert_eq!(n.vars["release_at"], format_instant(late + h(24), "UTC"));
        // Its dedupe key still names the suspension's own release instant.
        assert_eq!(n.period, format!("e3:86400:{}:s7", r_at.to_rfc3339()));
        assert!(n.why.contains("not sent in time"), "{}", n.why);
        // Written once, it is not planned again.
        written.extend(n.topics.iter().cloned());
        assert!(plan(&a, &b, &res, &written, &s, "UTC", late + h(1)).is_empty());
        assert_eq!(next_due(&a, &b, &res, &written, &s, late + h(1)), None);
        // Within the window but less than a day before the release: the later instant too.
        let mut w7: HashSet<Topic> = [Topic::Overdue { episode: 3 }].into();
        let p7 = plan(&a, &b, &res, &w7, &s, "UTC", r_at - h(2));
        let seven = p7.notices.iter().find(|n| n.vars["lead"] == "7d").unwrap();
        assert_eq!(
            seven.vars["release_at"],
            format_instant(r_at + h(22), "UTC")
        );
        w7.extend(p7.notices.iter().flat_map(|n| n.topics.iter().cloned()));
        assert!(plan(&a, &b, &res, &w7, &s, "UTC", r_at - h(1)).is_empty());
    }

    #[test]
    fn balance_low_once_per_crossing_and_coupon_expiry_is_a_due_instant() {
        let (_, sa) = policies();
        let s = settings();
        let res = vec![(ppu("r"), &sa)];
        let good = AccountFacts {
            cash_balance: 1_500,
            episode: None,
            state: AccountState::Good,
            ..debtor(None)
        };
        let none = HashSet::new();
        // 15.00 cash + 10.00 coupon expiring at t0+5d, threshold 20.00.
        let armed = BalanceFacts {
            reachable: true,
            threshold: Some(2_000),
            armed: true,
            coupons: vec![(1_000, t0() + d(5))],
        };
        assert!(plan(&good, &armed, &res, &none, &s, "UTC", t0()).is_empty());
        assert_eq!(
            next_due(&good, &armed, &res, &none, &s, t0()),
            Some(t0() + d(5))
        );
        let p = plan(&good, &armed, &res, &none, &s, "UTC", t0() + d(5));
        assert!(p.disarm);
        assert_eq!(kinds(&p), vec!["balance_low"]);
        assert_eq!(p.notices[0].vars["funds"], "15.00 CNY");
        let disarmed = BalanceFacts {
            armed: false,
            ..armed.clone()
        };
        assert!(plan(&good, &disarmed, &res, &none, &s, "UTC", t0() + d(6)).is_empty());
        assert_eq!(
            next_due(&good, &disarmed, &res, &none, &s, t0() + d(6)),
            None
        );
        let topped = AccountFacts {
            cash_balance: 2_000,
            ..good.clone()
        };
        let p = plan(&topped, &disarmed, &res, &none, &s, "UTC", t0() + d(6));
        assert!(p.rearm && p.notices.is_empty());
    }
}
