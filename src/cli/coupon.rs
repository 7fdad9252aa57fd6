//! `arrears coupon grant`: a general or cash coupon for an account.

use std::process::ExitCode;

use anyhow::{Context, Result};
use arrears::domain::money::parse_amount;
use arrears::domain::settle::CouponKind;
use arrears::ledger;
use chrono::{DateTime, Utc};
use clap::{Subcommand, ValueEnum};

use super::output::print_json;
use super::{open_to_change, parse_instant, Env};

#[derive(Subcommand)]
pub enum CouponAction {
    /// Grant a coupon.
    Grant {
        account: String,
        amount: String,
        #[arg(long)]
        kind: CouponKindArg,
        #[arg(long, value_parser = parse_instant)]
        expires_at: DateTime<Utc>,
        /// The operator's reference of this grant: granted once, however often the command is
        /// retried (the same reference with other values is refused)
        #[arg(long)]
        reference: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CouponKindArg {
    General,
    Cash,
}

pub async fn run(env: &Env, action: CouponAction) -> Result<ExitCode> {
    let CouponAction::Grant {
        account,
        amount,
        kind,
        expires_at,
        reference,
    } = action;
    let digits = env.digits();
    let amount = parse_amount(&amount, digits).with_context(|| format!("amount {amount:?}"))?;
    let kind = match kind {
        CouponKindArg::Cash => CouponKind::Cash,
        CouponKindArg::General => CouponKind::General,
    };
    let db = open_to_change(&env.config, env.explicit_as_of).await?;
    let report = ledger::grant_coupon(
        &db,
        digits,
        &account,
        amount,
        kind,
        expires_at,
        env.as_of,
        reference.as_deref(),
    )
    .await?;
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}
