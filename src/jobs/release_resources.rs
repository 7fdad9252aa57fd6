//! `release_resources`: R4 with the guards of R9 and R10. A suspended resource whose
//! retention is over, whose account has no legal hold, and whose release warnings were all
//! accepted at least `warning_min_age` earlier is released: marked released (the row stays as
//! its tombstone), with a lifecycle event and a delete order for its product's control plane.
//! Bills, ledger and usage are never touched. One run releases at most
//! max(`max_release_percent` of live resources, `release_always_allowed`) unless the operator
//! allows a mass release, and the job refuses to run when the service clock and the
//! database clock disagree by more than `max_clock_skew`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::resources;
use crate::db::Db;
use crate::domain::lifecycle::{release_check, NotReleased, ResourceState};
use crate::jobs::{in_slot, JobError, JobName, SlotReport, SlotRun};
use crate::lifecycle::{self, LifecycleError, Loaded};

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

#[derive(Debug, Clone, Serialize)]
pub struct Released {
    pub account_id: String,
    pub resource_id: String,
    pub product: String,
    pub reason: String,
    pub suspended_at: Option<DateTime<Utc>>,
    pub release_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReleaseReport {
    pub job: &'static str,
    pub slot: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub skipped: Option<String>,
    pub live_resources: i64,
    /// The most one run may release without --allow-mass-release.
    pub cap: i64,
    pub suspended_examined: usize,
    pub released_count: usize,
    /// The first resources released (or, on a dry run, that would be).
    pub released: Vec<Released>,
    /// Suspended resources kept, counted by why (retention_not_over, legal_hold, ...).
    pub kept: BTreeMap<String, usize>,
    pub errors: Vec<String>,
}

impl SlotReport for ReleaseReport {
    fn skipped(&mut self, why: String) {
        self.skipped = Some(why);
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
        job: JobName::ReleaseResources.as_str(),
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    let run = SlotRun {
        job: JobName::ReleaseResources,
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

fn why(n: &NotReleased) -> &'static str {
    match n {
        NotReleased::NotSuspended => "not_suspended",
        NotReleased::ArrearsPaid => "arrears_paid",
        NotReleased::ComplianceSuspension => "compliance_suspension",
        NotReleased::PolicyKeepsNonArrearsSuspensions => "non_arrears_suspension_kept_by_policy",
        NotReleased::LegalHold => "legal_hold",
        NotReleased::RetentionNotOver { .. } => "retention_not_over",
        NotReleased::WarningMissing { .. } => "release_warning_missing",
        NotReleased::WarningTooRecent { .. } => "release_warning_too_recent",
    }
}

/// The resources of `loaded` that may be released at `now`.
async fn releasable(
    conn: &mut AsyncPgConnection,
    config: &Config,
    loaded: &Loaded,
    now: DateTime<Utc>,
    kept: &mut BTreeMap<String, usize>,
) -> Result<Vec<Released>, LifecycleError> {
    let mut out = Vec::new();
    for (r, product) in &loaded.resources {
        let ResourceState::Suspended(reason) = r.state else {
            continue;
        };
        let Some(policy) = config.product(product).map(|p| &p.policy) else {
            *kept.entry("product_not_configured".into()).or_default() += 1;
            continue;
        };
        let warnings = match r.suspended_at {
            Some(p) => lifecycle::accepted_warnings(conn, &loaded.id, p).await?,
            None => vec![],
        };
        match release_check(
            &loaded.account,
            r,
            policy,
            &warnings,
            config.lifecycle.warning_min_age.to_chrono(),
            now,
        ) {
            Ok(release_at) => out.push(Released {
                account_id: loaded.id.clone(),
                resource_id: r.id.clone(),
                product: product.clone(),
                reason: reason.as_str().to_string(),
                suspended_at: r.suspended_at,
                release_at,
            }),
            Err(n) => *kept.entry(why(&n).to_string()).or_default() += 1,
        }
    }
    Ok(out)
}

async fn release(
    db: &Db,
    config: &Config,
    opts: &Options,
    report: &mut ReleaseReport,
) -> Result<(), JobError> {
    let mut conn = db.conn().await?;
    let min_retention = config
        .products
        .values()
        .map(|p| p.policy.retention.to_chrono())
        .min()
        .unwrap_or_default();
    let accounts_with_due: Vec<String> = resources::table
        .filter(resources::state.eq("suspended"))
        .filter(resources::suspended_at.le(opts.as_of - min_retention))
        .select(resources::account_id)
        .distinct()
        .order(resources::account_id)
        .load(&mut conn)
        .await
        .map_err(crate::db::DbError::Query)?;
    report.live_resources = resources::table
        .filter(resources::state.ne("released"))
        .count()
        .get_result(&mut conn)
        .await
        .map_err(crate::db::DbError::Query)?;
    report.cap = (report.live_resources * i64::from(config.lifecycle.max_release_percent) / 100)
        .max(i64::from(config.lifecycle.release_always_allowed));

    // First the plan, read-only, so the mass-release guard sees the whole run.
    let mut plan: Vec<Released> = Vec::new();
    for id in &accounts_with_due {
        let Some(loaded) = lifecycle::load(&mut conn, id, false)
            .await
            .map_err(lifecycle_err)?
        else {
            continue;
        };
        report.suspended_examined += loaded
            .resources
            .iter()
            .filter(|(r, _)| matches!(r.state, ResourceState::Suspended(_)))
            .count();
        plan.extend(
            releasable(&mut conn, config, &loaded, opts.as_of, &mut report.kept)
                .await
                .map_err(lifecycle_err)?,
        );
    }
    if plan.len() as i64 > report.cap && !opts.allow_mass_release {
        return Err(JobError::Refused(format!(
            "refusing a mass release: {} resources are due, but one run may release at most {} (max of {}% of {} live \
             resources and {}); check the plan with --dry-run, then rerun with --allow-mass-release",
            plan.len(),
            report.cap,
            config.lifecycle.max_release_percent,
            report.live_resources,
            config.lifecycle.release_always_allowed
        )));
    }
    if opts.dry_run {
        report.released_count = plan.len();
        report.released = plan.into_iter().take(LISTED).collect();
        return Ok(());
    }
    drop(conn);
    let cause = format!("release_resources@{}", opts.as_of.to_rfc3339());
    let mut by_account: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &plan {
        by_account
            .entry(p.account_id.clone())
            .or_default()
            .push(p.resource_id.clone());
    }
    for (account, planned) in by_account {
        match release_account(db, config, &account, &planned, opts.as_of, &cause).await {
            Ok(done) => {
                report.released_count += done.len();
                for d in done {
                    if report.released.len() < LISTED {
                        report.released.push(d);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(job = "release_resources", account_id = %account, error = %e, "account not released");
                if report.errors.len() < LISTED {
                    report.errors.push(format!("{account}: {e}"));
                }
            }
        }
    }
    Ok(())
}

fn lifecycle_err(e: LifecycleError) -> JobError {
    match e {
        LifecycleError::Db(d) => JobError::Db(d),
        other => JobError::Refused(other.to_string()),
    }
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
    let (account, planned, cause) = (account.to_string(), planned.to_vec(), cause.to_string());
    conn.transaction::<_, LifecycleError, _>(async move |conn| {
        let Some(loaded) = lifecycle::load(conn, &account, true).await? else {
            return Ok(vec![]);
        };
        let mut kept = BTreeMap::new();
        let due = releasable(conn, config, &loaded, now, &mut kept).await?;
        let mut done = Vec::new();
        for d in due.into_iter().filter(|d| planned.contains(&d.resource_id)) {
            diesel::update(resources::table.find((&account, &d.resource_id)))
                .set((
                    resources::state.eq("released"),
                    resources::released_at.eq(now),
                    resources::updated_at.eq(now),
                ))
                .execute(conn)
                .await?;
            lifecycle::record_event(
                conn,
                &account,
                Some(&d.resource_id),
                &format!("suspended ({})", d.reason),
                "released",
                "retention period over: released for good, its data deleted by the control plane",
                &cause,
                now,
            )
            .await?;
            lifecycle::record_order(
                conn,
                config,
                &account,
                &d.resource_id,
                &d.product,
                "release",
                Some(&d.reason),
                &cause,
                now,
            )
            .await?;
            done.push(d);
        }
        if !done.is_empty() {
            let r = crate::notify::recipient(conn, &account).await?;
            let extra = serde_json::json!({ "released_at": r.at(now) });
            let kind = crate::notify::NoticeKind::Released;
            crate::notify::notify_customer(conn, config, &r, kind, &now.to_rfc3339(), extra, now)
                .await?;
        }
        Ok(done)
    })
    .await
}
