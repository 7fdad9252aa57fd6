//! `arrears bills ACCOUNT`: each day's bill, its lines, and what coupons and cash paid.

use std::process::ExitCode;

use anyhow::Result;
use arrears::queries;
use chrono::NaiveDate;

use super::output::{print_bills, print_json};
use super::{open, Env};

#[derive(clap::Args)]
pub struct BillsArgs {
    account: String,
    #[arg(long)]
    from: Option<NaiveDate>,
    #[arg(long)]
    to: Option<NaiveDate>,
    #[arg(long)]
    json: bool,
}

pub async fn run(env: &Env, args: BillsArgs) -> Result<ExitCode> {
    let db = open(&env.config).await?;
    let bills = queries::bills(&db, env.digits(), &args.account, args.from, args.to).await?;
    if args.json {
        print_json(&bills)?;
    } else {
        print_bills(&args.account, &bills, &env.config.billing.currency);
    }
    Ok(ExitCode::SUCCESS)
}
