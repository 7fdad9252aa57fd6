//! `arrears schedule`: the next slots of every enabled job.

use std::process::ExitCode;

use anyhow::Result;
use arrears::scheduler::{Cadence, JobSchedule, Schedule};
use chrono::{DateTime, SecondsFormat, Utc};

use super::output::{print_json, print_schedule};
use super::{parse_instant, Env};

#[derive(clap::Args)]
pub struct ScheduleArgs {
    /// Start after this instant (default: --as-of, or now).
    #[arg(long, value_parser = parse_instant)]
    from: Option<DateTime<Utc>>,
    /// Slots per job (1 to 10,000).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    count: u64,
    #[arg(long)]
    json: bool,
}

pub fn run(env: &Env, args: ScheduleArgs) -> Result<ExitCode> {
    let schedule = Schedule::load(env.config.service.jobs_dir.as_deref())?;
    let from = args.from.unwrap_or(env.as_of);
    let rows: Vec<serde_json::Value> = schedule
        .jobs
        .iter()
        .filter(|j| j.enabled)
        .map(|j| row(j, from, args.count as usize))
        .collect();
    if args.json {
        print_json(&rows)?;
    } else {
        print_schedule(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// A job's row: its cadence, where it was read from, and its next `count` slots.
fn row(j: &JobSchedule, from: DateTime<Utc>, count: usize) -> serde_json::Value {
    let (cron, slots) = match &j.cadence {
        Cadence::Cron { cron, .. } => {
            let slots = j
                .next_slots(from, count)
                .into_iter()
                .map(|t| {
                    serde_json::json!({
                        "utc": t.to_rfc3339_opts(SecondsFormat::Secs, true),
                        "local": t.with_timezone(&j.time_zone).to_rfc3339_opts(SecondsFormat::Secs, false),
                    })
                })
                .collect();
            (cron.as_str().to_string(), slots)
        }
        Cadence::Every(d) => (format!("every {}s (continuous)", d.as_secs()), Vec::new()),
    };
    serde_json::json!({
        "job": j.job.name(),
        "cron": cron,
        "time_zone": j.time_zone.name(),
        "source": j.origin,
        "slots": slots,
    })
}
