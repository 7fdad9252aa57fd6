//! `arrears serve`: the daemon. One task per scheduled job walks the schedule and claims each
//! due slot in PostgreSQL (so N instances run each slot once); a dispatcher drains the outbox;
//! a helper bills batches of billing runs that any instance started; the HTTP API answers
//! health, readiness, metrics and the account endpoints. systemd hears of it through
//! sd_notify (READY, WATCHDOG, STOPPING).
//!
//! Failure model: every loop survives a database error (logged, retried with backoff, and
//! reported by /readyz); a slot whose runner died is taken over when its lease expires; on
//! SIGTERM the loops stop claiming, a billing run stops between batches (each batch commits
//! or rolls back whole, and the slot is marked interrupted so the next start resumes it at
//! once), and the process exits 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::db::{Db, DbError, MigrationMode};
use crate::jobs::{Did, JobError, Outcome, RunArgs};
use crate::notify::Channels;
use crate::scheduler::{Cadence, CatchUp, Clock, JobSchedule, Schedule};
use crate::shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("notification channels: {0}")]
    Channels(String),
}

/// Sends a state line to systemd when it started us with Type=notify (no-op otherwise).
/// Hand-written, not the sd-notify crate: its 0.5.0 connects to NOTIFY_SOCKET as a path, so an
/// abstract `@name` address (containers, some systemd versions) would never hear us.
pub fn sd_notify(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_socket(&addr, state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// One datagram to `addr`: a path, or with a leading `@` a Linux abstract socket name.
fn notify_socket(addr: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = addr.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), addr)?;
    }
    Ok(())
}

/// Runs the service until SIGTERM or SIGINT. `listener` is bound by the caller (so that a
/// busy address fails before anything starts).
pub async fn serve(
    config: Config,
    schedule: Schedule,
    clock: Clock,
    listener: tokio::net::TcpListener,
) -> Result<(), ServeError> {
    let channels = Channels::from_config(&config).map_err(ServeError::Channels)?;
    let shared = Arc::new(Shared::new(config, schedule, clock, channels));

    // Signals first: a SIGTERM during start-up (database unreachable) still stops cleanly.
    {
        let sh = shared.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = which, "stopping: no new slots are claimed");
            sd_notify("STOPPING=1");
            sh.request_stop();
        });
    }

    let http = {
        let sh = shared.clone();
        let mut rx = shared.stop_signal();
        tokio::spawn(async move {
            let app = crate::server::router(sh);
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        })
    };

    // The database, however long it takes to come back.
    let mut backoff = Duration::from_millis(500);
    let db = loop {
        if shared.stopping() {
            let _ = http.await;
            return Ok(());
        }
        match open_db(&shared.config, shared.clock.now()).await {
            Ok(db) => break db,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "database not available");
                shared.pause(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    shared.set_db(db.clone());
    if shared.stopping() {
        db.request_stop();
    }
    shared.beat();
    tracing::info!(
        jobs = shared.schedule.jobs.iter().filter(|j| j.enabled).count(),
        "schedule loaded; ready"
    );
    sd_notify("READY=1");

    let mut tasks = Vec::new();
    for js in shared.schedule.jobs.iter().filter(|j| j.enabled).cloned() {
        let sh = shared.clone();
        if js.job.helps() {
            tasks.push(tokio::spawn(help_loop(sh.clone(), db.clone(), js.clone())));
        }
        match js.cadence {
            Cadence::Cron { .. } => tasks.push(tokio::spawn(job_loop(sh, db.clone(), js))),
            Cadence::Every(every) => {
                tasks.push(tokio::spawn(dispatch_loop(sh, db.clone(), js, every)))
            }
        }
    }
    if let Some(every) = watchdog_interval() {
        tokio::spawn(watchdog(shared.clone(), every));
    }

    for t in tasks {
        let _ = t.await;
    }
    let _ = http.await;
    tracing::info!("stopped");
    Ok(())
}

async fn open_db(config: &Config, now: DateTime<Utc>) -> Result<Db, DbError> {
    let db = Db::open(config, MigrationMode::Require).await?;
    // The configured price list takes effect now (a changed price from this start on).
    let prices = crate::db::catalog::apply(&mut *db.conn().await?, config, now, false).await?;
    if !prices.up_to_date {
        tracing::info!(report = %serde_json::to_value(&prices).unwrap_or_default(),
            "applied the configured price list");
    }
    // The due-work index follows the configured policies before the first slot runs.
    let policies = crate::lifecycle::policies::apply(&db, config, now, false).await?;
    if !policies.up_to_date {
        tracing::info!(report = %serde_json::to_value(&policies).unwrap_or_default(),
            "the lifecycle policies changed: recomputed what they derive");
    }
    Ok(db)
}

fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// WATCHDOG=1 while the loops keep completing passes (a hung service is restarted).
async fn watchdog(sh: Arc<Shared>, every: Duration) {
    let stale = (every.as_secs() as i64 * 2).max(10);
    while !sh.stopping() {
        if sh.since_beat() <= stale {
            sd_notify("WATCHDOG=1");
        }
        sh.pause(every).await;
    }
}

/// One scheduled job on this instance: resume slots whose runner died, then run due slots.
async fn job_loop(sh: Arc<Shared>, db: Db, js: JobSchedule) {
    let tick = sh.config.service.tick.std();
    let mut backoff = tick;
    let mut client: Option<crate::db::RawClient> = None;
    while !sh.stopping() {
        match job_step(&sh, &db, &js, &mut client).await {
            Ok(false) => backoff = tick,
            Ok(true) => {
                // A slot failed or was refused: try again later, not every tick.
                backoff = (backoff * 2).clamp(tick, Duration::from_secs(30));
            }
            Err(e) => {
                client = None;
                tracing::warn!(job = js.job.name().as_str(), error = %e, retry_in_ms = backoff.as_millis() as u64, "scheduler pass failed");
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        sh.beat();
        sh.pause(backoff).await;
    }
}

async fn connected<'a>(
    db: &Db,
    client: &'a mut Option<crate::db::RawClient>,
) -> Result<&'a tokio_postgres::Client, DbError> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(db.raw_client().await?);
    }
    Ok(client.as_ref().expect("set above"))
}

