//! The `arrears` command line: one-off job runs, imports and operator actions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use arrears::config::Config;
use arrears::db::{self, Db, MigrationMode};
use arrears::domain::money::parse_non_negative;
use arrears::domain::settle::CouponKind;
use arrears::import::{self, ImportError};
use arrears::jobs::{generate_bills, JobName};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations.
    Migrate,
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
    /// Validate the configuration.
    Check,
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
    },
    /// The embedded default database.
    Embedded {
        #[command(subcommand)]
        action: EmbeddedAction,
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
}

#[derive(Subcommand)]
enum EmbeddedAction {
    /// Print the URL of the embedded database (starting it if needed).
    Url,
    /// Stop the embedded PostgreSQL cluster.
    Stop,
}

fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 instant such as 2026-11-23T00:30:00+08:00 ({e})")
        })
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARREARS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn open(config: &Config, mode: MigrationMode) -> Result<Db> {
    let db = Db::open(config, mode)
        .await
        .context("opening the database")?;
    let mut conn = db.conn().await?;
    db::catalog::sync_prices(&mut conn, config)
        .await
        .context("syncing the price list")?;
    Ok(db)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    let as_of = cli.as_of.unwrap_or_else(Utc::now);
    let digits = config.billing.minor_unit_digits;
    match cli.command {
        Command::Check => {
            println!(
                "configuration OK ({}): {} product(s)",
                config.origin,
                config.products.len()
            );
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
            print_json(&serde_json::json!({ "applied": applied, "status": "up to date" }))?;
        }
        Command::Bench {
            accounts,
            usage,
            dir,
        } => {
            let report = arrears::bench::run(
                &config,
                &arrears::bench::BenchOptions {
                    accounts,
                    usage,
                    dir,
                },
            )
            .await?;
            print_json(&report)?;
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
            let db = open(&config, MigrationMode::Require).await?;
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
            let db = open(&config, MigrationMode::Require).await?;
            let report = ledger::topup(
                &db,
                digits,
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
            let db = open(&config, MigrationMode::Require).await?;
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
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            match job {
                JobName::GenerateBills => {
                    let opts = generate_bills::Options {
                        as_of,
                        bill_day: day,
                        dry_run,
                        force,
                    };
                    let report = generate_bills::run(&db, &config, &opts).await?;
                    print_json(&report)?;
                }
            }
        }
        Command::Account {
            action: AccountAction::Show { id, json },
        } => {
            let db = open(&config, MigrationMode::Require).await?;
            let Some(view) = queries::account(&db, digits, &id).await? else {
                bail!("unknown account {id:?}");
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
                for r in &view.resources {
                    println!(
                        "  {:<16} {:<6} {:<12} {}{}",
                        r.id,
                        r.product,
                        r.billing_mode,
                        r.state,
                        r.reason
                            .as_deref()
                            .map(|x| format!(" ({x})"))
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
