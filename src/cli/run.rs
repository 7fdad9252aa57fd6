//! `arrears run JOB`: one run of a registered job now, its JSON report printed.

use std::process::ExitCode;

use anyhow::Result;
use arrears::jobs::{registry, DynJob, JobCtx, RunArgs};
use arrears::scheduler::Schedule;
use chrono::NaiveDate;

use super::output::print_outcome;
use super::{open_to_change, Env};

#[derive(clap::Args)]
pub struct RunCmd {
    #[arg(value_parser = registered_job())]
    job: &'static dyn DynJob,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run a slot that already finished (the job stays idempotent).
    #[arg(long)]
    force: bool,
    /// generate_bills: the billing day (default: the day before --as-of in the billing zone).
    #[arg(long)]
    day: Option<NaiveDate>,
    /// release_resources: release more than the configured safety fraction in one run.
    #[arg(long)]
    allow_mass_release: bool,
}

/// `JOB`: the names of the registered jobs are its possible values.
fn registered_job() -> impl clap::builder::TypedValueParser<Value = &'static dyn DynJob> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(registry::names())
        .try_map(|name| registry::find(&name).ok_or("not a registered job"))
}

pub async fn run(env: &Env, cmd: RunCmd) -> Result<ExitCode> {
    let db = open_to_change(&env.config, env.explicit_as_of.filter(|_| !cmd.dry_run)).await?;
    // The slot the schedule gives this instant, so that a one-off run and the service claim
    // the same slot and never both run it (generate_bills names its slot by its billing day).
    let schedule = Schedule::load(env.config.service.jobs_dir.as_deref())?;
    let job = cmd.job;
    let js = schedule.get(job.name());
    let slot = js
        .filter(|j| j.enabled)
        .and_then(|j| j.slot_at(env.as_of))
        .unwrap_or(env.as_of);
    let args = RunArgs {
        as_of: env.as_of,
        slot,
        resuming: false,
        dry_run: cmd.dry_run,
        force: cmd.force,
        day: cmd.day,
        allow_mass_release: cmd.allow_mass_release,
        // A one-off run of the dispatcher delivers every notice due at its instant, batch
        // after batch (a notice that fails waits for a later instant, and only notices that
        // existed when the run began are taken, so the run ends); the service's passes are
        // bounded and come every few seconds.
        max_batches: Some(usize::MAX),
    };
    let ctx = JobCtx {
        knobs: js.map(|j| &j.knobs),
        ..JobCtx::new(&db, &env.config)
    };
    print_outcome(job.run(ctx, &args).await)
}
