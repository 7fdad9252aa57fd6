//! `arrears simulate`: what a policy change would do. The current database is copied twice,
//! the real jobs run hour by hour over N days on each copy (one under the configured
//! policies, one under the proposed override), and the two are compared day by day; the
//! copies are dropped at the end, so the database itself is never changed.
//!
//! What the simulation assumes:
//! - the jobs run at the slots of [`slots`]: at the start of every billing day
//!   (`billing.time_zone`) `generate_bills`, then at every whole UTC hour `send_alerts`,
//!   `deliver_notifications`, `enforce_suspensions`, `release_resources`, in that order;
//! - nothing else happens: no new usage, no top-ups, no operator actions;
//! - every notice is accepted by its channel when first delivered: email goes to the file
//!   transport and SMS to the `log` adapter in a temporary folder, and no webhook is sent
//!   (control-plane endpoints are removed from the simulation's configuration).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::Serialize;

use crate::config::{Config, SmsProviderKind};
use crate::db::{embedded, raw_connect, Db, DbError, MigrationMode};
use crate::domain::calendar::{billing_day_of, start_of_day};
use crate::domain::money::format_scaled;
use crate::domain::policy::Policy;
use crate::jobs::{deliver_notifications, DynJob, JobCtx, JobError, SimulatedAt, JOBS};

/// The longest simulation: a year of hourly slots.
pub const MAX_DAYS: u32 = 366;
/// Job errors kept in the report per policy (all are counted).
const MAX_ERRORS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    #[error("--days: must be between 1 and {MAX_DAYS}, not {0}")]
    Days(u32),
    #[error("database URL {0:?} names no database")]
    Url(String),
    #[error("copying the database into {target}: {message}")]
    Copy { target: String, message: String },
    #[error("the simulation's notification channels: {0}")]
    Channels(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for SimulateError {
    fn from(e: tokio_postgres::Error) -> Self {
        SimulateError::Db(DbError::Postgres(e))
    }
}

/// One key the policy file changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    pub key: String,
    pub from: String,
    pub to: String,
}

/// The proposed configuration: the current one with a policy file's keys applied.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub origin: String,
    pub config: Config,
    pub overrides: Vec<Override>,
}

impl Proposal {
    /// Reads a policy file (`[products.<id>.policy]` sections as in arrears.toml, only the
    /// keys to change) and applies it to `config`.
    pub fn load(config: &Config, path: &Path) -> Result<Proposal, SimulateError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimulateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(config, &text, &path.display().to_string())
    }

    pub fn from_toml(config: &Config, text: &str, origin: &str) -> Result<Proposal, SimulateError> {
        let invalid = |key: String, message: String| SimulateError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        };
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| SimulateError::Syntax {
                    origin: origin.to_string(),
                    message: e.to_string(),
                })?;
        let mut proposed = config.clone();
        let mut overrides = Vec::new();
        for (top, value) in table {
            if top != "products" {
                return Err(invalid(
                    top,
                    "a policy file holds only [products.<id>.policy] sections".into(),
                ));
            }
            let toml::Value::Table(products) = value else {
                return Err(invalid(top, "must be a table of products".into()));
            };
            for (id, value) in products {
                let Some(product) = proposed.products.get_mut(&id) else {
                    return Err(invalid(
                        format!("products.{id}"),
                        format!(
                            "no such product in the configuration ({})",
                            config
                                .products
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                };
                let toml::Value::Table(sections) = value else {
                    return Err(invalid(
                        format!("products.{id}"),
                        "must be a table with a policy section".into(),
                    ));
                };
                for (section, value) in sections {
                    let key = format!("products.{id}.{section}");
                    if section != "policy" {
                        return Err(invalid(
                            key,
                            "only the policy of a product can be overridden".into(),
                        ));
                    }
                    let toml::Value::Table(changes) = value else {
                        return Err(invalid(key, "must be a table of policy keys".into()));
                    };
                    let (policy, changed) = override_policy(&product.policy, changes)
                        .map_err(|(k, m)| invalid(format!("{key}{k}"), m))?;
                    for (k, from, to) in changed {
                        overrides.push(Override {
                            key: format!("{key}.{k}"),
                            from,
                            to,
                        });
                    }
                    product.policy = policy;
                }
            }
        }
        if overrides.is_empty() {
            return Err(invalid(
                "products".into(),
                "the policy file changes nothing: give at least one [products.<id>.policy] key"
                    .into(),
            ));
        }
        Ok(Proposal {
            origin: origin.to_string(),
            config: proposed,
            overrides,
        })
    }
}

/// Applies `changes` to `base`, validated as the configuration validates a policy. Errors
/// carry the key suffix (".grace") and the message.
#[allow(clippy::type_complexity)]
fn override_policy(
    base: &Policy,
    changes: toml::Table,
) -> Result<(Policy, Vec<(String, String, String)>), (String, String)> {
    let toml::Value::Table(mut merged) =
        toml::Value::try_from(base).map_err(|e| (String::new(), e.to_string()))?
    else {
        return Err((String::new(), "the policy is not a table".into()));
    };
    // Values as an operator reads them: 72h rather than "72h".
    let show = |v: &toml::Value| match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut changed = Vec::new();
    for (k, v) in changes {
        let from = merged.get(&k).map(show).unwrap_or_default();
        changed.push((k.clone(), from, show(&v)));
        merged.insert(k, v);
    }
    let policy: Policy =
        serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            let path = e.path().to_string();
            let suffix = if path == "." {
                String::new()
            } else {
                format!(".{path}")
            };
            (suffix, e.inner().to_string())
        })?;
    // The same rules the configuration applies to a product's policy at load.
    if let Err((k, why)) = policy.check() {
        return Err((format!(".{k}"), why.into()));
    }
    Ok((policy, changed))
}

