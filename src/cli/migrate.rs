//! `arrears migrate`: pending migrations, then the configured price list and policies.

use std::process::ExitCode;

use anyhow::Result;
use arrears::db::{self, Db, MigrationMode};
use arrears::lifecycle;

use super::output::print_json;
use super::{guard_time_travel, Env};

pub async fn run(env: &Env) -> Result<ExitCode> {
    let config = &env.config;
    // Migrated here, not by the opening, so that the report lists what this run applied
    // (the embedded database migrates itself when it is opened: there it lists nothing).
    let db = Db::open(config, MigrationMode::Caller).await?;
    let applied = db.migrate().await?;
    db.check_money(config).await?;
    guard_time_travel(&db, config, env.explicit_as_of).await?;
    let prices = db::catalog::apply(&mut *db.conn().await?, config, env.as_of, false).await?;
    let policies = lifecycle::policies::apply(&db, config, env.as_of, false).await?;
    print_json(&serde_json::json!({
        "applied": applied, "status": "up to date", "prices": prices, "policies": policies
    }))?;
    Ok(ExitCode::SUCCESS)
}
