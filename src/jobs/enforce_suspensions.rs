//! `enforce_suspensions`: R2, R3, R5 and R6 applied on a schedule. Every account that might
//! need a change (not good, in arrears, compliance-locked, or owning a package that ran out
//! or expired, or a suspended resource) is evaluated at `as_of` and brought to the state the
//! rules give: grace over and unpaid -> suspended per policy; paid -> restored; package used
//! up with pay-as-you-go off -> quota_exhausted; package expired -> package_expired. Each
//! account is re-read and decided under its row lock in the transaction that applies the
//! decision, so a concurrent top-up always wins.

use chrono::{DateTime, Utc};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use serde::Serialize;

use crate::config::Config;
use crate::db::Db;
use crate::domain::lifecycle::evaluate;
use crate::jobs::{in_slot, JobError, JobName, SlotReport, SlotRun};
use crate::lifecycle::{self, Applied, LifecycleError};

const LISTED: usize = 100;

#[derive(Debug, Clone)]
pub struct Options {
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub force: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EnforceReport {
    pub job: &'static str,
    pub slot: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub skipped: Option<String>,
    pub accounts_evaluated: usize,
    /// More accounts were waiting than one run evaluates; the next run goes on.
    pub more_remaining: bool,
    pub accounts_changed: usize,
    pub resources_suspended: usize,
    pub resources_restored: usize,
    /// The first changes (or, on a dry run, the plan), by account.
    pub changes: Vec<Applied>,
    /// Accounts that could not be evaluated, with the error; the others went on.
    pub errors: Vec<String>,
}

impl SlotReport for EnforceReport {
    fn skipped(&mut self, why: String) {
        self.skipped = Some(why);
    }
}

pub async fn run(db: &Db, config: &Config, opts: &Options) -> Result<EnforceReport, JobError> {
    run_in_slot(db, config, opts, opts.as_of).await
}

/// Runs as the slot `slot`: the schedule's instant that the service or the CLI claims
/// (`run` uses `as_of` itself).
pub async fn run_in_slot(
    db: &Db,
    config: &Config,
    opts: &Options,
    slot: DateTime<Utc>,
) -> Result<EnforceReport, JobError> {
    let mut report = EnforceReport {
        job: JobName::EnforceSuspensions.as_str(),
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    let run = SlotRun {
        job: JobName::EnforceSuspensions,
        slot,
        as_of: opts.as_of,
        force: opts.force,
        dry_run: opts.dry_run,
    };
    in_slot(
        db,
        config,
        &mut client,
        run,
        &mut report,
        async |client, _, report| enforce(db, client, config, opts, report).await,
    )
    .await?;
    tracing::info!(job = report.job, slot = %slot, suspended = report.resources_suspended,
        restored = report.resources_restored, "enforce_suspensions finished");
    Ok(report)
}

async fn enforce(
    db: &Db,
    client: &tokio_postgres::Client,
    config: &Config,
    opts: &Options,
    report: &mut EnforceReport,
) -> Result<(), JobError> {
    let limit = config.lifecycle.enforce_max_accounts as i64;
    let ids: Vec<String> = client
        .query(
            "SELECT id FROM accounts
             WHERE state <> 'good' OR cash_balance + credit_quota < 0 OR compliance_locked
             UNION
             SELECT DISTINCT account_id FROM resources
             WHERE state = 'suspended' AND state_reason <> 'unsubscribed'
                OR (state = 'active' AND billing_mode = 'package'
                    AND (package_expires_at <= $1 OR (NOT payg_enabled AND package_used >= package_quota)))
             ORDER BY 1 LIMIT $2",
            &[&opts.as_of, &(limit + 1)],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    report.more_remaining = ids.len() as i64 > limit;
    let cause = format!("enforce_suspensions@{}", opts.as_of.to_rfc3339());
    for id in ids.iter().take(limit as usize) {
        report.accounts_evaluated += 1;
        match enforce_account(db, config, id, opts, &cause).await {
            Ok(applied) if applied.is_empty() => {}
            Ok(applied) => {
                report.accounts_changed += 1;
                report.resources_suspended += applied.suspended.len();
                report.resources_restored += applied.restored.len();
                if report.changes.len() < LISTED {
                    report.changes.push(applied);
                }
            }
            Err(e) => {
                tracing::warn!(job = "enforce_suspensions", account_id = %id, error = %e, "account not evaluated");
                if report.errors.len() < LISTED {
                    report.errors.push(format!("{id}: {e}"));
                }
            }
        }
    }
    Ok(())
}

pub async fn enforce_account(
    db: &Db,
    config: &Config,
    id: &str,
    opts: &Options,
    cause: &str,
) -> Result<Applied, LifecycleError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let (id, cause, as_of, dry_run) = (id.to_string(), cause.to_string(), opts.as_of, opts.dry_run);
    conn.transaction::<_, LifecycleError, _>(async move |conn| {
        let Some(loaded) = lifecycle::load(conn, &id, true).await? else {
            return Ok(Applied {
                account_id: id.clone(),
                ..Default::default()
            });
        };
        if dry_run {
            let eval = evaluate(&loaded.account, &loaded.with_policies(config), as_of);
            return Ok(lifecycle::describe(&id, &eval));
        }
        lifecycle::reconcile(conn, config, &loaded, as_of, &cause).await
    })
    .await
}
