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

/// R7's inputs: the threshold, whether the alert is armed, and the coupons that count as funds.
#[derive(Debug, Clone, Default)]
pub struct BalanceFacts {
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
            for lead in &p.release_warnings {
                out.push(Window {
                    topic: Topic::Warning {
                        suspension: s.no,
                        lead_seconds: lead.seconds(),
                        release_at,
                    },
                    start: release_at - lead.to_chrono(),
                    end: Some(release_at),
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
        .filter(|w| w.active(now) && !written.contains(&w.topic))
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
        plan.notices.push(PlannedNotice {
            kind: NoticeKind::ReleaseWarning,
            period: format!(
                "{}:{lead_seconds}:{}:{}",
                episode.map_or("-".to_string(), |e| format!("e{e}")),
                release_at.to_rfc3339(),
                list.join(",")
            ),
            vars: serde_json::json!({
                "release_at": format_instant(release_at, tz),
                "lead": lead,
                "resources": resources,
            }),
            episode,
            suspension: nos.first().copied(),
            why: format!(
                "{} will be released at {release_at}: the {lead} warning",
                resources.join(", ")
            ),
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
        .filter(|w| w.start > now && !written.contains(&w.topic))
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