/// The job slots between `from` (inclusive) and `to` (exclusive), in the order they run:
/// each registered job when its `Job::SIMULATED` says (at the start of every billing day,
/// or at every whole UTC hour), jobs due at one instant in their `order` (today:
/// `generate_bills`, then `send_alerts`, `deliver_notifications`, `enforce_suspensions`,
/// `release_resources`). The one place that says when jobs run in a simulation.
pub fn slots(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    config: &Config,
) -> Vec<(DateTime<Utc>, &'static dyn DynJob)> {
    let mut out = Vec::new();
    if from >= to {
        return out;
    }
    let tz = config.billing.time_zone;
    let mut days = Vec::new();
    let mut day = billing_day_of(from, tz);
    while day <= billing_day_of(to, tz) {
        let t = start_of_day(day, tz);
        if t >= from && t < to {
            days.push(t);
        }
        day += Duration::days(1);
    }
    let mut hours = Vec::new();
    let mut hour = from.duration_trunc(Duration::hours(1)).unwrap_or(from);
    if hour < from {
        hour += Duration::hours(1);
    }
    while hour < to {
        hours.push(hour);
        hour += Duration::hours(1);
    }
    for job in JOBS {
        let at = match job.simulated().at {
            SimulatedAt::BillingDayStart => &days,
            SimulatedAt::EveryHour => &hours,
        };
        out.extend(at.iter().map(|t| (*t, *job)));
    }
    out.sort_by_key(|(t, j)| (*t, j.simulated().order));
    out
}

/// Runs one slot of one job on `db`, as the scheduler would (not a dry run, not forced).
pub async fn run_slot(
    db: &Db,
    config: &Config,
    channels: &deliver_notifications::Channels,
    at: DateTime<Utc>,
    job: &'static dyn DynJob,
) -> Result<(), JobError> {
    let ctx = JobCtx {
        channels: Some(channels),
        ..JobCtx::new(db, config)
    };
    job.run_scheduled(ctx, at, None)
        .await
        .into_result()
        .map(|_| ())
}

