//! Applying lifecycle decisions to a loaded account, in memory: the account ends in the
//! state the decision gives (so that what comes next, and its due instants, are computed on
//! the state it leaves), and every write is appended to `Effects`. No I/O here: the caller
//! writes the effects in the transaction that holds the account's lock.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::domain::alerts::{self, AlertPlan, AlertSettings, PlannedNotice, Topic};
use crate::domain::due;
use crate::domain::lifecycle::{
    evaluate, release_deadline, AccountState, EpisodeFacts, EpisodeMove, Evaluation, Reason,
    ResourceChange, ResourceFacts, ResourceState, SuspensionFacts,
};
use crate::domain::money::format_scaled;
use crate::domain::notice::NoticeKind;
use crate::lifecycle::effects::{
    AccountUpdate, Effects, EpisodeUpdate, NewEpisode, NewEvent, NewNotice, NewOrder,
    NewSuspension, ResourceUpdate, SuspensionEnd,
};
use crate::lifecycle::{DueAt, DueJob, Loaded};

/// What every decision in one transaction shares: the configuration, the instant it acts
/// at, and its cause for the audit trail.
pub struct Ctx<'a> {
    pub config: &'a Config,
    pub now: DateTime<Utc>,
    pub cause: String,
    pub alerts: AlertSettings,
}

impl<'a> Ctx<'a> {
    pub fn new(config: &'a Config, now: DateTime<Utc>, cause: &str) -> Ctx<'a> {
        Ctx {
            config,
            now,
            cause: cause.to_string(),
            alerts: AlertSettings {
                imminent_lead: config.notifications.suspension_imminent_lead.to_chrono(),
                currency: config.billing.currency.clone(),
                minor_unit_digits: config.billing.minor_unit_digits,
                warning_min_age: config.lifecycle.warning_min_age.to_chrono(),
            },
        }
    }
}

/// What applying an evaluation changed, for reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    pub account_id: String,
    pub account_from: Option<String>,
    pub account_to: Option<String>,
    /// `opened` or `closed (paid)` / `closed (released)` with the episode's number.
    pub episode: Option<String>,
    pub suspended: Vec<ResourceMove>,
    pub restored: Vec<ResourceMove>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceMove {
    pub resource_id: String,
    pub from: String,
    pub to: String,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.account_to.is_none()
            && self.episode.is_none()
            && self.suspended.is_empty()
            && self.restored.is_empty()
    }
}

/// What `eval` would change, without changing it (dry runs).
pub fn describe(account_id: &str, eval: &Evaluation) -> Applied {
    let mut d = Applied {
        account_id: account_id.to_string(),
        episode: eval.episode.map(|m| match m {
            EpisodeMove::Open => "opened".to_string(),
            EpisodeMove::Close(r) => format!("closed ({})", r.as_str()),
        }),
        ..Default::default()
    };
    for ch in &eval.changes {
        let mv = ResourceMove {
            resource_id: ch.resource_id.clone(),
            from: ch.from.to_string(),
            to: ch.to.to_string(),
        };
        if ch.to == ResourceState::Active {
            d.restored.push(mv);
        } else {
            d.suspended.push(mv);
        }
    }
    if eval.account_to != eval.account_from {
        d.account_from = Some(eval.account_from.as_str().to_string());
        d.account_to = Some(eval.account_to.as_str().to_string());
    }
    d
}

pub(crate) fn resource_mut<'l>(l: &'l mut Loaded, id: &str) -> &'l mut ResourceFacts {
    let i = l
        .resources
        .iter()
        .position(|(r, _)| r.id == id)
        .unwrap_or_else(|| panic!("resource {id} was checked to exist"));
    &mut l.resources[i].0
}

/// The template variables every customer notice has, from the account as it is now.
fn base_vars(l: &Loaded, ctx: &Ctx) -> serde_json::Map<String, serde_json::Value> {
    let d = ctx.config.billing.minor_unit_digits;
    let cur = &ctx.config.billing.currency;
    let due = (-(l.account.cash_balance + l.account.credit_quota)).max(0);
    let mut v = serde_json::Map::new();
    v.insert("account_id".into(), l.id.clone().into());
    v.insert("account_name".into(), l.contact.name.clone().into());
    v.insert(
        "amount_due".into(),
        format!("{} {cur}", format_scaled(due, d)).into(),
    );
    v.insert(
        "cash_balance".into(),
        format!("{} {cur}", format_scaled(l.account.cash_balance, d)).into(),
    );
    v
}

