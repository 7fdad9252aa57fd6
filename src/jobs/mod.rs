//! The jobs, one module each, named as in jobs/*.toml and on the CLI; their one registration
//! list (`jobs!`, read by the CLI, the schedule, the service, `simulate` and `demo`); and the
//! slot protocol every slotted job runs in: its claim, lease and record in `job_runs` (job,
//! slot, start, end, status, report, error).

pub mod registry;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::db::{Db, DbError};
use tokio_postgres::types::Type;

pub use registry::{
    Did, DynJob, Job, JobCtx, JobKnobs, JobName, Knobs, NoKnobs, Outcome, RunArgs, Runs, Simulated,
    SimulatedAt, Skipped,
};

/// Registers jobs: declares each one's module and lists it in `JOBS`, in the order given.
/// A job's type must be named as its module is (checked at compile time).
macro_rules! jobs {
    ($($module:ident :: $job:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// Every registered job, in the order the schedule lists them.
        pub static JOBS: &[&dyn DynJob] = &[$(&registry::Registered::<$module::$job>::NEW),*];

        $(const _: () = assert!(
            registry::same_name(stringify!($module), <$module::$job as Job>::NAME),
            concat!("the job in src/jobs/", stringify!($module), ".rs must be named ", stringify!($module)),
        );)*
    };
}

// The registration list: one line per job (its file is src/jobs/NAME.rs, its schedule
// jobs/NAME.toml).
jobs! {
    generate_bills::GenerateBills,
    send_alerts::SendAlerts,
    enforce_suspensions::EnforceSuspensions,
    release_resources::ReleaseResources,
    deliver_notifications::DeliverNotifications,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Refused(String),
    /// The service is shutting down: the run stopped between batches (every batch either
    /// committed or rolled back whole) and the next start resumes it.
    #[error("interrupted by shutdown between batches; the next run resumes")]
    Interrupted,
    /// The slot's lease could not be kept: the run stopped between batches so that it never
    /// runs alongside the instance that takes the slot over.
    #[error(
        "the slot's lease was lost; stopped between batches (whoever holds the slot resumes it)"
    )]
    LeaseLost,
    /// The notification channels could not be built from the configuration.
    #[error("{0}")]
    Channels(String),
    /// The report could not be written as JSON.
    #[error("cannot write the report: {0}")]
    Report(serde_json::Error),
}

impl From<tokio_postgres::Error> for JobError {
    fn from(e: tokio_postgres::Error) -> Self {
        JobError::Db(DbError::Postgres(e))
    }
}

/// This process's name in slot claims and batch records: `host:pid:start`. The start time
/// (nanoseconds, hex) tells apart two processes with the same host name and pid (containers).
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        format!("{host}:{}:{start:x}", std::process::id())
    })
}

/// What claiming a slot found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The slot is ours to run (attempt number).
    Run(i32),
    /// The slot already finished successfully at this instant.
    AlreadyDone(DateTime<Utc>),
    /// Another runner holds the slot under a lease that has not expired.
    Busy {
        owner: String,
        lease_until: DateTime<Utc>,
    },
}