/// What happened on one copy in one window, and where it stood at the window's end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Accounts for which an overdue alert or reminder was written.
    pub accounts_alerted: i64,
    /// Accounts that went to `suspended`.
    pub accounts_suspended: i64,
    /// Resources that went from active to suspended (any reason).
    pub resources_suspended: i64,
    /// Resources released for good.
    pub resources_released: i64,
    /// Accounts back to `good` from `in_arrears` or `suspended`.
    pub accounts_restored: i64,
    /// At the end of the window: accounts with `arrears_since` set...
    pub accounts_in_arrears: i64,
    /// ...and what they owe, max(0, -(cash + credit quota)), in minor units.
    pub arrears_at_risk_minor: i64,
    /// The same as an exact decimal in the deployment currency.
    pub arrears_at_risk: String,
}

/// Rows above these ids were written by the simulation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baseline {
    pub notice_id: i64,
    pub event_id: i64,
}

pub async fn baseline(client: &tokio_postgres::Client) -> Result<Baseline, DbError> {
    // Raw SQL: one SELECT of scalar subqueries over two tables, which diesel cannot compose.
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(max(id), 0) FROM notices), (SELECT coalesce(max(id), 0) FROM lifecycle_events)",
            &[],
        )
        .await?;
    Ok(Baseline {
        notice_id: row.get(0),
        event_id: row.get(1),
    })
}

