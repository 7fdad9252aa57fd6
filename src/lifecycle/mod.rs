//! The lifecycle's I/O: loading accounts with their open episode, resources, current
//! suspensions and facts (one account under a row lock, or a batch of due accounts), applying
//! what `domain::lifecycle` decides in the caller's transaction (resource and account states,
//! episodes and suspensions, the audit trail, control-plane orders, notices), keeping the
//! due-work index in step, and the operator actions that change the facts (compliance lock,
//! legal hold, pay-as-you-go, package renewal, unsubscribe, recorded acceptances).
//!
//! Decisions are made in memory on what was loaded (`apply`), which also yields what to
//! write (`effects::Effects`); the writes are set-based, one statement per table per batch,
//! so a batch of a thousand accounts costs a dozen round trips.

pub mod apply;
pub mod effects;
pub mod load;
pub mod policies;
pub mod run;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::{accounts, arrears_episodes, resources};
use crate::db::{Db, DbError};
use crate::domain::alerts::{BalanceFacts, Topic};
use crate::domain::lifecycle::{
    AcceptedWarning, AccountFacts, BillingMode, ResourceFacts, ResourceState,
};
use crate::domain::policy::Policy;

pub use apply::{Applied, ResourceMove};
pub use load::load;

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

/// What a customer notice needs to know about its account; never a contact address.
#[derive(Debug, Clone, Default)]
pub struct Contact {
    pub name: String,
    pub has_email: bool,
    pub has_phone: bool,
    pub timezone: String,
}

/// The due-work index of an account: when each lifecycle job next has something to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DueAt {
    pub send_alerts: Option<DateTime<Utc>>,
    pub enforce_suspensions: Option<DateTime<Utc>>,
    pub release_resources: Option<DateTime<Utc>>,
}

/// An account with everything the lifecycle decides on.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub id: String,
    pub account: AccountFacts,
    pub balance: BalanceFacts,
    pub contact: Contact,
    /// Suspensions numbered so far on this account (the next one is `suspensions + 1`).
    pub suspensions: i32,
    /// (facts, product id)
    pub resources: Vec<(ResourceFacts, String)>,
    /// Release warnings accepted for the resources' current suspensions.
    pub warnings: Vec<AcceptedWarning>,
    /// The timed notices already written for the open episode and current suspensions.
    pub written: HashSet<Topic>,
    pub due: DueAt,
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

    fn resource(&self, resource_id: &str) -> Result<&ResourceFacts, LifecycleError> {
        self.resources
            .iter()
            .map(|(r, _)| r)
            .find(|r| r.id == resource_id)
            .ok_or_else(|| LifecycleError::UnknownResource {
                account: self.id.clone(),
                resource: resource_id.to_string(),
            })
    }
}

/// Which lifecycle job is acting (its own due instant must move past `now`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueJob {
    SendAlerts,
    EnforceSuspensions,
    ReleaseResources,
}

impl DueJob {
    pub fn column(self) -> &'static str {
        match self {
            DueJob::SendAlerts => "alerts_due_at",
            DueJob::EnforceSuspensions => "enforce_due_at",
            DueJob::ReleaseResources => "release_due_at",
        }
    }
}

/// Marks accounts due for some lifecycle jobs at `at` (at the latest): what every input
/// change that is not decided on the spot does (a bill, an accepted notice, an import), so
/// that the next run of each job looks at them. `ids` sorted, so that concurrent callers lock
/// rows in one order.
pub async fn mark_due(
    conn: &mut AsyncPgConnection,
    ids: &[String],
    jobs: &[DueJob],
    at: DateTime<Utc>,
) -> QueryResult<usize> {
    if ids.is_empty() || jobs.is_empty() {
        return Ok(0);
    }
    let mut sorted = ids.to_vec();
    sorted.sort();
    sorted.dedup();
    let sets: Vec<String> = jobs
        .iter()
        .map(|j| format!("{c} = least(coalesce({c}, 'infinity'), $2)", c = j.column()))
        .collect();
    // Raw SQL: the column list depends on the jobs, and least() over a nullable column is not
    // something the query builder says.
    diesel::sql_query(format!(
        "UPDATE accounts SET {} WHERE id IN (SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE)",
        sets.join(", ")
    ))
    .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&sorted)
    .bind::<diesel::sql_types::Timestamptz, _>(at)
    .execute(conn)
    .await
}

