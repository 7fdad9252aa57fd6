//! The benchmarks: billing (`bench`), several instances (`bench-instances`), the lifecycle
//! jobs (`bench-lifecycle`) and email delivery (`bench-email`), each in scratch databases;
//! each prints a JSON report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::output::print_json;
use super::Env;

#[derive(clap::Args)]
pub struct BenchArgs {
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
}

#[derive(clap::Args)]
pub struct BenchEmailArgs {
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// A second local server to measure against, e.g. smtp://127.0.0.1:2525?tls=none
    /// (aiosmtpd); compared with a plain SMTP load generator.
    #[arg(long)]
    smtp_url: Option<String>,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Rounds against smtp-sink (arrears, then smtp-source); the median round's ratio is
    /// judged against the target.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(clap::Args)]
pub struct BenchLifecycleArgs {
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
}

#[derive(clap::Args)]
pub struct BenchInstancesArgs {
    #[arg(long, default_value_t = 200_000)]
    accounts: u64,
    #[arg(long, default_value_t = 2_000_000)]
    usage: u64,
    #[arg(long, default_value_t = 1)]
    helpers: usize,
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
}

pub async fn bench(env: &Env, a: BenchArgs) -> Result<ExitCode> {
    let opts = arrears::bench::BenchOptions {
        accounts: a.accounts,
        usage: a.usage,
        dir: a.dir,
        days: a.days,
    };
    print_json(&arrears::bench::run(&env.config, &opts).await?)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn bench_instances(env: &Env, a: BenchInstancesArgs) -> Result<ExitCode> {
    let opts = arrears::bench::InstancesOptions {
        accounts: a.accounts,
        usage: a.usage,
        dir: a.dir,
        helpers: a.helpers,
    };
    print_json(&arrears::bench::run_instances(&env.config, &opts).await?)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn bench_lifecycle(env: &Env, a: BenchLifecycleArgs) -> Result<ExitCode> {
    let opts = arrears::bench_lifecycle::LifecycleBenchOptions {
        accounts: a.accounts,
        history: a.history,
        debtors: a.debtors,
        billed: a.billed,
        dir: a.dir,
    };
    print_json(&arrears::bench_lifecycle::run(&env.config, &opts).await?)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn bench_email(env: &Env, a: BenchEmailArgs) -> Result<ExitCode> {
    let opts = arrears::bench_email::EmailBenchOptions {
        count: a.count,
        smtp_url: a.smtp_url,
        connections: a.connections,
        rounds: a.rounds,
    };
    print_json(&arrears::bench_email::run(&env.config, &opts).await?)?;
    Ok(ExitCode::SUCCESS)
}
