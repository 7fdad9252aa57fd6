//! Running a lifecycle job over the accounts that are due: only accounts whose due instant
//! for the job is at or before `as_of` are selected, oldest due first, in batches claimed
//! with FOR UPDATE SKIP LOCKED (so that any number of runs and instances share the work and a
//! top-up waiting on an account's lock is never blocked for long), each batch decided in
//! memory and written in one transaction, until nothing is due. A per-run cap is a flood
//! guard: what it defers is reported and first in line on the next run, so no account is
//! ever starved. A run with nothing due reads one index entry and writes nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::accounts;
use crate::db::{stats as planner_stats, Db, DbError};
use crate::lifecycle::apply::{self, Ctx};
use crate::lifecycle::effects::Effects;
use crate::lifecycle::{load, DueJob, LifecycleError, Loaded};

/// How long a run waits for due accounts that other transactions hold (a billing batch, a
/// concurrent run of the same job) before it leaves them to the next run.
const LOCKED_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const LOCKED_POLL: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    /// Accounts decided and written per transaction.
    pub batch_size: usize,
    /// The most accounts one run decides on (a flood guard).
    pub max_accounts: usize,
}

/// What a run over the due accounts did, for the job's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DueStats {
    /// Accounts due at `as_of` when the run began.
    pub accounts_due: i64,
    pub accounts_evaluated: usize,
    pub batches: usize,
    /// Still due after the run because of the per-run cap: first in line next time.
    pub deferred: i64,
    /// Still due because other transactions held them for longer than the run waits.
    pub locked_elsewhere: i64,
    /// New notices written into the outbox.
    pub notices_written: usize,
}

/// What one lifecycle job does to each due account.
pub trait DueWork: Sync {
    const JOB: DueJob;
    /// What one batch adds to the job's report; merged once the batch is committed.
    type Tally: Default + Send;
    /// Decides on `l` at `ctx.now`, in memory, appending the writes; returns whether more than
    /// the due instants changed.
    fn decide(&self, l: &mut Loaded, ctx: &Ctx, fx: &mut Effects, tally: &mut Self::Tally) -> bool;
    fn merge(&mut self, tally: Self::Tally);
}

macro_rules! with_due_column {
    ($job:expr, |$col:ident| $body:expr) => {
        match $job {
            DueJob::SendAlerts => {
                let $col = accounts::alerts_due_at;
                $body
            }
            DueJob::EnforceSuspensions => {
                let $col = accounts::enforce_due_at;
                $body
            }
            DueJob::ReleaseResources => {
                let $col = accounts::release_due_at;
                $body
            }
        }
    };
}

/// Accounts due for `job` at `as_of`.
pub async fn count_due(
    conn: &mut AsyncPgConnection,
    job: DueJob,
    as_of: DateTime<Utc>,
) -> QueryResult<i64> {
    with_due_column!(job, |col| accounts::table
        .filter(col.le(as_of))
        .count()
        .get_result(conn)
        .await)
}

/// Where a run has got to in the due order: (due instant, account id) of the last account it
/// took. The next batch starts after it, so that each batch is an index range scan from
/// where the last one ended, not from the start of the index (whose first entries are the
/// dead versions of the accounts already done).
type Cursor = Option<(DateTime<Utc>, String)>;

/// Locks up to `limit` due accounts after `after`, oldest due first, skipping those another
/// transaction holds. Returns them with their due instants.
async fn claim_due(
    conn: &mut AsyncPgConnection,
    job: DueJob,
    as_of: DateTime<Utc>,
    after: &Cursor,
    limit: i64,
) -> QueryResult<Vec<(DateTime<Utc>, String)>> {
    due_page(conn, job, as_of, after, limit, true).await
}

