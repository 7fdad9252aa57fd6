//! Loading accounts as the lifecycle decides on them: the account with its open episode,
//! its resources with their current suspensions, R7's coupons, the release warnings accepted
//! for the current suspensions and the timed notices already written, for one account or a
//! batch, in five queries whatever the batch size.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db::schema::{
    accounts, arrears_episodes, coupons, notices, release_warnings, resource_suspensions, resources,
};
use crate::domain::alerts::{BalanceFacts, Topic};
use crate::domain::lifecycle::{
    AcceptedWarning, AccountFacts, AccountState, BillingMode, EpisodeFacts, Reason, ResourceFacts,
    ResourceState, SuspensionFacts,
};
use crate::lifecycle::{Contact, DueAt, LifecycleError, Loaded};

#[derive(Queryable, Selectable)]
#[diesel(table_name = accounts)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct AccountRow {
    id: String,
    name: String,
    #[diesel(select_expression = accounts::email.is_not_null())]
    has_email: bool,
    #[diesel(select_expression = accounts::phone.is_not_null())]
    has_phone: bool,
    timezone: String,
    cash_balance: i64,
    credit_quota: i64,
    low_balance_threshold: Option<i64>,
    balance_alert_armed: bool,
    state: String,
    compliance_locked: bool,
    legal_hold: bool,
    arrears_since: Option<DateTime<Utc>>,
    episodes: i32,
    suspensions: i32,
    alerts_due_at: Option<DateTime<Utc>>,
    enforce_due_at: Option<DateTime<Utc>>,
    release_due_at: Option<DateTime<Utc>>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = arrears_episodes)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct EpisodeRow {
    no: i32,
    opened_at: DateTime<Utc>,
    first_overdue_alert_at: Option<DateTime<Utc>>,
    suspended_at: Option<DateTime<Utc>>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = resources)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct ResourceRow {
    account_id: String,
    id: String,
    product: String,
    billing_mode: String,
    state: String,
    state_reason: Option<String>,
    package_quota: Option<i64>,
    package_used: i64,
    package_expires_at: Option<DateTime<Utc>>,
    payg_enabled: bool,
    term_ends_at: Option<DateTime<Utc>>,
    suspended_at: Option<DateTime<Utc>>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = resource_suspensions)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct SuspensionRow {
    no: i32,
    reason: String,
    episode: Option<i32>,
    started_at: DateTime<Utc>,
    release_at: Option<DateTime<Utc>>,
}

/// A release warning accepted for a resource's current suspension.
#[derive(Queryable, Selectable)]
#[diesel(table_name = release_warnings)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct WarningRow {
    account_id: String,
    suspension: i32,
    lead_seconds: i32,
    release_at: Option<DateTime<Utc>>,
    accepted_at: DateTime<Utc>,
}

/// Loads an account and everything the lifecycle decides on; with `lock`, the account row is
/// locked FOR UPDATE first, which serialises every decision about the account (top-ups, jobs,
/// operators).
pub async fn load(
    conn: &mut AsyncPgConnection,
    id: &str,
    lock: bool,
) -> Result<Option<Loaded>, LifecycleError> {
    if lock {
        let found: Option<String> = accounts::table
            .find(id)
            .select(accounts::id)
            .for_update()
            .first(conn)
            .await
            .optional()?;
        if found.is_none() {
            return Ok(None);
        }
    }
    Ok(load_many(conn, &[id.to_string()]).await?.into_iter().next())
}

