//! The lifecycle rules R1–R10 (PRODUCT.md §3) as pure decisions: given an account with its
//! open arrears episode, its resources with their current suspensions and their products'
//! policies, and an instant, what state should each be in, does an episode open or close,
//! may this resource be released, and may this action go ahead. The jobs and commands do the
//! I/O around these functions.
//!
//! Every clock counts from a fact of the episode or suspension it belongs to: grace from the
//! episode's start (sa) or its first accepted overdue alert (lcic); retention from the start
//! of the resource's current suspension (resource and reason) with the release deadline the
//! policy gave it. A new episode, or a new reason, starts new clocks.

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::domain::policy::{GraceStart, Policy, SuspendScope};
use crate::domain::settle::is_in_arrears;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    Good,
    InArrears,
    Suspended,
    ComplianceLocked,
}

impl AccountState {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Good => "good",
            AccountState::InArrears => "in_arrears",
            AccountState::Suspended => "suspended",
            AccountState::ComplianceLocked => "compliance_locked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "good" => AccountState::Good,
            "in_arrears" => AccountState::InArrears,
            "suspended" => AccountState::Suspended,
            "compliance_locked" => AccountState::ComplianceLocked,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Arrears,
    QuotaExhausted,
    PackageExpired,
    Compliance,
    Unsubscribed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Arrears => "arrears",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::PackageExpired => "package_expired",
            Reason::Compliance => "compliance",
            Reason::Unsubscribed => "unsubscribed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "arrears" => Reason::Arrears,
            "quota_exhausted" => Reason::QuotaExhausted,
            "package_expired" => Reason::PackageExpired,
            "compliance" => Reason::Compliance,
            "unsubscribed" => Reason::Unsubscribed,
            _ => return None,
        })
    }
}

/// A resource's state with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceState {
    Active,
    Suspended(Reason),
    Released,
}

impl ResourceState {
    pub fn state_str(self) -> &'static str {
        match self {
            ResourceState::Active => "active",
            ResourceState::Suspended(_) => "suspended",
            ResourceState::Released => "released",
        }
    }

    pub fn reason(self) -> Option<Reason> {
        match self {
            ResourceState::Suspended(r) => Some(r),
            _ => None,
        }
    }

    pub fn parse(state: &str, reason: Option<&str>) -> Option<Self> {
        Some(match state {
            "active" => ResourceState::Active,
            "released" => ResourceState::Released,
            "suspended" => ResourceState::Suspended(Reason::parse(reason?)?),
            _ => return None,
        })
    }
}

impl fmt::Display for ResourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceState::Suspended(r) => write!(f, "suspended ({})", r.as_str()),
            s => f.write_str(s.state_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingMode {
    Prepaid,
    PayPerUse,
    Package,
}

impl BillingMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "prepaid" => BillingMode::Prepaid,
            "pay_per_use" => BillingMode::PayPerUse,
            "package" => BillingMode::Package,
            _ => return None,
        })
    }
}

/// The open arrears episode of an account: from R1 until the account is good again (or
/// nothing of it is left to act on). Its facts are what grace and suspension count from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpisodeFacts {
    /// The episode's number on its account (1, 2, ...).
    pub no: i32,
    /// R1: when it began.
    pub opened_at: DateTime<Utc>,
    /// When a channel first accepted this episode's overdue alert (lcic's grace clock, R9).
    pub first_overdue_alert_at: Option<DateTime<Utc>>,
    /// When the account was suspended in this episode.
    pub suspended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct AccountFacts {
    pub cash_balance: i64,
    pub credit_quota: i64,
    pub state: AccountState,
    /// Since when the account owes money (aging); kept while the debt lasts, even when its
    /// episode closed because everything was released.
    pub arrears_since: Option<DateTime<Utc>>,
    /// The open episode, if any.
    pub episode: Option<EpisodeFacts>,
    /// Episodes numbered so far on this account (the next one is `episodes + 1`).
    pub episodes: i32,
    pub compliance_locked: bool,
    pub legal_hold: bool,
}

impl AccountFacts {
    pub fn in_arrears(&self) -> bool {
        is_in_arrears(self.cash_balance, self.credit_quota)
    }

    /// When the open episode's first overdue alert was accepted.
    pub fn first_overdue_alert_at(&self) -> Option<DateTime<Utc>> {
        self.episode.as_ref()?.first_overdue_alert_at
    }
}

/// The current suspension of a resource: one resource, one reason, one retention clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SuspensionFacts {
    /// The suspension's number on its account (1, 2, ...).
    pub no: i32,
    pub reason: Reason,
    /// The episode an arrears suspension belongs to.
    pub episode: Option<i32>,
    /// When the resource was suspended for this reason: the retention clock.
    pub started_at: DateTime<Utc>,
    /// When the policy releases it (R4); `None`: never (compliance, or a reason the policy keeps).
    pub release_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct ResourceFacts {
    pub id: String,
    pub billing_mode: BillingMode,
    pub state: ResourceState,
    pub package_quota: Option<i64>,
    pub package_used: i64,
    pub package_expires_at: Option<DateTime<Utc>>,
    pub payg_enabled: bool,
    pub term_ends_at: Option<DateTime<Utc>>,
    /// Since when the resource has been out of service without a break (whatever the
    /// reasons): usage starting after it is refused.
    pub suspended_at: Option<DateTime<Utc>>,
    pub suspension: Option<SuspensionFacts>,
}

