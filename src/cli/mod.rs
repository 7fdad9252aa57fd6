//! The `arrears` command line as a table of contents: the global flags, one variant per
//! command, and one module per command group that parses, calls the library and prints
//! (through `output`, where every table and JSON document is rendered).

mod account;
mod bench;
mod bills;
mod check;
mod coupon;
mod demo;
mod embedded;
mod facts;
mod gate;
mod import;
mod migrate;
mod notices;
pub mod output;
mod policies;
mod prices;
mod products;
mod report;
mod resource;
mod run;
mod schedule;
mod service;
mod simulate;
mod topup;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use arrears::config::Config;
use arrears::db::{Db, MigrationMode};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "arrears", version, about = "Billing-arrears lifecycle engine")]
pub struct Cli {
    /// Configuration file (default: the built-in example configuration).
    #[arg(long, global = true, env = "ARREARS_CONFIG")]
    pub config: Option<PathBuf>,
    /// The instant the command acts at (RFC 3339); default: now. How tests and demos travel in time.
    #[arg(long, global = true, value_parser = parse_instant)]
    pub as_of: Option<DateTime<Utc>>,
    /// Let a state-changing command act at an --as-of more than lifecycle.max_clock_skew
    /// ahead of the database clock (tests and scratch databases; never a production one).
    #[arg(long, global = true)]
    pub allow_future: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply pending database migrations, then the configuration's lifecycle policies
    /// (`policies apply`).
    Migrate,
    /// The versioned price list in the database.
    Prices {
        #[command(subcommand)]
        action: prices::PricesAction,
    },
    /// The lifecycle policies in the database.
    Policies {
        #[command(subcommand)]
        action: policies::PoliciesAction,
    },
    /// Import a CSV file (header row required); a file with any bad row imports nothing.
    Import(import::ImportArgs),
    /// Credit an account's cash balance; idempotent by reference.
    Topup(topup::TopupArgs),
    /// Coupons.
    Coupon {
        #[command(subcommand)]
        action: coupon::CouponAction,
    },
    /// Run one job now and print its JSON report.
    Run(run::RunCmd),
    /// May ACCOUNT do ACTION (on --resource)? Exit 0 allowed, 1 refused, 2 error (unknown
    /// account or resource, database unreachable, bad arguments); the reason is printed.
    Gate(gate::GateArgs),
    /// Operator actions on a resource.
    Resource {
        #[command(subcommand)]
        action: resource::ResourceAction,
    },
    /// Record lifecycle facts that the notification outbox will record once it exists:
    /// a channel accepted the overdue alert or a release warning.
    Facts {
        #[command(subcommand)]
        action: facts::FactsAction,
    },
    /// Accounts.
    Account {
        #[command(subcommand)]
        action: account::AccountAction,
    },
    /// An account's bills: each day's bill, its lines, and what coupons and cash paid.
    Bills(bills::BillsArgs),
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
        action: notices::NoticesAction,
    },
    /// Benchmark: generate, import and bill N accounts and M usage records in a scratch
    /// database `arrears_bench` on the same server; prints a JSON report.
    Bench(bench::BenchArgs),
    /// Email benchmark: delivers COUNT outbox notices to postfix's smtp-sink (started on a
    /// free local port) and compares with `smtp-source -d -s CONNECTIONS` sending as many
    /// messages of the same size to it; with --smtp-url, also against that server.
    BenchEmail(bench::BenchEmailArgs),
    /// Operator reports (a table on a terminal, JSON otherwise or with --json).
    Report {
        #[command(subcommand)]
        what: report::ReportWhat,
    },
    /// Run the accounts forward N days on two copies of the database, under the current
    /// policies and under the policy override FILE, and compare day by day. Changes nothing.
    Simulate(simulate::SimulateArgs),
    /// Lifecycle benchmark: N accounts of which HISTORY became history through the jobs and
    /// DEBTORS fall into arrears on one bill; times each lifecycle job with nothing due and in
    /// the slots where the debtors are due, in a scratch database `arrears_bench_lifecycle`.
    BenchLifecycle(bench::BenchLifecycleArgs),
    /// Billing with several instances: bills one generated day alone, then on an identical
    /// copy with HELPERS more instances claiming batches; prints both times.
    BenchInstances(bench::BenchInstancesArgs),
    /// The guided first run: the whole lifecycle of both products on a fresh database, 80
    /// simulated days in well under a minute. Notices land in OUT/notices.
    Demo(demo::DemoArgs),
    /// The embedded default database.
    Embedded {
        #[command(subcommand)]
        action: embedded::EmbeddedAction,
    },
    /// The next slots of every enabled job: job, cron, time zone, instant in UTC and locally.
    Schedule(schedule::ScheduleArgs),
    /// The daemon: runs the schedule (each slot once across instances), delivers notices and
    /// serves HTTP on service.http_addr (ARREARS_HTTP_ADDR). With --as-of, its clock starts
    /// there and runs --speed times faster (for demos and tests).
    Serve {
        #[arg(long, default_value_t = 1)]
        speed: u32,
    },
}

