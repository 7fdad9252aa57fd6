//! `arrears account ...`: an account's state, history and episodes, and the operator's
//! compliance lock and legal hold.

use std::process::ExitCode;

use anyhow::Result;
use arrears::lifecycle::{self, OperatorAction};
use arrears::queries;
use clap::Subcommand;

use super::output::{print_account, print_history, print_json, print_suspensions};
use super::{bad_input, open, open_to_change, Env};

#[derive(Subcommand)]
pub enum AccountAction {
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

pub async fn run(env: &Env, action: AccountAction) -> Result<ExitCode> {
    let (id, op, cause) = match action {
        AccountAction::Show { id, json } => return show(env, &id, json).await,
        AccountAction::History { id, json } => return history(env, &id, json).await,
        AccountAction::Episodes { id, json } => return episodes(env, &id, json).await,
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
    };
    let db = open_to_change(&env.config, env.explicit_as_of).await?;
    print_json(&lifecycle::operator_action(&db, &env.config, &id, op, env.as_of, cause).await?)?;
    Ok(ExitCode::SUCCESS)
}

async fn show(env: &Env, id: &str, json: bool) -> Result<ExitCode> {
    let db = open(&env.config).await?;
    let Some(view) = queries::account(&db, env.digits(), id).await? else {
        bad_input!("unknown account {id:?}");
    };
    if json {
        print_json(&view)?;
    } else {
        print_account(&view, &env.config.billing.currency);
    }
    Ok(ExitCode::SUCCESS)
}

async fn history(env: &Env, id: &str, json: bool) -> Result<ExitCode> {
    let db = open(&env.config).await?;
    let events = queries::history(&db, id).await?;
    if json {
        print_json(&events)?;
    } else {
        print_history(id, &queries::episodes(&db, id).await?, &events);
    }
    Ok(ExitCode::SUCCESS)
}

async fn episodes(env: &Env, id: &str, json: bool) -> Result<ExitCode> {
    let db = open(&env.config).await?;
    let episodes = queries::episodes(&db, id).await?;
    let suspensions = queries::suspensions(&db, id).await?;
    if json {
        print_json(&serde_json::json!({
            "account_id": id, "episodes": episodes, "suspensions": suspensions
        }))?;
    } else {
        print_suspensions(&episodes, &suspensions);
    }
    Ok(ExitCode::SUCCESS)
}