/// Loads the accounts `ids` (the caller holds their locks when it will act on them), in the
/// order of `ids`.
pub async fn load_many(
    conn: &mut AsyncPgConnection,
    ids: &[String],
) -> Result<Vec<Loaded>, LifecycleError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(AccountRow, Option<EpisodeRow>)> = accounts::table
        .left_join(
            arrears_episodes::table.on(arrears_episodes::account_id
                .eq(accounts::id)
                .and(accounts::episode.eq(arrears_episodes::no.nullable()))),
        )
        .filter(accounts::id.eq_any(ids))
        .select((AccountRow::as_select(), Option::<EpisodeRow>::as_select()))
        .load(conn)
        .await?;
    let res: Vec<(ResourceRow, Option<SuspensionRow>)> = resources::table
        .left_join(
            resource_suspensions::table.on(resource_suspensions::account_id
                .eq(resources::account_id)
                .and(resources::suspension.eq(resource_suspensions::no.nullable()))),
        )
        .filter(resources::account_id.eq_any(ids))
        .order((resources::account_id, resources::id))
        .select((
            ResourceRow::as_select(),
            Option::<SuspensionRow>::as_select(),
        ))
        .load(conn)
        .await?;
    let with_threshold: Vec<&String> = rows
        .iter()
        .filter(|(a, _)| a.low_balance_threshold.is_some())
        .map(|(a, _)| &a.id)
        .collect();
    let cps: Vec<(String, i64, DateTime<Utc>)> = if with_threshold.is_empty() {
        Vec::new()
    } else {
        coupons::table
            .filter(coupons::account_id.eq_any(with_threshold))
            .filter(coupons::remaining.gt(0))
            .select((coupons::account_id, coupons::remaining, coupons::expires_at))
            .load(conn)
            .await?
    };
    let warnings: Vec<WarningRow> = release_warnings::table
        .inner_join(
            resources::table.on(resources::account_id
                .eq(release_warnings::account_id)
                .and(resources::suspension.eq(release_warnings::suspension.nullable()))),
        )
        .filter(release_warnings::account_id.eq_any(ids))
        .select(WarningRow::as_select())
        .load(conn)
        .await?;
    // Timed notices of the open episodes and of the current suspensions: what is written.
    // The episode and suspension numbers once each (a batch's accounts mostly share them):
    // the index condition takes every (account, kind, number) combination.
    let mut episodes: Vec<i32> = rows
        .iter()
        .filter_map(|(_, e)| e.as_ref().map(|e| e.no))
        .collect();
    episodes.sort_unstable();
    episodes.dedup();
    let current: HashSet<(String, i32)> = res
        .iter()
        .filter_map(|(r, s)| s.as_ref().map(|s| (r.account_id.clone(), s.no)))
        .collect();
    let open: HashMap<String, i32> = rows
        .iter()
        .filter_map(|(a, e)| e.as_ref().map(|e| (a.id.clone(), e.no)))
        .collect();
    let mut suspension_nos: Vec<i32> = current.iter().map(|(_, n)| *n).collect();
    suspension_nos.sort_unstable();
    suspension_nos.dedup();
    let written_rows: Vec<(String, Option<i32>, Option<i32>, serde_json::Value)> =
        if episodes.is_empty() && suspension_nos.is_empty() {
            Vec::new()
        } else {
            notices::table
                .filter(notices::account_id.eq_any(ids))
                .filter(
                    notices::kind
                        .eq_any(["overdue", "overdue_reminder", "suspension_imminent"])
                        .and(notices::episode.eq_any(&episodes))
                        .or(notices::kind
                            .eq("release_warning")
                            .and(notices::suspension.eq_any(&suspension_nos))),
                )
                .select((
                    notices::account_id,
                    notices::episode,
                    notices::suspension,
                    notices::payload,
                ))
                .load(conn)
                .await?
        };

    let mut by_account: HashMap<String, Loaded> = HashMap::with_capacity(rows.len());
    for (a, e) in rows {
        by_account.insert(a.id.clone(), loaded_account(a, e)?);
    }
    for (r, s) in res {
        let Some(l) = by_account.get_mut(&r.account_id) else {
            continue;
        };
        l.resources.push(resource_facts(r, s)?);
    }
    for (account, remaining, expires_at) in cps {
        if let Some(l) = by_account.get_mut(&account) {
            l.balance.coupons.push((remaining, expires_at));
        }
    }
    for w in warnings {
        if let Some(l) = by_account.get_mut(&w.account_id) {
            l.warnings.push(AcceptedWarning {
                suspension: w.suspension,
                lead_seconds: i64::from(w.lead_seconds),
                release_at: w.release_at,
                accepted_at: w.accepted_at,
            });
        }
    }
    for (account, episode, suspension, payload) in written_rows {
        let relevant = match (episode, suspension) {
            (_, Some(s)) if current.contains(&(account.clone(), s)) => true,
            (Some(e), _) => open.get(&account) == Some(&e),
            _ => false,
        };
        let Some(l) = by_account.get_mut(&account).filter(|_| relevant) else {
            continue;
        };
        if let Ok(topics) = serde_json::from_value::<Vec<Topic>>(payload["_about"].clone()) {
            l.written.extend(topics);
        }
    }
    Ok(ids.iter().filter_map(|id| by_account.remove(id)).collect())
}