fn at(l: &Loaded, t: DateTime<Utc>) -> String {
    crate::domain::calendar::format_instant(t, &l.contact.timezone)
}

/// Writes a customer notice on every channel the account can be reached on.
#[allow(clippy::too_many_arguments)]
fn customer_notice(
    l: &Loaded,
    ctx: &Ctx,
    fx: &mut Effects,
    kind: NoticeKind,
    period: &str,
    extra: serde_json::Value,
    episode: Option<i32>,
    suspension: Option<i32>,
    topics: &[Topic],
) {
    let mut vars = base_vars(l, ctx);
    if let serde_json::Value::Object(more) = extra {
        vars.extend(more);
    }
    vars.insert(
        "_about".into(),
        serde_json::to_value(topics).unwrap_or_default(),
    );
    let payload = serde_json::Value::Object(vars);
    for (channel, reachable) in [("email", l.contact.has_email), ("sms", l.contact.has_phone)] {
        if reachable {
            fx.notices.push(NewNotice {
                account_id: l.id.clone(),
                kind: kind.as_str(),
                channel,
                dedupe_key: format!("{}:{period}:{channel}", kind.as_str()),
                payload: payload.clone(),
                episode,
                suspension,
                at: ctx.now,
            });
        }
    }
}

/// Writes a control-plane event for `product`'s endpoint, when one is configured.
fn control_plane_event(
    l: &Loaded,
    ctx: &Ctx,
    fx: &mut Effects,
    product: &str,
    kind: NoticeKind,
    period: &str,
    data: serde_json::Value,
) {
    if !ctx.config.webhooks.products.contains_key(product) {
        return;
    }
    let dedupe = format!("{}:{period}:webhook", kind.as_str());
    let body = serde_json::json!({
        "event_id": crate::notify::event_id(&l.id, &dedupe),
        "type": kind.as_str(),
        "occurred_at": ctx.now,
        "account_id": l.id,
        "product": product,
        "data": data,
    });
    fx.notices.push(NewNotice {
        account_id: l.id.clone(),
        kind: kind.as_str(),
        channel: "webhook",
        dedupe_key: dedupe,
        payload: body,
        episode: l.account.episode.as_ref().map(|e| e.no),
        suspension: None,
        at: ctx.now,
    });
}

/// An order for the resource's control plane, with its signed webhook.
#[allow(clippy::too_many_arguments)]
fn order(
    l: &Loaded,
    ctx: &Ctx,
    fx: &mut Effects,
    resource_id: &str,
    product: &str,
    kind: &'static str,
    reason: Option<&'static str>,
    suspension: i32,
) {
    fx.orders.push(NewOrder {
        account_id: l.id.clone(),
        resource_id: resource_id.to_string(),
        product: product.to_string(),
        kind,
        reason,
        cause: ctx.cause.clone(),
        at: ctx.now,
    });
    let event = match kind {
        "suspend" => NoticeKind::ResourceSuspended,
        "restore" => NoticeKind::ResourceRestored,
        _ => NoticeKind::ResourceReleased,
    };
    control_plane_event(
        l,
        ctx,
        fx,
        product,
        event,
        &format!("s{suspension}:{resource_id}"),
        serde_json::json!({ "resource_id": resource_id, "reason": reason }),
    );
}

fn event(
    l: &Loaded,
    ctx: &Ctx,
    fx: &mut Effects,
    resource_id: Option<&str>,
    from: String,
    to: String,
    reason: String,
) {
    fx.events.push(NewEvent {
        account_id: l.id.clone(),
        episode: l.account.episode.as_ref().map(|e| e.no),
        resource_id: resource_id.map(str::to_string),
        from,
        to,
        reason,
        cause: ctx.cause.clone(),
        at: ctx.now,
    });
}