impl ResourceFacts {
    pub fn is_live(&self) -> bool {
        self.state != ResourceState::Released
    }
}

/// R2: when grace ends for resources of a product with `policy`, if it has started.
/// lcic counts from the open episode's first accepted overdue alert (no alert, no deadline:
/// R9); sa from the start of the episode.
pub fn grace_deadline(account: &AccountFacts, policy: &Policy) -> Option<DateTime<Utc>> {
    let ep = account.episode.as_ref()?;
    let start = match policy.grace_starts {
        GraceStart::FirstOverdueAlert => ep.first_overdue_alert_at?,
        GraceStart::ArrearsStart => ep.opened_at,
    };
    Some(start + policy.grace.to_chrono())
}

fn grace_over(account: &AccountFacts, policy: &Policy, now: DateTime<Utc>) -> bool {
    account.in_arrears() && grace_deadline(account, policy).is_some_and(|d| now >= d)
}

/// Whether R3 suspends this resource once grace is over: lcic suspends everything; sa
/// freezes pay-per-use (and package) resources and lets prepaid ones run to their term end.
fn in_suspend_scope(r: &ResourceFacts, policy: &Policy, now: DateTime<Utc>) -> bool {
    match policy.suspend_scope {
        SuspendScope::AllResources => true,
        SuspendScope::PayPerUseOnly => {
            r.billing_mode != BillingMode::Prepaid || r.term_ends_at.is_some_and(|t| now >= t)
        }
    }
}

/// R4 and R6: when a suspension for `reason` that started at `started_at` is released under
/// `policy`; `None` when the policy never releases it.
pub fn release_deadline(
    reason: Reason,
    started_at: DateTime<Utc>,
    policy: &Policy,
) -> Option<DateTime<Utc>> {
    let releasable = match reason {
        Reason::Arrears | Reason::Unsubscribed => true,
        Reason::QuotaExhausted | Reason::PackageExpired => policy.release_non_arrears_suspensions,
        Reason::Compliance => false,
    };
    releasable.then(|| started_at + policy.retention.to_chrono())
}

/// The state a resource should be in at `now`. Released and unsubscribed resources stay as
/// they are; a compliance lock wins over everything; arrears over the package reasons (R6).
/// An arrears suspension belongs to its episode: one left from another episode counts as
/// not suspended for arrears (it gets a new suspension and new clocks).
pub fn desired_resource_state(
    account: &AccountFacts,
    r: &ResourceFacts,
    policy: &Policy,
    now: DateTime<Utc>,
) -> ResourceState {
    match r.state {
        ResourceState::Released | ResourceState::Suspended(Reason::Unsubscribed) => return r.state,
        _ => {}
    }
    if account.compliance_locked {
        return ResourceState::Suspended(Reason::Compliance);
    }
    if let (true, Some(ep)) = (account.in_arrears(), &account.episode) {
        let already_for_arrears = r.state == ResourceState::Suspended(Reason::Arrears)
            && r.suspension
                .as_ref()
                .is_none_or(|s| s.episode == Some(ep.no));
        if already_for_arrears
            || (grace_over(account, policy, now) && in_suspend_scope(r, policy, now))
        {
            return ResourceState::Suspended(Reason::Arrears);
        }
    }
    if r.billing_mode == BillingMode::Package {
        if r.package_expires_at.is_some_and(|t| now >= t) {
            return ResourceState::Suspended(Reason::PackageExpired);
        }
        if !r.payg_enabled && r.package_used >= r.package_quota.unwrap_or(0) {
            return ResourceState::Suspended(Reason::QuotaExhausted);
        }
    }
    ResourceState::Active
}

/// The state the account should be in at `now`: suspended once grace is over for any of its
/// live resources' products (and for the rest of the episode), good as soon as cash + credit
/// quota is back to >= 0 (R5).
pub fn desired_account_state<'a>(
    account: &AccountFacts,
    resources: impl IntoIterator<Item = (&'a ResourceFacts, &'a Policy)>,
    now: DateTime<Utc>,
) -> AccountState {
    if account.compliance_locked {
        return AccountState::ComplianceLocked;
    }
    if !account.in_arrears() {
        return AccountState::Good;
    }
    let Some(ep) = &account.episode else {
        // Owing, with nothing left to act on: it stays where it was.
        return match account.state {
            AccountState::Suspended => AccountState::Suspended,
            _ => AccountState::InArrears,
        };
    };
    let suspended = ep.suspended_at.is_some()
        || resources
            .into_iter()
            .any(|(r, p)| r.is_live() && grace_over(account, p, now));
    if suspended {
        AccountState::Suspended
    } else {
        AccountState::InArrears
    }
}

/// Why an episode closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Cash + credit quota is back to >= 0.
    Paid,
    /// Every resource of the account was released: nothing is left to act on.
    Released,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Paid => "paid",
            CloseReason::Released => "released",
        }
    }
}

/// What happens to the account's episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpisodeMove {
    /// R1 without a bill (a lowered credit quota, an opening balance below zero): a new
    /// episode begins now.
    Open,
    Close(CloseReason),
}

