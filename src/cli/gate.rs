//! `arrears gate ACCOUNT ACTION`: may the account do it? Exit 0 allowed, 1 refused (every
//! error of `gate` exits 2, so that a control plane never takes an error for a refusal).

use std::process::ExitCode;

use anyhow::{bail, Result};
use arrears::domain::lifecycle::{gate, Action};
use arrears::lifecycle;

use super::output::print_json;
use super::{open, Env};

#[derive(clap::Args)]
pub struct GateArgs {
    account: String,
    action: Action,
    #[arg(long)]
    resource: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn run(env: &Env, args: GateArgs) -> Result<ExitCode> {
    let GateArgs {
        account,
        action,
        resource,
        json,
    } = args;
    let db = open(&env.config).await?;
    let mut conn = db.conn().await?;
    let Some(loaded) = lifecycle::load(&mut conn, &account, false).await? else {
        bail!("unknown account {account:?}");
    };
    let policies = loaded.with_policies(&env.config);
    let target = match &resource {
        None => None,
        Some(rid) => match policies.iter().find(|(r, _)| &r.id == rid) {
            Some((r, p)) => Some((r, *p)),
            None => bail!("unknown resource {rid:?} of account {account:?}"),
        },
    };
    let decision = gate(&loaded.account, target, action);
    if json {
        print_json(&serde_json::json!({
            "account_id": account,
            "resource_id": resource,
            "action": action,
            "allowed": decision.allowed,
            "code": decision.code,
            "reason": decision.reason,
        }))?;
    } else {
        let verdict = if decision.allowed {
            "allowed"
        } else {
            "refused"
        };
        println!("{verdict}: {}", decision.reason);
    }
    Ok(if decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