/// The next page of due accounts after `after` (due instant, id); locked (FOR UPDATE SKIP
/// LOCKED) or, for dry runs, not.
async fn due_page(
    conn: &mut AsyncPgConnection,
    job: DueJob,
    as_of: DateTime<Utc>,
    after: &Cursor,
    limit: i64,
    lock: bool,
) -> QueryResult<Vec<(DateTime<Utc>, String)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        due: DateTime<Utc>,
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
    }
    let col = job.column();
    // Raw SQL: a row comparison `(due, id) > (t, id)` is what lets PostgreSQL start the index
    // scan at the cursor; the query builder has no row comparison.
    // Two statements rather than one with `$2 IS NULL OR ...`: a generic plan could not use
    // the row comparison as the index scan's start.
    let lock = if lock { " FOR UPDATE SKIP LOCKED" } else { "" };
    let rows: Vec<Row> = match after {
        Some((t, id)) => {
            diesel::sql_query(format!(
                "SELECT {col} AS due, id FROM accounts
                 WHERE {col} <= $1 AND ({col}, id) > ($2, $3)
                 ORDER BY {col}, id LIMIT $4{lock}"
            ))
            .bind::<diesel::sql_types::Timestamptz, _>(as_of)
            .bind::<diesel::sql_types::Timestamptz, _>(*t)
            .bind::<diesel::sql_types::Text, _>(id)
            .bind::<diesel::sql_types::BigInt, _>(limit)
            .load(conn)
            .await?
        }
        None => {
            diesel::sql_query(format!(
                "SELECT {col} AS due, id FROM accounts WHERE {col} <= $1
                 ORDER BY {col}, id LIMIT $2{lock}"
            ))
            .bind::<diesel::sql_types::Timestamptz, _>(as_of)
            .bind::<diesel::sql_types::BigInt, _>(limit)
            .load(conn)
            .await?
        }
    };
    Ok(rows.into_iter().map(|r| (r.due, r.id)).collect())
}

/// Runs `work` over every account due for its job at `opts.as_of`. Accounts that could not be
/// decided on go into `errors` with the error (their due instant moves an hour on, so that one
/// bad account never blocks the others); the others go on.
pub async fn run_due<W: DueWork>(
    db: &Db,
    config: &Config,
    opts: &RunOptions,
    cause: &str,
    work: &mut W,
    errors: &mut Vec<String>,
) -> Result<DueStats, DbError> {
    let mut stats = DueStats::default();
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    stats.accounts_due = count_due(conn, W::JOB, opts.as_of).await?;
    if stats.accounts_due == 0 {
        return Ok(stats);
    }
    let ctx = Ctx::new(config, opts.as_of, cause);
    let batch = opts.batch_size.max(1);
    if opts.dry_run {
        let mut after: Cursor = None;
        while stats.accounts_evaluated < opts.max_accounts {
            let limit = batch.min(opts.max_accounts - stats.accounts_evaluated) as i64;
            let page = due_page(conn, W::JOB, opts.as_of, &after, limit, false).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.clone());
            let ids: Vec<String> = page.into_iter().map(|(_, id)| id).collect();
            let mut tally = W::Tally::default();
            let loaded = load::load_many(conn, &ids).await.map_err(lifecycle_db)?;
            let mut fx = Effects::default();
            for mut l in loaded {
                work.decide(&mut l, &ctx, &mut fx, &mut tally);
            }
            work.merge(tally);
            stats.accounts_evaluated += ids.len();
            stats.batches += 1;
        }
        stats.deferred = (stats.accounts_due - stats.accounts_evaluated as i64).max(0);
        return Ok(stats);
    }
    planner_stats::refresh_stale(conn, planner_stats::LIFECYCLE).await;
    let mut next_refresh = STATS_EVERY;
    let started = std::time::Instant::now();
    let mut cursor: Cursor = None;
    loop {
        if stats.batches >= next_refresh {
            planner_stats::refresh_stale(conn, planner_stats::LIFECYCLE).await;
            next_refresh = stats.batches + STATS_EVERY;
        }
        if stats.accounts_evaluated >= opts.max_accounts {
            stats.deferred = count_due(conn, W::JOB, opts.as_of).await?;
            if stats.deferred > 0 {
                tracing::warn!(job = ?W::JOB, deferred = stats.deferred, max_accounts = opts.max_accounts,
                    "per-run cap reached: the rest is first in line on the next run");
            }
            break;
        }
        let limit = batch.min(opts.max_accounts - stats.accounts_evaluated) as i64;
        match decide_batch(conn, &ctx, opts, &cursor, limit, work).await {
            Ok(None) if cursor.is_some() => {
                // The end of the due range: once more from its start, for what other
                // transactions held when this run passed.
                cursor = None;
            }
            Ok(None) => {
                // Nothing free: what is still due is held by another transaction.
                let left = count_due(conn, W::JOB, opts.as_of).await?;
                if left == 0 {
                    break;
                }
                if started.elapsed() >= LOCKED_WAIT {
                    stats.locked_elsewhere = left;
                    tracing::warn!(job = ?W::JOB, accounts = left,
                        "due accounts held by other transactions; left to the next run");
                    break;
                }
                tokio::time::sleep(LOCKED_POLL).await;
            }
            Ok(Some((n, notices, last))) => {
                stats.accounts_evaluated += n;
                stats.notices_written += notices;
                stats.batches += 1;
                cursor = Some(last);
            }
            Err(e) => {
                if matches!(
                    e,
                    LifecycleError::Db(DbError::Pool(_) | DbError::Connect(_))
                ) {
                    return Err(lifecycle_db(e));
                }
                // One account's data broke the batch: decide on each alone, so that the bad
                // one is reported and pushed back and the others go on.
                tracing::warn!(job = ?W::JOB, error = %e, "a batch failed; deciding its accounts one by one");
                let (n, last) =
                    isolate(conn, &ctx, opts, &cursor, limit, work, &mut stats, errors).await?;
                stats.accounts_evaluated += n;
                stats.batches += 1;
                if let Some(last) = last {
                    cursor = Some(last);
                }
            }
        }
    }
    Ok(stats)
}