/// Moves one resource as `ch` says: ends its current suspension when its reason (or its
/// episode) changes, starts a new one with its own clock and release deadline, and writes
/// the resource, the audit event, the control-plane order and the package notices.
/// Returns the episode of an arrears suspension it ended by restoring the resource.
fn apply_change(
    l: &mut Loaded,
    ch: &ResourceChange,
    ctx: &Ctx,
    fx: &mut Effects,
) -> Option<Option<i32>> {
    let now = ctx.now;
    let Some(i) = l.resources.iter().position(|(r, _)| r.id == ch.resource_id) else {
        return None;
    };
    let product = l.resources[i].1.clone();
    let policy = ctx.config.product(&product).map(|p| &p.policy);
    let old = l.resources[i].0.suspension.clone();
    let mut restored_from_arrears = None;
    let ends =
        matches!(ch.from, ResourceState::Suspended(_)) && (ch.to != ch.from || ch.new_suspension);
    if let (true, Some(s)) = (ends, &old) {
        let how = match ch.to {
            ResourceState::Active => "restored",
            ResourceState::Released => "released",
            ResourceState::Suspended(r) if ResourceState::Suspended(r) == ch.from => "new_episode",
            ResourceState::Suspended(_) => "reason_changed",
        };
        fx.suspensions_end.push(SuspensionEnd {
            account_id: l.id.clone(),
            no: s.no,
            at: now,
            how,
        });
        if ch.to == ResourceState::Active && s.reason == Reason::Arrears {
            restored_from_arrears = Some(s.episode);
        }
    }
    let episode_no = l.account.episode.as_ref().map(|e| e.no);
    let mut new_no = None;
    {
        let suspensions = &mut l.suspensions;
        let r = &mut l.resources[i].0;
        match ch.to {
            ResourceState::Suspended(reason) => {
                if ch.new_suspension || r.suspension.is_none() {
                    *suspensions += 1;
                    let s = SuspensionFacts {
                        no: *suspensions,
                        reason,
                        episode: (reason == Reason::Arrears).then_some(episode_no).flatten(),
                        started_at: now,
                        release_at: policy.and_then(|p| release_deadline(reason, now, p)),
                    };
                    fx.suspensions_new.push(NewSuspension {
                        account_id: l.id.clone(),
                        no: s.no,
                        resource_id: r.id.clone(),
                        reason: reason.as_str(),
                        episode: s.episode,
                        started_at: now,
                        release_at: s.release_at,
                    });
                    new_no = Some(s.no);
                    r.suspension = Some(s);
                }
                if !matches!(ch.from, ResourceState::Suspended(_)) {
                    r.suspended_at = Some(now);
                }
            }
            ResourceState::Active => {
                r.suspension = None;
                r.suspended_at = None;
            }
            ResourceState::Released => {}
        }
        r.state = ch.to;
        fx.resources.push(ResourceUpdate {
            account_id: l.id.clone(),
            id: r.id.clone(),
            state: ch.to.state_str(),
            reason: ch.to.reason().map(|x| x.as_str()),
            suspended_at: r.suspended_at,
            suspension: if ch.to == ResourceState::Released {
                None
            } else {
                r.suspension.as_ref().map(|s| s.no)
            },
            released_at: (ch.to == ResourceState::Released).then_some(now),
            at: now,
        });
        if ch.to == ResourceState::Released {
            r.suspension = None;
        }
    }
    if ch.to != ch.from || ch.new_suspension {
        announce_change(l, ch, ctx, fx, &product, old.as_ref(), new_no);
    }
    restored_from_arrears
}

/// What a resource's move tells: the audit event, the control-plane order when it stops,
/// starts serving or goes, and R6's notice when its package ran out or expired.
fn announce_change(
    l: &mut Loaded,
    ch: &ResourceChange,
    ctx: &Ctx,
    fx: &mut Effects,
    product: &str,
    old: Option<&SuspensionFacts>,
    new_no: Option<i32>,
) {
    let why = match ch.to {
        ResourceState::Active => "restored: the cause of the suspension is gone".to_string(),
        ResourceState::Suspended(r) if ch.to == ch.from => {
            format!("suspended: {} (a new arrears episode)", r.as_str())
        }
        ResourceState::Suspended(Reason::Unsubscribed) => {
            "unsubscribed by the customer: no usage after this instant is accepted".to_string()
        }
        ResourceState::Suspended(r) => format!("suspended: {}", r.as_str()),
        ResourceState::Released => {
            "retention period over: released for good, its data deleted by the control plane"
                .to_string()
        }
    };
    let rid = ch.resource_id.clone();
    event(
        l,
        ctx,
        fx,
        Some(&rid),
        ch.from.to_string(),
        ch.to.to_string(),
        why,
    );
    // An order when the resource stops or starts serving, or goes (a change of suspension
    // reason is not news to the control plane).
    let (kind, suspension) = match (ch.from, ch.to, old, new_no) {
        (ResourceState::Active, ResourceState::Suspended(_), _, Some(n)) => (Some("suspend"), n),
        (ResourceState::Suspended(_), ResourceState::Active, Some(s), _) => (Some("restore"), s.no),
        (_, ResourceState::Released, Some(s), _) => (Some("release"), s.no),
        _ => (None, 0),
    };
    if let Some(kind) = kind {
        order(
            l,
            ctx,
            fx,
            &rid,
            product,
            kind,
            ch.to.reason().or(ch.from.reason()).map(|r| r.as_str()),
            suspension,
        );
    }
    // R6 notices: the package ran out or expired.
    let package_notice = match ch.to {
        ResourceState::Suspended(Reason::QuotaExhausted) => Some(NoticeKind::PackageExhausted),
        ResourceState::Suspended(Reason::PackageExpired) => Some(NoticeKind::PackageExpired),
        _ => None,
    };
    if let (Some(k), Some(n)) = (package_notice, new_no) {
        let extra = serde_json::json!({ "resource_id": rid, "suspended_at": at(l, ctx.now) });
        customer_notice(
            l,
            ctx,
            fx,
            k,
            &format!("s{n}:{rid}"),
            extra,
            None,
            Some(n),
            &[],
        );
    }
}