/// A slot newer than the job's latest success that is not finished.
struct OpenSlot {
    slot: DateTime<Utc>,
    as_of: DateTime<Utc>,
    status: String,
    /// Held by a live runner elsewhere, or failed and still in its back-off.
    waiting: bool,
}

/// One pass of a job's loop. Returns whether a slot failed (the loop then backs off).
async fn job_step(
    sh: &Shared,
    db: &Db,
    js: &JobSchedule,
    client: &mut Option<crate::db::RawClient>,
) -> Result<bool, JobError> {
    let Cadence::Cron { catch_up, .. } = &js.cadence else {
        return Ok(false);
    };
    let every = *catch_up == CatchUp::Every;
    let job = js.job.name().as_str();
    let now = sh.clock.now();
    let c = connected(db, client).await?;
    let open = open_slots(sh, c, job).await?;
    // Slots not yet started, counted from the last one handed out (a one-off run with a
    // future --as-of does not hold the schedule back).
    // Raw SQL: a read on the loop's raw connection, which diesel does not drive.
    let last: Option<DateTime<Utc>> = c
        .query_one(
            "SELECT max(as_of) FROM job_runs WHERE job = $1 AND as_of <= $2",
            &[&job, &now],
        )
        .await?
        .get(0);
    let due = js.due(last, now);
    if due.dropped > 0 {
        sh.metrics.dropped(js.job.name(), due.dropped);
        tracing::error!(job, dropped = due.dropped, kept = due.slots.len(), max_catch_up = js.max_catch_up,
            "CATCH-UP CAPPED: more slots were missed than max_catch_up allows (clock jump or long outage?); the oldest were skipped and need an operator");
    }

    if every {
        // Billing: the oldest open day first; while one is open (held elsewhere, or failed
        // and waiting), no later day starts.
        for o in &open {
            if o.waiting || sh.stopping() {
                return Ok(false);
            }
            tracing::info!(job, slot = %o.slot, was = o.status, "resuming slot");
            match run_slot(sh, db, js, o.as_of, Some(o.slot)).await {
                Outcome::Done { .. } => {}
                Outcome::HeldElsewhere { .. } => return Ok(false),
                Outcome::Refused(_) | Outcome::Failed(_) => return Ok(true),
            }
        }
    } else if due.slots.is_empty() {
        // A level-triggered job resumes its newest open slot only when no newer slot is due
        // (a newer run does the same work at a later instant).
        let Some(o) = open.last().filter(|o| !o.waiting && !sh.stopping()) else {
            return Ok(false);
        };
        tracing::info!(job, slot = %o.slot, was = o.status, "resuming slot");
        let outcome = run_slot(sh, db, js, o.as_of, Some(o.slot)).await;
        return Ok(matches!(outcome, Outcome::Refused(_) | Outcome::Failed(_)));
    }
    if due.missed > 0 {
        tracing::info!(
            job,
            missed = due.missed,
            running = due.slots.len(),
            "catching up missed slots"
        );
    }
    let (newest_done, failed) = run_due(sh, db, js, due.slots, every).await;
    if let Some(newest) = newest_done.filter(|_| !every) {
        close_superseded(sh, c, job, newest).await?;
    }
    Ok(failed)
}

