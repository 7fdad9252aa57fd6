//! `arrears simulate --policy FILE --days N`: a policy change tried on two copies of the
//! database, compared day by day.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use arrears::db::{Db, MigrationMode};
use chrono::{DateTime, Utc};

use super::output::{print_json, wants_json};
use super::{parse_instant, Env};

#[derive(clap::Args)]
pub struct SimulateArgs {
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
}

pub async fn run(env: &Env, args: SimulateArgs) -> Result<ExitCode> {
    let proposal = arrears::simulate::Proposal::load(&env.config, &args.policy)?;
    // Read-only on the source: no price-list sync here (each copy gets its own).
    let db = Db::open(&env.config, MigrationMode::Require).await?;
    let opts = arrears::simulate::Options {
        from: args.from.unwrap_or(env.as_of),
        days: args.days,
        proposal,
    };
    let report = arrears::simulate::run(&db, &env.config, &opts).await?;
    if wants_json(args.json) {
        print_json(&report)?;
    } else {
        print!("{}", arrears::simulate::table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
