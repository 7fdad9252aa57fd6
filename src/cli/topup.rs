//! `arrears topup ACCOUNT AMOUNT --reference REF`: credit cash, idempotent by reference.

use std::process::ExitCode;

use anyhow::{Context, Result};
use arrears::domain::money::parse_amount;
use arrears::ledger;

use super::output::print_json;
use super::{open_to_change, Env};

#[derive(clap::Args)]
pub struct TopupArgs {
    account: String,
    /// Decimal amount in the account currency ("100.00").
    amount: String,
    #[arg(long)]
    reference: String,
}

pub async fn run(env: &Env, args: TopupArgs) -> Result<ExitCode> {
    let TopupArgs {
        account,
        amount,
        reference,
    } = args;
    let amount =
        parse_amount(&amount, env.digits()).with_context(|| format!("amount {amount:?}"))?;
    let db = open_to_change(&env.config, env.explicit_as_of).await?;
    let report = ledger::topup(
        &db,
        &env.config,
        &account,
        amount,
        &reference,
        env.as_of,
        "cli:topup",
    )
    .await?;
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}