/// Evaluates the account at `ctx.now` and applies the result in memory, appending the writes.
pub fn reconcile(l: &mut Loaded, ctx: &Ctx, fx: &mut Effects) -> Applied {
    let eval = evaluate(&l.account, &l.with_policies(ctx.config), ctx.now);
    apply_evaluation(l, &eval, ctx, fx)
}

/// Applies `eval` (made on `l` at `ctx.now`) to `l`, appending the writes.
pub fn apply_evaluation(l: &mut Loaded, eval: &Evaluation, ctx: &Ctx, fx: &mut Effects) -> Applied {
    let now = ctx.now;
    let applied = describe(&l.id, eval);
    match eval.episode {
        Some(EpisodeMove::Open) => {
            l.account.episodes += 1;
            let no = l.account.episodes;
            fx.episodes_new.push(NewEpisode {
                account_id: l.id.clone(),
                no,
                opened_at: now,
                opened_by: ctx.cause.clone(),
            });
            l.account.episode = Some(EpisodeFacts {
                no,
                opened_at: now,
                first_overdue_alert_at: None,
                suspended_at: None,
            });
        }
        Some(EpisodeMove::Close(reason)) => {
            if let Some(ep) = l.account.episode.take() {
                fx.episodes_upd.push(EpisodeUpdate {
                    account_id: l.id.clone(),
                    no: ep.no,
                    suspended_at: None,
                    closed: Some((now, reason.as_str(), ctx.cause.clone())),
                });
            }
        }
        None => {}
    }
    let mut restored_episodes = BTreeSet::new();
    for ch in &eval.changes {
        if let Some(ep) = apply_change(l, ch, ctx, fx) {
            restored_episodes.insert(ep);
        }
    }
    if let Some(ep) = restored_episodes.into_iter().next() {
        let period = ep.map_or_else(|| format!("at:{}", now.to_rfc3339()), |e| format!("e{e}"));
        let extra = serde_json::json!({ "restored_at": at(l, now) });
        customer_notice(
            l,
            ctx,
            fx,
            NoticeKind::Restored,
            &period,
            extra,
            ep,
            None,
            &[],
        );
    }
    let from = eval.account_from;
    let to = eval.account_to;
    l.account.state = to;
    if l.account.in_arrears() {
        l.account.arrears_since = l.account.arrears_since.or(Some(now));
    } else {
        l.account.arrears_since = None;
    }
    if to == AccountState::Suspended {
        if let Some(ep) = l
            .account
            .episode
            .as_mut()
            .filter(|e| e.suspended_at.is_none())
        {
            ep.suspended_at = Some(now);
            let no = ep.no;
            fx.episodes_upd.push(EpisodeUpdate {
                account_id: l.id.clone(),
                no,
                suspended_at: Some(now),
                closed: None,
            });
            let release_at = l
                .resources
                .iter()
                .filter_map(|(r, _)| r.suspension.as_ref().and_then(|s| s.release_at))
                .min()
                .or_else(|| {
                    l.with_policies(ctx.config)
                        .iter()
                        .map(|(_, p)| now + p.retention.to_chrono())
                        .min()
                })
                .unwrap_or(now);
            let extra =
                serde_json::json!({ "suspended_at": at(l, now), "release_at": at(l, release_at) });
            customer_notice(
                l,
                ctx,
                fx,
                NoticeKind::Suspended,
                &format!("e{no}"),
                extra,
                Some(no),
                None,
                &[],
            );
        }
    }
    if from != to {
        let why = match to {
            AccountState::Good => "cash + credit quota is back to >= 0",
            AccountState::InArrears => "cash + credit quota is below zero",
            AccountState::Suspended => "grace period over and still in arrears",
            AccountState::ComplianceLocked => "compliance lock",
        };
        event(
            l,
            ctx,
            fx,
            None,
            from.as_str().into(),
            to.as_str().into(),
            why.into(),
        );
        let mut products: Vec<String> = l.resources.iter().map(|(_, p)| p.clone()).collect();
        products.sort();
        products.dedup();
        for product in products {
            let data = serde_json::json!({ "from": from.as_str(), "to": to.as_str() });
            let period = format!("{product}:{}:{}", now.to_rfc3339(), to.as_str());
            control_plane_event(
                l,
                ctx,
                fx,
                &product,
                NoticeKind::AccountStateChanged,
                &period,
                data,
            );
        }
    }
    applied
}

