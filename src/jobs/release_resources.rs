//! `release_resources`: R4 with the guards of R9 and R10, for the accounts that are due (the
//! due-work index: a release instant that has come, or a day after the last warning was
//! accepted). A suspended resource whose retention is over, whose account has no legal hold,
//! and whose release warnings for its current suspension (announcing its current release
//! instant) were all accepted at least `warning_min_age` earlier is released: marked released
//! (the row stays as its tombstone), with a lifecycle event and a delete order for its
//! product's control plane. Bills, ledger and usage are never touched. One run releases at
//! most max(`max_release_percent` of live resources, `release_always_allowed`) unless the
//! operator allows a mass release (the whole run is planned first, read-only), and the job
//! refuses to run when the service clock and the database clock disagree by more than
//! `max_clock_skew`.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::resources;
use crate::db::Db;
use crate::jobs::registry::LifecycleKnobs;
use crate::jobs::{
    in_slot, Job, JobCtx, JobError, JobName, RunArgs, Simulated, SimulatedAt, SlotReport, SlotRun,
    Skipped,
};
use crate::lifecycle::apply::{self, Ctx};
use crate::lifecycle::effects::Effects;
use crate::lifecycle::policies::{self, PoliciesReport};
use crate::lifecycle::run::{run_due, DueStats, DueWork, RunOptions};
use crate::lifecycle::{self, DueJob, LifecycleError, Loaded};

pub use crate::lifecycle::apply::Released;

const LISTED: usize = 100;

#[derive(Debug, Clone)]
pub struct Options {
    pub as_of: DateTime<Utc>,
    /// The service's own clock (not `as_of`, which travels), for the clock guard.
    pub service_now: DateTime<Utc>,
    pub dry_run: bool,
    pub force: bool,
    pub allow_mass_release: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReleaseReport {
    pub job: &'static str,
    pub slot: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub skipped: Option<String>,
    /// The runner holding the slot when this run was skipped for it (not done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    pub policies: Option<PoliciesReport>,
    #[serde(flatten)]
    pub due: DueStats,
    /// Live resources, when something was due (the base of the mass-release guard).
    pub live_resources: i64,
    /// The most one run may release without --allow-mass-release.
    pub cap: i64,
    pub suspended_examined: usize,
    pub released_count: usize,
    /// The first resources released (or, on a dry run, that would be).
    pub released: Vec<Released>,
    /// Suspended resources kept, counted by why (retention_not_over, legal_hold, ...).
    pub kept: BTreeMap<String, usize>,
    /// Accounts that could not be decided on, with the error; the others went on.
    pub errors: Vec<String>,
    /// Dry run only: why the run itself would be refused (R10: more due than `cap`, without
    /// --allow-mass-release); the plan above is what it would release with the override.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_be_refused: Option<String>,
}

impl SlotReport for ReleaseReport {
    fn skipped(&mut self, skip: &crate::jobs::Skip) {
        self.skipped = Some(skip.why());
        self.held_by = skip.held_by();
    }
}

#[derive(Default)]
pub struct Tally {
    examined: usize,
    released: Vec<Released>,
    kept: BTreeMap<String, usize>,
}

/// Plans (`planned` = None) or releases what the plan holds.
struct Release {
    dry_run: bool,
    planned: Option<HashSet<(String, String)>>,
    report: ReleaseReport,
}

impl DueWork for Release {
    const JOB: DueJob = DueJob::ReleaseResources;
    type Tally = Tally;

    fn decide(&self, l: &mut Loaded, ctx: &Ctx, fx: &mut Effects, tally: &mut Tally) -> bool {
        tally.examined += l
            .resources
            .iter()
            .filter(|(r, _)| r.suspension.is_some())
            .count();
        let mut due = apply::releasable(l, ctx, &mut tally.kept);
        if let Some(planned) = &self.planned {
            // Only what the guarded plan holds: a release that became possible since waits for
            // the next run's plan.
            due.retain(|d| planned.contains(&(d.account_id.clone(), d.resource_id.clone())));
        }
        if due.is_empty() {
            return false;
        }
        if !self.dry_run {
            apply::release(l, &due, ctx, fx);
        }
        tally.released.extend(due);
        true
    }

