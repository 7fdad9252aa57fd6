//! The jobs, one module each, named as in jobs/*.toml and on the CLI, and the record of
//! their runs (job, slot, start, end, status, report, error).

pub mod deliver_notifications;
pub mod enforce_suspensions;
pub mod generate_bills;
pub mod release_resources;
pub mod send_alerts;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::DbError;

/// Every job's one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum JobName {
    GenerateBills,
    EnforceSuspensions,
    ReleaseResources,
    SendAlerts,
    DeliverNotifications,
}

impl JobName {
    pub fn as_str(self) -> &'static str {
        match self {
            JobName::GenerateBills => "generate_bills",
            JobName::EnforceSuspensions => "enforce_suspensions",
            JobName::ReleaseResources => "release_resources",
            JobName::SendAlerts => "send_alerts",
            JobName::DeliverNotifications => "deliver_notifications",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Refused(String),
}

impl From<tokio_postgres::Error> for JobError {
    fn from(e: tokio_postgres::Error) -> Self {
        JobError::Db(DbError::Postgres(e))
    }
}

/// What claiming a slot found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The slot is ours to run (attempt number).
    Run(i32),
    /// The slot already finished successfully at this instant.
    AlreadyDone(DateTime<Utc>),
}

/// Claims `(job, slot)` in `job_runs`: a new slot, a failed one or (with `force`) a finished
/// one is (re)started; a finished one without `force` is reported as done.
pub async fn claim_slot(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
    as_of: DateTime<Utc>,
    force: bool,
) -> Result<Claim, JobError> {
    let row = client
        .query_opt(
            "INSERT INTO job_runs (job, slot, status, as_of, started_at)
             VALUES ($1, $2, 'running', $3, clock_timestamp())
             ON CONFLICT (job, slot) DO UPDATE SET
               status = 'running', attempts = job_runs.attempts + 1, as_of = excluded.as_of,
               started_at = excluded.started_at, finished_at = NULL, error = NULL
             WHERE job_runs.status <> 'succeeded' OR $4
             RETURNING attempts",
            &[&job.as_str(), &slot, &as_of, &force],
        )
        .await?;
    if let Some(r) = row {
        return Ok(Claim::Run(r.get(0)));
    }
    let done: Option<DateTime<Utc>> = client
        .query_one(
            "SELECT finished_at FROM job_runs WHERE job = $1 AND slot = $2",
            &[&job.as_str(), &slot],
        )
        .await?
        .get(0);
    Ok(Claim::AlreadyDone(done.unwrap_or(slot)))
}

/// Records the end of a claimed run with its report or error.
pub async fn finish_slot(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
    outcome: Result<&serde_json::Value, &str>,
) -> Result<(), JobError> {
    let (status, report, error) = match outcome {
        Ok(r) => ("succeeded", Some(r), None),
        Err(e) => ("failed", None, Some(e)),
    };
    client
        .execute(
            "UPDATE job_runs SET status = $3, report = $4, error = $5, finished_at = clock_timestamp()
             WHERE job = $1 AND slot = $2",
            &[&job.as_str(), &slot, &status, &report, &error],
        )
        .await?;
    Ok(())
}

/// Claims `(job, slot)` unless this is a dry run. Returns why the run is skipped when the slot
/// already finished (and `force` was not given).
pub async fn begin_slot(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
    as_of: DateTime<Utc>,
    force: bool,
    dry_run: bool,
) -> Result<Option<String>, JobError> {
    if dry_run {
        return Ok(None);
    }
    Ok(match claim_slot(client, job, slot, as_of, force).await? {
        Claim::AlreadyDone(at) => Some(format!(
            "slot already ran (finished {at}); use --force to run it again"
        )),
        Claim::Run(_) => None,
    })
}

/// Records the end of a slot claimed by `begin_slot` (nothing on a dry run): the report on
/// success, the error otherwise. The job's own error wins over a failure to record it.
pub async fn end_slot<R: Serialize>(
    client: &tokio_postgres::Client,
    job: JobName,
    slot: DateTime<Utc>,
    dry_run: bool,
    result: Result<(), JobError>,
    report: &R,
) -> Result<(), JobError> {
    if dry_run {
        return result;
    }
    let recorded = match &result {
        Ok(()) => {
            finish_slot(
                client,
                job,
                slot,
                Ok(&serde_json::to_value(report).unwrap_or_default()),
            )
            .await
        }
        Err(e) => finish_slot(client, job, slot, Err(&e.to_string())).await,
    };
    result?;
    recorded
}
