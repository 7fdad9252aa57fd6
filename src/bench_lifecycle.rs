//! `arrears bench-lifecycle`: the lifecycle jobs at a cloud's scale. A scratch database gets N
//! accounts; H of them become history through the real jobs (in arrears months ago, frozen,
//! half of them released, all still owing), and D fall into arrears on one bill among the
//! accounts billed that day. Measured, in this process, with the real jobs:
//! - each lifecycle job's run when nothing is due (target: under 100 ms, whatever the history);
//! - the slot where the D debtors are due: send_alerts, enforce_suspensions, then delivery
//!   (SMS through the log adapter, counted as accepted) and the two grace slots where they
//!   are suspended, each in one run (target: 2,000 accounts/s or more per job);
//! - release_resources releasing half the history at once;
//! - the peak resident memory of the process (target: under 200 MB).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::db::{self, catalog, Db, DbError, MigrationMode};
use crate::import;
use crate::jobs::{
    deliver_notifications, enforce_suspensions, generate_bills, release_resources, send_alerts,
    JobError,
};

const BENCH_DB: &str = "arrears_bench_lifecycle";

#[derive(Debug, Clone)]
pub struct LifecycleBenchOptions {
    pub accounts: u64,
    pub history: u64,
    pub debtors: u64,
    /// Accounts with usage on the bill day (the debtors among them).
    pub billed: u64,
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleBenchError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Import(#[from] import::ImportError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

impl From<tokio_postgres::Error> for LifecycleBenchError {
    fn from(e: tokio_postgres::Error) -> Self {
        LifecycleBenchError::Db(DbError::Postgres(e))
    }
}

/// One timed run of a lifecycle job.
#[derive(Debug, Clone, Serialize)]
pub struct Timed {
    pub job: &'static str,
    pub as_of: DateTime<Utc>,
    pub accounts_due: i64,
    pub accounts_evaluated: usize,
    pub changed: usize,
    pub seconds: f64,
    pub accounts_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LifecycleBenchReport {
    pub accounts: u64,
    pub history: u64,
    pub debtors: u64,
    pub billed: u64,
    /// Seconds per set-up phase.
    pub setup_seconds: BTreeMap<String, f64>,
    /// Runs with nothing due, milliseconds (target < 100 each).
    pub idle_runs_ms: BTreeMap<String, Vec<f64>>,
    pub idle_max_ms: f64,
    /// Making the history (informative: these are the jobs at scale too).
    pub history_runs: Vec<Timed>,
    /// The slots where the debtors are due (target >= 2,000 accounts/s each).
    pub slot_runs: Vec<Timed>,
    pub slowest_per_second: f64,
    /// Delivering the debtors' overdue SMS (informative).
    pub delivery_seconds: f64,
    pub notices_delivered: usize,
    pub peak_rss_mib: f64,
    pub database: String,
}

fn timed(
    job: &'static str,
    as_of: DateTime<Utc>,
    due: i64,
    evaluated: usize,
    changed: usize,
    t: Instant,
) -> Timed {
    let seconds = t.elapsed().as_secs_f64();
    Timed {
        job,
        as_of,
        accounts_due: due,
        accounts_evaluated: evaluated,
        changed,
        seconds,
        accounts_per_second: evaluated as f64 / seconds.max(1e-9),
    }
}

async fn alerts(db: &Db, config: &Config, as_of: DateTime<Utc>) -> Result<Timed, JobError> {
    let t = Instant::now();
    let opts = send_alerts::Options {
        as_of,
        dry_run: false,
        force: false,
    };
    let r = send_alerts::run(db, config, &opts).await?;
    let written = r.due.notices_written;
    Ok(timed(
        "send_alerts",
        as_of,
        r.due.accounts_due,
        r.due.accounts_evaluated,
        written,
        t,
    ))
}

async fn enforce(db: &Db, config: &Config, as_of: DateTime<Utc>) -> Result<Timed, JobError> {
    let t = Instant::now();
    let opts = enforce_suspensions::Options {
        as_of,
        dry_run: false,
        force: false,
    };
    let r = enforce_suspensions::run(db, config, &opts).await?;
    Ok(timed(
        "enforce_suspensions",
        as_of,
        r.due.accounts_due,
        r.due.accounts_evaluated,
        r.resources_suspended + r.resources_restored,
        t,
    ))
}

async fn release(
    db: &Db,
    config: &Config,
    as_of: DateTime<Utc>,
    allow: bool,
) -> Result<Timed, JobError> {
    let t = Instant::now();
    let opts = release_resources::Options {
        as_of,
        service_now: Utc::now(),
        dry_run: false,
        force: false,
        allow_mass_release: allow,
    };
    let r = release_resources::run(db, config, &opts).await?;
    Ok(timed(
        "release_resources",
        as_of,
        r.due.accounts_due,
        r.due.accounts_evaluated,
        r.released_count,
        t,
    ))
}

fn instant(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// History, through the real jobs: in arrears since `opened` (opening balances below zero),
/// frozen 15 days later (sa), half of them warned and released 15 days after that.
async fn make_history(
    db: &Db,
    config: &Config,
    opened: DateTime<Utc>,
) -> Result<Vec<Timed>, LifecycleBenchError> {
    let mut history = Vec::new();
    history.push(enforce(db, config, opened).await?);
    history.push(alerts(db, config, opened).await?);
    let frozen = opened + Duration::days(15);
    history.push(enforce(db, config, frozen).await?);
    history.push(alerts(db, config, frozen).await?);
    let release_at = frozen + Duration::days(15);
    // The release warnings of half the history, as delivery records them when a channel
    // accepts them (these accounts have no contact, so no notice is written).
    let c = db.raw_client().await?;
    // Raw SQL: benchmark scaffolding (INSERT ... SELECT from a VALUES list; least() over nulls).
    c.execute(
        "INSERT INTO release_warnings (account_id, suspension, lead_seconds, release_at, accepted_at)
         SELECT r.account_id, r.suspension, l.lead, s.release_at, s.release_at - make_interval(secs => l.lead)
         FROM resources r
         JOIN resource_suspensions s ON s.account_id = r.account_id AND s.no = r.suspension
         CROSS JOIN (VALUES (604800), (86400)) AS l(lead)
         WHERE r.account_id LIKE 'h%' AND right(r.account_id, 1) IN ('0', '2', '4', '6', '8')",
        &[],
    )
    .await?;
    c.execute(
        "UPDATE accounts SET release_due_at = least(coalesce(release_due_at, 'infinity'), $1)
         WHERE id LIKE 'h%' AND right(id, 1) IN ('0', '2', '4', '6', '8')",
        &[&(release_at - Duration::days(7))],
    )
    .await?;
    history.push(alerts(db, config, release_at - Duration::days(7)).await?);
    history.push(release(db, config, release_at, true).await?);
    history.push(enforce(db, config, release_at).await?);
    Ok(history)
}

/// `hours` hourly slots from `from` of the three lifecycle jobs, their times in `idle` (ms);
/// with `require_idle`, a slot where an account is due is an error.
async fn idle_runs(
    db: &Db,
    config: &Config,
    from: DateTime<Utc>,
    hours: i64,
    require_idle: bool,
    idle: &mut BTreeMap<String, Vec<f64>>,
) -> Result<(), LifecycleBenchError> {
    for k in 0..hours {
        let at = from + Duration::hours(k);
        for r in [
            alerts(db, config, at).await?,
            enforce(db, config, at).await?,
            release(db, config, at, false).await?,
        ] {
            if require_idle && r.accounts_due != 0 {
                return Err(LifecycleBenchError::Setup(format!(
                    "{} had {} accounts due at {at}; the idle runs need none",
                    r.job, r.accounts_due
                )));
            }
            idle.entry(r.job.to_string())
                .or_default()
                .push(r.seconds * 1000.0);
        }
    }
    Ok(())
}

pub async fn run(
    config: &Config,
    opts: &LifecycleBenchOptions,
) -> Result<LifecycleBenchReport, LifecycleBenchError> {
    if opts.history + opts.debtors > opts.accounts || opts.debtors > opts.billed {
        return Err(LifecycleBenchError::Setup(
            "--history plus --debtors must not exceed --accounts, nor --debtors --billed".into(),
        ));
    }
    // The scratch database, and a configuration whose SMS go to a log in the data folder and
    // count as accepted (as in the demo), so that lcic's grace starts.
    std::fs::create_dir_all(&opts.dir)?;
    let mut config = config.clone();
    config.lifecycle.allow_future = true;
    config.notifications.dev_channels_count_as_accepted = true;
    config.sms.provider = crate::config::SmsProviderKind::Log;
    config.sms.log_file = Some(std::path::absolute(opts.dir.join("sms.log"))?);
    config.email.smtp_url = None;
    config.email.file_dir = Some(std::path::absolute(opts.dir.join("mail"))?);
    config.webhooks.products.clear();
    let base = Db::open(&config, MigrationMode::Apply).await?;
    let url = db::recreate_database(&base.url, BENCH_DB).await?;
    let db = Db::open_url(&url, config.database.pool_size.max(2), MigrationMode::Apply).await?;
    catalog::apply_to_new(&db, &config).await?;
    let mut setup = BTreeMap::new();

    let t = Instant::now();
    let files = generate(&opts.dir, opts)?;
    setup.insert("generate".to_string(), t.elapsed().as_secs_f64());
    let opened = instant("2026-08-01T02:00:00Z");
    let t = Instant::now();
    import::import_file(
        &db,
        &config,
        import::ImportKind::Accounts,
        &files.0,
        opened,
        false,
    )
    .await?;
    setup.insert("import_accounts".to_string(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    import::import_file(
        &db,
        &config,
        import::ImportKind::Resources,
        &files.1,
        opened,
        false,
    )
    .await?;
    setup.insert("import_resources".to_string(), t.elapsed().as_secs_f64());
    eprintln!("bench-lifecycle: {} accounts imported", opts.accounts);

    // History: in arrears since August, frozen, half of them warned and released.
    let t = Instant::now();
    let history = make_history(&db, &config, opened).await?;
    let c = db.raw_client().await?;
    setup.insert("history".to_string(), t.elapsed().as_secs_f64());
    eprintln!("bench-lifecycle: history made");

    let bill_at = instant("2026-11-22T16:30:00Z");
    let t = Instant::now();
    import::import_file(
        &db,
        &config,
        import::ImportKind::Usage,
        &files.2,
        bill_at,
        false,
    )
    .await?;
    setup.insert("import_usage".to_string(), t.elapsed().as_secs_f64());
    // Raw SQL: VACUUM ANALYZE, a utility command diesel cannot issue.
    c.batch_execute("VACUUM ANALYZE").await?;

    // Nothing is due: the hours before the bill.
    let mut idle: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    idle_runs(
        &db,
        &config,
        instant("2026-11-22T10:05:00Z"),
        5,
        true,
        &mut idle,
    )
    .await?;

    let t = Instant::now();
    let bills = generate_bills::run(
        &db,
        &config,
        &generate_bills::Options {
            as_of: bill_at,
            bill_day: None,
            dry_run: false,
            force: false,
        },
    )
    .await?;
    setup.insert("billing".to_string(), t.elapsed().as_secs_f64());
    if bills.entered_arrears_count != opts.debtors as i64 {
        return Err(LifecycleBenchError::Setup(format!(
            "{} accounts entered arrears on the bill, {} were meant to",
            bills.entered_arrears_count, opts.debtors
        )));
    }
    eprintln!(
        "bench-lifecycle: {} debtors billed into arrears",
        opts.debtors
    );

    // The slot where the debtors are due, then their grace slots.
    let slot = instant("2026-11-22T17:05:00Z");
    let mut slots = vec![
        alerts(&db, &config, slot).await?,
        enforce(&db, &config, slot).await?,
        release(&db, &config, slot, false).await?,
    ];
    let t = Instant::now();
    let channels = deliver_notifications::Channels::from_config(&config)
        .map_err(LifecycleBenchError::Setup)?;
    let delivered = deliver_notifications::run(
        &db,
        &config,
        &channels,
        &deliver_notifications::Options {
            as_of: slot,
            dry_run: false,
            max_batches: 1_000_000,
        },
    )
    .await?;
    let delivery_seconds = t.elapsed().as_secs_f64();
    slots.push(enforce(&db, &config, slot + Duration::hours(24)).await?);
    slots.push(enforce(&db, &config, bill_at + Duration::days(15)).await?);
    // After the grace slots nothing is due until the first release warnings.
    idle_runs(
        &db,
        &config,
        bill_at + Duration::days(16),
        3,
        false,
        &mut idle,
    )
    .await?;
    let idle_max_ms = idle.values().flatten().copied().fold(0.0, f64::max);
    let slowest_per_second = slots
        .iter()
        .filter(|r| r.accounts_evaluated > 0)
        .map(|r| r.accounts_per_second)
        .fold(f64::INFINITY, f64::min);
    Ok(LifecycleBenchReport {
        accounts: opts.accounts,
        history: opts.history,
        debtors: opts.debtors,
        billed: opts.billed,
        setup_seconds: setup,
        idle_runs_ms: idle,
        idle_max_ms,
        history_runs: history,
        slot_runs: slots,
        slowest_per_second,
        delivery_seconds,
        notices_delivered: delivered.sent,
        peak_rss_mib: peak_rss_mib(),
        database: crate::db::redact_url(&url),
    })
}

/// Accounts, resources, usage. History `h…` (sa, owing 1.00, no contact), debtors `d…` (half
/// lcic, half sa, cash 0.00, a phone), paying `p…` (cash 1000.00); each has one pay-per-use
/// resource; the debtors and the first paying accounts have one usage record on 2026-11-22.
fn generate(dir: &Path, o: &LifecycleBenchOptions) -> std::io::Result<(PathBuf, PathBuf, PathBuf)> {
    let files = (
        dir.join("lc-accounts.csv"),
        dir.join("lc-resources.csv"),
        dir.join("lc-usage.csv"),
    );
    let mut a = BufWriter::with_capacity(1 << 20, std::fs::File::create(&files.0)?);
    let mut r = BufWriter::with_capacity(1 << 20, std::fs::File::create(&files.1)?);
    let mut u = BufWriter::with_capacity(1 << 20, std::fs::File::create(&files.2)?);
    writeln!(
        a,
        "id,name,email,phone,locale,timezone,cash_balance,credit_quota,low_balance_threshold"
    )?;
    writeln!(r, "id,account_id,product,billing_mode,package_quota,package_expires_at,payg_enabled,term_ends_at")?;
    writeln!(
        u,
        "event_id,account_id,resource_id,meter,quantity,started_at,ended_at"
    )?;
    let mut billed_paying = o.billed - o.debtors;
    for i in 0..o.accounts {
        let (id, product, cash, phone) = if i < o.history {
            (format!("h{i:08}"), "sa", "-1.00", String::new())
        } else if i < o.history + o.debtors {
            let product = if i % 2 == 0 { "lcic" } else { "sa" };
            (
                format!("d{i:08}"),
                product,
                "0.00",
                format!("+86138{:08}", i % 100_000_000),
            )
        } else {
            (
                format!("p{i:08}"),
                if i % 2 == 0 { "lcic" } else { "sa" },
                "1000.00",
                String::new(),
            )
        };
        writeln!(a, "{id},Account {i},,{phone},en,Asia/Shanghai,{cash},0,")?;
        writeln!(r, "{id}-r,{id},{product},pay_per_use,,,,")?;
        let uses = if id.starts_with('d') {
            true
        } else if id.starts_with('p') && billed_paying > 0 {
            billed_paying -= 1;
            true
        } else {
            false
        };
        if uses {
            let meter = if product == "lcic" {
                "classroom_minutes"
            } else {
                "assets_scanned"
            };
            writeln!(
                u,
                "e{i},{id},{id}-r,{meter},100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"
            )?;
        }
    }
    a.flush()?;
    r.flush()?;
    u.flush()?;
    Ok(files)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