/// The customer unsubscribes `resource` (checked to exist and not to be released): it is
/// suspended for good (reason `unsubscribed`, its own retention clock). Returns the move.
pub fn unsubscribe(
    l: &mut Loaded,
    resource: &str,
    ctx: &Ctx,
    fx: &mut Effects,
) -> Option<ResourceMove> {
    let r = l
        .resources
        .iter()
        .find(|(r, _)| r.id == resource)?
        .0
        .clone();
    if r.state == ResourceState::Suspended(Reason::Unsubscribed) {
        return None;
    }
    let ch = ResourceChange {
        resource_id: resource.to_string(),
        from: r.state,
        to: ResourceState::Suspended(Reason::Unsubscribed),
        new_suspension: true,
    };
    apply_change(l, &ch, ctx, fx);
    Some(ResourceMove {
        resource_id: resource.to_string(),
        from: ch.from.to_string(),
        to: ch.to.to_string(),
    })
}

/// A resource released (or, on a dry run, that would be).
#[derive(Debug, Clone, Serialize)]
pub struct Released {
    pub account_id: String,
    pub resource_id: String,
    pub product: String,
    pub reason: String,
    pub suspension: Option<i32>,
    pub suspended_at: Option<DateTime<Utc>>,
    pub release_at: DateTime<Utc>,
}

/// The resources of `l` that `release_check` lets go at `ctx.now`; the others are counted in
/// `kept` by why.
pub fn releasable(
    l: &Loaded,
    ctx: &Ctx,
    kept: &mut std::collections::BTreeMap<String, usize>,
) -> Vec<Released> {
    use crate::domain::lifecycle::{release_check, NotReleased};
    let mut out = Vec::new();
    for (r, product) in &l.resources {
        let ResourceState::Suspended(reason) = r.state else {
            continue;
        };
        let Some(policy) = ctx.config.product(product).map(|p| &p.policy) else {
            *kept.entry("product_not_configured".into()).or_default() += 1;
            continue;
        };
        let min_age = ctx.config.lifecycle.warning_min_age.to_chrono();
        match release_check(&l.account, r, policy, &l.warnings, min_age, ctx.now) {
            Ok(release_at) => out.push(Released {
                account_id: l.id.clone(),
                resource_id: r.id.clone(),
                product: product.clone(),
                reason: reason.as_str().to_string(),
                suspension: r.suspension.as_ref().map(|s| s.no),
                suspended_at: r.suspension.as_ref().map(|s| s.started_at),
                release_at,
            }),
            Err(n) => {
                let why = match n {
                    NotReleased::NotSuspended => "not_suspended",
                    NotReleased::ArrearsPaid => "arrears_paid",
                    NotReleased::ComplianceSuspension => "compliance_suspension",
                    NotReleased::PolicyKeepsNonArrearsSuspensions => {
                        "non_arrears_suspension_kept_by_policy"
                    }
                    NotReleased::LegalHold => "legal_hold",
                    NotReleased::RetentionNotOver { .. } => "retention_not_over",
                    NotReleased::WarningMissing { .. } => "release_warning_missing",
                    NotReleased::WarningTooRecent { .. } => "release_warning_too_recent",
                };
                *kept.entry(why.to_string()).or_default() += 1;
            }
        }
    }
    out
}

