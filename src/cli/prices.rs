//! `arrears prices apply`: the configured price list written as new versions.

use std::process::ExitCode;

use anyhow::Result;
use arrears::db;
use chrono::{DateTime, Utc};
use clap::Subcommand;

use super::output::{print_json, print_price_changes, wants_json};
use super::{open, parse_instant, Env};

#[derive(Subcommand)]
pub enum PricesAction {
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

pub async fn run(env: &Env, action: PricesAction) -> Result<ExitCode> {
    let PricesAction::Apply {
        effective_from,
        dry_run,
    } = action;
    let db = open(&env.config).await?;
    let report = db::catalog::apply(
        &mut *db.conn().await?,
        &env.config,
        effective_from.unwrap_or(env.as_of),
        dry_run,
    )
    .await?;
    if wants_json(false) {
        print_json(&report)?;
    } else {
        print_price_changes(&report);
    }
    Ok(ExitCode::SUCCESS)
}
