//! `arrears import accounts|resources|usage FILE`: a CSV file, all of it or nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use arrears::import::{self, ImportError, ImportKind};
use clap::ValueEnum;

use super::output::{print_bad_rows, print_json};
use super::{open_to_change, Env};

#[derive(clap::Args)]
pub struct ImportArgs {
    kind: ImportWhat,
    file: PathBuf,
    /// Check the file and report what it would import, writing nothing
    #[arg(long)]
    dry_run: bool,
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
    let kind = match args.kind {
        ImportWhat::Accounts => ImportKind::Accounts,
        ImportWhat::Resources => ImportKind::Resources,
        ImportWhat::Usage => ImportKind::Usage,
    };
    let result = import::import_file(&db, config, kind, file, as_of, args.dry_run).await;
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