/// An episode opens when the account owes and has something live to act on (or nothing at
/// all: it is still told it owes), and closes when it is paid or its resources are all
/// released.
pub fn episode_move<'a>(
    account: &AccountFacts,
    resources: impl IntoIterator<Item = &'a ResourceFacts>,
) -> Option<EpisodeMove> {
    let (mut any, mut live) = (false, false);
    for r in resources {
        any = true;
        live |= r.is_live();
    }
    match (&account.episode, account.in_arrears()) {
        (None, true) if live || !any => Some(EpisodeMove::Open),
        (Some(_), false) => Some(EpisodeMove::Close(CloseReason::Paid)),
        (Some(_), true) if any && !live => Some(EpisodeMove::Close(CloseReason::Released)),
        _ => None,
    }
}

/// One change the engine should make to a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceChange {
    pub resource_id: String,
    pub from: ResourceState,
    pub to: ResourceState,
    /// A new suspension (and retention clock) starts: a new reason, or arrears in a new episode.
    pub new_suspension: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub account_from: AccountState,
    pub account_to: AccountState,
    pub episode: Option<EpisodeMove>,
    pub changes: Vec<ResourceChange>,
}

impl Evaluation {
    pub fn is_empty(&self) -> bool {
        self.episode.is_none() && self.account_from == self.account_to && self.changes.is_empty()
    }
}

/// The account as the rest of an evaluation sees it once `mv` has happened at `now`.
pub fn after_episode_move(
    account: &AccountFacts,
    mv: Option<EpisodeMove>,
    now: DateTime<Utc>,
) -> AccountFacts {
    let mut a = account.clone();
    match mv {
        Some(EpisodeMove::Open) => {
            a.episodes += 1;
            a.episode = Some(EpisodeFacts {
                no: a.episodes,
                opened_at: now,
                first_overdue_alert_at: None,
                suspended_at: None,
            });
        }
        Some(EpisodeMove::Close(_)) => a.episode = None,
        None => {}
    }
    a
}

/// Everything that should change for one account at `now`.
pub fn evaluate(
    account: &AccountFacts,
    resources: &[(ResourceFacts, &Policy)],
    now: DateTime<Utc>,
) -> Evaluation {
    let mv = episode_move(account, resources.iter().map(|(r, _)| r));
    let eff = after_episode_move(account, mv, now);
    let episode_no = eff.episode.as_ref().map(|e| e.no);
    let changes = resources
        .iter()
        .filter_map(|(r, p)| {
            let to = desired_resource_state(&eff, r, p, now);
            let new_suspension = match (to, &r.suspension) {
                (ResourceState::Suspended(_), _) if to != r.state => true,
                // Every suspended resource has its suspension (and clock).
                (ResourceState::Suspended(_), None) => true,
                (ResourceState::Suspended(Reason::Arrears), Some(s)) => s.episode != episode_no,
                _ => false,
            };
            (to != r.state || new_suspension).then(|| ResourceChange {
                resource_id: r.id.clone(),
                from: r.state,
                to,
                new_suspension,
            })
        })
        .collect();
    Evaluation {
        account_from: account.state,
        account_to: desired_account_state(&eff, resources.iter().map(|(r, p)| (r, *p)), now),
        episode: mv,
        changes,
    }
}

/// Why a resource is not released now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "why")]
pub enum NotReleased {
    NotSuspended,
    /// Suspended for arrears, but cash + credit quota is back to >= 0 (a credit quota raised
    /// outside a top-up, say): the next enforcement restores it; it is never released.
    ArrearsPaid,
    /// Compliance suspensions are a legal matter: never released automatically.
    ComplianceSuspension,
    /// R6: non-arrears suspensions are released only when the policy says so.
    PolicyKeepsNonArrearsSuspensions,
    LegalHold,
    RetentionNotOver {
        release_at: DateTime<Utc>,
    },
    /// R9: the warning `lead` before this suspension's release was not accepted by a channel.
    WarningMissing {
        lead: String,
    },
    /// R9: accepted, but less than the minimum age ago.
    WarningTooRecent {
        lead: String,
        accepted_at: DateTime<Utc>,
    },
}

/// A release warning a channel accepted: for which suspension, which lead, and the release
/// instant it announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedWarning {
    pub suspension: i32,
    pub lead_seconds: i64,
    pub release_at: Option<DateTime<Utc>>,
    pub accepted_at: DateTime<Utc>,
}

/// When the warning `lead` for the suspension `s` (announcing its current release instant)
/// was first accepted.
fn accepted_for(
    warnings: &[AcceptedWarning],
    s: &SuspensionFacts,
    lead_seconds: i64,
) -> Option<DateTime<Utc>> {
    warnings
        .iter()
        .filter(|w| {
            w.suspension == s.no && w.lead_seconds == lead_seconds && w.release_at == s.release_at
        })
        .map(|w| w.accepted_at)
        .min()
}

