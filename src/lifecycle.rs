//! The lifecycle's I/O: loading an account's facts under a row lock, applying what
//! `domain::lifecycle::evaluate` decided (resource and account states, the audit trail, the
//! control-plane orders) in the caller's transaction, and the operator actions that change
//! the facts (compliance lock, legal hold, pay-as-you-go, package renewal, unsubscribe).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::{
    accounts, control_plane_orders, lifecycle_events, release_warnings, resources,
};
use crate::db::{Db, DbError};
use crate::domain::lifecycle::{
    evaluate, AcceptedWarning, AccountFacts, AccountState, BillingMode, Evaluation, Reason,
    ResourceFacts, ResourceState,
};
use crate::domain::policy::Policy;
use crate::notify::{self, NoticeKind};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    #[error("unknown resource {resource:?} of account {account:?}")]
    UnknownResource { account: String, resource: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for LifecycleError {
    fn from(e: diesel::result::Error) -> Self {
        LifecycleError::Db(DbError::Query(e))
    }
}

/// An account with its resources as the domain sees them.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub id: String,
    pub account: AccountFacts,
    /// (facts, product id)
    pub resources: Vec<(ResourceFacts, String)>,
}

impl Loaded {
    /// Pairs each resource with its product's policy; resources of a product no longer
    /// configured are left out of decisions (and reported by `arrears check`).
    pub fn with_policies<'c>(&self, config: &'c Config) -> Vec<(ResourceFacts, &'c Policy)> {
        self.resources
            .iter()
            .filter_map(|(r, p)| config.product(p).map(|prod| (r.clone(), &prod.policy)))
            .collect()
    }

    pub fn product_of(&self, resource_id: &str) -> Option<&str> {
        self.resources
            .iter()
            .find(|(r, _)| r.id == resource_id)
            .map(|(_, p)| p.as_str())
    }
}

type AccountRow = (
    i64,
    i64,
    String,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    bool,
    bool,
);
type ResourceRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    i64,
    Option<DateTime<Utc>>,
    bool,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// Loads an account and its resources; with `lock`, the account row is locked FOR UPDATE
/// first, which serialises every decision about the account (top-ups, jobs, operators).
pub async fn load(
    conn: &mut AsyncPgConnection,
    id: &str,
    lock: bool,
) -> Result<Option<Loaded>, LifecycleError> {
    let q = accounts::table.find(id).select((
        accounts::cash_balance,
        accounts::credit_quota,
        accounts::state,
        accounts::arrears_since,
        accounts::suspended_at,
        accounts::first_overdue_alert_at,
        accounts::compliance_locked,
        accounts::legal_hold,
    ));
    let row: Option<AccountRow> = if lock {
        q.for_update().first(conn).await.optional()?
    } else {
        q.first(conn).await.optional()?
    };
    let Some(a) = row else { return Ok(None) };
    let account = AccountFacts {
        cash_balance: a.0,
        credit_quota: a.1,
        state: AccountState::parse(&a.2)
            .ok_or_else(|| LifecycleError::Invalid(format!("account state {:?}", a.2)))?,
        arrears_since: a.3,
        suspended_at: a.4,
        first_overdue_alert_at: a.5,
        compliance_locked: a.6,
        legal_hold: a.7,
    };
    let rows: Vec<ResourceRow> = resources::table
        .filter(resources::account_id.eq(id))
        .order(resources::id)
        .select((
            resources::id,
            resources::product,
            resources::billing_mode,
            resources::state,
            resources::state_reason,
            resources::package_quota,
            resources::package_used,
            resources::package_expires_at,
            resources::payg_enabled,
            resources::term_ends_at,
            resources::suspended_at,
        ))
        .load(conn)
        .await?;
    let mut res = Vec::with_capacity(rows.len());
    for r in rows {
        let state = ResourceState::parse(&r.3, r.4.as_deref()).ok_or_else(|| {
            LifecycleError::Invalid(format!("resource {} state {:?} {:?}", r.0, r.3, r.4))
        })?;
        let billing_mode = BillingMode::parse(&r.2).ok_or_else(|| {
            LifecycleError::Invalid(format!("resource {} billing mode {:?}", r.0, r.2))
        })?;
        res.push((
            ResourceFacts {
                id: r.0,
                billing_mode,
                state,
                package_quota: r.5,
                package_used: r.6,
                package_expires_at: r.7,
                payg_enabled: r.8,
                term_ends_at: r.9,
                suspended_at: r.10,
            },
            r.1,
        ));
    }
    Ok(Some(Loaded {
        id: id.to_string(),
        account,
        resources: res,
    }))
}

