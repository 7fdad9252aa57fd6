//! `arrears demo`: the guided first run, its timeline printed as it happens.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

use super::output::{print_demo_header, print_demo_summary, print_json};
use super::Env;

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "arrears-demo")]
    out: PathBuf,
    /// The scratch database, dropped and created afresh on the embedded (or configured)
    /// server.
    #[arg(long, default_value = "arrears_demo")]
    database: String,
    /// Print the whole report as JSON instead of the timeline and tables.
    #[arg(long)]
    json: bool,
}

pub async fn run(env: &Env, args: DemoArgs) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    if !args.json {
        print_demo_header();
    }
    let report = arrears::demo::run(
        &env.config,
        &arrears::demo::DemoOptions {
            out_dir: args.out,
            database: args.database,
            print: !args.json,
        },
    )
    .await?;
    if args.json {
        print_json(&report)?;
    } else {
        print_demo_summary(&report, started.elapsed().as_secs_f64());
    }
    if !report.all_match {
        bail!("a final state differs from the one the scenario declares");
    }
    Ok(ExitCode::SUCCESS)
}
