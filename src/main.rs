//! The `arrears` command line: one-off job runs, imports and operator actions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use arrears::config::Config;
use arrears::db::{self, Db, MigrationMode};
use arrears::domain::lifecycle::{gate, Action};
use arrears::domain::money::parse_non_negative;
use arrears::domain::money::QUANTITY_DIGITS;
use arrears::domain::policy::PolicyDuration;
use arrears::domain::settle::CouponKind;
use arrears::import::{self, ImportError};
use arrears::jobs::{
    deliver_notifications, enforce_suspensions, generate_bills, release_resources, send_alerts,
    JobName,
};
use arrears::lifecycle::{self, OperatorAction};
use arrears::scheduler::{Cadence, Clock, Schedule};
use arrears::{ledger, queries};
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "arrears", version, about = "Billing-arrears lifecycle engine")]
struct Cli {
    /// Configuration file (default: the built-in example configuration).
    #[arg(long, global = true, env = "ARREARS_CONFIG")]
    config: Option<PathBuf>,
    /// The instant the command acts at (RFC 3339); default: now. How tests and demos travel in time.
    #[arg(long, global = true, value_parser = parse_instant)]
    as_of: Option<DateTime<Utc>>,
    /// Let a state-changing command act at an --as-of more than lifecycle.max_clock_skew
    /// ahead of the database clock (tests and scratch databases; never a production one).
    #[arg(long, global = true)]
    allow_future: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations, then the configuration's lifecycle policies
    /// (`policies apply`).
    Migrate,
    /// The versioned price list in the database.
    Prices {
        #[command(subcommand)]
        action: PricesAction,
    },
    /// The lifecycle policies in the database.
    Policies {
        #[command(subcommand)]
        action: PoliciesAction,
    },
    /// Import a CSV file (header row required); a file with any bad row imports nothing.
    Import { kind: ImportWhat, file: PathBuf },
    /// Credit an account's cash balance; idempotent by reference.
    Topup {
        account: String,
        /// Decimal amount in the account currency ("100.00").
        amount: String,
        #[arg(long)]
        reference: String,
    },
    /// Coupons.
    Coupon {
        #[command(subcommand)]
        action: CouponAction,
    },
    /// Run one job now and print its JSON report.
    Run {
        job: JobName,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Run a slot that already finished (the job stays idempotent).
        #[arg(long)]
        force: bool,
        /// generate_bills: the billing day (default: the day before --as-of in the billing zone).
        #[arg(long)]
        day: Option<NaiveDate>,
        /// release_resources: release more than the configured safety fraction in one run.
        #[arg(long)]
        allow_mass_release: bool,
    },
    /// May ACCOUNT do ACTION (on --resource)? Exit 0 allowed, 1 refused, 2 error (unknown
    /// account or resource, database unreachable, bad arguments); the reason is printed.
    Gate {
        account: String,
        action: Action,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Operator actions on a resource.
    Resource {
        #[command(subcommand)]
        action: ResourceAction,
    },
    /// Record lifecycle facts that the notification outbox will record once it exists:
    /// a channel accepted the overdue alert or a release warning.
    Facts {
        #[command(subcommand)]
        action: FactsAction,
    },
    /// Accounts.
    Account {
        #[command(subcommand)]
        action: AccountAction,
    },
    /// An account's bills: each day's bill, its lines, and what coupons and cash paid.
    Bills {
        account: String,
        #[arg(long)]
        from: Option<NaiveDate>,
        #[arg(long)]
        to: Option<NaiveDate>,
        #[arg(long)]
        json: bool,
    },
    /// Every product with its policy and price list.
    Products {
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and the channels' settings, and render every template in
    /// every locale with sample data.
    Check,
    /// The outbox of notices.
    Notices {
        #[command(subcommand)]
        action: NoticesAction,
    },
    /// Benchmark: generate, import and bill N accounts and M usage records in a scratch
    /// database `arrears_bench` on the same server; prints a JSON report.
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        accounts: u64,
        #[arg(long, default_value_t = 10_000_000)]
        usage: u64,
        /// Where the generated CSV files go.
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Bill this many consecutive days (USAGE records each, imported then billed day by
        /// day): the last day's billing time against the first's shows whether billing's
        /// cost grows with history.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=30))]
        days: u32,
    },
    /// Email benchmark: delivers COUNT outbox notices to postfix's smtp-sink (started on a
    /// free local port) and compares with `smtp-source -d -s CONNECTIONS` sending as many
    /// messages of the same size to it; with --smtp-url, also against that server.
    BenchEmail {
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// A second local server to measure against, e.g. smtp://127.0.0.1:2525?tls=none
        /// (aiosmtpd); compared with a plain SMTP load generator.
        #[arg(long)]
        smtp_url: Option<String>,
        #[arg(long, default_value_t = 16)]
        connections: usize,
    },
    /// Operator reports (a table on a terminal, JSON otherwise or with --json).
    Report {
        #[command(subcommand)]
        what: ReportWhat,
    },
    /// Run the accounts forward N days on two copies of the database, under the current
    /// policies and under the policy override FILE, and compare day by day. Changes nothing.
    Simulate {
        /// TOML with [products.<id>.policy] sections: only the keys to change.
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        days: u32,
        /// Where the simulation starts (RFC 3339); default: --as-of, or now.
        #[arg(long, value_parser = parse_instant)]
        from: Option<DateTime<Utc>>,
        #[arg(long)]
        json: bool,
    },
    /// Lifecycle benchmark: N accounts of which HISTORY became history through the jobs and
    /// DEBTORS fall into arrears on one bill; times each lifecycle job with nothing due and in
    /// the slots where the debtors are due, in a scratch database `arrears_bench_lifecycle`.
    BenchLifecycle {
        #[arg(long, default_value_t = 1_000_000)]
        accounts: u64,
        #[arg(long, default_value_t = 100_000)]
        history: u64,
        #[arg(long, default_value_t = 30_000)]
        debtors: u64,
        /// Accounts billed on the day the debtors fall into arrears (debtors included).
        #[arg(long, default_value_t = 100_000)]
        billed: u64,
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
    },
    /// Billing with several instances: bills one generated day alone, then on an identical
    /// copy with HELPERS more instances claiming batches; prints both times.
    BenchInstances {
        #[arg(long, default_value_t = 200_000)]
        accounts: u64,
        #[arg(long, default_value_t = 2_000_000)]
        usage: u64,
        #[arg(long, default_value_t = 1)]
        helpers: usize,
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
    },
    /// The guided first run: the whole lifecycle of both products on a fresh database, 80
    /// simulated days in well under a minute. Notices land in OUT/notices.
    Demo {
        #[arg(long, default_value = "arrears-demo")]
        out: PathBuf,
        /// The scratch database, dropped and created afresh on the embedded (or configured)
        /// server.
        #[arg(long, default_value = "arrears_demo")]
        database: String,
        /// Print the whole report as JSON instead of the timeline and tables.
        #[arg(long)]
        json: bool,
    },
    /// The embedded default database.
    Embedded {
        #[command(subcommand)]
        action: EmbeddedAction,
    },
    /// The next slots of every enabled job: job, cron, time zone, instant in UTC and locally.
    Schedule {
        /// Start after this instant (default: --as-of, or now).
        #[arg(long, value_parser = parse_instant)]
        from: Option<DateTime<Utc>>,
        /// Slots per job.
        #[arg(long, default_value_t = 3)]
        count: usize,
        #[arg(long)]
        json: bool,
    },
    /// The daemon: runs the schedule (each slot once across instances), delivers notices and
    /// serves HTTP on service.http_addr (ARREARS_HTTP_ADDR). With --as-of, its clock starts
    /// there and runs --speed times faster (for demos and tests).
    Serve {
        #[arg(long, default_value_t = 1)]
        speed: u32,
    },
}

#[derive(Subcommand)]
enum PricesAction {
    /// Write the configured price list as new versions where it differs from the database:
    /// a changed or removed price takes effect from --effective-from (default: --as-of, or
    /// now); a price seen for the first time is in effect since always. Prints the changes.
    Apply {
        #[arg(long, value_parser = parse_instant)]
        effective_from: Option<DateTime<Utc>>,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum PoliciesAction {
    /// Recompute what the configuration's lifecycle policies derive (release instants of live
    /// suspensions, the due-work index) for the accounts they affect, when they differ from
    /// those recorded; prints how many moved.
    Apply {
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum ReportWhat {
    /// Accounts in arrears by days in arrears (0-1, 2-7, 8-30, 31-60, over 60) and by
    /// lifecycle state, with what they owe, at --as-of.
    Aging {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ImportWhat {
    Accounts,
    Resources,
    Usage,
}

#[derive(Subcommand)]
enum CouponAction {
    /// Grant a coupon.
    Grant {
        account: String,
        amount: String,
        #[arg(long)]
        kind: CouponKindArg,
        #[arg(long, value_parser = parse_instant)]
        expires_at: DateTime<Utc>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CouponKindArg {
    General,
    Cash,
}

#[derive(Subcommand)]
enum AccountAction {
    /// An account's state, balances and resources.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The audit trail: every state change of the account and its resources, with the
    /// arrears episode it happened in (the text view lists the episodes first).
    History {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The account's arrears episodes and resource suspensions: when each began, its facts
    /// (first accepted overdue alert, suspension, release instant) and how it ended.
    Episodes {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Lock the account for a compliance review: every resource suspended, never restored
    /// automatically.
    ComplianceLock { id: String },
    /// Lift a compliance lock (the account is then re-evaluated).
    ComplianceUnlock { id: String },
    /// Put the account on legal hold: nothing of it is released.
    LegalHold { id: String },
    /// Lift a legal hold.
    LegalHoldClear { id: String },
}

#[derive(Subcommand)]
enum ResourceAction {
    /// Turn pay-as-you-go on for a package (restores a quota_exhausted suspension).
    EnablePayg { account: String, resource: String },
    /// Renew a package: new included quota and expiry, usage counter reset.
    Renew {
        account: String,
        resource: String,
        /// Included quantity of the package meter.
        #[arg(long)]
        quota: String,
        #[arg(long, value_parser = parse_instant)]
        expires_at: DateTime<Utc>,
    },
    /// The customer stops the resource: no usage after --as-of is accepted, nothing more is
    /// billed, its data follows the release rules.
    Unsubscribe { account: String, resource: String },
}

#[derive(Subcommand)]
enum NoticesAction {
    /// Notices with their kind, channel, status, attempts, last error and provider id.
    List {
        /// pending, sending, sent, retrying, dead or cancelled
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Put a dead (or retrying) notice back in the queue, due at --as-of.
    Retry { id: i64 },
}

#[derive(Subcommand)]
enum FactsAction {
    /// A channel accepted the first overdue alert of the account's current arrears at --as-of
    /// (starts the lcic grace clock).
    OverdueAlert { account: String },
    /// A channel accepted the release warning LEAD before release (e.g. 7d, 24h) at --as-of,
    /// for the current suspension of every suspended resource of the account (or --resource),
    /// announcing its current release instant.
    ReleaseWarning {
        account: String,
        #[arg(long)]
        lead: String,
        #[arg(long)]
        resource: Option<String>,
    },
}

#[derive(Subcommand)]
enum EmbeddedAction {
    /// Print the URL of the embedded database (starting it if needed).
    Url,
    /// Stop the embedded PostgreSQL cluster.
    Stop,
}

fn print_price_changes(report: &db::catalog::PricesReport) {
    if report.up_to_date {
        println!("the price list is up to date");
        return;
    }
    for c in &report.changes {
        let when = c
            .effective_from
            .map(|t| format!("from {t}"))
            .unwrap_or_else(|| "since always".into());
        println!(
            "{:<8} {}/{}: {} -> {} per {} {when}",
            c.change,
            c.product,
            c.meter,
            c.from.as_deref().unwrap_or("-"),
            c.to.as_deref().unwrap_or("-"),
            c.unit
        );
    }
    if report.dry_run {
        println!("(dry run: nothing written)");
    }
}

fn print_episodes(episodes: &[queries::EpisodeView]) {
    for e in episodes {
        println!(
            "episode {}: opened {} ({}); overdue alert accepted {}; suspended {}; {}",
            e.no,
            e.opened_at,
            e.opened_by,
            e.first_overdue_alert_at
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            e.suspended_at
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            match (&e.closed_at, &e.close_reason) {
                (Some(t), Some(r)) => format!("closed {t} ({r})"),
                _ => "open".into(),
            }
        );
    }
}

fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 instant such as 2026-11-23T00:30:00+08:00 ({e})")
        })
}

/// JSON when asked for or when stdout is not a terminal (a pipe, a file, a script).
fn wants_json(json: bool) -> bool {
    use std::io::IsTerminal;
    json || !std::io::stdout().is_terminal()
}

/// A job run's report, and its exit status: 75 when another live runner holds the slot (the
/// run did nothing and the slot is not done; try again once that runner is gone).
fn print_run<T: serde::Serialize>(report: &T) -> Result<ExitCode> {
    let v = serde_json::to_value(report)?;
    print_json(&v)?;
    if v.get("held_by").is_some_and(|h| !h.is_null()) {
        eprintln!(
            "not done: {}",
            v.get("skipped")
                .and_then(|s| s.as_str())
                .unwrap_or("the slot is held elsewhere")
        );
        return Ok(ExitCode::from(EXIT_SLOT_HELD));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let _ = e.print();
            // Bad arguments are bad input (1), except to `gate`, whose 1 means refused.
            let gate = std::env::args().skip(1).any(|a| a == "gate");
            return ExitCode::from(if gate { EXIT_ERROR } else { EXIT_BAD_INPUT });
        }
    };
    init_logging(&cli);
    let gate = matches!(cli.command, Command::Gate { .. });
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if gate { EXIT_ERROR } else { exit_code_of(&e) })
        }
    }
}

/// Exit statuses (README "Exit codes"): 0 done or allowed; 1 refused by `gate`, or bad input
/// to any other command; 2 any other error, and every error of `gate`; 75 a job run skipped
/// because another live runner holds its slot (not done: try again later).
const EXIT_BAD_INPUT: u8 = 1;
const EXIT_ERROR: u8 = 2;
const EXIT_SLOT_HELD: u8 = 75;

/// An error in what the command was given (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

macro_rules! bad_input {
    ($($t:tt)*) => { return Err(BadInput(format!($($t)*)).into()) };
}

/// 1 when the error is about the command's input (arguments, files, configuration, unknown
/// names, a refused reference or day), 2 for everything else (the database, I/O, bugs).
fn exit_code_of(e: &anyhow::Error) -> u8 {
    use arrears::config::ConfigError;
    use arrears::db::{catalog::PricesError, DbError};
    use arrears::domain::money::DecimalError;
    use arrears::jobs::JobError;
    use arrears::ledger::LedgerError;
    use arrears::lifecycle::LifecycleError;
    for cause in e.chain() {
        let input = if cause.is::<BadInput>()
            || cause.is::<ConfigError>()
            || cause.is::<DecimalError>()
            || cause.is::<PricesError>()
        {
            Some(true)
        } else if let Some(l) = cause.downcast_ref::<LedgerError>() {
            Some(!matches!(l, LedgerError::Db(_)))
        } else if let Some(i) = cause.downcast_ref::<ImportError>() {
            Some(!matches!(i, ImportError::Db(_)))
        } else if let Some(l) = cause.downcast_ref::<LifecycleError>() {
            Some(!matches!(l, LifecycleError::Db(_)))
        } else if let Some(j) = cause.downcast_ref::<JobError>() {
            Some(matches!(j, JobError::Refused(_)))
        } else if let Some(d) = cause.downcast_ref::<DbError>() {
            Some(matches!(
                d,
                DbError::Prices(PricesError::NotAfterLatest { .. })
            ))
        } else {
            None
        };
        if let Some(input) = input {
            return if input { EXIT_BAD_INPUT } else { EXIT_ERROR };
        }
    }
    EXIT_ERROR
}

/// The time-travel guard of state-changing commands: an explicit --as-of more than
/// lifecycle.max_clock_skew ahead of the database clock is refused without --allow-future
/// (bills, suspensions and releases written for the future cannot be taken back).
async fn guard_time_travel(db: &Db, config: &Config, as_of: Option<DateTime<Utc>>) -> Result<()> {
    let Some(t) = as_of else { return Ok(()) };
    if config.lifecycle.allow_future {
        return Ok(());
    }
    let now = db.database_now().await?;
    let skew = config.lifecycle.max_clock_skew;
    if t > now + skew.to_chrono() {
        bad_input!(
            "--as-of {t} is ahead of the database clock ({now}) by more than \
             lifecycle.max_clock_skew ({skew}); a state-changing command acts at the present. To \
             travel in time on purpose (a test or scratch database), add --allow-future; to \
             preview, use the command's --dry-run where it has one"
        );
    }
    Ok(())
}

/// CLI commands log warnings to stderr as text; `serve` logs info and up as JSON lines to
/// stdout (or text, or to journald: service.log_format). ARREARS_LOG sets the filter.
fn init_logging(cli: &Cli) {
    use tracing_subscriber::prelude::*;
    let serving = matches!(cli.command, Command::Serve { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARREARS_LOG")
        .unwrap_or_else(|_| if serving { "info" } else { "warn" }.into());
    let format = if serving {
        // The format is read before the configuration is validated; a bad value is reported
        // by Config::load and falls back to JSON here.
        Config::load(cli.config.as_deref())
            .map(|c| c.service.log_format)
            .unwrap_or_else(|_| "json".into())
    } else {
        "text".into()
    };
    let registry = tracing_subscriber::registry().with(filter);
    match format.as_str() {
        "journald" => match tracing_journald::layer() {
            Ok(layer) => registry.with(layer).init(),
            Err(e) => {
                registry
                    .with(
                        tracing_subscriber::fmt::layer()
                            .json()
                            .with_writer(std::io::stdout),
                    )
                    .init();
                tracing::warn!(error = %e, "journald is not reachable; logging JSON to stdout");
            }
        },
        "json" => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stdout),
            )
            .init(),
        _ => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

/// Opens the database for a command that only reads: no side effects (the price list and
/// policies are written only by `prices apply`, `policies apply`, `migrate` and `serve`).
async fn open(config: &Config, mode: MigrationMode) -> Result<Db> {
    Db::open(config, mode).await.context("opening the database")
}

/// Opens the database for a command that changes state at --as-of: the time-travel guard
/// first.
async fn open_to_change(config: &Config, as_of: Option<DateTime<Utc>>) -> Result<Db> {
    let db = open(config, MigrationMode::Require).await?;
    guard_time_travel(&db, config, as_of).await?;
    Ok(db)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    config.lifecycle.allow_future = cli.allow_future;
    let config = config;
    let explicit_as_of = cli.as_of;
    let as_of = cli.as_of.unwrap_or_else(Utc::now);
    let digits = config.billing.minor_unit_digits;
    match cli.command {
        Command::Check => {
            let templates = arrears::notify::templates::Templates::load(
                config.notifications.templates_dir.as_deref(),
            )?;
            let rendered = match templates.check_all() {
                Ok(n) => n,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("  {e}");
                    }
                    bad_input!("{} template(s) failed to render", errors.len());
                }
            };
            deliver_notifications::Channels::from_config(&config).map_err(anyhow::Error::msg)?;
            let schedule = Schedule::load(config.service.jobs_dir.as_deref())?;
            println!(
                "configuration OK ({}): {} product(s); {} scheduled job(s) enabled; {rendered} templates rendered in {} locales; email via {}; sms via {:?}",
                config.origin,
                config.products.len(),
                schedule.jobs.iter().filter(|j| j.enabled).count(),
                arrears::contact::LOCALES.len(),
                if config.email.smtp_url.is_some() { "SMTP" } else { "the file transport" },
                config.sms.provider
            );
            // R9 needs a customer to have been warned: a channel that reaches nobody is no
            // warning unless the configuration says so (a demo, a test).
            let dev: Vec<&str> = [
                (
                    config.email.smtp_url.is_none(),
                    "email goes to .eml files (no ARREARS_SMTP_URL)",
                ),
                (
                    matches!(config.sms.provider, arrears::config::SmsProviderKind::Log),
                    "SMS goes to a log file (ARREARS_SMS_PROVIDER=log)",
                ),
            ]
            .into_iter()
            .filter_map(|(on, what)| on.then_some(what))
            .collect();
            for what in &dev {
                if config.notifications.dev_channels_count_as_accepted {
                    println!("warning: {what}, and notifications.dev_channels_count_as_accepted = true: such a notice counts as the customer warned (R9) though it reached nobody; never in production");
                } else {
                    println!("warning: {what}: it reaches no customer, so it never counts as a warning (R9); a notice sent only that way lets no lcic grace start and no release happen");
                }
            }
            // The configured database, when there is one: does it bill what this file says?
            if config.database.url.is_some() {
                match open(&config, MigrationMode::Require).await {
                    Ok(db) => {
                        let mut conn = db.conn().await?;
                        let drift = db::catalog::drift(&mut conn, &config, as_of).await?;
                        if drift.is_empty() {
                            println!("price list: the database bills the configured prices");
                        }
                        if !db::stats::autovacuum_on(&mut conn).await? {
                            println!("warning: the database runs with autovacuum = off: the jobs analyze the tables they read when their statistics go stale, but nothing reclaims dead rows, so tables and indexes grow with every update; turn it on or schedule VACUUM");
                        }
                        for c in &drift {
                            println!(
                                "warning: price list: {} {}/{} (database {}, configuration {}): run `arrears prices apply --dry-run` to preview",
                                c.change, c.product, c.meter,
                                c.from.as_deref().unwrap_or("-"), c.to.as_deref().unwrap_or("-")
                            );
                        }
                    }
                    Err(e) => println!("warning: database not checked: {e:#}"),
                }
            }
        }
        Command::Schedule { from, count, json } => {
            let schedule = Schedule::load(config.service.jobs_dir.as_deref())?;
            let from = from.unwrap_or(as_of);
            let mut rows = Vec::new();
            for j in schedule.jobs.iter().filter(|j| j.enabled) {
                let (cron, slots) = match &j.cadence {
                    Cadence::Cron { cron, .. } => {
                        let slots = j
                            .next_slots(from, count)
                            .into_iter()
                            .map(|t| serde_json::json!({
                                "utc": t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                                "local": t.with_timezone(&j.time_zone).to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
                            }))
                            .collect();
                        (cron.as_str().to_string(), slots)
                    }
                    Cadence::Every(d) => {
                        (format!("every {}s (continuous)", d.as_secs()), Vec::new())
                    }
                };
                rows.push(serde_json::json!({
                    "job": j.job,
                    "cron": cron,
                    "time_zone": j.time_zone.name(),
                    "source": j.origin,
                    "slots": slots,
                }));
            }
            if json {
                print_json(&rows)?;
            } else {
                for r in &rows {
                    println!(
                        "{} ({}, {}) from {}",
                        r["job"].as_str().unwrap_or(""),
                        r["cron"].as_str().unwrap_or(""),
                        r["time_zone"].as_str().unwrap_or(""),
                        r["source"].as_str().unwrap_or("")
                    );
                    for s in r["slots"].as_array().into_iter().flatten() {
                        println!(
                            "  {}  ({})",
                            s["utc"].as_str().unwrap_or(""),
                            s["local"].as_str().unwrap_or("")
                        );
                    }
                }
            }
        }
        Command::Serve { speed } => {
            let schedule = Schedule::load(config.service.jobs_dir.as_deref())?;
            if explicit_as_of.is_some() && !config.lifecycle.allow_future {
                guard_time_travel(
                    &open(&config, MigrationMode::Require).await?,
                    &config,
                    explicit_as_of,
                )
                .await?;
            }
            let clock = match cli.as_of {
                Some(start) => Clock::simulated(start, speed),
                None => Clock::Wall,
            };
            let addr = config.service.http_addr.clone();
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| {
                    format!("listening on {addr} (service.http_addr / ARREARS_HTTP_ADDR)")
                })?;
            tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
            arrears::service::serve(config, schedule, clock, listener).await?;
        }
        Command::Products { json } => {
            let products: Vec<_> = config.products.values().collect();
            if json {
                print_json(&products)?;
            } else {
                for p in products {
                    println!("{} — {}", p.id, p.name);
                    println!(
                        "  grace {} from {:?}, retention {}, suspends {:?}",
                        p.policy.grace,
                        p.policy.grace_starts,
                        p.policy.retention,
                        p.policy.suspend_scope
                    );
                    for pr in &p.prices {
                        println!(
                            "  {:<20} {} {} per {}",
                            pr.meter, pr.unit_price, config.billing.currency, pr.unit
                        );
                    }
                }
            }
        }
        Command::Migrate => {
            let db = Db::open(&config, MigrationMode::Apply).await?;
            let applied = db.migrate().await?;
            guard_time_travel(&db, &config, explicit_as_of).await?;
            let prices = db::catalog::apply(&mut *db.conn().await?, &config, as_of, false).await?;
            let policies = lifecycle::policies::apply(&db, &config, as_of, false).await?;
            print_json(&serde_json::json!({
                "applied": applied, "status": "up to date", "prices": prices, "policies": policies
            }))?;
        }
        Command::Policies {
            action: PoliciesAction::Apply { dry_run },
        } => {
            let db = open_to_change(&config, explicit_as_of.filter(|_| !dry_run)).await?;
            print_json(&lifecycle::policies::apply(&db, &config, as_of, dry_run).await?)?;
        }
        Command::Prices {
            action:
                PricesAction::Apply {
                    effective_from,
                    dry_run,
                },
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let report = db::catalog::apply(
                &mut *db.conn().await?,
                &config,
                effective_from.unwrap_or(as_of),
                dry_run,
            )
            .await?;
            if wants_json(false) {
                print_json(&report)?;
            } else {
                print_price_changes(&report);
            }
        }
        Command::Bench {
            accounts,
            usage,
            dir,
            days,
        } => {
            let report = arrears::bench::run(
                &config,
                &arrears::bench::BenchOptions {
                    accounts,
                    usage,
                    dir,
                    days,
                },
            )
            .await?;
            print_json(&report)?;
        }
        Command::Demo {
            out,
            database,
            json,
        } => {
            let days = arrears::demo::DAYS;
            let started = std::time::Instant::now();
            if !json {
                println!(
                    "arrears demo: {} accounts, lcic and sa, {days} simulated days from {} (Asia/Shanghai)\n",
                    arrears::demo::accounts(),
                    arrears::demo::START
                );
                println!("day     local time   account             state              event");
            }
            let report = arrears::demo::run(
                &config,
                &arrears::demo::DemoOptions {
                    out_dir: out,
                    database,
                    print: !json,
                },
            )
            .await?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "\n{} slots run in {:.1}s; {} notices sent.\n",
                    report.slots_run,
                    started.elapsed().as_secs_f64(),
                    report.notices_sent
                );
                println!(
                    "{:<20} {:<5} {:<18} {:<18} {:>9}  resources",
                    "account", "prod", "final state", "declared", "cash"
                );
                for a in &report.accounts {
                    println!(
                        "{:<20} {:<5} {:<18} {:<18} {:>9}  {}  {}",
                        a.account,
                        a.product,
                        a.final_state,
                        a.expected_state,
                        a.cash_balance,
                        a.resources.join(" "),
                        if a.matches { "ok" } else { "MISMATCH" }
                    );
                }
                let mut by_state = std::collections::BTreeMap::<&str, usize>::new();
                for a in &report.accounts {
                    *by_state.entry(a.final_state.as_str()).or_default() += 1;
                }
                let by_state: Vec<String> =
                    by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
                println!("\nAccounts by final state: {}", by_state.join(", "));
                let dir = report.out_dir.display();
                let me = std::env::args().next().unwrap_or_else(|| "arrears".into());
                println!("\nWhere to look next:");
                println!("  {dir}/notices/          every email as .eml (open it in a mail client) and sms.log");
                println!(
                    "  {dir}/timeline.txt      this timeline; {dir}/input/ the CSV files loaded"
                );
                println!("  export DATABASE_URL={}", report.database_url);
                println!("  {me} account history suspended-restored");
                println!("  {me} bills released-lcic");
                println!("  {me} notices list");
                println!("  {me} report aging --as-of {}", report.end.to_rfc3339());
            }
            if !report.all_match {
                bail!("a final state differs from the one the scenario declares");
            }
        }
        Command::BenchInstances {
            accounts,
            usage,
            helpers,
            dir,
        } => {
            let opts = arrears::bench::InstancesOptions {
                accounts,
                usage,
                dir,
                helpers,
            };
            print_json(&arrears::bench::run_instances(&config, &opts).await?)?;
        }
        Command::BenchLifecycle {
            accounts,
            history,
            debtors,
            billed,
            dir,
        } => {
            let opts = arrears::bench_lifecycle::LifecycleBenchOptions {
                accounts,
                history,
                debtors,
                billed,
                dir,
            };
            print_json(&arrears::bench_lifecycle::run(&config, &opts).await?)?;
        }
        Command::BenchEmail {
            count,
            smtp_url,
            connections,
        } => {
            let opts = arrears::bench_email::EmailBenchOptions {
                count,
                smtp_url,
                connections,
            };
            print_json(&arrears::bench_email::run(&config, &opts).await?)?;
        }
        Command::Report {
            what: ReportWhat::Aging { json },
        } => {
            // A report only reads: no price-list sync.
            let db = Db::open(&config, MigrationMode::Require).await?;
            let report = arrears::report::aging(&db, &config, as_of).await?;
            if wants_json(json) {
                print_json(&report)?;
            } else {
                print!("{}", arrears::report::aging_table(&report));
            }
        }
        Command::Simulate {
            policy,
            days,
            from,
            json,
        } => {
            let proposal = arrears::simulate::Proposal::load(&config, &policy)?;
            // Read-only on the source: no price-list sync here (each copy gets its own).
            let db = Db::open(&config, MigrationMode::Require).await?;
            let opts = arrears::simulate::Options {
                from: from.unwrap_or(as_of),
                days,
                proposal,
            };
            let report = arrears::simulate::run(&db, &config, &opts).await?;
            if wants_json(json) {
                print_json(&report)?;
            } else {
                print!("{}", arrears::simulate::table(&report));
            }
        }
        Command::Embedded { action } => match action {
            EmbeddedAction::Url => {
                let dir = config.embedded.state_dir.clone();
                let e = tokio::task::spawn_blocking(move || db::embedded::ensure_started(&dir))
                    .await??;
                println!("{}", e.url);
            }
            EmbeddedAction::Stop => {
                let was = db::embedded::stop(&config.embedded.state_dir)?;
                println!("{}", if was { "stopped" } else { "not running" });
            }
        },
        Command::Import { kind, file } => {
            let db = open_to_change(&config, explicit_as_of).await?;
            let result = match kind {
                ImportWhat::Accounts => import::import_accounts(&db, &config, &file, as_of).await,
                ImportWhat::Resources => import::import_resources(&db, &config, &file, as_of).await,
                ImportWhat::Usage => import::import_usage(&db, &config, &file, as_of).await,
            };
            match result {
                Ok(report) => print_json(&report)?,
                Err(ImportError::BadRows {
                    file,
                    count,
                    errors,
                }) => {
                    eprintln!("{}: {count} bad line(s), nothing imported", file.display());
                    for e in &errors {
                        eprintln!("  {e}");
                    }
                    if count > errors.len() {
                        eprintln!("  ... and {} more", count - errors.len());
                    }
                    return Ok(ExitCode::FAILURE);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Command::Topup {
            account,
            amount,
            reference,
        } => {
            let amount = parse_non_negative(&amount, digits)
                .with_context(|| format!("amount {amount:?}"))?;
            let db = open_to_change(&config, explicit_as_of).await?;
            let report = ledger::topup(
                &db,
                &config,
                &account,
                amount,
                &reference,
                as_of,
                "cli:topup",
            )
            .await?;
            print_json(&report)?;
        }
        Command::Coupon {
            action:
                CouponAction::Grant {
                    account,
                    amount,
                    kind,
                    expires_at,
                },
        } => {
            let amount = parse_non_negative(&amount, digits)
                .with_context(|| format!("amount {amount:?}"))?;
            let kind = match kind {
                CouponKindArg::Cash => CouponKind::Cash,
                CouponKindArg::General => CouponKind::General,
            };
            let db = open_to_change(&config, explicit_as_of).await?;
            let report =
                ledger::grant_coupon(&db, digits, &account, amount, kind, expires_at, as_of)
                    .await?;
            print_json(&report)?;
        }
        Command::Run {
            job,
            dry_run,
            force,
            day,
            allow_mass_release,
        } => {
            let db = open_to_change(&config, explicit_as_of.filter(|_| !dry_run)).await?;
            // The slot the schedule gives this instant, so that a one-off run and the service
            // claim the same slot and never both run it (generate_bills names its slot by its
            // billing day).
            let schedule = Schedule::load(config.service.jobs_dir.as_deref())?;
            let slot = schedule
                .get(job)
                .filter(|j| j.enabled)
                .and_then(|j| j.slot_at(as_of))
                .unwrap_or(as_of);
            let config = schedule
                .get(job)
                .map(|j| j.knobs.apply(job, &config))
                .unwrap_or(config);
            match job {
                JobName::GenerateBills => {
                    let opts = generate_bills::Options {
                        as_of,
                        bill_day: day,
                        dry_run,
                        force,
                    };
                    return print_run(&generate_bills::run(&db, &config, &opts).await?);
                }
                JobName::EnforceSuspensions => {
                    let opts = enforce_suspensions::Options {
                        as_of,
                        dry_run,
                        force,
                    };
                    return print_run(
                        &enforce_suspensions::run_in_slot(&db, &config, &opts, slot).await?,
                    );
                }
                JobName::ReleaseResources => {
                    let opts = release_resources::Options {
                        as_of,
                        service_now: Utc::now(),
                        dry_run,
                        force,
                        allow_mass_release,
                    };
                    return print_run(
                        &release_resources::run_in_slot(&db, &config, &opts, slot).await?,
                    );
                }
                JobName::SendAlerts => {
                    let opts = send_alerts::Options {
                        as_of,
                        dry_run,
                        force,
                    };
                    return print_run(&send_alerts::run_in_slot(&db, &config, &opts, slot).await?);
                }
                JobName::DeliverNotifications => {
                    let channels = deliver_notifications::Channels::from_config(&config)
                        .map_err(anyhow::Error::msg)?;
                    let opts = deliver_notifications::Options {
                        as_of,
                        dry_run,
                        max_batches: 100,
                    };
                    print_json(&deliver_notifications::run(&db, &config, &channels, &opts).await?)?;
                }
            }
        }
        Command::Notices {
            action:
                NoticesAction::List {
                    status,
                    account,
                    limit,
                    json,
                },
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let list = queries::notices(&db, status.as_deref(), account.as_deref(), limit).await?;
            if json {
                print_json(&list)?;
            } else {
                for n in &list {
                    println!(
                        "{:>6} {:<12} {:<22} {:<8} {:<8} attempts {} {}{}",
                        n.id,
                        n.account_id,
                        n.kind,
                        n.channel,
                        n.status,
                        n.attempts,
                        n.provider_message_id.as_deref().unwrap_or(""),
                        n.last_error
                            .as_deref()
                            .map(|e| format!("  error: {e}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::Notices {
            action: NoticesAction::Retry { id },
        } => {
            let db = open_to_change(&config, explicit_as_of).await?;
            if !queries::retry_notice(&db, id, as_of).await? {
                bad_input!("no dead or retrying notice {id}");
            }
            println!("notice {id} queued again for {as_of}");
        }
        Command::Gate {
            account,
            action,
            resource,
            json,
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let mut conn = db.conn().await?;
            let Some(loaded) = lifecycle::load(&mut conn, &account, false).await? else {
                bail!("unknown account {account:?}");
            };
            let policies = loaded.with_policies(&config);
            let target = match &resource {
                None => None,
                Some(rid) => match policies.iter().find(|(r, _)| &r.id == rid) {
                    Some((r, p)) => Some((r, *p)),
                    None => bail!("unknown resource {rid:?} of account {account:?}"),
                },
            };
            let decision = gate(&loaded.account, target, action);
            if json {
                print_json(&serde_json::json!({
                    "account_id": account,
                    "resource_id": resource,
                    "action": action,
                    "allowed": decision.allowed,
                    "code": decision.code,
                    "reason": decision.reason,
                }))?;
            } else {
                println!(
                    "{}: {}",
                    if decision.allowed {
                        "allowed"
                    } else {
                        "refused"
                    },
                    decision.reason
                );
            }
            return Ok(if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Command::Resource { action } => {
            let db = open_to_change(&config, explicit_as_of).await?;
            let (account, op, cause) = match action {
                ResourceAction::EnablePayg { account, resource } => (
                    account,
                    OperatorAction::EnablePayg { resource },
                    "cli:resource enable-payg",
                ),
                ResourceAction::Renew {
                    account,
                    resource,
                    quota,
                    expires_at,
                } => {
                    let quota = parse_non_negative(&quota, QUANTITY_DIGITS)
                        .with_context(|| format!("quota {quota:?}"))?;
                    (
                        account,
                        OperatorAction::RenewPackage {
                            resource,
                            quota,
                            expires_at,
                        },
                        "cli:resource renew",
                    )
                }
                ResourceAction::Unsubscribe { account, resource } => (
                    account,
                    OperatorAction::Unsubscribe { resource },
                    "cli:resource unsubscribe",
                ),
            };
            print_json(
                &lifecycle::operator_action(&db, &config, &account, op, as_of, cause).await?,
            )?;
        }
        Command::Facts { action } => {
            let db = open_to_change(&config, explicit_as_of).await?;
            match action {
                FactsAction::OverdueAlert { account } => {
                    let at = lifecycle::record_overdue_alert(&db, &account, as_of).await?;
                    print_json(
                        &serde_json::json!({ "account_id": account, "first_overdue_alert_at": at }),
                    )?;
                }
                FactsAction::ReleaseWarning {
                    account,
                    lead,
                    resource,
                } => {
                    let lead: PolicyDuration = lead.parse()?;
                    let recorded = lifecycle::record_release_warning(
                        &db,
                        &account,
                        lead.seconds(),
                        resource.as_deref(),
                        as_of,
                    )
                    .await?;
                    print_json(&serde_json::json!({
                        "account_id": account, "lead": lead, "accepted_at": as_of, "warnings": recorded
                    }))?;
                }
            }
        }
        Command::Account {
            action: AccountAction::History { id, json },
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let events = queries::history(&db, &id).await?;
            if json {
                print_json(&events)?;
            } else {
                print_episodes(&queries::episodes(&db, &id).await?);
                if events.is_empty() {
                    println!("no lifecycle events for {id}");
                }
                for e in &events {
                    println!(
                        "{}  {:<4} {:<16} {} -> {}  {}  [{}]",
                        e.occurred_at.format("%Y-%m-%d %H:%M:%S"),
                        e.episode.map(|n| format!("e{n}")).unwrap_or_default(),
                        e.resource_id.as_deref().unwrap_or("(account)"),
                        e.from,
                        e.to,
                        e.reason,
                        e.cause
                    );
                }
            }
        }
        Command::Account {
            action: AccountAction::Episodes { id, json },
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let episodes = queries::episodes(&db, &id).await?;
            let suspensions = queries::suspensions(&db, &id).await?;
            if json {
                print_json(&serde_json::json!({
                    "account_id": id, "episodes": episodes, "suspensions": suspensions
                }))?;
            } else {
                print_episodes(&episodes);
                for s in &suspensions {
                    println!(
                        "  s{:<4} {:<16} {:<16} {} from {}  release {}  {}",
                        s.no,
                        s.resource_id,
                        s.reason,
                        s.episode
                            .map(|n| format!("e{n}"))
                            .unwrap_or_else(|| "-".into()),
                        s.started_at,
                        s.release_at
                            .map(|t| t.to_string())
                            .unwrap_or_else(|| "never".into()),
                        match (&s.ended_at, &s.ended_how) {
                            (Some(t), Some(how)) => format!("ended {t} ({how})"),
                            _ => "current".into(),
                        }
                    );
                }
            }
        }
        Command::Account {
            action:
                action @ (AccountAction::ComplianceLock { .. }
                | AccountAction::ComplianceUnlock { .. }
                | AccountAction::LegalHold { .. }
                | AccountAction::LegalHoldClear { .. }),
        } => {
            let db = open_to_change(&config, explicit_as_of).await?;
            let (id, op, cause) = match action {
                AccountAction::ComplianceLock { id } => (
                    id,
                    OperatorAction::ComplianceLock(true),
                    "cli:account compliance-lock",
                ),
                AccountAction::ComplianceUnlock { id } => (
                    id,
                    OperatorAction::ComplianceLock(false),
                    "cli:account compliance-unlock",
                ),
                AccountAction::LegalHold { id } => (
                    id,
                    OperatorAction::LegalHold(true),
                    "cli:account legal-hold",
                ),
                AccountAction::LegalHoldClear { id } => (
                    id,
                    OperatorAction::LegalHold(false),
                    "cli:account legal-hold-clear",
                ),
                AccountAction::Show { .. }
                | AccountAction::History { .. }
                | AccountAction::Episodes { .. } => {
                    unreachable!("matched above")
                }
            };
            print_json(&lifecycle::operator_action(&db, &config, &id, op, as_of, cause).await?)?;
        }
        Command::Account {
            action: AccountAction::Show { id, json },
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let Some(view) = queries::account(&db, digits, &id).await? else {
                bad_input!("unknown account {id:?}");
            };
            if json {
                print_json(&view)?;
            } else {
                println!(
                    "{} ({})  state {}  cash {} {}  credit quota {}",
                    view.id,
                    view.name,
                    view.state,
                    view.cash_balance,
                    config.billing.currency,
                    view.credit_quota
                );
                if let Some(t) = view.arrears_since {
                    println!("  in arrears since {t}");
                }
                if let Some(e) = &view.episode {
                    println!(
                        "  episode {} opened {}; overdue alert accepted {}; suspended {}",
                        e.no,
                        e.opened_at,
                        e.first_overdue_alert_at
                            .map(|t| t.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e.suspended_at
                            .map(|t| t.to_string())
                            .unwrap_or_else(|| "-".into()),
                    );
                }
                let due = |t: Option<DateTime<Utc>>| {
                    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
                };
                println!(
                    "  next due: send_alerts {}, enforce_suspensions {}, release_resources {}",
                    due(view.next_due.send_alerts),
                    due(view.next_due.enforce_suspensions),
                    due(view.next_due.release_resources)
                );
                for r in &view.resources {
                    println!(
                        "  {:<16} {:<6} {:<12} {}{}{}",
                        r.id,
                        r.product,
                        r.billing_mode,
                        r.state,
                        r.reason
                            .as_deref()
                            .map(|x| format!(" ({x})"))
                            .unwrap_or_default(),
                        r.release_at
                            .map(|t| format!("  released at {t} unless paid"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::Bills {
            account,
            from,
            to,
            json,
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let bills = queries::bills(&db, digits, &account, from, to).await?;
            if json {
                print_json(&bills)?;
            } else {
                if bills.is_empty() {
                    println!("no bills for {account}");
                }
                for b in &bills {
                    println!(
                        "{}  total {} {}  (cash coupons {}, general coupons {}, cash {}){}",
                        b.bill_day,
                        b.total,
                        config.billing.currency,
                        b.paid_cash_coupons,
                        b.paid_general_coupons,
                        b.paid_cash,
                        if b.late_records > 0 {
                            format!("  incl. {} late record(s)", b.late_records)
                        } else {
                            String::new()
                        }
                    );
                    for l in &b.lines {
                        let mut notes = Vec::new();
                        if l.included_quantity != "0" {
                            notes.push(format!("{} from package quota", l.included_quantity));
                        }
                        if l.unbilled_quantity != "0" {
                            notes.push(format!(
                                "{} over quota not billed: pay-as-you-go off",
                                l.unbilled_quantity
                            ));
                        }
                        let notes = if notes.is_empty() {
                            String::new()
                        } else {
                            format!("  ({})", notes.join("; "))
                        };
                        println!(
                            "    {:<16} {:<20} {:>12} x {:>12} = {:>10}{notes}",
                            l.resource_id, l.meter, l.billed_quantity, l.unit_price, l.amount
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