/// An account's facts as loaded, before its resources, coupons, warnings and notices.
fn loaded_account(a: AccountRow, e: Option<EpisodeRow>) -> Result<Loaded, LifecycleError> {
    let state = AccountState::parse(&a.state)
        .ok_or_else(|| LifecycleError::Invalid(format!("account {} state {:?}", a.id, a.state)))?;
    let account = AccountFacts {
        cash_balance: a.cash_balance,
        credit_quota: a.credit_quota,
        state,
        arrears_since: a.arrears_since,
        episode: e.map(|e| EpisodeFacts {
            no: e.no,
            opened_at: e.opened_at,
            first_overdue_alert_at: e.first_overdue_alert_at,
            suspended_at: e.suspended_at,
        }),
        episodes: a.episodes,
        compliance_locked: a.compliance_locked,
        legal_hold: a.legal_hold,
    };
    Ok(Loaded {
        id: a.id,
        account,
        balance: BalanceFacts {
            reachable: a.has_email || a.has_phone,
            threshold: a.low_balance_threshold,
            armed: a.balance_alert_armed,
            coupons: Vec::new(),
        },
        contact: Contact {
            name: a.name,
            has_email: a.has_email,
            has_phone: a.has_phone,
            timezone: a.timezone,
        },
        suspensions: a.suspensions,
        resources: Vec::new(),
        warnings: Vec::new(),
        written: HashSet::new(),
        due: DueAt {
            send_alerts: a.alerts_due_at,
            enforce_suspensions: a.enforce_due_at,
            release_resources: a.release_due_at,
        },
    })
}

/// A resource's facts as loaded, with its product.
fn resource_facts(
    r: ResourceRow,
    s: Option<SuspensionRow>,
) -> Result<(ResourceFacts, String), LifecycleError> {
    let state = ResourceState::parse(&r.state, r.state_reason.as_deref()).ok_or_else(|| {
        LifecycleError::Invalid(format!(
            "resource {} state {:?} {:?}",
            r.id, r.state, r.state_reason
        ))
    })?;
    let billing_mode = BillingMode::parse(&r.billing_mode).ok_or_else(|| {
        LifecycleError::Invalid(format!(
            "resource {} billing mode {:?}",
            r.id, r.billing_mode
        ))
    })?;
    let suspension = match s {
        Some(s) => Some(SuspensionFacts {
            no: s.no,
            reason: Reason::parse(&s.reason).ok_or_else(|| {
                LifecycleError::Invalid(format!("suspension {} reason {:?}", s.no, s.reason))
            })?,
            episode: s.episode,
            started_at: s.started_at,
            release_at: s.release_at,
        }),
        None => None,
    };
    Ok((
        ResourceFacts {
            id: r.id,
            billing_mode,
            state,
            package_quota: r.package_quota,
            package_used: r.package_used,
            package_expires_at: r.package_expires_at,
            payg_enabled: r.payg_enabled,
            term_ends_at: r.term_ends_at,
            suspended_at: r.suspended_at,
            suspension,
        },
        r.product,
    ))
}