/// Counts what happened in `[from, to)` among rows written after `base`, and what accounts
/// in arrears owe now.
pub async fn measure(
    client: &tokio_postgres::Client,
    config: &Config,
    base: Baseline,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Counts, DbError> {
    // Raw SQL: a CTE read by scalar subqueries, which the query builder cannot say.
    let row = client
        .query_one(
            "WITH ev AS (
               SELECT account_id, resource_id, from_state, to_state FROM lifecycle_events
               WHERE id > $4 AND occurred_at >= $1 AND occurred_at < $2)
             SELECT
               (SELECT count(DISTINCT account_id) FROM notices
                 WHERE id > $3 AND kind IN ('overdue', 'overdue_reminder')
                   AND created_at >= $1 AND created_at < $2),
               (SELECT count(DISTINCT account_id) FROM ev
                 WHERE resource_id IS NULL AND to_state = 'suspended'),
               (SELECT count(*) FROM ev
                 WHERE resource_id IS NOT NULL AND from_state = 'active' AND to_state LIKE 'suspended%'),
               (SELECT count(*) FROM ev WHERE resource_id IS NOT NULL AND to_state = 'released'),
               (SELECT count(DISTINCT account_id) FROM ev
                 WHERE resource_id IS NULL AND from_state IN ('in_arrears', 'suspended') AND to_state = 'good'),
               (SELECT count(*) FROM accounts WHERE arrears_since IS NOT NULL),
               (SELECT coalesce(sum(greatest(0::numeric, -(cash_balance::numeric + credit_quota))), 0)::bigint
                  FROM accounts WHERE arrears_since IS NOT NULL)",
            &[&from, &to, &base.notice_id, &base.event_id],
        )
        .await?;
    let at_risk: i64 = row.get(6);
    Ok(Counts {
        accounts_alerted: row.get(0),
        accounts_suspended: row.get(1),
        resources_suspended: row.get(2),
        resources_released: row.get(3),
        accounts_restored: row.get(4),
        accounts_in_arrears: row.get(5),
        arrears_at_risk_minor: at_risk,
        arrears_at_risk: format_scaled(at_risk, config.billing.minor_unit_digits),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Day {
    /// 1-based.
    pub day: u32,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub current: Counts,
    pub proposed: Counts,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Over the whole window (an account alerted on several days counts once); arrears at
    /// the end of the simulation.
    #[serde(flatten)]
    pub counts: Counts,
    /// Slots whose job failed (the simulation goes on, as the scheduler would).
    pub job_errors: usize,
    /// The first failures: slot, job and error.
    pub errors: Vec<String>,
}

/// `arrears simulate`.
#[derive(Debug, Clone, Serialize)]
pub struct SimulateReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub days: u32,
    pub policy_file: String,
    pub overrides: Vec<Override>,
    pub currency: String,
    /// The two copies (current, proposed), dropped when the simulation ended.
    pub copies: Vec<String>,
    /// How the copies were made: `template` (CREATE DATABASE ... TEMPLATE) or `pg_dump`.
    pub copied_with: Vec<String>,
    /// Job runs per policy.
    pub slots: usize,
    pub per_day: Vec<Day>,
    pub totals: BTreeMap<&'static str, Totals>,
}

pub struct Options {
    pub from: DateTime<Utc>,
    pub days: u32,
    pub proposal: Proposal,
}

/// Runs the simulation. The database behind `db` is only read (copied).
pub async fn run(
    db: &Db,
    config: &Config,
    opts: &Options,
) -> Result<SimulateReport, SimulateError> {
    if opts.days == 0 || opts.days > MAX_DAYS {
        return Err(SimulateError::Days(opts.days));
    }
    let source = crate::db::database_name(&db.url)?;
    let admin = raw_connect(&crate::db::with_database(&db.url, "postgres")?).await?;
    let tag = format!(
        "arrears_sim_{}_{}",
        std::process::id(),
        Utc::now().timestamp_micros()
    );
    let names = [format!("{tag}_current"), format!("{tag}_proposed")];
    let dir = std::env::temp_dir().join(&tag);
    let result = run_on_copies(db, config, opts, &admin, &source, &names, &dir).await;
    // Always drop the copies and the scratch folder, whatever happened.
    // Raw SQL: DROP DATABASE is DDL, which diesel's query builder does not say.
    for name in &names {
        if let Err(e) = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                ident(name)
            ))
            .await
        {
            tracing::warn!(database = %name, error = %e, "could not drop a simulation copy");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_on_copies(
    db: &Db,
    config: &Config,
    opts: &Options,
    admin: &tokio_postgres::Client,
    source: &str,
    names: &[String; 2],
    dir: &Path,
) -> Result<SimulateReport, SimulateError> {
    let (url_a, url_b) = (
        crate::db::with_database(&db.url, &names[0])?,
        crate::db::with_database(&db.url, &names[1])?,
    );
    let mut copied_with = Vec::new();
    // The source is always dumped: a template copy would lock its users out while it copies.
    copied_with.push(copy_database(admin, source, &db.url, &names[0], &url_a, false).await?);
    // The first copy has no other sessions, so the second is a fast template copy of it.
    copied_with.push(copy_database(admin, &names[0], &url_a, &names[1], &url_b, true).await?);
    let to = opts.from + Duration::days(i64::from(opts.days));
    let plan = slots(opts.from, to, config);
    let windows: Vec<(DateTime<Utc>, DateTime<Utc>)> = (0..i64::from(opts.days))
        .map(|d| {
            (
                opts.from + Duration::days(d),
                opts.from + Duration::days(d + 1),
            )
        })
        .collect();
    let current = sandbox(config, &dir.join("current"))?;
    let proposed = sandbox(&opts.proposal.config, &dir.join("proposed"))?;
    let (a, b) = tokio::join!(
        run_copy(&url_a, &current, &plan, &windows),
        run_copy(&url_b, &proposed, &plan, &windows),
    );
    let ((cur_days, cur_tot), (prop_days, prop_tot)) = (a?, b?);
    let per_day = windows
        .iter()
        .zip(cur_days.into_iter().zip(prop_days))
        .enumerate()
        .map(|(i, ((from, to), (current, proposed)))| Day {
            day: i as u32 + 1,
            from: *from,
            to: *to,
            current,
            proposed,
        })
        .collect();
    let mut totals = BTreeMap::new();
    totals.insert("current", cur_tot);
    totals.insert("proposed", prop_tot);
    Ok(SimulateReport {
        from: opts.from,
        to,
        days: opts.days,
        policy_file: opts.proposal.origin.clone(),
        overrides: opts.proposal.overrides.clone(),
        currency: config.billing.currency.clone(),
        copies: names.to_vec(),
        copied_with,
        slots: plan.len(),
        per_day,
        totals,
    })
}

/// The configuration the simulation runs with: notices go to files in `dir` and nowhere
/// else (file email transport, SMS log, no webhooks).
fn sandbox(config: &Config, dir: &Path) -> Result<Config, SimulateError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SimulateError::Channels(format!("{}: {e}", dir.display())))?;
    let mut c = config.clone();
    // The copies travel ahead of the database clock.
    c.lifecycle.allow_future = true;
    // The copies' channels are files: counted as accepted, as the real channels would be.
    c.notifications.dev_channels_count_as_accepted = true;
    c.email.smtp_url = None;
    c.email.file_dir = Some(dir.join("outbox"));
    c.embedded.state_dir = dir.to_path_buf();
    c.sms.provider = SmsProviderKind::Log;
    c.sms.log_file = Some(dir.join("sms.log"));
    c.webhooks.products.clear();
    c.database.pool_size = c.database.pool_size.min(2);
    Ok(c)
}

/// Runs every slot on the copy at `url`, measuring each window after its last slot.
async fn run_copy(
    url: &str,
    config: &Config,
    plan: &[(DateTime<Utc>, &'static dyn DynJob)],
    windows: &[(DateTime<Utc>, DateTime<Utc>)],
) -> Result<(Vec<Counts>, Totals), SimulateError> {
    let db = Db::open_url(url, config.database.pool_size, MigrationMode::Require).await?;
    // The copy bills with the configured price list (the source is never written to).
    // A price that differs takes effect from the first simulated slot.
    let from = plan.first().map_or_else(Utc::now, |(at, _)| *at);
    crate::db::catalog::apply(&mut *db.conn().await?, config, from, false)
        .await
        .map_err(DbError::from)?;
    let channels =
        deliver_notifications::Channels::from_config(config).map_err(SimulateError::Channels)?;
    let client = db.raw_client().await?;
    let base = baseline(&client).await?;
    let mut days = Vec::with_capacity(windows.len());
    let mut totals = Totals::default();
    let mut next = 0;
    for (from, to) in windows {
        while let Some((at, job)) = plan.get(next).filter(|(at, _)| at < to) {
            if let Err(e) = run_slot(&db, config, &channels, *at, *job).await {
                totals.job_errors += 1;
                if totals.errors.len() < MAX_ERRORS {
                    totals
                        .errors
                        .push(format!("{} {}: {e}", at.to_rfc3339(), job.name()));
                }
            }
            next += 1;
        }
        days.push(measure(&client, config, base, *from, *to).await?);
    }
    // Totals over the whole window: an account alerted on several days counts once.
    if let (Some((first, _)), Some((_, last))) = (windows.first(), windows.last()) {
        totals.counts = measure(&client, config, base, *first, *last).await?;
    }
    Ok((days, totals))
}

/// Copies database `source` into a new database `target`: `CREATE DATABASE ... TEMPLATE`
/// when nobody else is connected to the source (PostgreSQL requires that), else pg_dump
/// piped into pg_restore (a consistent snapshot while others keep working). Returns how.
async fn copy_database(
    admin: &tokio_postgres::Client,
    source: &str,
    source_url: &str,
    target: &str,
    target_url: &str,
    template_ok: bool,
) -> Result<String, SimulateError> {
    // A copy just restored by pg_restore may still show its exiting backend for a moment:
    // give it up to five seconds to go before settling for a dump.
    let mut others: i64 = 1;
    for attempt in 0..50 {
        // Raw SQL: pg_stat_activity is a catalog view outside schema.rs.
        others = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&source],
            )
            .await?
            .get(0);
        if !template_ok || others == 0 || attempt == 49 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if template_ok && others == 0 {
        // Raw SQL: CREATE DATABASE ... TEMPLATE is DDL, which diesel's query builder does not say.
        let sql = format!(
            "CREATE DATABASE {} TEMPLATE {}",
            ident(target),
            ident(source)
        );
        match admin.batch_execute(&sql).await {
            Ok(()) => return Ok("template".into()),
            // Someone connected in between: fall back to a dump.
            Err(e) => tracing::info!(error = %e, "template copy failed; copying with pg_dump"),
        }
    }
    // Raw SQL: CREATE DATABASE ... TEMPLATE is DDL, which diesel's query builder does not say.
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {} TEMPLATE template0",
            ident(target)
        ))
        .await?;
    let (src, dst, tgt) = (
        source_url.to_string(),
        target_url.to_string(),
        target.to_string(),
    );
    tokio::task::spawn_blocking(move || dump_restore(&src, &dst))
        .await
        .map_err(|e| SimulateError::Copy {
            target: tgt.clone(),
            message: e.to_string(),
        })?
        .map_err(|message| SimulateError::Copy {
            target: tgt,
            message,
        })?;
    Ok("pg_dump".into())
}