/// R4, R9, R10's legal hold: may this resource be released at `now`? Only on warnings for
/// its current suspension that announced its current release instant.
pub fn release_check(
    account: &AccountFacts,
    r: &ResourceFacts,
    policy: &Policy,
    warnings: &[AcceptedWarning],
    warning_min_age: Duration,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, NotReleased> {
    let (ResourceState::Suspended(reason), Some(s)) = (r.state, r.suspension.as_ref()) else {
        return Err(NotReleased::NotSuspended);
    };
    match reason {
        Reason::Arrears if !account.in_arrears() => return Err(NotReleased::ArrearsPaid),
        Reason::Compliance => return Err(NotReleased::ComplianceSuspension),
        Reason::QuotaExhausted | Reason::PackageExpired
            if !policy.release_non_arrears_suspensions =>
        {
            return Err(NotReleased::PolicyKeepsNonArrearsSuspensions)
        }
        _ => {}
    }
    let Some(release_at) = s.release_at else {
        return Err(NotReleased::PolicyKeepsNonArrearsSuspensions);
    };
    if account.legal_hold {
        return Err(NotReleased::LegalHold);
    }
    if now < release_at {
        return Err(NotReleased::RetentionNotOver { release_at });
    }
    for lead in &policy.release_warnings {
        match accepted_for(warnings, s, lead.seconds()) {
            None => {
                return Err(NotReleased::WarningMissing {
                    lead: lead.to_string(),
                })
            }
            Some(at) if at + warning_min_age > now => {
                return Err(NotReleased::WarningTooRecent {
                    lead: lead.to_string(),
                    accepted_at: at,
                })
            }
            Some(_) => {}
        }
    }
    Ok(release_at)
}

/// When `release_resources` should next look at this resource: when `release_check` can
/// first pass without new input (its release instant, or a day after its last warning was
/// accepted, whichever is later; `now` when it can already), or, while a warning is missing or
/// a legal hold holds it, once at its release instant (to report why it is kept) and then only
/// when an input changes (a warning accepted, the hold lifted: both mark the account due).
pub fn release_due_at(
    account: &AccountFacts,
    r: &ResourceFacts,
    policy: &Policy,
    warnings: &[AcceptedWarning],
    warning_min_age: Duration,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let (ResourceState::Suspended(reason), Some(s)) = (r.state, r.suspension.as_ref()) else {
        return None;
    };
    if reason == Reason::Compliance || (reason == Reason::Arrears && !account.in_arrears()) {
        return None;
    }
    let release_at = s.release_at?;
    let mut ready = Some(release_at);
    for lead in &policy.release_warnings {
        ready = match (ready, accepted_for(warnings, s, lead.seconds())) {
            (Some(t), Some(at)) => Some(t.max(at + warning_min_age)),
            _ => None,
        };
    }
    match ready {
        Some(t) if !account.legal_hold => Some(t.max(now)),
        _ => (release_at > now).then_some(release_at),
    }
}

/// What a product's control plane may ask before acting (PRODUCT.md §5 `gate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Action {
    CreateResource,
    Purchase,
    Upgrade,
    Renew,
    Operate,
    AccessData,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreateResource => "create_resource",
            Action::Purchase => "purchase",
            Action::Upgrade => "upgrade",
            Action::Renew => "renew",
            Action::Operate => "operate",
            Action::AccessData => "access_data",
        }
    }

    fn incurs_fees(self) -> bool {
        matches!(
            self,
            Action::CreateResource | Action::Purchase | Action::Upgrade | Action::Renew
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GateDecision {
    pub allowed: bool,
    /// Machine-readable reason: `ok`, `compliance_locked`, `in_arrears`, `resource_released`,
    /// `resource_suspended`, `account_suspended`.
    pub code: &'static str,
    pub reason: String,
}

fn refuse(code: &'static str, reason: String) -> GateDecision {
    GateDecision {
        allowed: false,
        code,
        reason,
    }
}

/// May `action` go ahead on the account (and the resource with its product's policy)?
/// R2: in arrears, fee-incurring actions are refused; R3: a suspended lcic resource refuses
/// operation and data access, a frozen sa resource refuses everything, a prepaid sa resource
/// that keeps running keeps `operate`.
pub fn gate(
    account: &AccountFacts,
    resource: Option<(&ResourceFacts, &Policy)>,
    action: Action,
) -> GateDecision {
    if account.compliance_locked {
        return refuse(
            "compliance_locked",
            "the account is locked for a compliance review".into(),
        );
    }
    if let Some((r, policy)) = resource {
        match r.state {
            ResourceState::Released => {
                return refuse(
                    "resource_released",
                    format!("resource {} was released and is gone", r.id),
                )
            }
            ResourceState::Suspended(reason) => {
                let frozen_everything = policy.suspend_scope == SuspendScope::PayPerUseOnly
                    && reason == Reason::Arrears;
                // Otherwise the service is unusable and its data inaccessible; buying, renewing or
                // upgrading is what lifts a package suspension, so those go on to the fee rule.
                if frozen_everything || matches!(action, Action::Operate | Action::AccessData) {
                    return refuse(
                        "resource_suspended",
                        format!(
                            "resource {} is suspended ({}): {} is not allowed",
                            r.id,
                            reason.as_str(),
                            action.as_str()
                        ),
                    );
                }
            }
            ResourceState::Active => {}
        }
    }
    if account.in_arrears() && action.incurs_fees() {
        return refuse(
            "in_arrears",
            format!(
                "the account is in arrears: {} incurs fees and is refused until it is topped up",
                action.as_str()
            ),
        );
    }
    if account.state == AccountState::Suspended
        && resource.is_none()
        && matches!(action, Action::Operate | Action::AccessData)
    {
        return refuse(
            "account_suspended",
            "the account is suspended for arrears".into(),
        );
    }
    GateDecision {
        allowed: true,
        code: "ok",
        reason: format!("{} is allowed", action.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EXAMPLE_CONFIG};
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
    }
    fn secs(n: i64) -> Duration {
        Duration::seconds(n)
    }
    fn hours(n: i64) -> Duration {
        Duration::hours(n)
    }
    fn days(n: i64) -> Duration {
        Duration::days(n)
    }

    fn policies() -> (Policy, Policy) {
        let c = Config::from_toml(EXAMPLE_CONFIG, "test", &[]).unwrap();
        (
            c.products["lcic"].policy.clone(),
            c.products["sa"].policy.clone(),
        )
    }

    /// In arrears since t0 by one unit (episode 1), first overdue alert accepted at t0 + 1 h.
    fn debtor() -> AccountFacts {
        AccountFacts {
            cash_balance: -100,
            credit_quota: 0,
            state: AccountState::InArrears,
            arrears_since: Some(t0()),
            episode: Some(EpisodeFacts {
                no: 1,
                opened_at: t0(),
                first_overdue_alert_at: Some(t0() + hours(1)),
                suspended_at: None,
            }),
            episodes: 1,
            compliance_locked: false,
            legal_hold: false,
        }
    }

    /// `debtor()` whose overdue alert no channel accepted.
    fn unalerted() -> AccountFacts {
        let mut a = debtor();
        if let Some(e) = a.episode.as_mut() {
            e.first_overdue_alert_at = None;
        }
        a
    }

    /// A suspension for `reason` that started at `at`, released 60 days later.
    fn suspension(no: i32, reason: Reason, at: DateTime<Utc>) -> SuspensionFacts {
        SuspensionFacts {
            no,
            reason,
            episode: (reason == Reason::Arrears).then_some(1),
            started_at: at,
            release_at: Some(at + days(60)),
        }
    }

    fn res(id: &str, mode: BillingMode) -> ResourceFacts {
        ResourceFacts {
            id: id.into(),
            billing_mode: mode,
            state: ResourceState::Active,
            package_quota: (mode == BillingMode::Package).then_some(1000),
            package_used: 0,
            package_expires_at: None,
            payg_enabled: false,
            term_ends_at: (mode == BillingMode::Prepaid).then(|| t0() + days(180)),
            suspended_at: None,
            suspension: None,
        }
    }

    const ARREARS: ResourceState = ResourceState::Suspended(Reason::Arrears);
    const ACTIVE: ResourceState = ResourceState::Active;

    #[test]
    fn lcic_grace_is_24h_from_the_first_accepted_alert() {
        let (lcic, _) = policies();
        let deadline = t0() + hours(1) + hours(24);
        // (account tweak, resource mode, instant, expected)
        let cases: Vec<(
            &str,
            AccountFacts,
            BillingMode,
            DateTime<Utc>,
            ResourceState,
        )> = vec![
            (
                "one second before the deadline",
                debtor(),
                BillingMode::PayPerUse,
                deadline - secs(1),
                ACTIVE,
            ),
            (
                "exactly at the deadline",
                debtor(),
                BillingMode::PayPerUse,
                deadline,
                ARREARS,
            ),
            (
                "one second after",
                debtor(),
                BillingMode::PayPerUse,
                deadline + secs(1),
                ARREARS,
            ),
            (
                "packages included",
                debtor(),
                BillingMode::Package,
                deadline,
                ARREARS,
            ),
            (
                "prepaid included",
                debtor(),
                BillingMode::Prepaid,
                deadline,
                ARREARS,
            ),
            (
                "no accepted alert: never suspended (R9)",
                unalerted(),
                BillingMode::PayPerUse,
                deadline + days(30),
                ACTIVE,
            ),
            (
                "paid within grace",
                AccountFacts {
                    cash_balance: 0,
                    state: AccountState::Good,
                    ..debtor()
                },
                BillingMode::PayPerUse,
                deadline + days(1),
                ACTIVE,
            ),
        ];
        for (name, account, mode, now, want) in cases {
            assert_eq!(
                desired_resource_state(&account, &res("r", mode), &lcic, now),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn sa_grace_is_15_days_from_arrears_and_prepaid_runs_to_its_term() {
        let (_, sa) = policies();
        let deadline = t0() + days(15);
        let ended_prepaid = ResourceFacts {
            term_ends_at: Some(deadline - days(1)),
            ..res("p", BillingMode::Prepaid)
        };
        let cases: Vec<(&str, ResourceFacts, DateTime<Utc>, ResourceState)> = vec![
            (
                "pay-per-use one second before",
                res("u", BillingMode::PayPerUse),
                deadline - secs(1),
                ACTIVE,
            ),
            (
                "pay-per-use at the deadline freezes",
                res("u", BillingMode::PayPerUse),
                deadline,
                ARREARS,
            ),
            (
                "prepaid keeps running",
                res("p", BillingMode::Prepaid),
                deadline + days(3),
                ACTIVE,
            ),
            (
                "prepaid whose term ended freezes",
                ended_prepaid,
                deadline,
                ARREARS,
            ),
        ];
        let account = unalerted();
        for (name, r, now, want) in cases {
            assert_eq!(
                desired_resource_state(&account, &r, &sa, now),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn restore_needs_cash_plus_credit_back_to_zero() {
        let (lcic, _) = policies();
        let suspended = ResourceFacts {
            state: ARREARS,
            suspended_at: Some(t0() + days(2)),
            suspension: Some(suspension(1, Reason::Arrears, t0() + days(2))),
            ..res("r", BillingMode::PayPerUse)
        };
        let now = t0() + days(30);
        let cases = [
            ("top-up of exactly the debt", 0, 0, ACTIVE),
            ("one cent short", -1, 0, ARREARS),
            ("credit quota covers the rest", -100, 100, ACTIVE),
            ("credit quota one short", -101, 100, ARREARS),
        ];
        for (name, cash, credit, want) in cases {
            let a = AccountFacts {
                cash_balance: cash,
                credit_quota: credit,
                state: AccountState::Suspended,
                ..debtor()
            };
            assert_eq!(
                desired_resource_state(&a, &suspended, &lcic, now),
                want,
                "{name}"
            );
            let want_account = if want == ACTIVE {
                AccountState::Good
            } else {
                AccountState::Suspended
            };
            assert_eq!(
                desired_account_state(&a, [(&suspended, &lcic)], now),
                want_account,
                "{name}"
            );
        }
    }

    #[test]
    fn released_and_unsubscribed_stay_and_compliance_wins() {
        let (lcic, _) = policies();
        let paid = AccountFacts {
            cash_balance: 500,
            state: AccountState::Good,
            ..debtor()
        };
        let released = ResourceFacts {
            state: ResourceState::Released,
            ..res("r", BillingMode::PayPerUse)
        };
        assert_eq!(
            desired_resource_state(&paid, &released, &lcic, t0()),
            ResourceState::Released
        );
        let unsub = ResourceFacts {
            state: ResourceState::Suspended(Reason::Unsubscribed),
            ..res("u", BillingMode::PayPerUse)
        };
        assert_eq!(
            desired_resource_state(&paid, &unsub, &lcic, t0()),
            unsub.state
        );
        let locked = AccountFacts {
            compliance_locked: true,
            ..paid.clone()
        };
        let c = ResourceState::Suspended(Reason::Compliance);
        assert_eq!(
            desired_resource_state(&locked, &res("r", BillingMode::PayPerUse), &lcic, t0()),
            c
        );
        let susp = ResourceFacts {
            state: c,
            ..res("r", BillingMode::PayPerUse)
        };
        assert_eq!(
            desired_resource_state(&locked, &susp, &lcic, t0() + days(100)),
            c,
            "never restored while locked"
        );
        assert_eq!(
            desired_account_state(&locked, [(&susp, &lcic)], t0()),
            AccountState::ComplianceLocked
        );
        assert_eq!(
            desired_resource_state(&paid, &susp, &lcic, t0()),
            ACTIVE,
            "restored when the lock is lifted"
        );
    }

    #[test]
    fn package_suspensions_not_caused_by_arrears() {
        let (lcic, _) = policies();
        let paid = AccountFacts {
            cash_balance: 500,
            state: AccountState::Good,
            ..debtor()
        };
        let used_up = ResourceFacts {
            package_used: 1000,
            ..res("p", BillingMode::Package)
        };
        let cases = [
            ("quota left", res("p", BillingMode::Package), ACTIVE),
            (
                "quota used up, pay-as-you-go off",
                used_up.clone(),
                ResourceState::Suspended(Reason::QuotaExhausted),
            ),
            (
                "quota used up, pay-as-you-go on",
                ResourceFacts {
                    payg_enabled: true,
                    ..used_up.clone()
                },
                ACTIVE,
            ),
            (
                "expired",
                ResourceFacts {
                    package_expires_at: Some(t0()),
                    ..res("p", BillingMode::Package)
                },
                ResourceState::Suspended(Reason::PackageExpired),
            ),
            (
                "renewed after exhaustion",
                ResourceFacts {
                    state: ResourceState::Suspended(Reason::QuotaExhausted),
                    package_used: 0,
                    ..res("p", BillingMode::Package)
                },
                ACTIVE,
            ),
        ];
        for (name, r, want) in cases {
            assert_eq!(
                desired_resource_state(&paid, &r, &lcic, t0()),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn account_state_follows_grace() {
        let (lcic, _) = policies();
        let r = res("r", BillingMode::PayPerUse);
        let deadline = t0() + hours(25);
        assert_eq!(
            desired_account_state(&debtor(), [(&r, &lcic)], deadline - secs(1)),
            AccountState::InArrears
        );
        assert_eq!(
            desired_account_state(&debtor(), [(&r, &lcic)], deadline),
            AccountState::Suspended
        );
        let e = evaluate(&debtor(), &[(r.clone(), &lcic)], deadline);
        assert_eq!(e.account_to, AccountState::Suspended);
        assert_eq!(
            e.changes,
            vec![ResourceChange {
                resource_id: "r".into(),
                from: ACTIVE,
                to: ARREARS,
                new_suspension: true,
            }]
        );
        assert!(evaluate(&debtor(), &[(r, &lcic)], deadline - secs(1))
            .changes
            .is_empty());
    }

    #[test]
    fn release_needs_retention_both_warnings_a_day_old_and_no_hold() {
        let (lcic, _) = policies();
        let suspended_at = t0() + hours(25);
        let release_at = suspended_at + days(60);
        let r = ResourceFacts {
            state: ARREARS,
            suspended_at: Some(suspended_at),
            suspension: Some(suspension(1, Reason::Arrears, suspended_at)),
            ..res("r", BillingMode::PayPerUse)
        };
        let w = |lead_days: i64, at: DateTime<Utc>| AcceptedWarning {
            suspension: 1,
            lead_seconds: lead_days * 86_400,
            release_at: Some(release_at),
            accepted_at: at,
        };
        let both = vec![w(7, release_at - days(7)), w(1, release_at - days(1))];
        let min_age = hours(24);
        let a = debtor();
        assert_eq!(
            release_check(&a, &r, &lcic, &both, min_age, release_at),
            Ok(release_at)
        );
        assert_eq!(
            release_check(&a, &r, &lcic, &both, min_age, release_at - secs(1)),
            Err(NotReleased::RetentionNotOver { release_at })
        );
        assert_eq!(
            release_check(&a, &r, &lcic, &both[..1], min_age, release_at),
            Err(NotReleased::WarningMissing { lead: "24h".into() })
        );
        let late = vec![w(7, release_at - days(7)), w(1, release_at - hours(2))];
        assert!(matches!(
            release_check(&a, &r, &lcic, &late, min_age, release_at),
            Err(NotReleased::WarningTooRecent { .. })
        ));
        assert_eq!(
            release_check(&a, &r, &lcic, &late, min_age, release_at + hours(22)),
            Ok(release_at)
        );
        let held = AccountFacts {
            legal_hold: true,
            ..debtor()
        };
        assert_eq!(
            release_check(&held, &r, &lcic, &both, min_age, release_at),
            Err(NotReleased::LegalHold)
        );
        let comp = ResourceFacts {
            state: ResourceState::Suspended(Reason::Compliance),
            ..r.clone()
        };
        assert_eq!(
            release_check(&a, &comp, &lcic, &both, min_age, release_at),
            Err(NotReleased::ComplianceSuspension)
        );
        let quota = ResourceFacts {
            state: ResourceState::Suspended(Reason::QuotaExhausted),
            ..r.clone()
        };
        assert_eq!(
            release_check(&a, &quota, &lcic, &both, min_age, release_at),
            Err(NotReleased::PolicyKeepsNonArrearsSuspensions)
        );
        let active = res("x", BillingMode::PayPerUse);
        assert_eq!(
            release_check(&a, &active, &lcic, &both, min_age, release_at),
            Err(NotReleased::NotSuspended)
        );
    }

    #[test]
    fn gate_answers_per_state() {
        let (lcic, sa) = policies();
        let good = AccountFacts {
            cash_balance: 100,
            state: AccountState::Good,
            arrears_since: None,
            ..debtor()
        };
        let grace = debtor();
        let suspended = AccountFacts {
            state: AccountState::Suspended,
            ..debtor()
        };
        let locked = AccountFacts {
            compliance_locked: true,
            state: AccountState::ComplianceLocked,
            ..good.clone()
        };
        let active = res("r", BillingMode::PayPerUse);
        let lcic_susp = ResourceFacts {
            state: ARREARS,
            ..res("r", BillingMode::PayPerUse)
        };
        let sa_prepaid = res("p", BillingMode::Prepaid);
        let released = ResourceFacts {
            state: ResourceState::Released,
            ..res("r", BillingMode::PayPerUse)
        };
        use Action::*;
        let cases: Vec<(
            &str,
            &AccountFacts,
            Option<(&ResourceFacts, &Policy)>,
            Action,
            bool,
        )> = vec![
            ("good: create", &good, None, CreateResource, true),
            ("grace: create refused", &grace, None, CreateResource, false),
            ("grace: purchase refused", &grace, None, Purchase, false),
            (
                "grace: upgrade refused",
                &grace,
                Some((&active, &lcic)),
                Upgrade,
                false,
            ),
            (
                "grace: renew refused",
                &grace,
                Some((&sa_prepaid, &sa)),
                Renew,
                false,
            ),
            (
                "grace: operate allowed",
                &grace,
                Some((&active, &lcic)),
                Operate,
                true,
            ),
            (
                "lcic suspended: operate refused",
                &suspended,
                Some((&lcic_susp, &lcic)),
                Operate,
                false,
            ),
            (
                "lcic suspended: data refused",
                &suspended,
                Some((&lcic_susp, &lcic)),
                AccessData,
                false,
            ),
            (
                "lcic suspended account: operate refused",
                &suspended,
                None,
                Operate,
                false,
            ),
            (
                "sa frozen: operate refused",
                &suspended,
                Some((&lcic_susp, &sa)),
                Operate,
                false,
            ),
            (
                "sa frozen: data refused",
                &suspended,
                Some((&lcic_susp, &sa)),
                AccessData,
                false,
            ),
            (
                "sa prepaid keeps operate",
                &suspended,
                Some((&sa_prepaid, &sa)),
                Operate,
                true,
            ),
            (
                "sa prepaid renewal refused",
                &suspended,
                Some((&sa_prepaid, &sa)),
                Renew,
                false,
            ),
            (
                "compliance: everything refused",
                &locked,
                Some((&active, &lcic)),
                Operate,
                false,
            ),
            (
                "released: refused",
                &good,
                Some((&released, &lcic)),
                AccessData,
                false,
            ),
        ];
        for (name, account, resource, action, allowed) in cases {
            let d = gate(account, resource, action);
            assert_eq!(d.allowed, allowed, "{name}: {}", d.reason);
            assert!(!d.reason.is_empty());
        }
    }

    #[test]
    fn episodes_open_on_a_debt_and_close_when_paid_or_nothing_is_left() {
        let live = res("r", BillingMode::PayPerUse);
        let released = ResourceFacts {
            state: ResourceState::Released,
            ..res("r", BillingMode::PayPerUse)
        };
        let no_episode = AccountFacts {
            episode: None,
            ..debtor()
        };
        let paid = AccountFacts {
            cash_balance: 0,
            ..debtor()
        };
        let owing = debtor();
        let cases: Vec<(
            &str,
            &AccountFacts,
            Vec<&ResourceFacts>,
            Option<EpisodeMove>,
        )> = vec![
            (
                "owes, no episode, something live",
                &no_episode,
                vec![&live],
                Some(EpisodeMove::Open),
            ),
            (
                "owes, no resource at all: still told",
                &no_episode,
                vec![],
                Some(EpisodeMove::Open),
            ),
            (
                "owes, everything released: nothing to act on",
                &no_episode,
                vec![&released],
                None,
            ),
            (
                "paid",
                &paid,
                vec![&live],
                Some(EpisodeMove::Close(CloseReason::Paid)),
            ),
            (
                "everything released",
                &owing,
                vec![&released],
                Some(EpisodeMove::Close(CloseReason::Released)),
            ),
            ("owes, episode open", &owing, vec![&live], None),
        ];
        for (name, a, r, want) in cases {
            assert_eq!(episode_move(a, r), want, "{name}");
        }
    }

    #[test]
    fn a_new_episode_or_a_new_reason_starts_a_new_suspension() {
        let (lcic, _) = policies();
        let grace_over = t0() + hours(30);
        // Suspended for arrears in episode 1, still in episode 1: nothing changes.
        let same = ResourceFacts {
            state: ARREARS,
            suspension: Some(suspension(1, Reason::Arrears, t0() + hours(25))),
            ..res("r", BillingMode::PayPerUse)
        };
        assert!(evaluate(&debtor(), &[(same.clone(), &lcic)], grace_over)
            .changes
            .is_empty());
        // Left over from episode 1 while episode 2 is open: a new suspension of episode 2.
        let mut ep2 = debtor();
        ep2.episodes = 2;
        if let Some(e) = ep2.episode.as_mut() {
            e.no = 2;
        }
        let e = evaluate(&ep2, &[(same.clone(), &lcic)], grace_over);
        assert_eq!(e.changes.len(), 1);
        assert!(e.changes[0].new_suspension && e.changes[0].to == ARREARS);
        // Quota exhausted, then arrears: a new reason, a new suspension.
        let quota = ResourceFacts {
            state: ResourceState::Suspended(Reason::QuotaExhausted),
            package_used: 1000,
            suspension: Some(suspension(2, Reason::QuotaExhausted, t0())),
            ..res("p", BillingMode::Package)
        };
        let e = evaluate(&debtor(), &[(quota, &lcic)], grace_over);
        assert_eq!(
            (e.changes[0].to, e.changes[0].new_suspension),
            (ARREARS, true)
        );
    }

    #[test]
    fn release_counts_only_warnings_for_the_current_suspension_and_instant() {
        let (lcic, _) = policies();
        let s_at = t0() + hours(25);
        let release_at = s_at + days(60);
        let r = ResourceFacts {
            state: ARREARS,
            suspended_at: Some(s_at),
            suspension: Some(suspension(5, Reason::Arrears, s_at)),
            ..res("r", BillingMode::PayPerUse)
        };
        let w = |no: i32, lead: i64, announced: DateTime<Utc>| AcceptedWarning {
            suspension: no,
            lead_seconds: lead * 86_400,
            release_at: Some(announced),
            accepted_at: release_at - days(lead),
        };
        let min_age = hours(24);
        let ok = [w(5, 7, release_at), w(5, 1, release_at)];
        assert_eq!(
            release_check(&debtor(), &r, &lcic, &ok, min_age, release_at),
            Ok(release_at)
        );
        // Another suspension's warnings (an earlier episode, or another product's resource).
        let other = [w(4, 7, release_at), w(4, 1, release_at)];
        assert!(matches!(
            release_check(&debtor(), &r, &lcic, &other, min_age, release_at),
            Err(NotReleased::WarningMissing { .. })
        ));
        // Warnings that announced another release instant.
        let moved = [
            w(5, 7, release_at - days(10)),
            w(5, 1, release_at - days(10)),
        ];
        assert!(matches!(
            release_check(&debtor(), &r, &lcic, &moved, min_age, release_at),
            Err(NotReleased::WarningMissing { .. })
        ));
    }
}
