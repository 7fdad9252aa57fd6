//! `arrears policies apply`: what the configured lifecycle policies derive, recomputed.

use std::process::ExitCode;

use anyhow::Result;
use arrears::lifecycle;
use clap::Subcommand;

use super::output::print_json;
use super::{open_to_change, Env};

#[derive(Subcommand)]
pub enum PoliciesAction {
    /// Recompute what the configuration's lifecycle policies derive (release instants of live
    /// suspensions, the due-work index) for the accounts they affect, when they differ from
    /// those recorded; prints how many moved.
    Apply {
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(env: &Env, action: PoliciesAction) -> Result<ExitCode> {
    let PoliciesAction::Apply { dry_run } = action;
    // A dry run changes nothing, so it may look at any instant.
    let db = open_to_change(&env.config, env.explicit_as_of.filter(|_| !dry_run)).await?;
    print_json(&lifecycle::policies::apply(&db, &env.config, env.as_of, dry_run).await?)?;
    Ok(ExitCode::SUCCESS)
}