/// What every command is given besides its own arguments.
pub struct Env {
    pub config: Config,
    /// `--as-of` as given: the time-travel guard checks only an explicit one.
    pub explicit_as_of: Option<DateTime<Utc>>,
    /// `--as-of`, or now.
    pub as_of: DateTime<Utc>,
}

impl Env {
    /// Minor-unit digits of the deployment currency.
    pub fn digits(&self) -> u32 {
        self.config.billing.minor_unit_digits
    }
}

/// Runs the command; its exit status on success (errors are mapped by the caller).
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    config.lifecycle.allow_future = cli.allow_future;
    let env = Env {
        config,
        explicit_as_of: cli.as_of,
        as_of: cli.as_of.unwrap_or_else(Utc::now),
    };
    match cli.command {
        Command::Migrate => migrate::run(&env).await,
        Command::Prices { action } => prices::run(&env, action).await,
        Command::Policies { action } => policies::run(&env, action).await,
        Command::Import(args) => import::run(&env, args).await,
        Command::Topup(args) => topup::run(&env, args).await,
        Command::Coupon { action } => coupon::run(&env, action).await,
        Command::Run(cmd) => run::run(&env, cmd).await,
        Command::Gate(args) => gate::run(&env, args).await,
        Command::Resource { action } => resource::run(&env, action).await,
        Command::Facts { action } => facts::run(&env, action).await,
        Command::Account { action } => account::run(&env, action).await,
        Command::Bills(args) => bills::run(&env, args).await,
        Command::Products { json } => products::run(&env, json),
        Command::Check => check::run(&env).await,
        Command::Notices { action } => notices::run(&env, action).await,
        Command::Bench(args) => bench::bench(&env, args).await,
        Command::BenchEmail(args) => bench::bench_email(&env, args).await,
        Command::BenchLifecycle(args) => bench::bench_lifecycle(&env, args).await,
        Command::BenchInstances(args) => bench::bench_instances(&env, args).await,
        Command::Report { what } => report::run(&env, what).await,
        Command::Simulate(args) => simulate::run(&env, args).await,
        Command::Demo(args) => demo::run(&env, args).await,
        Command::Embedded { action } => embedded::run(&env, action).await,
        Command::Schedule(args) => schedule::run(&env, args),
        Command::Serve { speed } => service::serve(&env, speed).await,
    }
}

/// An error in what the command was given (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Returns a `BadInput` error from the enclosing function.
macro_rules! bad_input {
    ($($t:tt)*) => { return Err($crate::cli::BadInput(format!($($t)*)).into()) };
}
pub(crate) use bad_input;

pub fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 instant such as 2026-11-23T00:30:00+08:00 ({e})")
        })
}

/// The time-travel guard of state-changing commands: an explicit --as-of more than
/// lifecycle.max_clock_skew ahead of the database clock is refused without --allow-future
/// (bills, suspensions and releases written for the future cannot be taken back).
pub async fn guard_time_travel(
    db: &Db,
    config: &Config,
    as_of: Option<DateTime<Utc>>,
) -> Result<()> {
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

/// Opens the database for a command that only reads: no side effects (the price list and
/// policies are written only by `prices apply`, `policies apply`, `migrate` and `serve`).
pub async fn open(config: &Config) -> Result<Db> {
    Db::open(config, MigrationMode::Require)
        .await
        .context("opening the database")
}

/// Opens the database for a command that changes state at --as-of: the time-travel guard
/// first.
pub async fn open_to_change(config: &Config, as_of: Option<DateTime<Utc>>) -> Result<Db> {
    let db = open(config).await?;
    guard_time_travel(&db, config, as_of).await?;
    Ok(db)
}
