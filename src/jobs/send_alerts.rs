//! `send_alerts` (hourly): decides which customer notices are due and writes them into the
//! outbox, each once per (account, kind, period, channel):
//! - overdue: the first alert of an arrears, then reminders on the policy's cadence (counted
//!   from the first alert a channel accepted) until the account is suspended;
//! - suspension imminent: `notifications.suspension_imminent_lead` before the grace deadline;
//! - release warnings: each of the policy's leads before a suspended resource's release;
//! - balance low (R7): once per crossing below the account's threshold, re-armed above it.
//! Hourly slots that were missed collapse into one: every decision is level-triggered.

use chrono::{DateTime, Duration, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::accounts;
use crate::db::{Db, DbError};
use crate::domain::lifecycle::{grace_deadline, AccountState, Reason, ResourceState};
use crate::domain::money::format_scaled;
use crate::jobs::{in_slot, JobError, JobName, SlotReport, SlotRun};
use crate::lifecycle::{self, LifecycleError};
use crate::notify::{self, NoticeKind};

#[derive(Debug, Clone)]
pub struct Options {
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub force: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AlertsReport {
    pub job: &'static str,
    pub slot: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub skipped: Option<String>,
    pub accounts_in_arrears: usize,
    pub overdue: usize,
    pub overdue_reminders: usize,
    pub suspension_imminent: usize,
    pub release_warnings: usize,
    pub balance_low: usize,
    pub balance_alerts_rearmed: usize,
    pub errors: Vec<String>,
}

impl SlotReport for AlertsReport {
    fn skipped(&mut self, why: String) {
        self.skipped = Some(why);
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
        job: JobName::SendAlerts.as_str(),
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    let run = SlotRun {
        job: JobName::SendAlerts,
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

#[derive(Default)]
struct Counts {
    overdue: usize,
    reminders: usize,
    imminent: usize,
    warnings: usize,
}

async fn alerts(
    db: &Db,
    config: &Config,
    opts: &Options,
    report: &mut AlertsReport,
) -> Result<(), JobError> {
    let mut conn = db.conn().await?;
    let limit = config.lifecycle.enforce_max_accounts as i64;
    let ids: Vec<String> = accounts::table
        .filter(diesel::dsl::sql::<diesel::sql_types::Bool>(
            "cash_balance + credit_quota < 0",
        ))
        .filter(accounts::compliance_locked.eq(false))
        .select(accounts::id)
        .order(accounts::id)
        .limit(limit)
        .load(&mut conn)
        .await
        .map_err(DbError::Query)?;
    report.accounts_in_arrears = ids.len();
    drop(conn);
    for id in ids {
        match account_alerts(db, config, &id, opts).await {
            Ok(c) => {
                report.overdue += c.overdue;
                report.overdue_reminders += c.reminders;
                report.suspension_imminent += c.imminent;
                report.release_warnings += c.warnings;
            }
            Err(e) => {
                tracing::warn!(job = "send_alerts", account_id = %id, error = %e, "account skipped");
                report.errors.push(format!("{id}: {e}"));
            }
        }
    }
    balance_alerts(db, config, opts, report).await
}

async fn account_alerts(
    db: &Db,
    config: &Config,
    id: &str,
    opts: &Options,
) -> Result<Counts, LifecycleError> {
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let (id, now, dry) = (id.to_string(), opts.as_of, opts.dry_run);
    conn.transaction::<_, LifecycleError, _>(async move |conn| {
        let mut c = Counts::default();
        let Some(loaded) = lifecycle::load(conn, &id, true).await? else {
            return Ok(c);
        };
        let a = &loaded.account;
        let Some(arrears_since) = a.arrears_since else {
            return Ok(c);
        };
        let r = notify::recipient(conn, &id).await?;
        let live: Vec<_> = loaded
            .with_policies(config)
            .into_iter()
            .filter(|(res, _)| res.state != ResourceState::Released)
            .collect();
        let deadline = live.iter().filter_map(|(_, p)| grace_deadline(a, p)).min();
        let min_grace = live
            .iter()
            .map(|(_, p)| p.grace.to_chrono())
            .min()
            .unwrap_or(Duration::hours(24));
        let cadence = live
            .iter()
            .map(|(_, p)| p.overdue_reminder_every.to_chrono())
            .min()
            .unwrap_or(Duration::hours(24));
        // Before the first alert is accepted the lcic clock has not started: the deadline is a
        // grace period from now.
        let shown_deadline = deadline.unwrap_or(now + min_grace);
        let since = arrears_since.to_rfc3339();
        let extra =
            serde_json::json!({ "deadline": r.at(shown_deadline), "_arrears_since": since });
        if dry {
            return Ok(c);
        }
        c.overdue += notify::notify_customer(
            conn,
            config,
            &r,
            NoticeKind::Overdue,
            &since,
            extra.clone(),
            now,
        )
        .await?;
        if a.state != AccountState::Suspended {
            // Reminders stop at the grace deadline: from then on the suspension notice speaks.
            if let (Some(first), true) =
                (a.first_overdue_alert_at, deadline.is_none_or(|d| now < d))
            {
                let n = (now - first).num_seconds() / cadence.num_seconds().max(1);
                if n >= 1 {
                    let period = format!("{since}:{n}");
                    c.reminders += notify::notify_customer(
                        conn,
                        config,
                        &r,
                        NoticeKind::OverdueReminder,
                        &period,
                        extra.clone(),
                        now,
                    )
                    .await?;
                }
            }
            if let Some(d) = deadline {
                if now >= d - config.notifications.suspension_imminent_lead.to_chrono() && now < d {
                    c.imminent += notify::notify_customer(
                        conn,
                        config,
                        &r,
                        NoticeKind::SuspensionImminent,
                        &d.to_rfc3339(),
                        extra.clone(),
                        now,
                    )
                    .await?;
                }
            }
        }
        for (res, policy) in &live {
            let (ResourceState::Suspended(reason), Some(suspended_at)) =
                (res.state, res.suspended_at)
            else {
                continue;
            };
            let releasable = reason == Reason::Arrears
                || reason == Reason::Unsubscribed
                || (matches!(reason, Reason::QuotaExhausted | Reason::PackageExpired)
                    && policy.release_non_arrears_suspensions);
            if !releasable {
                continue;
            }
            let release_at = suspended_at + policy.retention.to_chrono();
            for lead in &policy.release_warnings {
                if now >= release_at - lead.to_chrono() && now < release_at {
                    let period = format!("{}:{}", suspended_at.to_rfc3339(), lead.seconds());
                    let vars = serde_json::json!({
                        "release_at": r.at(release_at),
                        "lead": lead.to_string(),
                        "_period": suspended_at,
                        "_lead_seconds": lead.seconds(),
                    });
                    c.warnings += notify::notify_customer(
                        conn,
                        config,
                        &r,
                        NoticeKind::ReleaseWarning,
                        &period,
                        vars,
                        now,
                    )
                    .await?;
                }
            }
        }
        Ok(c)
    })
    .await
}

/// R7: funds (cash + credit quota + unexpired coupons) below the threshold alert once per
/// crossing; the alert re-arms when funds are back at or above it.
async fn balance_alerts(
    db: &Db,
    config: &Config,
    opts: &Options,
    report: &mut AlertsReport,
) -> Result<(), JobError> {
    let client = db.raw_client().await?;
    let rows = client
        .query(
            "SELECT a.id, a.cash_balance + a.credit_quota
                      + coalesce(sum(c.remaining) FILTER (WHERE c.expires_at > $1), 0)::bigint AS funds,
                    a.low_balance_threshold, a.balance_alert_armed
             FROM accounts a LEFT JOIN coupons c ON c.account_id = a.id
             WHERE a.low_balance_threshold IS NOT NULL AND NOT a.compliance_locked
             GROUP BY a.id",
            &[&opts.as_of],
        )
        .await?;
    let d = config.billing.minor_unit_digits;
    for row in rows {
        let (id, funds, threshold, armed): (String, i64, i64, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if opts.dry_run {
            continue;
        }
        if funds < threshold && armed {
            let mut pooled = db.conn().await?;
            let conn: &mut AsyncPgConnection = &mut pooled;
            let (id2, now) = (id.clone(), opts.as_of);
            let cur = config.billing.currency.clone();
            let sent = conn
                .transaction::<_, diesel::result::Error, _>(async move |conn| {
                    // Disarm only if still armed: a concurrent run sends nothing twice.
                    let n = diesel::update(
                        accounts::table
                            .find(&id2)
                            .filter(accounts::balance_alert_armed.eq(true)),
                    )
                    .set(accounts::balance_alert_armed.eq(false))
                    .execute(conn)
                    .await?;
                    if n == 0 {
                        return Ok(0);
                    }
                    let r = notify::recipient(conn, &id2).await?;
                    let extra = serde_json::json!({
                        "funds": format!("{} {cur}", format_scaled(funds, d)),
                        "threshold": format!("{} {cur}", format_scaled(threshold, d)),
                    });
                    notify::notify_customer(
                        conn,
                        config,
                        &r,
                        NoticeKind::BalanceLow,
                        &now.to_rfc3339(),
                        extra,
                        now,
                    )
                    .await
                })
                .await
                .map_err(DbError::Query)?;
            report.balance_low += sent;
        } else if funds >= threshold && !armed {
            let mut conn = db.conn().await?;
            diesel::update(accounts::table.find(&id))
                .set(accounts::balance_alert_armed.eq(true))
                .execute(&mut conn)
                .await
                .map_err(DbError::Query)?;
            report.balance_alerts_rearmed += 1;
        }
    }
    Ok(())
}