    fn merge(&mut self, tally: Tally) {
        let r = &mut self.report;
        r.suspended_examined += tally.examined;
        r.released_count += tally.released.len();
        for d in tally.released {
            if r.released.len() < LISTED {
                r.released.push(d);
            }
        }
        for (k, v) in tally.kept {
            *r.kept.entry(k).or_default() += v;
        }
    }
}

pub async fn run(db: &Db, config: &Config, opts: &Options) -> Result<ReleaseReport, JobError> {
    run_in_slot(db, config, opts, opts.as_of).await
}

/// Runs as the slot `slot`: the schedule's instant that the service or the CLI claims
/// (`run` uses `as_of` itself).
pub async fn run_in_slot(
    db: &Db,
    config: &Config,
    opts: &Options,
    slot: DateTime<Utc>,
) -> Result<ReleaseReport, JobError> {
    let db_now = db.database_now().await?;
    let skew = (opts.service_now - db_now).num_seconds().abs();
    if skew > config.lifecycle.max_clock_skew.seconds() {
        return Err(JobError::Refused(format!(
            "refusing to release: the service clock ({}) and the database clock ({db_now}) differ by {skew}s, more \
             than lifecycle.max_clock_skew ({})",
            opts.service_now, config.lifecycle.max_clock_skew
        )));
    }
    let mut report = ReleaseReport {
        job: ReleaseResources::NAME,
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    let run = SlotRun {
        job: JobName::of::<ReleaseResources>(),
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
        async |_, _, report| release(db, config, opts, report).await,
    )
    .await?;
    tracing::info!(job = report.job, slot = %slot, released = report.released_count, "release_resources finished");
    Ok(report)
}

async fn release(
    db: &Db,
    config: &Config,
    opts: &Options,
    report: &mut ReleaseReport,
) -> Result<(), JobError> {
    if !opts.dry_run {
        report.policies = policies::ensure(db, config, opts.as_of).await?;
    }
    let run = RunOptions {
        as_of: opts.as_of,
        dry_run: true,
        batch_size: config.lifecycle.batch_size,
        max_accounts: config.lifecycle.enforce_max_accounts,
    };
    let cause = format!("release_resources@{}", opts.as_of.to_rfc3339());
    // First the plan, read-only, so the mass-release guard sees the whole run.
    let mut plan = Release {
        dry_run: true,
        planned: None,
        report: ReleaseReport::default(),
    };
    let planned_stats = run_due(db, config, &run, &cause, &mut plan, &mut Vec::new()).await?;
    if planned_stats.accounts_due == 0 {
        report.due = planned_stats;
        return Ok(());
    }
    let mut conn = db.conn().await?;
    report.live_resources = resources::table
        .filter(resources::state.ne("released"))
        .count()
        .get_result(&mut conn)
        .await
        .map_err(crate::db::DbError::Query)?;
    drop(conn);
    report.cap = (report.live_resources * i64::from(config.lifecycle.max_release_percent) / 100)
        .max(i64::from(config.lifecycle.release_always_allowed));
    let due_count = plan.report.released_count as i64;
    let refusal = (due_count > report.cap && !opts.allow_mass_release).then(|| {
        format!(
            "refusing a mass release: {due_count} resources are due, but one run may release at most {} (max of {}% of {} live \
             resources and {}); check the plan with --dry-run, then rerun with --allow-mass-release",
            report.cap,
            config.lifecycle.max_release_percent,
            report.live_resources,
            config.lifecycle.release_always_allowed
        )
    });
    // A dry run shows the plan even when the run would be refused: the refusal tells the
    // operator to look at it.
    if opts.dry_run {
        let (live, cap) = (report.live_resources, report.cap);
        *report = ReleaseReport {
            job: report.job,
            slot: report.slot,
            as_of: report.as_of,
            dry_run: true,
            live_resources: live,
            cap,
            due: planned_stats,
            would_be_refused: refusal,
            ..plan.report
        };
        return Ok(());
    }
    if let Some(refusal) = refusal {
        return Err(JobError::Refused(refusal));
    }
    let mut work = Release {
        dry_run: false,
        planned: Some(
            all_planned(&plan.report, db, config, &run, &cause)
                .await?
                .into_iter()
                .collect(),
        ),
        report: std::mem::take(report),
    };
    let run = RunOptions {
        dry_run: false,
        ..run
    };
    let mut errors = Vec::new();
    let stats = run_due(db, config, &run, &cause, &mut work, &mut errors).await;
    *report = work.report;
    report.due = stats?;
    report.errors = errors;
    Ok(())
}

/// Every (account, resource) of the plan: the report lists only the first ones, so a second
/// read-only pass collects them all.
async fn all_planned(
    listed: &ReleaseReport,
    db: &Db,
    config: &Config,
    run: &RunOptions,
    cause: &str,
) -> Result<Vec<(String, String)>, JobError> {
    if listed.released.len() == listed.released_count {
        return Ok(listed
            .released
            .iter()
            .map(|d| (d.account_id.clone(), d.resource_id.clone()))
            .collect());
    }
    struct Collect(Vec<(String, String)>);
    impl DueWork for Collect {
        const JOB: DueJob = DueJob::ReleaseResources;
        type Tally = Vec<(String, String)>;
        fn decide(&self, l: &mut Loaded, ctx: &Ctx, _: &mut Effects, t: &mut Self::Tally) -> bool {
            let mut kept = BTreeMap::new();
            t.extend(
                apply::releasable(l, ctx, &mut kept)
                    .into_iter()
                    .map(|d| (d.account_id, d.resource_id)),
            );
            false
        }
        fn merge(&mut self, t: Self::Tally) {
            self.0.extend(t);
        }
    }
    let mut c = Collect(Vec::new());
    run_due(db, config, run, cause, &mut c, &mut Vec::new()).await?;
    Ok(c.0)
}

/// Re-checks and releases, under the account's lock, the planned resources that are still
/// releasable (a top-up since the plan restores them instead, and wins).
pub async fn release_account(
    db: &Db,
    config: &Config,
    account: &str,
    planned: &[String],
    now: DateTime<Utc>,
    cause: &str,
) -> Result<Vec<Released>, LifecycleError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction::<_, LifecycleError, _>(async |conn| {
        let Some(mut l) = lifecycle::load(conn, account, true).await? else {
            return Ok(vec![]);
        };
        let ctx = Ctx::new(config, now, cause);
        let mut kept = BTreeMap::new();
        let due: Vec<Released> = apply::releasable(&l, &ctx, &mut kept)
            .into_iter()
            .filter(|d| planned.contains(&d.resource_id))
            .collect();
        let mut fx = Effects::default();
        apply::release(&mut l, &due, &ctx, &mut fx);
        apply::finish(
            &l,
            &ctx,
            Some(DueJob::ReleaseResources),
            !due.is_empty(),
            &mut fx,
        );
        fx.write(conn).await?;
        Ok(due)
    })
    .await
}

/// The job, as registered in `jobs!`.
pub struct ReleaseResources;

impl Job for ReleaseResources {
    const NAME: &'static str = "release_resources";
    const SCHEDULE: &'static str = include_str!("../../jobs/release_resources.toml");
    const SIMULATED: Simulated = Simulated {
        at: SimulatedAt::EveryHour,
        order: 4,
    };

    type Options = Options;
    type Knobs = LifecycleKnobs;
    type Report = ReleaseReport;

    fn options(args: &RunArgs, _: &Config, _: &LifecycleKnobs) -> Options {
        Options {
            as_of: args.as_of,
            // The clock guard compares the real clock with the database's, whatever
            // instant the run acts at.
            service_now: Utc::now(),
            dry_run: args.dry_run,
            force: args.force,
            allow_mass_release: args.allow_mass_release,
        }
    }

    async fn run(ctx: JobCtx<'_>, opts: &Options, slot: DateTime<Utc>) -> Result<ReleaseReport, JobError> {
        run_in_slot(ctx.db, ctx.config, opts, slot).await
    }

    fn skipped(r: &ReleaseReport) -> Option<Skipped> {
        Skipped::from_report(&r.skipped, &r.held_by)
    }
}