/// Batches between two looks at the planner statistics (a run writes notices, episodes and
/// suspensions as it goes, and reads them back for the next batches).
const STATS_EVERY: usize = 10;

fn lifecycle_db(e: LifecycleError) -> DbError {
    match e {
        LifecycleError::Db(d) => d,
        other => DbError::Connect(other.to_string()),
    }
}

/// Claims, decides and writes one batch in one transaction. `None`: nothing free was due
/// after `after`; else how many, the new notices, and where the batch ended.
async fn decide_batch<W: DueWork>(
    conn: &mut AsyncPgConnection,
    ctx: &Ctx<'_>,
    opts: &RunOptions,
    after: &Cursor,
    limit: i64,
    work: &mut W,
) -> Result<Option<(usize, usize, (DateTime<Utc>, String))>, LifecycleError> {
    let (claimed, notices, tally) = conn
        .transaction::<_, LifecycleError, _>(async |conn| {
            let claimed = claim_due(conn, W::JOB, opts.as_of, after, limit).await?;
            let mut tally = W::Tally::default();
            if claimed.is_empty() {
                return Ok((claimed, 0, tally));
            }
            let ids: Vec<String> = claimed.iter().map(|(_, id)| id.clone()).collect();
            let loaded = load::load_many(conn, &ids).await?;
            let mut fx = Effects::default();
            for mut l in loaded {
                let changed = work.decide(&mut l, ctx, &mut fx, &mut tally);
                apply::finish(&l, ctx, Some(W::JOB), changed, &mut fx);
            }
            let notices = fx.write(conn).await?;
            Ok((claimed, notices, tally))
        })
        .await?;
    let Some(last) = claimed.last().cloned() else {
        return Ok(None);
    };
    work.merge(tally);
    Ok(Some((claimed.len(), notices, last)))
}

/// Decides on up to `limit` due accounts after `after`, one transaction each; an account that
/// fails alone is reported and its due instant moved an hour on. Returns how many were looked
/// at and where they ended.
#[allow(clippy::too_many_arguments)]
async fn isolate<W: DueWork>(
    conn: &mut AsyncPgConnection,
    ctx: &Ctx<'_>,
    opts: &RunOptions,
    after: &Cursor,
    limit: i64,
    work: &mut W,
    stats: &mut DueStats,
    errors: &mut Vec<String>,
) -> Result<(usize, Option<(DateTime<Utc>, String)>), DbError> {
    let claimed = conn
        .transaction::<_, DbError, _>(async |conn| {
            Ok(claim_due(conn, W::JOB, opts.as_of, after, limit).await?)
        })
        .await?;
    for (_, id) in &claimed {
        let one = conn
            .transaction::<_, LifecycleError, _>(async |conn| {
                let Some(mut l) = load::load(conn, id, true).await? else {
                    return Ok((0, W::Tally::default()));
                };
                let mut tally = W::Tally::default();
                let mut fx = Effects::default();
                let changed = work.decide(&mut l, ctx, &mut fx, &mut tally);
                apply::finish(&l, ctx, Some(W::JOB), changed, &mut fx);
                Ok((fx.write(conn).await?, tally))
            })
            .await;
        match one {
            Ok((notices, tally)) => {
                stats.notices_written += notices;
                work.merge(tally);
            }
            Err(e) => {
                tracing::error!(job = ?W::JOB, account_id = %id, error = %e, "account not decided on; looked at again in an hour");
                if errors.len() < 100 {
                    errors.push(format!("{id}: {e}"));
                }
                let later = opts.as_of + chrono::Duration::hours(1);
                with_due_column!(W::JOB, |col| diesel::update(accounts::table.find(id))
                    .set(col.eq(later))
                    .execute(conn)
                    .await)?;
            }
        }
    }
    Ok((claimed.len(), claimed.last().cloned()))
}

/// Adds `n` to the counter `key` (for tallies that count by why).
pub fn bump(map: &mut BTreeMap<String, usize>, key: &str, n: usize) {
    if n > 0 {
        *map.entry(key.to_string()).or_default() += n;
    }
}
