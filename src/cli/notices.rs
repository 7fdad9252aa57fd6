//! `arrears notices list|retry`: the outbox of notices.

use std::process::ExitCode;

use anyhow::Result;
use arrears::queries;
use clap::Subcommand;

use super::output::{print_json, print_notices};
use super::{bad_input, open, open_to_change, Env};

#[derive(Subcommand)]
pub enum NoticesAction {
    /// Notices with their kind, channel, status, attempts, last error and provider id.
    List {
        /// pending, sending, sent, retrying, dead or cancelled
        #[arg(long, value_parser = ["pending", "sending", "sent", "retrying", "dead", "cancelled"])]
        status: Option<String>,
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Put a dead (or retrying) notice back in the queue, due at --as-of.
    Retry { id: i64 },
}

pub async fn run(env: &Env, action: NoticesAction) -> Result<ExitCode> {
    match action {
        NoticesAction::List {
            status,
            account,
            limit,
            json,
        } => {
            let db = open(&env.config).await?;
            if let Some(id) = &account {
                if !queries::account_exists(&db, id).await? {
                    bad_input!("unknown account {id:?}");
                }
            }
            let list = queries::notices(&db, status.as_deref(), account.as_deref(), limit).await?;
            if json {
                print_json(&list)?;
            } else {
                print_notices(&list);
            }
        }
        NoticesAction::Retry { id } => {
            let db = open_to_change(&env.config, env.explicit_as_of).await?;
            if !queries::retry_notice(&db, id, env.as_of).await? {
                bad_input!("no dead or retrying notice {id}");
            }
            println!("notice {id} queued again for {}", env.as_of);
        }
    }
    Ok(ExitCode::SUCCESS)
}