/// The job's open slots newer than its latest success, oldest first: interrupted, held by a
/// runner whose lease expired, or failed and past their back-off (the lease, doubled per
/// attempt, at most an hour). Older ones are behind a later success: billing refuses them
/// (days are billed in order) and level-triggered jobs have nothing left to do for them. A
/// slot still `running` under this instance's own name is dead whatever its lease says: this
/// job's slots run one at a time in this loop, so its run ended without its outcome being
/// recorded (the database went away under it) and it is resumed at once.
async fn open_slots(
    sh: &Shared,
    c: &tokio_postgres::Client,
    job: &str,
) -> Result<Vec<OpenSlot>, JobError> {
    let lease = sh.config.service.lease.seconds() as f64;
    let me = crate::jobs::instance_id();
    // Raw SQL: a CTE and lease arithmetic (clock_timestamp(), make_interval()) diesel cannot say.
    let rows = c
        .query(
            "WITH done AS (SELECT max(slot) AS latest FROM job_runs WHERE job = $1 AND status = 'succeeded')
             SELECT slot, as_of, status, status = 'running' AND coalesce(lease_until, '-infinity') >= clock_timestamp()
                                         AND owner IS DISTINCT FROM $3
                    OR status = 'failed' AND finished_at + least(make_interval(secs => $2 * power(2, least(attempts, 12) - 1)),
                                                             interval '1 hour') >= clock_timestamp() AS waiting
             FROM job_runs, done
             WHERE job = $1 AND status <> 'succeeded' AND slot > coalesce(done.latest, '-infinity')
             ORDER BY slot",
            &[&job, &lease, &me],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OpenSlot {
            slot: r.get(0),
            as_of: r.get(1),
            status: r.get(2),
            waiting: r.get(3),
        })
        .collect())
}

/// Runs the due slots in order. Returns the newest slot done and whether one failed. A
/// billing-like job (`every`) stops at the first slot not done: days are billed in order.
async fn run_due(
    sh: &Shared,
    db: &Db,
    js: &JobSchedule,
    slots: Vec<DateTime<Utc>>,
    every: bool,
) -> (Option<DateTime<Utc>>, bool) {
    let (mut newest_done, mut failed) = (None, false);
    for slot in slots {
        if sh.stopping() {
            break;
        }
        match run_slot(sh, db, js, slot, None).await {
            Outcome::Done { .. } => newest_done = Some(slot),
            Outcome::HeldElsewhere { .. } if every => break,
            Outcome::HeldElsewhere { .. } => {}
            Outcome::Refused(_) | Outcome::Failed(_) => {
                failed = true;
                if every {
                    break;
                }
            }
        }
    }
    (newest_done, failed)
}

/// A level-triggered job's open slots behind a newer run have nothing left to do: closed,
/// so that no claim of a dead runner stays open for ever. A running claim is closed only
/// when a takeover could claim it (claim_slot's rule: four leases past its lease): a live
/// runner whose renewal is merely late keeps its slot and records it. This instance's own
/// running claims are closed at once (see `open_slots`).
async fn close_superseded(
    sh: &Shared,
    c: &tokio_postgres::Client,
    job: &str,
    newest: DateTime<Utc>,
) -> Result<(), JobError> {
    let lease = sh.config.service.lease.seconds() as f64;
    let me = crate::jobs::instance_id();
    // Raw SQL: takeover arithmetic on clock_timestamp() and make_interval(), unknown to diesel.
    c.execute(
        "UPDATE job_runs SET status = 'failed', error = $3, finished_at = clock_timestamp(), lease_until = NULL
         WHERE job = $1 AND slot < $2 AND (status = 'interrupted'
            OR (status = 'running' AND (owner = $5 OR coalesce(lease_until, '-infinity')
                  < clock_timestamp() - make_interval(secs => 4 * $4::float8))))",
        &[&job, &newest, &format!("superseded by the slot at {newest}"), &lease, &me],
    )
    .await?;
    Ok(())
}

