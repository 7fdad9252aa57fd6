//! `arrears policies apply`: keeps what the database derived from the lifecycle policies in
//! step with the configuration. The release deadline of every live suspension and the
//! due-work index were computed under the policies (and the notice knobs) of the day; when the
//! configuration's differ from those recorded in `lifecycle_policies`, the affected accounts
//! are recomputed (deadlines moved, due instants moved) and the new policies recorded, with a
//! report of how many moved. Run by `arrears migrate`, at service start, and by every
//! lifecycle job before it selects due work (so that a changed grace period never leaves an
//! account waiting on a stale due instant).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::{accounts, lifecycle_policies, resources};
use crate::db::{Db, DbError};
use crate::domain::lifecycle::release_deadline;
use crate::lifecycle::apply::{self, Ctx};
use crate::lifecycle::effects::{Effects, SuspensionDeadline};
use crate::lifecycle::{load, LifecycleError, Loaded};

/// Arbitrary constant naming the advisory lock that serialises concurrent applies.
const POLICIES_LOCK: i64 = 0x6172_7265_6172_7302;
/// The key under which the notice knobs that move due instants are recorded.
const KNOBS: &str = "*";
const BATCH: usize = 1000;

#[derive(Debug, Clone, Default, Serialize)]
pub struct PoliciesReport {
    pub dry_run: bool,
    /// Nothing differed: nothing was recomputed.
    pub up_to_date: bool,
    /// Products (and `*` for the notification knobs) whose recorded policy differed.
    pub changed: Vec<String>,
    pub accounts_examined: usize,
    /// Live suspensions whose release instant the new policy moves.
    pub release_deadlines_moved: usize,
    /// Accounts whose due instants moved (the report's `due_moved_by_job` by job).
    pub accounts_due_moved: usize,
    pub due_moved_by_job: BTreeMap<String, usize>,
}

/// What the configuration says, as recorded: each product's policy, and the knobs.
fn wanted(config: &Config) -> BTreeMap<String, serde_json::Value> {
    let mut m: BTreeMap<String, serde_json::Value> = config
        .products
        .values()
        .map(|p| {
            (
                p.id.clone(),
                serde_json::to_value(&p.policy).unwrap_or_default(),
            )
        })
        .collect();
    m.insert(
        KNOBS.into(),
        serde_json::json!({
            "suspension_imminent_lead": config.notifications.suspension_imminent_lead,
            "warning_min_age": config.lifecycle.warning_min_age,
        }),
    );
    m
}

async fn recorded(
    conn: &mut AsyncPgConnection,
) -> QueryResult<BTreeMap<String, serde_json::Value>> {
    Ok(lifecycle_policies::table
        .select((lifecycle_policies::product, lifecycle_policies::policy))
        .load::<(String, serde_json::Value)>(conn)
        .await?
        .into_iter()
        .collect())
}

/// The keys whose recorded policy differs from the configuration's (empty: in step).
pub async fn differences(db: &Db, config: &Config) -> Result<Vec<String>, DbError> {
    let mut conn = db.conn().await?;
    let have = recorded(&mut conn).await?;
    Ok(diff(&have, &wanted(config)))
}