/// Claims `(job, slot)` in `job_runs` for `lease`: a new slot, a failed or interrupted one, a
/// running one whose lease expired (its runner died: the slot is taken over and resumed) or,
/// with `force`, a finished one is (re)started. The lease is on the database's clock, the
/// one clock every instance shares.
pub async fn claim_slot(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
    as_of: DateTime<Utc>,
    force: bool,
    lease: std::time::Duration,
) -> Result<Claim, JobError> {
    let lease_secs = lease.as_secs_f64();
    // The run's claim is also a session advisory lock on this connection, which PostgreSQL
    // releases the moment the holder's connection dies (a SIGKILL, a crash): a `running`
    // slot whose lock is free has no live runner and is taken over at once. While the lock is
    // held the runner is alive and connected, and a late lease renewal (a loaded machine) is
    // no reason to run the slot twice; the lease stays for a holder that is alive but cut off
    // behind a connection PostgreSQL has not yet seen die: that runner stops itself once it
    // could not renew for a whole lease, and its slot is taken over four leases later.
    let locked = try_lock_slot(client, job, slot).await?;
    // Only the lock's holder claims (the lock first, then the row: two claimers can never
    // both win), except a claim stuck behind a connection that is not yet seen dead.
    let row = if locked {
        // Raw SQL: a typed upsert on the slot's own connection, where the advisory lock lives.
        client
            .query_typed_opt(
                "INSERT INTO job_runs (job, slot, status, as_of, started_at, owner, lease_until)
                 VALUES ($1, $2, 'running', $3, clock_timestamp(), $5,
                         clock_timestamp() + make_interval(secs => $6))
                 ON CONFLICT (job, slot) DO UPDATE SET
                   status = 'running', attempts = job_runs.attempts + 1, as_of = excluded.as_of,
                   started_at = excluded.started_at, finished_at = NULL, error = NULL,
                   owner = excluded.owner, lease_until = excluded.lease_until
                 WHERE job_runs.status IN ('failed', 'interrupted', 'running')
                    OR (job_runs.status = 'succeeded' AND $4)
                 RETURNING attempts",
                &[
                    (&job.as_str(), Type::TEXT),
                    (&slot, Type::TIMESTAMPTZ),
                    (&as_of, Type::TIMESTAMPTZ),
                    (&force, Type::BOOL),
                    (&instance_id(), Type::TEXT),
                    (&lease_secs, Type::FLOAT8),
                ],
            )
            .await?
    } else {
        // Raw SQL: a typed one-round-trip takeover, timed by clock_timestamp() and make_interval().
        client
            .query_typed_opt(
                "UPDATE job_runs SET
                   status = 'running', attempts = attempts + 1, as_of = $3,
                   started_at = clock_timestamp(), finished_at = NULL, error = NULL, owner = $4,
                   lease_until = clock_timestamp() + make_interval(secs => $5::float8)
                 WHERE job = $1 AND slot = $2 AND status = 'running'
                   AND coalesce(lease_until, '-infinity') < clock_timestamp() - make_interval(secs => 4 * $5::float8)
                 RETURNING attempts",
                &[
                    (&job.as_str(), Type::TEXT),
                    (&slot, Type::TIMESTAMPTZ),
                    (&as_of, Type::TIMESTAMPTZ),
                    (&instance_id(), Type::TEXT),
                    (&lease_secs, Type::FLOAT8),
                ],
            )
            .await?
    };
    if let Some(r) = row {
        return Ok(Claim::Run(r.get(0)));
    }
    if locked {
        unlock_slot(client, job, slot).await?;
    }
    // Raw SQL: a one-round-trip typed read on the slot's connection, which diesel does not drive.
    let Some(row) = client
        .query_typed_opt(
            "SELECT status, finished_at, owner, lease_until FROM job_runs WHERE job = $1 AND slot = $2",
            &[(&job.as_str(), Type::TEXT), (&slot, Type::TIMESTAMPTZ)],
        )
        .await?
    else {
        // The lock's holder is claiming it this very moment.
        return Ok(Claim::Busy {
            owner: "another runner (claiming it now)".into(),
            lease_until: slot,
        });
    };
    let status: String = row.get(0);
    if status == "running" {
        return Ok(Claim::Busy {
            owner: row.get::<_, Option<String>>(2).unwrap_or_default(),
            lease_until: row.get::<_, Option<DateTime<Utc>>>(3).unwrap_or(slot),
        });
    }
    let done: Option<DateTime<Utc>> = row.get(1);
    Ok(Claim::AlreadyDone(done.unwrap_or(slot)))
}

