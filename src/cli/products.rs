//! `arrears products`: every configured product with its policy and price list.

use std::process::ExitCode;

use anyhow::Result;

use super::output::{print_json, print_products};
use super::Env;

pub fn run(env: &Env, json: bool) -> Result<ExitCode> {
    if json {
        let products: Vec<_> = env.config.products.values().collect();
        print_json(&products)?;
    } else {
        print_products(&env.config);
    }
    Ok(ExitCode::SUCCESS)
}