fn diff(
    have: &BTreeMap<String, serde_json::Value>,
    want: &BTreeMap<String, serde_json::Value>,
) -> Vec<String> {
    let mut keys: Vec<String> = want
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(have.keys().filter(|k| !want.contains_key(*k)).cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Applies the configuration's policies if they differ from the recorded ones (a no-op
/// costing one query when they do not). What every lifecycle job calls first.
pub async fn ensure(
    db: &Db,
    config: &Config,
    now: DateTime<Utc>,
) -> Result<Option<PoliciesReport>, DbError> {
    if differences(db, config).await?.is_empty() {
        return Ok(None);
    }
    Ok(Some(apply(db, config, now, false).await?))
}

/// Recomputes what the policies derive for the accounts they affect, at `now`, and records
/// the policies. With `dry_run`, reports what would move and changes nothing.
pub async fn apply(
    db: &Db,
    config: &Config,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<PoliciesReport, DbError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    // Raw SQL: advisory locks are functions the query builder does not know.
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(POLICIES_LOCK)
        .execute(conn)
        .await?;
    let result = apply_locked(conn, config, now, dry_run).await;
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<diesel::sql_types::BigInt, _>(POLICIES_LOCK)
        .execute(conn)
        .await?;
    result
}

async fn apply_locked(
    conn: &mut AsyncPgConnection,
    config: &Config,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<PoliciesReport, DbError> {
    let want = wanted(config);
    let have = recorded(conn).await?;
    let changed = diff(&have, &want);
    let mut report = PoliciesReport {
        dry_run,
        up_to_date: changed.is_empty(),
        changed: changed.clone(),
        ..Default::default()
    };
    if changed.is_empty() {
        return Ok(report);
    }
    // Accounts whose derived facts can move: an open episode or a live suspension, with a
    // resource of a changed product (any product when the knobs changed or nothing was
    // recorded yet).
    let all = have.is_empty() || changed.iter().any(|k| k == KNOBS);
    let products: Vec<String> = changed.iter().filter(|k| *k != KNOBS).cloned().collect();
    let mut q = accounts::table
        .inner_join(resources::table.on(resources::account_id.eq(accounts::id)))
        .filter(
            accounts::episode
                .is_not_null()
                .or(resources::state.eq("suspended")),
        )
        .select(accounts::id)
        .distinct()
        .order(accounts::id)
        .into_boxed();
    if !all {
        q = q.filter(resources::product.eq_any(products));
    }
    let ids: Vec<String> = q.load(conn).await?;
    let ctx = Ctx::new(config, now, "policies apply");
    for chunk in ids.chunks(BATCH) {
        let moved = conn
            .transaction::<_, LifecycleError, _>(async |conn| {
                // Locked in id order, as billing locks its batches: never a deadlock.
                let _: Vec<String> = accounts::table
                    .filter(accounts::id.eq_any(chunk))
                    .order(accounts::id)
                    .select(accounts::id)
                    .for_update()
                    .load(conn)
                    .await?;
                let loaded = load::load_many(conn, chunk).await?;
                let mut fx = Effects::default();
                let mut counts: Moved = (0, 0, BTreeMap::new());
                for mut l in loaded {
                    rederive(&mut l, config, &ctx, &mut fx, &mut counts);
                }
                if !dry_run {
                    fx.write(conn).await?;
                }
                Ok(counts)
            })
            .await
            .map_err(|e| match e {
                LifecycleError::Db(d) => d,
                other => DbError::Connect(other.to_string()),
            })?;
        report.accounts_examined += chunk.len();
        report.release_deadlines_moved += moved.0;
        report.accounts_due_moved += moved.1;
        for (k, v) in moved.2 {
            *report.due_moved_by_job.entry(k).or_default() += v;
        }
    }
    if dry_run {
        return Ok(report);
    }
    // Raw SQL: an UPDATE ... FROM join; migrated warnings take their suspension's instant.
    diesel::sql_query(
        "UPDATE release_warnings w SET release_at = s.release_at
         FROM resource_suspensions s
         WHERE w.release_at IS NULL AND s.account_id = w.account_id AND s.no = w.suspension
           AND s.release_at IS NOT NULL",
    )
    .execute(conn)
    .await?;
    diesel::delete(lifecycle_policies::table)
        .execute(conn)
        .await?;
    let rows: Vec<_> = want
        .iter()
        .map(|(k, v)| {
            (
                lifecycle_policies::product.eq(k),
                lifecycle_policies::policy.eq(v),
                lifecycle_policies::applied_at.eq(now),
            )
        })
        .collect();
    diesel::insert_into(lifecycle_policies::table)
        .values(&rows)
        .execute(conn)
        .await?;
    tracing::info!(changed = ?report.changed, accounts = report.accounts_examined,
        deadlines_moved = report.release_deadlines_moved, due_moved = report.accounts_due_moved,
        "lifecycle policies applied");
    Ok(report)
}

/// What moved: release deadlines, accounts whose due instants moved, and those by job.
type Moved = (usize, usize, BTreeMap<String, usize>);

/// Recomputes what `l`'s policies derive (its suspensions' release deadlines, its due
/// instants), appending the writes and counting what moved.
fn rederive(l: &mut Loaded, config: &Config, ctx: &Ctx, fx: &mut Effects, counts: &mut Moved) {
    for (r, product) in l.resources.iter_mut() {
        let (Some(s), Some(p)) = (r.suspension.as_mut(), config.product(product)) else {
            continue;
        };
        let deadline = release_deadline(s.reason, s.started_at, &p.policy);
        if deadline != s.release_at {
            s.release_at = deadline;
            fx.deadlines.push(SuspensionDeadline {
                account_id: l.id.clone(),
                no: s.no,
                release_at: deadline,
            });
            counts.0 += 1;
        }
    }
    // Warnings migrated without the instant they announced announced this one.
    for w in l.warnings.iter_mut().filter(|w| w.release_at.is_none()) {
        w.release_at = l
            .resources
            .iter()
            .filter_map(|(r, _)| r.suspension.as_ref())
            .find(|s| s.no == w.suspension)
            .and_then(|s| s.release_at);
    }
    let before = l.due;
    let after = apply::finish(l, ctx, None, false, fx);
    if after != before {
        counts.1 += 1;
        for (job, b, a) in [
            ("send_alerts", before.send_alerts, after.send_alerts),
            (
                "enforce_suspensions",
                before.enforce_suspensions,
                after.enforce_suspensions,
            ),
            (
                "release_resources",
                before.release_resources,
                after.release_resources,
            ),
        ] {
            if a != b {
                *counts.2.entry(job.to_string()).or_default() += 1;
            }
        }
    }
}