/// Releases `due` (from `releasable` on this very `l`): marked released, kept as their own
/// tombstones, with a delete order for the control plane and one `released` notice; then the
/// account is reconciled (an episode with nothing left live closes).
pub fn release(l: &mut Loaded, due: &[Released], ctx: &Ctx, fx: &mut Effects) {
    if due.is_empty() {
        return;
    }
    for d in due {
        let Some(r) = l.resources.iter().find(|(r, _)| r.id == d.resource_id) else {
            continue;
        };
        let ch = ResourceChange {
            resource_id: d.resource_id.clone(),
            from: r.0.state,
            to: ResourceState::Released,
            new_suspension: false,
        };
        apply_change(l, &ch, ctx, fx);
    }
    let first = due.iter().filter_map(|d| d.suspension).min().unwrap_or(0);
    let extra = serde_json::json!({ "released_at": at(l, ctx.now) });
    let episode = l.account.episode.as_ref().map(|e| e.no);
    customer_notice(
        l,
        ctx,
        fx,
        NoticeKind::Released,
        &format!("s{first}"),
        extra,
        episode,
        Some(first),
        &[],
    );
    reconcile(l, ctx, fx);
}

/// `send_alerts`' decision for the account at `ctx.now`: the notices due, R7's crossing.
pub fn alert_plan(l: &Loaded, ctx: &Ctx) -> AlertPlan {
    alerts::plan(
        &l.account,
        &l.balance,
        &l.with_policies(ctx.config),
        &l.written,
        &ctx.alerts,
        &l.contact.timezone,
        ctx.now,
    )
}

/// Writes `plan` (from `alert_plan` on this `l`) and records its topics as written.
pub fn apply_alerts(l: &mut Loaded, plan: &AlertPlan, ctx: &Ctx, fx: &mut Effects) {
    for n in &plan.notices {
        let PlannedNotice {
            kind,
            period,
            vars,
            episode,
            suspension,
            topics,
            ..
        } = n;
        customer_notice(
            l,
            ctx,
            fx,
            *kind,
            period,
            vars.clone(),
            *episode,
            *suspension,
            topics,
        );
        l.written.extend(topics.iter().cloned());
    }
    if plan.disarm {
        l.balance.armed = false;
    }
    if plan.rearm {
        l.balance.armed = true;
    }
}

/// Each lifecycle job's next due instant for the account as it is now.
pub fn due_at(l: &Loaded, ctx: &Ctx) -> DueAt {
    let res = l.with_policies(ctx.config);
    let min_age = ctx.config.lifecycle.warning_min_age.to_chrono();
    let with_warnings: Vec<_> = res
        .iter()
        .map(|(r, p)| (r.clone(), *p, l.warnings.as_slice()))
        .collect();
    DueAt {
        send_alerts: alerts::next_due(
            &l.account,
            &l.balance,
            &res,
            &l.written,
            &ctx.alerts,
            ctx.now,
        ),
        enforce_suspensions: due::enforce_due(&l.account, &res, ctx.now),
        release_resources: due::release_due(&l.account, &with_warnings, min_age, ctx.now),
    }
}

/// Ends the decisions on `l`: its lifecycle columns and due instants are written (`changed`:
/// more than the due instants changed). The job that acted (`own`) has done what was due at
/// `now`, so its own next due instant is later.
pub fn finish(
    l: &Loaded,
    ctx: &Ctx,
    own: Option<DueJob>,
    changed: bool,
    fx: &mut Effects,
) -> DueAt {
    let mut due = due_at(l, ctx);
    // A job never leaves itself due at the instant it just acted at: the loop that selected
    // the account would select it again. What is still due (held back on purpose, a mass
    // release refused, say) is looked at by the job's next run.
    let later = |t: Option<DateTime<Utc>>| t.map(|t| t.max(ctx.now + Duration::seconds(1)));
    match own {
        Some(DueJob::SendAlerts) => due.send_alerts = later(due.send_alerts),
        Some(DueJob::EnforceSuspensions) => {
            due.enforce_suspensions = later(due.enforce_suspensions)
        }
        Some(DueJob::ReleaseResources) => due.release_resources = later(due.release_resources),
        None => {}
    }
    fx.accounts.push(AccountUpdate {
        id: l.id.clone(),
        state: l.account.state.as_str(),
        arrears_since: l.account.arrears_since,
        episode: l.account.episode.as_ref().map(|e| e.no),
        episodes: l.account.episodes,
        suspensions: l.suspensions,
        armed: l.balance.armed,
        alerts_due_at: due.send_alerts,
        enforce_due_at: due.enforce_suspensions,
        release_due_at: due.release_resources,
        changed,
        at: ctx.now,
    });
    due
}