/// The advisory-lock key of a slot (64 bits of a hash of its job and instant).
/// Takes the slot's advisory lock, waiting up to two seconds for a holder that is going away:
/// a runner killed in the middle of a statement holds the lock until its backend notices the
/// closed connection (within 100 ms: `client_connection_check_interval`, db::RAW_SESSION_SETUP).
async fn try_lock_slot(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
) -> Result<bool, JobError> {
    let key = slot_lock_key(job, slot);
    for attempt in 0..=20 {
        // Raw SQL: session advisory locks are functions the query builder does not know.
        let locked: bool = client
            .query_typed_one("SELECT pg_try_advisory_lock($1)", &[(&key, Type::INT8)])
            .await?
            .get(0);
        if locked || attempt == 20 {
            return Ok(locked);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(false)
}

pub fn slot_lock_key(job: JobName, slot: DateTime<Utc>) -> i64 {
    // FNV-1a: stable across processes and builds (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("arrears-slot/{}/{}", job.as_str(), slot.timestamp_micros()).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Releases the slot's advisory lock taken by `claim_slot` on this connection.
async fn unlock_slot(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
) -> Result<(), JobError> {
    // Raw SQL: session advisory locks are functions the query builder does not know.
    client
        .execute_typed(
            "SELECT pg_advisory_unlock($1)",
            &[(&slot_lock_key(job, slot), Type::INT8)],
        )
        .await?;
    Ok(())
}

/// Records the end of a claimed run with its report or error, while the claim is still ours
/// (a runner that lost its lease to a takeover must not overwrite the new runner's record).
pub async fn finish_slot(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
    outcome: Result<&serde_json::Value, &JobError>,
) -> Result<(), JobError> {
    let (status, report, error) = match outcome {
        Ok(r) => ("succeeded", Some(r), None),
        Err(e @ (JobError::Interrupted | JobError::LeaseLost)) => {
            ("interrupted", None, Some(e.to_string()))
        }
        Err(e) => ("failed", None, Some(e.to_string())),
    };
    // Raw SQL: a typed update on the slot's own connection, pipelined with the unlock (end_slot).
    let n = client
        .execute_typed(
            "UPDATE job_runs SET status = $3, report = $4, error = $5, finished_at = clock_timestamp(),
                                 lease_until = NULL
             WHERE job = $1 AND slot = $2 AND owner = $6 AND status = 'running'",
            &[
                (&job.as_str(), Type::TEXT),
                (&slot, Type::TIMESTAMPTZ),
                (&status, Type::TEXT),
                (&report, Type::JSONB),
                (&error, Type::TEXT),
                (&instance_id(), Type::TEXT),
            ],
        )
        .await?;
    if n == 0 {
        tracing::error!(job = job.as_str(), slot = %slot, outcome = status,
            "the slot's claim was lost (lease expired and taken over) before the run ended; its outcome is not recorded");
    }
    Ok(())
}

/// A claimed slot: its lease is renewed in the background until `end_slot`.
pub struct SlotLease {
    job: JobName,
    slot: DateTime<Utc>,
    renewal: Option<tokio::task::JoinHandle<()>>,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlotLease {
    /// The claim may have passed to another runner (a renewal found it taken, or none
    /// succeeded for a whole lease): a long run must stop at its next batch.
    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(t) = self.renewal.take() {
            t.abort();
        }
    }
}

/// One run of a slotted job: which slot, at which instant, and how.
#[derive(Debug, Clone, Copy)]
pub struct SlotRun {
    pub job: JobName,
    pub slot: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    /// Run a slot that already finished.
    pub force: bool,
    /// Claim nothing and record nothing.
    pub dry_run: bool,
}

/// Why a slotted run did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The slot already finished successfully.
    AlreadyRan { finished: DateTime<Utc> },
    /// Another live runner holds the slot: the run is someone else's, not done.
    HeldElsewhere {
        owner: String,
        lease_until: DateTime<Utc>,
    },
}

impl Skip {
    pub fn why(&self) -> String {
        match self {
            Skip::AlreadyRan { finished } => {
                format!("slot already ran (finished {finished}); use --force to run it again")
            }
            Skip::HeldElsewhere { owner, lease_until } => format!(
                "slot is being run by {owner} (lease until {lease_until}); it is not done yet"
            ),
        }
    }

    /// The runner holding the slot, for a report's `held_by`.
    pub fn held_by(&self) -> Option<String> {
        match self {
            Skip::HeldElsewhere { owner, .. } => Some(owner.clone()),
            Skip::AlreadyRan { .. } => None,
        }
    }
}

/// The report of a slotted job: where a skipped run says why (`skipped`) and, when another
/// runner holds the slot, who (`held_by`: the CLI exits 75 and the service retries).
pub trait SlotReport: Serialize {
    fn skipped(&mut self, skip: &Skip);
}

/// The one protocol of every slotted job: claims the slot (not on a dry run) and keeps its
/// lease; when it already ran or another runner holds it, says why in the report and does
/// nothing; else runs `work` and records its outcome with the report.
pub async fn in_slot<R: SlotReport>(
    db: &Db,
    config: &Config,
    client: &mut tokio_postgres::Client,
    run: SlotRun,
    report: &mut R,
    work: impl AsyncFnOnce(&mut tokio_postgres::Client, &SlotLease, &mut R) -> Result<(), JobError>,
) -> Result<(), JobError> {
    let lease = match begin_slot(db, config, client, &run).await? {
        SlotStart::Skip(skip) => {
            report.skipped(&skip);
            return Ok(());
        }
        SlotStart::Run(lease) => lease,
    };
    let result = work(client, &lease, report).await;
    end_slot(client, lease, run.dry_run, result, report).await
}

/// What `begin_slot` decided.
enum SlotStart {
    /// Not run, and why (it already ran, or another runner holds it).
    Skip(Skip),
    /// Ours to run; pass the lease to `end_slot`.
    Run(SlotLease),
}

/// Claims `(job, slot)` unless this is a dry run, and keeps renewing the lease while the run
/// goes on. Skips a slot that already finished (without `force`) or that another live runner
/// holds.
async fn begin_slot(
    db: &Db,
    config: &Config,
    client: &tokio_postgres::Client,
    run: &SlotRun,
) -> Result<SlotStart, JobError> {
    let SlotRun {
        job,
        slot,
        as_of,
        force,
        dry_run,
    } = *run;
    if dry_run {
        return Ok(SlotStart::Run(SlotLease {
            job,
            slot,
            renewal: None,
            lost: Default::default(),
        }));
    }
    let lease = config.service.lease.std();
    Ok(
        match claim_slot(client, job, slot, as_of, force, lease).await? {
            Claim::AlreadyDone(finished) => SlotStart::Skip(Skip::AlreadyRan { finished }),
            Claim::Busy { owner, lease_until } => {
                SlotStart::Skip(Skip::HeldElsewhere { owner, lease_until })
            }
            Claim::Run(attempt) => {
                if attempt > 1 {
                    tracing::info!(job = job.as_str(), slot = %slot, attempt, "resuming slot");
                }
                let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                SlotStart::Run(SlotLease {
                    job,
                    slot,
                    renewal: Some(tokio::spawn(renew_lease(
                        db.clone(),
                        job,
                        slot,
                        lease,
                        lost.clone(),
                    ))),
                    lost,
                })
            }
        },
    )
}

/// Renews a slot's lease every third of its length until aborted. A failed renewal (the
/// database is away) is retried at the next tick; when the claim is found taken, or no
/// renewal succeeded for a whole lease, `lost` is set (and logged loudly).
async fn renew_lease(
    db: Db,
    job: JobName,
    slot: DateTime<Utc>,
    lease: std::time::Duration,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let every = (lease / 3).max(std::time::Duration::from_millis(200));
    let lease_secs = lease.as_secs_f64();
    let mut renewed_at = std::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let renewed = async {
            let c = db.raw_client().await?;
            // Raw SQL: a typed one-round-trip renewal on the database's clock (clock_timestamp()).
            let n = c
                .execute_typed(
                    "UPDATE job_runs SET lease_until = clock_timestamp() + make_interval(secs => $4)
                     WHERE job = $1 AND slot = $2 AND owner = $3 AND status = 'running'",
                    &[
                        (&job.as_str(), Type::TEXT),
                        (&slot, Type::TIMESTAMPTZ),
                        (&instance_id(), Type::TEXT),
                        (&lease_secs, Type::FLOAT8),
                    ],
                )
                .await
                .map_err(DbError::from)?;
            Ok::<u64, DbError>(n)
        }
        .await;
        match renewed {
            Ok(0) => {
                tracing::error!(job = job.as_str(), slot = %slot, "lost the slot's lease: another runner took it over");
                lost.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            Ok(_) => renewed_at = std::time::Instant::now(),
            Err(e) => {
                tracing::warn!(job = job.as_str(), slot = %slot, error = %e, "cannot renew the slot's lease; retrying");
                if renewed_at.elapsed() >= lease {
                    tracing::error!(job = job.as_str(), slot = %slot, "no lease renewal for a whole lease: another runner may take the slot over");
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    }
}

/// Records the end of a slot claimed by `begin_slot` (nothing on a dry run): the report on
/// success, `interrupted` when the run stopped for a shutdown (the next start resumes it at
/// once), the error otherwise. The job's own error wins over a failure to record it.
async fn end_slot<R: Serialize>(
    client: &tokio_postgres::Client,
    mut lease: SlotLease,
    dry_run: bool,
    result: Result<(), JobError>,
    report: &R,
) -> Result<(), JobError> {
    if let Some(t) = lease.renewal.take() {
        t.abort();
    }
    if dry_run {
        return result;
    }
    let (job, slot) = (lease.job, lease.slot);
    let report = serde_json::to_value(report).unwrap_or_default();
    let outcome = match &result {
        Ok(()) => Ok(&report),
        Err(e) => Err(e),
    };
    // The lock goes once the outcome is recorded (never before: a claimer seeing the slot
    // still running with its lock free would take it over). Both sent at once, one round
    // trip: the server runs them in order, the record (its own transaction) first.
    let (recorded, _) = tokio::join!(
        finish_slot(client, job, slot, outcome),
        unlock_slot(client, job, slot)
    );
    result?;
    recorded
}