/// What applying an evaluation changed, for reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    pub account_id: String,
    pub account_from: Option<String>,
    pub account_to: Option<String>,
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
        self.account_to.is_none() && self.suspended.is_empty() && self.restored.is_empty()
    }
}

/// What `eval` would change, without changing it (dry runs).
pub fn describe(account_id: &str, eval: &Evaluation) -> Applied {
    let mut d = Applied {
        account_id: account_id.to_string(),
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

/// Evaluates the loaded account at `now` and applies the result in the caller's
/// transaction. Returns what changed.
pub async fn reconcile(
    conn: &mut AsyncPgConnection,
    config: &Config,
    loaded: &Loaded,
    now: DateTime<Utc>,
    cause: &str,
) -> Result<Applied, LifecycleError> {
    let eval = evaluate(&loaded.account, &loaded.with_policies(config), now);
    apply(conn, config, loaded, &eval, now, cause).await
}

async fn apply(
    conn: &mut AsyncPgConnection,
    config: &Config,
    loaded: &Loaded,
    eval: &Evaluation,
    now: DateTime<Utc>,
    cause: &str,
) -> Result<Applied, LifecycleError> {
    let id = &loaded.id;
    for ch in &eval.changes {
        let was_suspended_at = loaded
            .resources
            .iter()
            .find(|(r, _)| r.id == ch.resource_id)
            .and_then(|(r, _)| r.suspended_at);
        let suspended_at = match (ch.from, ch.to) {
            (_, ResourceState::Active) => None,
            (ResourceState::Suspended(_), ResourceState::Suspended(_)) => was_suspended_at,
            _ => Some(now),
        };
        diesel::update(resources::table.find((id, &ch.resource_id)))
            .set((
                resources::state.eq(ch.to.state_str()),
                resources::state_reason.eq(ch.to.reason().map(|r| r.as_str())),
                resources::suspended_at.eq(suspended_at),
                resources::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
        let why = match ch.to {
            ResourceState::Active => "restored: the cause of the suspension is gone".to_string(),
            ResourceState::Suspended(r) => format!("suspended: {}", r.as_str()),
            ResourceState::Released => "released".to_string(),
        };
        record_event(
            conn,
            id,
            Some(&ch.resource_id),
            &ch.from.to_string(),
            &ch.to.to_string(),
            &why,
            cause,
            now,
        )
        .await?;
        let product = loaded.product_of(&ch.resource_id).unwrap_or_default();
        // An order when the resource stops or starts serving (a change of suspension
        // reason is not news to the control plane).
        let kind = match (ch.from, ch.to) {
            (ResourceState::Active, ResourceState::Suspended(_)) => Some("suspend"),
            (ResourceState::Suspended(_), ResourceState::Active) => Some("restore"),
            _ => None,
        };
        if let Some(kind) = kind {
            record_order(
                conn,
                config,
                id,
                &ch.resource_id,
                product,
                kind,
                ch.to.reason().map(|r| r.as_str()),
                cause,
                now,
            )
            .await?;
        }
        // R6 notices: the package ran out or expired.
        let package_notice = match ch.to {
            ResourceState::Suspended(Reason::QuotaExhausted) => Some(NoticeKind::PackageExhausted),
            ResourceState::Suspended(Reason::PackageExpired) => Some(NoticeKind::PackageExpired),
            _ => None,
        };
        if let Some(k) = package_notice {
            let r = notify::recipient(conn, id).await?;
            let extra =
                serde_json::json!({ "resource_id": ch.resource_id, "suspended_at": r.at(now) });
            let period = format!("{}:{}", ch.resource_id, now.to_rfc3339());
            notify::notify_customer(conn, config, &r, k, &period, extra, now).await?;
        }
    }
    let restored = eval
        .changes
        .iter()
        .any(|c| c.to == ResourceState::Active && c.from.reason() == Some(Reason::Arrears));
    if restored {
        let r = notify::recipient(conn, id).await?;
        let extra = serde_json::json!({ "restored_at": r.at(now) });
        notify::notify_customer(
            conn,
            config,
            &r,
            NoticeKind::Restored,
            &now.to_rfc3339(),
            extra,
            now,
        )
        .await?;
    }
    if eval.account_to != eval.account_from {
        let a = &loaded.account;
        let (arrears_since, suspended_at, first_alert) = match eval.account_to {
            AccountState::Good => (None, None, None),
            AccountState::InArrears => (
                a.arrears_since.or(Some(now)),
                None,
                a.first_overdue_alert_at,
            ),
            AccountState::Suspended => (
                a.arrears_since.or(Some(now)),
                a.suspended_at.or(Some(now)),
                a.first_overdue_alert_at,
            ),
            AccountState::ComplianceLocked => {
                (a.arrears_since, a.suspended_at, a.first_overdue_alert_at)
            }
        };
        diesel::update(accounts::table.find(id))
            .set((
                accounts::state.eq(eval.account_to.as_str()),
                accounts::arrears_since.eq(arrears_since),
                accounts::suspended_at.eq(suspended_at),
                accounts::first_overdue_alert_at.eq(first_alert),
                accounts::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
        let why = match eval.account_to {
            AccountState::Good => "cash + credit quota is back to >= 0",
            AccountState::InArrears => "cash + credit quota is below zero",
            AccountState::Suspended => "grace period over and still in arrears",
            AccountState::ComplianceLocked => "compliance lock",
        };
        record_event(
            conn,
            id,
            None,
            eval.account_from.as_str(),
            eval.account_to.as_str(),
            why,
            cause,
            now,
        )
        .await?;
        if eval.account_to == AccountState::Suspended {
            let r = notify::recipient(conn, id).await?;
            let retention = loaded
                .with_policies(config)
                .iter()
                .map(|(_, p)| p.retention.to_chrono())
                .min()
                .unwrap_or_default();
            let extra = serde_json::json!({ "suspended_at": r.at(now), "release_at": r.at(now + retention) });
            notify::notify_customer(
                conn,
                config,
                &r,
                NoticeKind::Suspended,
                &now.to_rfc3339(),
                extra,
                now,
            )
            .await?;
        }
        let mut products: Vec<&str> = loaded.resources.iter().map(|(_, p)| p.as_str()).collect();
        products.sort();
        products.dedup();
        for product in products {
            let data = serde_json::json!({ "from": eval.account_from.as_str(), "to": eval.account_to.as_str() });
            let period = format!("{product}:{}", now.to_rfc3339());
            notify::notify_control_plane(
                conn,
                config,
                id,
                product,
                NoticeKind::AccountStateChanged,
                &period,
                data,
                now,
            )
            .await?;
        }
    }
    Ok(describe(id, eval))
}

/// Appends one lifecycle event (the audit trail).
#[allow(clippy::too_many_arguments)]
pub async fn record_event(
    conn: &mut AsyncPgConnection,
    account_id: &str,
    resource_id: Option<&str>,
    from: &str,
    to: &str,
    reason: &str,
    cause: &str,
    at: DateTime<Utc>,
) -> QueryResult<()> {
    diesel::insert_into(lifecycle_events::table)
        .values((
            lifecycle_events::account_id.eq(account_id),
            lifecycle_events::resource_id.eq(resource_id),
            lifecycle_events::from_state.eq(from),
            lifecycle_events::to_state.eq(to),
            lifecycle_events::reason.eq(reason),
            lifecycle_events::cause.eq(cause),
            lifecycle_events::occurred_at.eq(at),
        ))
        .execute(conn)
        .await
        .map(|_| ())
}

/// Records an order for a product's control plane and writes its signed webhook into the
/// outbox, in the caller's transaction.
#[allow(clippy::too_many_arguments)]
pub async fn record_order(
    conn: &mut AsyncPgConnection,
    config: &Config,
    account_id: &str,
    resource_id: &str,
    product: &str,
    kind: &str,
    reason: Option<&str>,
    cause: &str,
    at: DateTime<Utc>,
) -> QueryResult<()> {
    diesel::insert_into(control_plane_orders::table)
        .values((
            control_plane_orders::account_id.eq(account_id),
            control_plane_orders::resource_id.eq(resource_id),
            control_plane_orders::product.eq(product),
            control_plane_orders::kind.eq(kind),
            control_plane_orders::reason.eq(reason),
            control_plane_orders::cause.eq(cause),
            control_plane_orders::created_at.eq(at),
        ))
        .execute(conn)
        .await?;
    let event = match kind {
        "suspend" => NoticeKind::ResourceSuspended,
        "restore" => NoticeKind::ResourceRestored,
        _ => NoticeKind::ResourceReleased,
    };
    let data = serde_json::json!({ "resource_id": resource_id, "reason": reason });
    notify::notify_control_plane(
        conn,
        config,
        account_id,
        product,
        event,
        &format!("{resource_id}:{}", at.to_rfc3339()),
        data,
        at,
    )
    .await
    .map(|_| ())
}

/// Release warnings accepted for this account, by suspension period.
pub async fn accepted_warnings(
    conn: &mut AsyncPgConnection,
    account_id: &str,
    period: DateTime<Utc>,
) -> QueryResult<Vec<AcceptedWarning>> {
    let rows: Vec<(i32, DateTime<Utc>)> = release_warnings::table
        .filter(release_warnings::account_id.eq(account_id))
        .filter(release_warnings::period.eq(period))
        .select((
            release_warnings::lead_seconds,
            release_warnings::accepted_at,
        ))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(l, a)| AcceptedWarning {
            lead_seconds: i64::from(l),
            accepted_at: a,
        })
        .collect())
}

/// An operator action on an account or resource, applied with the re-evaluation it causes in
/// one transaction.
#[derive(Debug, Clone)]
pub enum OperatorAction {
    ComplianceLock(bool),
    LegalHold(bool),
    EnablePayg {
        resource: String,
    },
    RenewPackage {
        resource: String,
        quota: i64,
        expires_at: DateTime<Utc>,
    },
    Unsubscribe {
        resource: String,
    },
}

pub async fn operator_action(
    db: &Db,
    config: &Config,
    account_id: &str,
    action: OperatorAction,
    now: DateTime<Utc>,
    cause: &str,
) -> Result<Applied, LifecycleError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let (account_id, cause) = (account_id.to_string(), cause.to_string());
    conn.transaction::<_, LifecycleError, _>(async move |conn| {
        let loaded = load(conn, &account_id, true)
            .await?
            .ok_or_else(|| LifecycleError::UnknownAccount(account_id.clone()))?;
        let check_resource = |rid: &str| -> Result<&ResourceFacts, LifecycleError> {
            loaded
                .resources
                .iter()
                .map(|(r, _)| r)
                .find(|r| r.id == rid)
                .ok_or_else(|| LifecycleError::UnknownResource {
                    account: account_id.clone(),
                    resource: rid.to_string(),
                })
        };
        match &action {
            OperatorAction::ComplianceLock(on) => {
                diesel::update(accounts::table.find(&account_id))
                    .set((
                        accounts::compliance_locked.eq(on),
                        accounts::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
            }
            OperatorAction::LegalHold(on) => {
                diesel::update(accounts::table.find(&account_id))
                    .set((accounts::legal_hold.eq(on), accounts::updated_at.eq(now)))
                    .execute(conn)
                    .await?;
            }
            OperatorAction::EnablePayg { resource } => {
                let r = check_resource(resource)?;
                if r.billing_mode != BillingMode::Package {
                    return Err(LifecycleError::Invalid(format!(
                        "resource {resource} is not a package"
                    )));
                }
                diesel::update(resources::table.find((&account_id, resource)))
                    .set((
                        resources::payg_enabled.eq(true),
                        resources::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
            }
            OperatorAction::RenewPackage {
                resource,
                quota,
                expires_at,
            } => {
                let r = check_resource(resource)?;
                if r.billing_mode != BillingMode::Package {
                    return Err(LifecycleError::Invalid(format!(
                        "resource {resource} is not a package"
                    )));
                }
                if *expires_at <= now {
                    return Err(LifecycleError::Invalid(format!(
                        "expires_at {expires_at} is not after {now}"
                    )));
                }
                diesel::update(resources::table.find((&account_id, resource)))
                    .set((
                        resources::package_quota.eq(quota),
                        resources::package_used.eq(0),
                        resources::package_expires_at.eq(expires_at),
                        resources::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
            }
            OperatorAction::Unsubscribe { resource } => {
                let r = check_resource(resource)?;
                if r.state == ResourceState::Released {
                    return Err(LifecycleError::Invalid(format!(
                        "resource {resource} was released"
                    )));
                }
                let suspended_at = r.suspended_at.unwrap_or(now);
                diesel::update(resources::table.find((&account_id, resource)))
                    .set((
                        resources::state.eq("suspended"),
                        resources::state_reason.eq("unsubscribed"),
                        resources::suspended_at.eq(suspended_at),
                        resources::unsubscribed_at.eq(now),
                        resources::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                record_event(
                    conn,
                    &account_id,
                    Some(resource),
                    &r.state.to_string(),
                    "suspended (unsubscribed)",
                    "unsubscribed by the customer: no usage after this instant is accepted",
                    &cause,
                    now,
                )
                .await?;
                let product = loaded.product_of(resource).unwrap_or_default().to_string();
                record_order(
                    conn,
                    config,
                    &account_id,
                    resource,
                    &product,
                    "suspend",
                    Some("unsubscribed"),
                    &cause,
                    now,
                )
                .await?;
            }
        }
        let reloaded = load(conn, &account_id, false)
            .await?
            .ok_or_else(|| LifecycleError::UnknownAccount(account_id.clone()))?;
        reconcile(conn, config, &reloaded, now, &cause).await
    })
    .await
}

/// Records that the first overdue alert of the current arrears was accepted at `at` (R2's
/// lcic grace clock). Until the notification outbox lands this is set by operators and tests.
pub async fn record_overdue_alert(
    db: &Db,
    account_id: &str,
    at: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, LifecycleError> {
    let mut conn = db.conn().await?;
    let n = diesel::update(accounts::table.find(account_id))
        .filter(accounts::first_overdue_alert_at.is_null())
        .filter(accounts::state.ne("good"))
        .set(accounts::first_overdue_alert_at.eq(at))
        .execute(&mut conn)
        .await?;
    let current: Option<Option<DateTime<Utc>>> = accounts::table
        .find(account_id)
        .select(accounts::first_overdue_alert_at)
        .first(&mut conn)
        .await
        .optional()?;
    match current {
        None => Err(LifecycleError::UnknownAccount(account_id.to_string())),
        Some(None) if n == 0 => Err(LifecycleError::Invalid(format!(
            "account {account_id} is not in arrears"
        ))),
        Some(v) => Ok(v),
    }
}

/// Records that the release warning `lead_seconds` before release was accepted at `at`, for
/// every suspension period of the account (or just `period`).
pub async fn record_release_warning(
    db: &Db,
    account_id: &str,
    lead_seconds: i64,
    period: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, LifecycleError> {
    let mut conn = db.conn().await?;
    let periods: Vec<DateTime<Utc>> = match period {
        Some(p) => vec![p],
        None => {
            resources::table
                .filter(resources::account_id.eq(account_id))
                .filter(resources::state.eq("suspended"))
                .select(resources::suspended_at.assume_not_null())
                .distinct()
                .load(&mut conn)
                .await?
        }
    };
    if periods.is_empty() {
        return Err(LifecycleError::Invalid(format!(
            "account {account_id} has no suspended resource to warn about"
        )));
    }
    let lead =
        i32::try_from(lead_seconds).map_err(|_| LifecycleError::Invalid("lead too long".into()))?;
    for p in &periods {
        diesel::insert_into(release_warnings::table)
            .values((
                release_warnings::account_id.eq(account_id),
                release_warnings::period.eq(p),
                release_warnings::lead_seconds.eq(lead),
                release_warnings::accepted_at.eq(at),
            ))
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await?;
    }
    Ok(periods)
}