/// Runs one slot of a scheduled job at `as_of`, with its knobs; the job claims the slot
/// itself. `resume` is the recorded slot of an open run being resumed (billing then bills
/// that slot's day, whatever instant it first ran at).
async fn run_slot(
    sh: &Shared,
    db: &Db,
    js: &JobSchedule,
    as_of: DateTime<Utc>,
    resume: Option<DateTime<Utc>>,
) -> Outcome {
    let started = Instant::now();
    let outcome = js.job.run_scheduled(sh.ctx(db, js), as_of, resume).await;
    let secs = started.elapsed().as_secs_f64();
    sh.metrics.record(js.job.name(), outcome.label(), secs);
    let job = js.job.name().as_str();
    match &outcome {
        Outcome::HeldElsewhere { why, .. } => {
            tracing::debug!(job, as_of = %as_of, why, "slot held by another runner")
        }
        Outcome::Done {
            did: Did::AlreadyRan,
            ..
        } => tracing::debug!(job, as_of = %as_of, "slot skipped: it already ran"),
        Outcome::Done { report, .. } => {
            tracing::info!(job, as_of = %as_of, seconds = secs, report = %report, "slot finished")
        }
        Outcome::Failed(e @ (JobError::Interrupted | JobError::LeaseLost)) => {
            tracing::info!(job, as_of = %as_of, reason = %e, "slot stopped between batches; it is resumed")
        }
        Outcome::Refused(e) => tracing::error!(job, as_of = %as_of, error = %e, "slot failed"),
        Outcome::Failed(e) => tracing::error!(job, as_of = %as_of, error = %e, "slot failed"),
    }
    outcome
}

/// A continuous job (the outbox dispatcher): a pass every `every`, of at most 20 batches
/// (its claims are per work item, so every instance runs it).
async fn dispatch_loop(sh: Arc<Shared>, db: Db, js: JobSchedule, every: Duration) {
    let job = js.job.name();
    let mut backoff = every;
    while !sh.stopping() {
        let started = Instant::now();
        let args = RunArgs {
            max_batches: Some(20),
            ..RunArgs::scheduled(sh.clock.now(), None)
        };
        let outcome = js.job.run(sh.ctx(&db, &js), &args).await;
        sh.beat();
        let secs = started.elapsed().as_secs_f64();
        let failure = match &outcome {
            Outcome::Done { did: Did::Idle, .. } => None,
            Outcome::Done { report, .. } | Outcome::HeldElsewhere { report, .. } => {
                sh.metrics.record(job, outcome.label(), secs);
                tracing::info!(job = job.as_str(), report = %report, "pass finished");
                None
            }
            Outcome::Refused(why) => Some(why.clone()),
            Outcome::Failed(e) => Some(e.to_string()),
        };
        backoff = match failure {
            None => every,
            Some(e) => {
                sh.metrics.record(job, outcome.label(), secs);
                tracing::warn!(job = job.as_str(), error = %e, "pass failed");
                (backoff * 2).min(Duration::from_secs(30))
            }
        };
        sh.pause(backoff).await;
    }
}

/// A job's share of work that any instance's runs left open (billing's batches), so that
/// two instances finish a run faster than one.
async fn help_loop(sh: Arc<Shared>, db: Db, js: JobSchedule) {
    let tick = sh.config.service.tick.std();
    while !sh.stopping() {
        if let Err(e) = js.job.help(sh.ctx(&db, &js)).await {
            tracing::warn!(job = js.job.name().as_str(), error = %e, "helping with batches failed")
        }
        sh.pause(tick).await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    #[test]
    fn notify_reaches_an_abstract_socket_and_a_path() {
        let name = format!("arrears-notify-test-{}", std::process::id());
        let abstract_addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("a name");
        let listener = UnixDatagram::bind_addr(&abstract_addr).expect("bind abstract");
        super::notify_socket(format!("@{name}").as_ref(), "READY=1").expect("sent");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"READY=1");

        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind path");
        super::notify_socket(path.as_os_str(), "WATCHDOG=1").expect("sent");
        let n = listener.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