/// Evaluates the locked account at `now` and applies the result in the caller's transaction
/// (the lock must be held: `load(conn, id, true)`). Returns what changed.
pub async fn reconcile(
    conn: &mut AsyncPgConnection,
    config: &Config,
    loaded: &Loaded,
    now: DateTime<Utc>,
    cause: &str,
) -> Result<Applied, LifecycleError> {
    let mut l = loaded.clone();
    let mut fx = effects::Effects::default();
    let ctx = apply::Ctx::new(config, now, cause);
    let applied = apply::reconcile(&mut l, &ctx, &mut fx);
    apply::finish(&l, &ctx, None, !applied.is_empty(), &mut fx);
    fx.write(conn).await?;
    Ok(applied)
}

/// Loads the account under its row lock, evaluates and applies, in one transaction of its own.
pub async fn reconcile_one(
    db: &Db,
    config: &Config,
    id: &str,
    now: DateTime<Utc>,
    cause: &str,
) -> Result<Applied, LifecycleError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction::<_, LifecycleError, _>(async |conn| {
        let loaded = load(conn, id, true)
            .await?
            .ok_or_else(|| LifecycleError::UnknownAccount(id.to_string()))?;
        reconcile(conn, config, &loaded, now, cause).await
    })
    .await
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
    conn.transaction::<_, LifecycleError, _>(async |conn| {
        let mut l = load(conn, account_id, true)
            .await?
            .ok_or_else(|| LifecycleError::UnknownAccount(account_id.to_string()))?;
        let package = |r: &ResourceFacts, resource: &str| {
            if r.billing_mode == BillingMode::Package {
                Ok(())
            } else {
                Err(LifecycleError::Invalid(format!(
                    "resource {resource} is not a package"
                )))
            }
        };
        let ctx = apply::Ctx::new(config, now, cause);
        let mut fx = effects::Effects::default();
        let mut unsubscribed = None;
        match &action {
            OperatorAction::ComplianceLock(on) => {
                diesel::update(accounts::table.find(account_id))
                    .set(accounts::compliance_locked.eq(on))
                    .execute(conn)
                    .await?;
                l.account.compliance_locked = *on;
            }
            OperatorAction::LegalHold(on) => {
                diesel::update(accounts::table.find(account_id))
                    .set(accounts::legal_hold.eq(on))
                    .execute(conn)
                    .await?;
                l.account.legal_hold = *on;
            }
            OperatorAction::EnablePayg { resource } => {
                package(l.resource(resource)?, resource)?;
                diesel::update(resources::table.find((account_id, resource)))
                    .set((
                        resources::payg_enabled.eq(true),
                        resources::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                apply::resource_mut(&mut l, resource).payg_enabled = true;
            }
            OperatorAction::RenewPackage {
                resource,
                quota,
                expires_at,
            } => {
                package(l.resource(resource)?, resource)?;
                if *expires_at <= now {
                    return Err(LifecycleError::Invalid(format!(
                        "expires_at {expires_at} is not after {now}"
                    )));
                }
                // The term it replaces is kept with what it had left: a late record of a day
                // that term covered still draws on it (generate_bills). Raw SQL: an INSERT ...
                // SELECT numbering the term from the ones before it.
                diesel::sql_query(
                    "INSERT INTO package_terms (account_id, resource_id, no, starts_at, ends_at, quota, used, closed_at)
                     SELECT r.account_id, r.id,
                            coalesce((SELECT max(t.no) FROM package_terms t
                                      WHERE t.account_id = r.account_id AND t.resource_id = r.id), 0) + 1,
                            r.package_starts_at, least(coalesce(r.package_expires_at, $3), $3),
                            coalesce(r.package_quota, 0), r.package_used, $3
                     FROM resources r WHERE r.account_id = $1 AND r.id = $2",
                )
                .bind::<diesel::sql_types::Text, _>(account_id)
                .bind::<diesel::sql_types::Text, _>(resource)
                .bind::<diesel::sql_types::Timestamptz, _>(now)
                .execute(conn)
                .await?;
                diesel::update(resources::table.find((account_id, resource)))
                    .set((
                        resources::package_quota.eq(quota),
                        resources::package_used.eq(0),
                        resources::package_expires_at.eq(expires_at),
                        resources::package_starts_at.eq(now),
                        resources::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                let r = apply::resource_mut(&mut l, resource);
                r.package_quota = Some(*quota);
                r.package_used = 0;
                r.package_expires_at = Some(*expires_at);
            }
            OperatorAction::Unsubscribe { resource } => {
                if l.resource(resource)?.state == ResourceState::Released {
                    return Err(LifecycleError::Invalid(format!(
                        "resource {resource} was released"
                    )));
                }
                diesel::update(resources::table.find((account_id, resource)))
                    .set(resources::unsubscribed_at.eq(now))
                    .execute(conn)
                    .await?;
                unsubscribed = Some(apply::unsubscribe(&mut l, resource, &ctx, &mut fx));
            }
        }
        let mut applied = apply::reconcile(&mut l, &ctx, &mut fx);
        if let Some(mv) = unsubscribed.flatten() {
            applied.suspended.insert(0, mv);
        }
        apply::finish(&l, &ctx, None, true, &mut fx);
        fx.write(conn).await?;
        Ok(applied)
    })
    .await
}

/// Records that a channel accepted the first overdue alert of the account's open episode at
/// `at` (R2's lcic grace clock): the operator's override of what delivery records itself.
/// Returns the episode's first accepted alert (an earlier one stays).
pub async fn record_overdue_alert(
    db: &Db,
    account_id: &str,
    at: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, LifecycleError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction::<_, LifecycleError, _>(async |conn| {
        let episode: Option<Option<i32>> = accounts::table
            .find(account_id)
            .select(accounts::episode)
            .for_update()
            .first(conn)
            .await
            .optional()?;
        let Some(episode) = episode else {
            return Err(LifecycleError::UnknownAccount(account_id.to_string()));
        };
        let Some(no) = episode else {
            return Err(LifecycleError::Invalid(format!(
                "account {account_id} is not in arrears (no open episode)"
            )));
        };
        diesel::update(arrears_episodes::table.find((account_id, no)))
            .filter(arrears_episodes::first_overdue_alert_at.is_null())
            .set(arrears_episodes::first_overdue_alert_at.eq(at))
            .execute(conn)
            .await?;
        mark_due(
            conn,
            &[account_id.to_string()],
            &[DueJob::SendAlerts, DueJob::EnforceSuspensions],
            at,
        )
        .await?;
        Ok(arrears_episodes::table
            .find((account_id, no))
            .select(arrears_episodes::first_overdue_alert_at)
            .first(conn)
            .await?)
    })
    .await
}

/// A release warning recorded by `record_release_warning`.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedWarning {
    pub resource_id: String,
    pub suspension: i32,
    pub release_at: DateTime<Utc>,
}

/// Records that the release warning `lead_seconds` before release was accepted at `at`, for
/// the current suspension of every suspended resource of the account that the policy
/// releases (or just `resource`), announcing its current release instant.
pub async fn record_release_warning(
    db: &Db,
    account_id: &str,
    lead_seconds: i64,
    resource: Option<&str>,
    at: DateTime<Utc>,
) -> Result<Vec<RecordedWarning>, LifecycleError> {
    let lead =
        i32::try_from(lead_seconds).map_err(|_| LifecycleError::Invalid("lead too long".into()))?;
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction::<_, LifecycleError, _>(async |conn| {
        let Some(l) = load(conn, account_id, true).await? else {
            return Err(LifecycleError::UnknownAccount(account_id.to_string()));
        };
        if let Some(rid) = resource {
            l.resource(rid)?;
        }
        let targets: Vec<RecordedWarning> = l
            .resources
            .iter()
            .filter(|(r, _)| resource.is_none_or(|rid| r.id == rid))
            .filter_map(|(r, _)| {
                let s = r.suspension.as_ref()?;
                Some(RecordedWarning {
                    resource_id: r.id.clone(),
                    suspension: s.no,
                    release_at: s.release_at?,
                })
            })
            .collect();
        if targets.is_empty() {
            return Err(LifecycleError::Invalid(format!(
                "account {account_id} has no suspended resource that its policy releases"
            )));
        }
        let rows: Vec<_> = targets
            .iter()
            .map(|t| {
                use crate::db::schema::release_warnings as w;
                (
                    w::account_id.eq(account_id),
                    w::suspension.eq(t.suspension),
                    w::lead_seconds.eq(lead),
                    w::release_at.eq(Some(t.release_at)),
                    w::accepted_at.eq(at),
                )
            })
            .collect();
        diesel::insert_into(crate::db::schema::release_warnings::table)
            .values(&rows)
            .on_conflict_do_nothing()
            .execute(conn)
            .await?;
        mark_due(
            conn,
            &[account_id.to_string()],
            &[DueJob::ReleaseResources],
            at,
        )
        .await?;
        Ok(targets)
    })
    .await
}
