//! `send_alerts` (hourly): writes the customer notices that are due into the outbox, for the
//! accounts that are due (the due-work index), each notice once per (account, topic,
//! channel) whatever the number of runs:
//! - overdue: the first alert of an arrears episode, then reminders on the policy's cadence
//!   (counted from the first alert a channel accepted) until the grace deadline;
//! - suspension imminent: `notifications.suspension_imminent_lead` before the grace deadline;
//! - release warnings: each of the policy's leads before a suspension's release instant, for
//!   every suspension the policy releases (arrears, unsubscribed, and the package reasons when
//!   `release_non_arrears_suspensions` is on), whether or not the account owes money;
//! - balance low (R7): once per crossing below the account's threshold, re-armed above it.
//!
//! Every notice names the episode or suspension it is about, so a new episode always gets its
//! own alerts and a retry is never taken for a new notice. Missed hours collapse into one run.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::db::Db;
use crate::domain::alerts::AlertPlan;
use crate::domain::notice::NoticeKind;
use crate::jobs::registry::LifecycleKnobs;
use crate::jobs::{
    in_slot, Job, JobCtx, JobError, JobName, RunArgs, Simulated, SimulatedAt, SlotReport, SlotRun,
    Skipped,
};
use crate::lifecycle::apply::{self, Ctx};
use crate::lifecycle::effects::Effects;
use crate::lifecycle::policies::{self, PoliciesReport};
use crate::lifecycle::run::{run_due, DueStats, DueWork, RunOptions};
use crate::lifecycle::{DueJob, Loaded};

const LISTED: usize = 100;

#[derive(Debug, Clone)]
pub struct Options {
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub force: bool,
}

/// One notice a run wrote (or, on a dry run, would write), and why.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedView {
    pub account_id: String,
    pub kind: &'static str,
    pub channels: Vec<&'static str>,
    pub period: String,
    pub why: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AlertsReport {
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
    /// Notices written (or planned) per kind, counted once per channel.
    pub overdue: usize,
    pub overdue_reminders: usize,
    pub suspension_imminent: usize,
    pub release_warnings: usize,
    pub balance_low: usize,
    pub balance_alerts_rearmed: usize,
    /// The first notices written, or on a dry run the plan: for whom, which, and why.
    pub plan: Vec<PlannedView>,
    /// Accounts that could not be decided on, with the error; the others went on.
    pub errors: Vec<String>,
}

impl SlotReport for AlertsReport {
    fn skipped(&mut self, skip: &crate::jobs::Skip) {
        self.skipped = Some(skip.why());
        self.held_by = skip.held_by();
    }
}

#[derive(Default)]
pub struct Tally {
    planned: Vec<(String, AlertPlan, Vec<&'static str>)>,
}

struct Alerts {
    dry_run: bool,
    report: AlertsReport,
}

impl DueWork for Alerts {
    const JOB: DueJob = DueJob::SendAlerts;
    type Tally = Tally;

    fn decide(&self, l: &mut Loaded, ctx: &Ctx, fx: &mut Effects, tally: &mut Tally) -> bool {
        let plan = apply::alert_plan(l, ctx);
        if plan.is_empty() {
            return false;
        }
        if !self.dry_run {
            apply::apply_alerts(l, &plan, ctx, fx);
        }
        let mut channels = Vec::new();
        if l.contact.has_email {
            channels.push("email");
        }
        if l.contact.has_phone {
            channels.push("sms");
        }
        let changed = plan.disarm || plan.rearm;
        tally.planned.push((l.id.clone(), plan, channels));
        changed
    }

    fn merge(&mut self, tally: Tally) {
        let r = &mut self.report;
        for (account, plan, channels) in tally.planned {
            if plan.rearm {
                r.balance_alerts_rearmed += 1;
            }
            for n in plan.notices {
                let count = channels.len();
                match n.kind {
                    NoticeKind::Overdue => r.overdue += count,
                    NoticeKind::OverdueReminder => r.overdue_reminders += count,
                    NoticeKind::SuspensionImminent => r.suspension_imminent += count,
                    NoticeKind::ReleaseWarning => r.release_warnings += count,
                    NoticeKind::BalanceLow => r.balance_low += count,
                    _ => {}
                }
                if r.plan.len() < LISTED {
                    r.plan.push(PlannedView {
                        account_id: account.clone(),
                        kind: n.kind.as_str(),
                        channels: channels.clone(),
                        period: n.period,
                        why: n.why,
                    });
                }
            }
        }
    }
}

pub async fn run(db: &Db, config: &Config, opts: &Options) -> Result<AlertsReport, JobError> {
    run_in_slot(db, config, opts, opts.as_of).await
}

/// Runs as the slot `slot`: the schedule's instant that the service or the CLI claims
/// (`run` uses `as_of` itself).
pub async fn run_in_slot(
    db: &Db,
    config: &Config,
    opts: &Options,
    slot: DateTime<Utc>,
) -> Result<AlertsReport, JobError> {
    let mut report = AlertsReport {
        job: SendAlerts::NAME,
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    let run = SlotRun {
        job: JobName::of::<SendAlerts>(),
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
        async |_, _, report| alerts(db, config, opts, report).await,
    )
    .await?;
    Ok(report)
}

async fn alerts(
    db: &Db,
    config: &Config,
    opts: &Options,
    report: &mut AlertsReport,
) -> Result<(), JobError> {
    if !opts.dry_run {
        report.policies = policies::ensure(db, config, opts.as_of).await?;
    }
    let mut work = Alerts {
        dry_run: opts.dry_run,
        report: std::mem::take(report),
    };
    let run = RunOptions {
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        batch_size: config.lifecycle.batch_size,
        max_accounts: config.lifecycle.enforce_max_accounts,
    };
    let cause = format!("send_alerts@{}", opts.as_of.to_rfc3339());
    let mut errors = Vec::new();
    let stats = run_due(db, config, &run, &cause, &mut work, &mut errors).await;
    *report = work.report;
    report.due = stats?;
    report.errors = errors;
    Ok(())
}

/// The job, as registered in `jobs!`.
pub struct SendAlerts;

impl Job for SendAlerts {
    const NAME: &'static str = "send_alerts";
    const SCHEDULE: &'static str = include_str!("../../jobs/send_alerts.toml");
    const SIMULATED: Simulated = Simulated {
        at: SimulatedAt::EveryHour,
        order: 1,
    };

    type Options = Options;
    type Knobs = LifecycleKnobs;
    type Report = AlertsReport;

    fn options(args: &RunArgs, _: &Config, _: &LifecycleKnobs) -> Options {
        Options {
            as_of: args.as_of,
            dry_run: args.dry_run,
            force: args.force,
        }
    }

    async fn run(ctx: JobCtx<'_>, opts: &Options, slot: DateTime<Utc>) -> Result<AlertsReport, JobError> {
        run_in_slot(ctx.db, ctx.config, opts, slot).await
    }

    fn skipped(r: &AlertsReport) -> Option<Skipped> {
        Skipped::from_report(&r.skipped, &r.held_by)
    }
}
