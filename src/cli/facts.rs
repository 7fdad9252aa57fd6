//! `arrears facts ...`: record that a channel accepted an overdue alert or a release
//! warning (what the outbox records itself when it delivers them).

use std::process::ExitCode;

use anyhow::Result;
use arrears::domain::policy::PolicyDuration;
use arrears::lifecycle;
use clap::Subcommand;

use super::output::print_json;
use super::{open_to_change, Env};

#[derive(Subcommand)]
pub enum FactsAction {
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

pub async fn run(env: &Env, action: FactsAction) -> Result<ExitCode> {
    let as_of = env.as_of;
    let db = open_to_change(&env.config, env.explicit_as_of).await?;
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
    Ok(ExitCode::SUCCESS)
}
