//! `arrears resource ...`: operator actions on a resource (pay-as-you-go, renewal,
//! unsubscribe), each recorded with the CLI as its cause.

use std::process::ExitCode;

use anyhow::{Context, Result};
use arrears::domain::money::{parse_non_negative, QUANTITY_DIGITS};
use arrears::lifecycle::{self, OperatorAction};
use chrono::{DateTime, Utc};
use clap::Subcommand;

use super::output::print_json;
use super::{open_to_change, parse_instant, Env};

#[derive(Subcommand)]
pub enum ResourceAction {
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

pub async fn run(env: &Env, action: ResourceAction) -> Result<ExitCode> {
    let db = open_to_change(&env.config, env.explicit_as_of).await?;
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
    let report =
        lifecycle::operator_action(&db, &env.config, &account, op, env.as_of, cause).await?;
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}
