//! `arrears report ...`: read-only operator reports.

use std::process::ExitCode;

use anyhow::Result;
use arrears::db::{Db, MigrationMode};
use clap::Subcommand;

use super::output::{print_json, wants_json};
use super::Env;

#[derive(Subcommand)]
pub enum ReportWhat {
    /// Accounts in arrears by days in arrears (0-1, 2-7, 8-30, 31-60, over 60) and by
    /// lifecycle state, with what they owe, at --as-of.
    Aging {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(env: &Env, what: ReportWhat) -> Result<ExitCode> {
    let ReportWhat::Aging { json } = what;
    // A report only reads: no price-list sync.
    let db = Db::open(&env.config, MigrationMode::Require).await?;
    let report = arrears::report::aging(&db, &env.config, env.as_of).await?;
    if wants_json(json) {
        print_json(&report)?;
    } else {
        print!("{}", arrears::report::aging_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