/// `pg_dump --format=custom SOURCE | pg_restore --dbname TARGET`, with the machine's
/// PostgreSQL binaries (the embedded cluster's bin dir, else PATH).
fn dump_restore(source_url: &str, target_url: &str) -> Result<(), String> {
    let bin = |name: &str| {
        embedded::bin_dir()
            .map(|d| d.join(name))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    };
    // Passwords go through the environment, never on a command line others can read.
    let (source_url, source_pass) = crate::db::split_password(source_url);
    let (target_url, target_pass) = crate::db::split_password(target_url);
    let mut dump = Command::new(bin("pg_dump"));
    if let Some(p) = source_pass {
        dump.env("PGPASSWORD", p);
    }
    let mut dump = dump
        .args(["--format=custom", "--no-owner", "--no-privileges"])
        .arg(format!("--dbname={source_url}"))
        .stdout(Stdio::piped())
        // Not piped: unread warnings could fill the pipe and stall the dump.
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run pg_dump: {e}"))?;
    let Some(out) = dump.stdout.take() else {
        return Err("pg_dump has no output pipe".into());
    };
    let mut restore = Command::new(bin("pg_restore"));
    if let Some(p) = target_pass {
        restore.env("PGPASSWORD", p);
    }
    let restore = restore
        .args([
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
        ])
        .arg(format!("--dbname={target_url}"))
        .stdin(Stdio::from(out))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run pg_restore: {e}"))?;
    let restored = restore
        .wait_with_output()
        .map_err(|e| format!("pg_restore: {e}"))?;
    let dumped = dump
        .wait_with_output()
        .map_err(|e| format!("pg_dump: {e}"))?;
    if !dumped.status.success() {
        return Err(format!(
            "pg_dump failed ({}); its messages are above",
            dumped.status
        ));
    }
    if !restored.status.success() {
        return Err(format!(
            "pg_restore failed ({}): {}",
            restored.status,
            String::from_utf8_lossy(&restored.stderr).trim()
        ));
    }
    Ok(())
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The report as a table for a terminal: both policies side by side per day.
pub fn table(r: &SimulateReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Simulation from {} for {} day(s); proposed policy {}:",
        r.from.to_rfc3339(),
        r.days,
        r.policy_file
    );
    for o in &r.overrides {
        let _ = writeln!(out, "  {} = {} (now {})", o.key, o.to, o.from);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<4} {:<17} {:>15} {:>15} {:>15} {:>15} {:>33}",
        "day",
        "from (UTC)",
        "alerted",
        "suspended",
        "released",
        "restored",
        format!("at risk ({})", r.currency)
    );
    let _ = writeln!(
        out,
        "{:<4} {:<17} {:>15} {:>15} {:>15} {:>15} {:>33}",
        "", "", "cur / prop", "cur / prop", "cur / prop", "cur / prop", "current / proposed"
    );
    let row = |out: &mut String,
               day: &dyn std::fmt::Display,
               from: &dyn std::fmt::Display,
               c: &Counts,
               p: &Counts| {
        let pair = |a: i64, b: i64| format!("{a} / {b}");
        let _ = writeln!(
            out,
            "{:<4} {:<17} {:>15} {:>15} {:>15} {:>15} {:>33}",
            day.to_string(),
            from.to_string(),
            pair(c.accounts_alerted, p.accounts_alerted),
            pair(c.accounts_suspended, p.accounts_suspended),
            pair(c.resources_released, p.resources_released),
            pair(c.accounts_restored, p.accounts_restored),
            format!("{} / {}", c.arrears_at_risk, p.arrears_at_risk)
        );
    };
    for d in &r.per_day {
        row(
            &mut out,
            &d.day,
            &d.from.format("%Y-%m-%d %H:%M"),
            &d.current,
            &d.proposed,
        );
    }
    if let (Some(c), Some(p)) = (r.totals.get("current"), r.totals.get("proposed")) {
        row(&mut out, &"all", &"", &c.counts, &p.counts);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "alerted and suspended count accounts, released counts resources; at risk is what accounts \
             in arrears owe at the end of the day."
        );
        for (name, t) in [("current", c), ("proposed", p)] {
            if t.job_errors > 0 {
                let _ = writeln!(out, "{name}: {} job run(s) failed:", t.job_errors);
                for e in &t.errors {
                    let _ = writeln!(out, "  {e}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EXAMPLE_CONFIG;

    fn config() -> Config {
        Config::from_toml(EXAMPLE_CONFIG, "example", &[]).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn slots_bill_at_midnight_in_the_billing_zone_then_run_the_hourly_jobs() {
        let c = config(); // Asia/Shanghai: midnight is 16:00 UTC
        let s = slots(at("2026-11-23T15:30:00Z"), at("2026-11-23T17:00:00Z"), &c);
        let names: Vec<(String, &str)> = s
            .iter()
            .map(|(t, j)| (t.format("%H:%M").to_string(), j.name().as_str()))
            .collect();
        let want = [
            ("16:00", "generate_bills"),
            ("16:00", "send_alerts"),
            ("16:00", "deliver_notifications"),
            ("16:00", "enforce_suspensions"),
            ("16:00", "release_resources"),
        ];
        assert_eq!(
            names,
            want.iter()
                .map(|(t, j)| (t.to_string(), *j))
                .collect::<Vec<_>>()
        );
        // A day from a whole hour: 24 hours of 4 jobs and one billing run.
        let day = slots(at("2026-11-23T00:00:00Z"), at("2026-11-24T00:00:00Z"), &c);
        assert_eq!(day.len(), 24 * 4 + 1);
        assert!(slots(at("2026-11-23T00:00:00Z"), at("2026-11-23T00:00:00Z"), &c).is_empty());
    }

    #[test]
    fn policy_file_overrides_only_the_keys_it_gives() {
        let c = config();
        let p =
            Proposal::from_toml(&c, "[products.lcic.policy]\ngrace = \"72h\"\n", "p.toml").unwrap();
        assert_eq!(p.config.products["lcic"].policy.grace.seconds(), 72 * 3600);
        assert_eq!(
            p.config.products["lcic"].policy.retention,
            c.products["lcic"].policy.retention
        );
        assert_eq!(p.config.products["sa"].policy, c.products["sa"].policy);
        assert_eq!(
            p.overrides,
            vec![Override {
                key: "products.lcic.policy.grace".into(),
                from: "24h".into(),
                to: "72h".into()
            }]
        );
    }

    #[test]
    fn policy_file_errors_name_the_key() {
        let c = config();
        let cases = [
            (
                "[products.lcic.policy]\ngrace = \"soon\"",
                "products.lcic.policy.grace",
            ),
            (
                "[products.lcic.policy]\ngrace = 3",
                "products.lcic.policy.grace",
            ),
            ("[products.nope.policy]\ngrace = \"1h\"", "products.nope"),
            ("[products.lcic]\nname = \"x\"", "products.lcic.name"),
            ("[billing]\ntime_zone = \"UTC\"", "billing"),
            (
                "[products.sa.policy]\nretention = \"1d\"",
                "products.sa.policy.release_warnings",
            ),
            (
                "[products.sa.policy]\nsuspend_scope = \"some\"",
                "products.sa.policy.suspend_scope",
            ),
            (
                "[products.sa.policy]\ngracee = \"1d\"",
                "products.sa.policy.gracee",
            ),
            ("", "products"),
        ];
        for (text, key) in cases {
            match Proposal::from_toml(&c, text, "p.toml") {
                Err(SimulateError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            Proposal::from_toml(&c, "[products", "p.toml"),
            Err(SimulateError::Syntax { .. })
        ));
    }
}
