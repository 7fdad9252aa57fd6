//! `arrears embedded url|stop`: the embedded default database.

use std::process::ExitCode;

use anyhow::Result;
use arrears::db;
use clap::Subcommand;

use super::Env;

#[derive(Subcommand)]
pub enum EmbeddedAction {
    /// Print the URL of the embedded database (starting it if needed).
    Url,
    /// Stop the embedded PostgreSQL cluster.
    Stop,
}

pub async fn run(env: &Env, action: EmbeddedAction) -> Result<ExitCode> {
    match action {
        EmbeddedAction::Url => {
            let dir = env.config.embedded.state_dir.clone();
            let e =
                tokio::task::spawn_blocking(move || db::embedded::ensure_started(&dir)).await??;
            println!("{}", e.url);
        }
        EmbeddedAction::Stop => {
            let was = db::embedded::stop(&env.config.embedded.state_dir)?;
            println!("{}", if was { "stopped" } else { "not running" });
        }
    }
    Ok(ExitCode::SUCCESS)
}
