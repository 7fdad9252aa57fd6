//! `arrears bills ACCOUNT`: each day's bill, its lines, and what coupons and cash paid.

use std::process::ExitCode;

use anyhow::Result;
use arrears::queries;
use chrono::NaiveDate;

use super::output::{print_bills, print_json};
use super::{bad_input, open, Env};

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
    if let (Some(f), Some(t)) = (args.from, args.to) {
        if f > t {
            bad_input!("--from {f} is after --to {t}");
        }
    }
    let db = open(&env.config).await?;
    if !queries::account_exists(&db, &args.account).await? {
        bad_input!("unknown account {:?}", args.account);
    }
    let bills = queries::bills(&db, env.digits(), &args.account, args.from, args.to).await?;
    if args.json {
        print_json(&bills)?;
    } else {
        print_bills(&args.account, &bills, &env.config.billing.currency);
    }
    Ok(ExitCode::SUCCESS)
}
