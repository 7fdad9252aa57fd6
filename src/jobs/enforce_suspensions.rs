//! `enforce_suspensions`: R2, R3, R5 and R6 applied on a schedule, to the accounts that are
//! due (the due-work index: a grace deadline, a package expiry or a prepaid term end that has
//! come, or an input that changed). Each due account is decided on under its row lock in the
//! transaction that applies the decision, so a concurrent top-up always wins: grace over and
//! unpaid -> suspended per policy; paid -> restored; package used up with pay-as-you-go off ->
//! quota_exhausted; package expired -> package_expired; an episode opens (a debt without a
//! bill) or closes (paid, or nothing left live).

use chrono::{DateTime, Utc};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use serde::Serialize;

use crate::config::Config;
use crate::db::Db;
use crate::domain::lifecycle::evaluate;
use crate::jobs::registry::LifecycleKnobs;
use crate::jobs::{
    in_slot, Job, JobCtx, JobError, JobName, RunArgs, Simulated, SimulatedAt, SlotReport, SlotRun,
    Skipped,
};
use crate::lifecycle::apply::{self, Ctx};
use crate::lifecycle::effects::Effects;
use crate::lifecycle::policies::{self, PoliciesReport};
use crate::lifecycle::run::{run_due, DueStats, DueWork, RunOptions};
use crate::lifecycle::{self, Applied, DueJob, LifecycleError, Loaded};

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
    /// The runner holding the slot when this run was skipped for it (not done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// The lifecycle policies were recomputed first (they changed since the last run).
    pub policies: Option<PoliciesReport>,
    #[serde(flatten)]
    pub due: DueStats,
    /// More accounts were due than one run decides on; the next run goes on with them first.
    pub more_remaining: bool,
    pub accounts_changed: usize,
    pub resources_suspended: usize,
    pub resources_restored: usize,
    pub episodes_opened: usize,
    pub episodes_closed: usize,
    /// The first changes (or, on a dry run, the plan), by account.
    pub changes: Vec<Applied>,
    /// Accounts that could not be decided on, with the error; the others went on.
    pub errors: Vec<String>,
}

impl SlotReport for EnforceReport {
    fn skipped(&mut self, skip: &crate::jobs::Skip) {
        self.skipped = Some(skip.why());
        self.held_by = skip.held_by();
    }
}

/// What one batch adds to the report.
#[derive(Default)]
pub struct Tally {
    changed: Vec<Applied>,
}

struct Enforce {
    dry_run: bool,
    report: EnforceReport,
}

impl DueWork for Enforce {
    const JOB: DueJob = DueJob::EnforceSuspensions;
    type Tally = Tally;

    fn decide(&self, l: &mut Loaded, ctx: &Ctx, fx: &mut Effects, tally: &mut Tally) -> bool {
        let applied = if self.dry_run {
            apply::describe(
                &l.id,
                &evaluate(&l.account, &l.with_policies(ctx.config), ctx.now),
            )
        } else {
            apply::reconcile(l, ctx, fx)
        };
        let changed = !applied.is_empty();
        if changed {
            tally.changed.push(applied);
        }
        changed
    }

    fn merge(&mut self, tally: Tally) {
        let r = &mut self.report;
        for a in tally.changed {
            r.accounts_changed += 1;
            r.resources_suspended += a.suspended.len();
            r.resources_restored += a.restored.len();
            match a.episode.as_deref() {
                Some("opened") => r.episodes_opened += 1,
                Some(_) => r.episodes_closed += 1,
                None => {}
            }
            if r.changes.len() < LISTED {
                r.changes.push(a);
            }
        }
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
        job: EnforceSuspensions::NAME,
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    let run = SlotRun {
        job: JobName::of::<EnforceSuspensions>(),
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
        async |_, _, report| enforce(db, config, opts, report).await,
    )
    .await?;
    tracing::info!(job = report.job, slot = %slot, due = report.due.accounts_due,
        suspended = report.resources_suspended, restored = report.resources_restored,
        "enforce_suspensions finished");
    Ok(report)
}

async fn enforce(
    db: &Db,
    config: &Config,
    opts: &Options,
    report: &mut EnforceReport,
) -> Result<(), JobError> {
    if !opts.dry_run {
        report.policies = policies::ensure(db, config, opts.as_of).await?;
    }
    let mut work = Enforce {
        dry_run: opts.dry_run,
        report: std::mem::take(report),
    };
    let run = RunOptions {
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        batch_size: config.lifecycle.batch_size,
        max_accounts: config.lifecycle.enforce_max_accounts,
    };
    let cause = format!("enforce_suspensions@{}", opts.as_of.to_rfc3339());
    let mut errors = Vec::new();
    let stats = run_due(db, config, &run, &cause, &mut work, &mut errors).await;
    *report = work.report;
    report.due = stats?;
    report.errors = errors;
    report.more_remaining = report.due.deferred > 0;
    Ok(())
}

/// Decides on one account now, waiting for its lock (operators and tests; the job's runs
/// take due accounts in batches).
pub async fn enforce_account(
    db: &Db,
    config: &Config,
    id: &str,
    opts: &Options,
    cause: &str,
) -> Result<Applied, LifecycleError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let (as_of, dry_run) = (opts.as_of, opts.dry_run);
    conn.transaction::<_, LifecycleError, _>(async |conn| {
        let Some(loaded) = lifecycle::load(conn, id, true).await? else {
            return Ok(Applied {
                account_id: id.to_string(),
                ..Default::default()
            });
        };
        if dry_run {
            let eval = evaluate(&loaded.account, &loaded.with_policies(config), as_of);
            return Ok(apply::describe(id, &eval));
        }
        let ctx = Ctx::new(config, as_of, cause);
        let mut l = loaded;
        let mut fx = Effects::default();
        let applied = apply::reconcile(&mut l, &ctx, &mut fx);
        apply::finish(
            &l,
            &ctx,
            Some(DueJob::EnforceSuspensions),
            !applied.is_empty(),
            &mut fx,
        );
        fx.write(conn).await?;
        Ok(applied)
    })
    .await
}

/// The job, as registered in `jobs!`.
pub struct EnforceSuspensions;

impl Job for EnforceSuspensions {
    const NAME: &'static str = "enforce_suspensions";
    const SCHEDULE: &'static str = include_str!("../../jobs/enforce_suspensions.toml");
    const SIMULATED: Simulated = Simulated {
        at: SimulatedAt::EveryHour,
        order: 3,
    };

    type Options = Options;
    type Knobs = LifecycleKnobs;
    type Report = EnforceReport;

    fn options(args: &RunArgs, _: &Config, _: &LifecycleKnobs) -> Options {
        Options {
            as_of: args.as_of,
            dry_run: args.dry_run,
            force: args.force,
        }
    }

    async fn run(ctx: JobCtx<'_>, opts: &Options, slot: DateTime<Utc>) -> Result<EnforceReport, JobError> {
        run_in_slot(ctx.db, ctx.config, opts, slot).await
    }

    fn skipped(r: &EnforceReport) -> Option<Skipped> {
        Skipped::from_report(&r.skipped, &r.held_by)
    }
}
