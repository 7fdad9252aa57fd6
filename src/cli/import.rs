//! `arrears import accounts|resources|usage FILE`: a CSV file, all of it or nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use arrears::import::{self, ImportError};
use clap::ValueEnum;

use super::output::{print_bad_rows, print_json};
use super::{open_to_change, Env};

#[derive(clap::Args)]
pub struct ImportArgs {
    kind: ImportWhat,
    file: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ImportWhat {
    Accounts,
    Resources,
    Usage,
}

pub async fn run(env: &Env, args: ImportArgs) -> Result<ExitCode> {
    let (config, as_of, file) = (&env.config, env.as_of, &args.file);
    let db = open_to_change(config, env.explicit_as_of).await?;
    let result = match args.kind {
        ImportWhat::Accounts => import::import_accounts(&db, config, file, as_of).await,
        ImportWhat::Resources => import::import_resources(&db, config, file, as_of).await,
        ImportWhat::Usage => import::import_usage(&db, config, file, as_of).await,
    };
    match result {
        Ok(report) => print_json(&report)?,
        Err(ImportError::BadRows {
            file,
            count,
            errors,
        }) => {
            print_bad_rows(&file, count, &errors);
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(ExitCode::SUCCESS)
}
