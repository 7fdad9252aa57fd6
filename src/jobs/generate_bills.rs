//! `generate_bills`: the daily bill of every account with usage (T+1), settled at once from
//! cash coupons, general cash coupons and cash, with R1's start of arrears.
//!
//! How a usage record is billed exactly once without touching it (usage is append-only and
//! marking ten million rows would cost more than rating them):
//! - each record has an arrival number `seq`; `billing_cursor.low_water_seq` says every
//!   record at or below it is billed, and each account's mark says every record of the
//!   account with `usage_day <= billed_through_day` and `seq <= billed_through_seq` is billed;
//! - a run first gathers, under a SHARE lock on `usage_records` (so that no import is half
//!   way through handing out lower numbers), the unbilled records above the low-water mark,
//!   aggregated per account, resource, meter and usage day, and sets aside the accounts it
//!   cannot bill (the day's bill exists already, or a meter lost its price);
//! - each batch of accounts then, in one transaction, writes the bills, lines, coupon draws,
//!   ledger entries, balances and the accounts' new marks, so a crash between batches leaves
//!   every account either billed and marked or untouched; the batches are rows of
//!   `job_batches` that any instance claims (FOR UPDATE SKIP LOCKED, in the batch's own
//!   transaction), and a resumed run recomputes the pre-pass, finding its earlier batches billed;
//! - at the end the low-water mark rises to just below the oldest record still unbilled.
//!
//! A record that arrives late (its day's bill already issued) is above its account's mark
//! and is billed by the next run, on that run's bill. Days are billed in order (a run for a
//! day before the latest billed one is refused), so marks only move forward. A
//! session-level advisory lock keeps two billing runs from interleaving.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::db::Db;
use crate::domain::calendar::{default_billing_day, end_of_day, start_of_day};
use crate::domain::money::{format_scaled, PRICE_DIGITS, QUANTITY_DIGITS};
use crate::jobs::{in_slot, JobError, JobName, SlotReport, SlotRun};

/// Arbitrary constant naming the billing run's advisory lock.
const BILLING_LOCK: i64 = 0x6172_7265_6172_7301;
/// Arbitrary constant naming the lock over `bill_candidates`: each batch holds it shared for
/// its transaction, a pre-pass exclusive while it rewrites the candidates (its helper
/// connections commit their ranges after its own transaction). Without it a batch of the same
/// run (resumed on another instance's helper) could read a helper's new candidates next to the
/// old ones its transaction had not yet deleted: the same record twice on one bill.
const CANDIDATES_LOCK: i64 = 0x6172_7265_6172_7302;
/// At most this many accounts are listed by name in a report.
const LISTED: usize = 100;

#[derive(Debug, Clone)]
pub struct Options {
    pub as_of: DateTime<Utc>,
    /// The billing day; default: the day before the one containing `as_of`.
    pub bill_day: Option<NaiveDate>,
    pub dry_run: bool,
    /// Re-run a slot that already succeeded (billing stays idempotent).
    pub force: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BillPreview {
    pub account_id: String,
    pub total: String,
    pub paid_cash_coupons: String,
    pub paid_general_coupons: String,
    pub paid_cash: String,
    pub lines: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerateBillsReport {
    pub job: &'static str,
    pub bill_day: NaiveDate,
    pub slot: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    /// Why nothing was done, when nothing was.
    pub skipped: Option<String>,
    /// The runner holding the slot when this run was skipped for it (not done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    pub currency: String,
    /// Unbilled usage records of the billing day or earlier.
    pub unbilled_records: i64,
    /// Of those, records of earlier days (late arrivals).
    pub late_records: i64,
    pub accounts_with_usage: i64,
    pub batches: usize,
    pub bills_issued: i64,
    pub lines: i64,
    /// Accounts whose bill for the day already existed: their new records go on the next
    /// day's bill.
    pub accounts_already_billed: i64,
    /// Accounts left unbilled because a meter they used has no price any more.
    pub accounts_skipped_unpriced: Vec<String>,
    /// Package overage recorded but not charged (pay-as-you-go off).
    pub lines_with_unbilled_overage: i64,
    pub total: String,
    pub paid_cash_coupons: String,
    pub paid_general_coupons: String,
    pub paid_cash: String,
    pub entered_arrears_count: i64,
    /// The first accounts (by id) that entered arrears in this run.
    pub entered_arrears: Vec<String>,
    /// Dry run only: the first bills (by account id) that would be issued.
    pub would_issue: Vec<BillPreview>,
    /// Days before `bill_day` that no run had billed, billed first by this run, in order
    /// (each in its own slot, as the service would have): one bill per account and day.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caught_up: Vec<CaughtUpDay>,
    /// Seconds spent per phase, summed over the batches this instance billed.
    pub timings: std::collections::BTreeMap<String, f64>,
    /// Batches billed by each instance (`host:pid`): any instance claims a run's batches.
    pub batches_by_instance: std::collections::BTreeMap<String, i64>,
}

/// A missed day a run billed before its own.
#[derive(Debug, Clone, Serialize)]
pub struct CaughtUpDay {
    pub bill_day: NaiveDate,
    pub bills_issued: i64,
    pub total: String,
    /// Why nothing was done that day, when nothing was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl SlotReport for GenerateBillsReport {
    fn skipped(&mut self, skip: &crate::jobs::Skip) {
        self.skipped = Some(skip.why());
        self.held_by = skip.held_by();
    }
}

fn lap_mark(
    timings: &mut std::collections::BTreeMap<String, f64>,
    phase: &str,
    lap: &mut std::time::Instant,
) {
    *timings.entry(phase.to_string()).or_insert(0.0) += lap.elapsed().as_secs_f64();
    *lap = std::time::Instant::now();
}

/// Bills the day (`opts.bill_day`, else the one before `as_of`'s), after any earlier day no run
/// has billed since the last one that was (PRODUCT.md: daily billing catches up every missed
/// day), each in its own slot, oldest first: a one-off run that names a later day does what the
/// service would have done. A dry run does not catch up (it would preview the later day with
/// the missed days' records as late ones): it is refused, naming the first missed day.
pub async fn run(
    db: &Db,
    config: &Config,
    opts: &Options,
) -> Result<GenerateBillsReport, JobError> {
    let tz = config.billing.time_zone;
    let day = opts
        .bill_day
        .unwrap_or_else(|| default_billing_day(opts.as_of, tz));
    let mut caught_up = Vec::new();
    if !opts.dry_run {
        for missed in missed_days(db, day, tz).await? {
            let r = run_day(
                db,
                config,
                &Options {
                    bill_day: Some(missed),
                    force: false,
                    ..opts.clone()
                },
                missed,
            )
            .await
            .map_err(|e| match e {
                JobError::Refused(why) => {
                    JobError::Refused(format!("billing day {missed}, billed first: {why}"))
                }
                e => {
                    tracing::warn!(job = GenerateBills::NAME, bill_day = %missed, error = %e,
                        "billing an earlier day first failed");
                    e
                }
            })?;
            let held_by = r.held_by.clone();
            caught_up.push(CaughtUpDay {
                bill_day: missed,
                bills_issued: r.bills_issued,
                total: r.total,
                skipped: r.skipped,
            });
            if let Some(owner) = held_by {
                // A live runner is billing the earlier day: this one waits for it (days go in
                // order), as a run whose own slot is held does (the CLI exits 75).
                let mut report = unrun(config, opts, day);
                report.skipped = Some(format!(
                    "billing day {missed} is being billed by {owner}; billing day {day} follows \
                     it: try again when it is done"
                ));
                report.held_by = Some(owner);
                report.caught_up = caught_up;
                return Ok(report);
            }
        }
    }
    let mut report = run_day(db, config, opts, day).await?;
    report.caught_up = caught_up;
    Ok(report)
}

/// The report of a run of `day` that did nothing (yet).
fn unrun(config: &Config, opts: &Options, day: NaiveDate) -> GenerateBillsReport {
    let mut report = GenerateBillsReport {
        job: GenerateBills::NAME,
        bill_day: day,
        slot: end_of_day(day, config.billing.time_zone),
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        currency: config.billing.currency.clone(),
        ..Default::default()
    };
    finish_amounts(&mut report, &BatchResult::default(), config);
    report
}

/// The days before `day` that are not billed, oldest first: a day whose run was interrupted
/// or failed (resumed, as the service would) and the days no run has billed
/// (`first_missed_day`).
async fn missed_days(db: &Db, day: NaiveDate, tz: chrono_tz::Tz) -> Result<Vec<NaiveDate>, JobError> {
    let client = db.raw_client().await?;
    let facts = BillingFacts::read(&client, end_of_day(day, tz)).await?;
    let open = facts.open.map(|slot| slot_day(slot, tz));
    let first = match (open, first_missed_day(facts.latest, facts.mark, day, tz)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(first
        .map(|first| first.iter_days().take_while(|d| *d < day).collect())
        .unwrap_or_default())
}

/// The billing day whose end is `slot`.
fn slot_day(slot: DateTime<Utc>, tz: chrono_tz::Tz) -> NaiveDate {
    (slot - chrono::Duration::seconds(1))
        .with_timezone(&tz)
        .date_naive()
}

/// What decides which days a run may bill: the last slot billed (`latest`), the furthest day
/// any account is billed through (`mark`), and the first run of an earlier day after `latest`
/// that did not finish (`open`: running elsewhere, interrupted or failed).
struct BillingFacts {
    latest: Option<DateTime<Utc>>,
    mark: Option<NaiveDate>,
    open: Option<DateTime<Utc>>,
}

impl BillingFacts {
    async fn read(
        client: &tokio_postgres::Client,
        slot: DateTime<Utc>,
    ) -> Result<BillingFacts, JobError> {
        // Raw SQL: a CTE read by scalar subqueries (with '-infinity'), which diesel cannot say.
        let row = client
            .query_one(
                "WITH done AS (
                   SELECT max(slot) AS latest FROM job_runs WHERE job = 'generate_bills' AND status = 'succeeded')
                 SELECT (SELECT latest FROM done),
                        (SELECT max(billed_through_day) FROM accounts),
                        (SELECT min(slot) FROM job_runs, done
                         WHERE job = 'generate_bills' AND status <> 'succeeded' AND slot < $1
                           AND slot > coalesce(done.latest, '-infinity'))",
                &[&slot],
            )
            .await?;
        Ok(BillingFacts {
            latest: row.get(0),
            mark: row.get(1),
            open: row.get(2),
        })
    }
}

/// The first day before `day` that no run has billed, given the last slot a run billed
/// (`latest`) and the furthest day any account is billed through (`mark`): none on a
/// database never billed (its first run starts the sequence) or when `day` follows on. Days
/// some accounts are billed past cannot be billed any more (days go in order): only an
/// earlier version's run past a gap, failed part way, leaves such days, and they are skipped.
fn first_missed_day(
    latest: Option<DateTime<Utc>>,
    mark: Option<NaiveDate>,
    day: NaiveDate,
    tz: chrono_tz::Tz,
) -> Option<NaiveDate> {
    let latest = latest.filter(|l| *l < start_of_day(day, tz))?;
    let first =
        default_billing_day(latest, tz).max(mark.unwrap_or(NaiveDate::MIN)) + chrono::Duration::days(1);
    (first < day).then_some(first)
}

async fn run_day(
    db: &Db,
    config: &Config,
    opts: &Options,
    day: NaiveDate,
) -> Result<GenerateBillsReport, JobError> {
    let tz = config.billing.time_zone;
    let slot = end_of_day(day, tz);
    if slot > opts.as_of {
        return Err(JobError::Refused(format!(
            "billing day {day} ({tz}) has not ended at {}: it ends at {slot}",
            opts.as_of
        )));
    }
    // Zero amounts until a run says otherwise (a skipped run reports them so).
    let mut report = unrun(config, opts, day);
    let mut client = db.raw_client().await?;
    if !opts.dry_run && !config.lifecycle.allow_future {
        // Bills are append-only and days are billed in order: a bill for a day that has not
        // ended by the database clock would refuse every real day before it, for ever.
        let now = db.database_now().await?;
        if slot > now {
            return Err(JobError::Refused(format!(
                "billing day {day} ({tz}) has not ended by the database clock ({now}); it ends at \
                 {slot}: bill it after that (a scratch database that travels in time: pass --allow-future)"
            )));
        }
    }
    if !opts.dry_run {
        // Checked before the claim, so that a refused run leaves no record behind.
        check_order(&client, day, slot, config.billing.time_zone).await?;
    }
    let run = SlotRun {
        job: JobName::of::<GenerateBills>(),
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
        async |client, lease, report| bill(db, lease, client, config, day, opts, report).await,
    )
    .await?;
    tracing::info!(job = report.job, slot = %slot, bills = report.bills_issued, dry_run = opts.dry_run, "generate_bills finished");
    Ok(report)
}

fn finish_amounts(report: &mut GenerateBillsReport, sums: &BatchResult, config: &Config) {
    let d = config.billing.minor_unit_digits;
    report.total = format_scaled(sums.total, d);
    report.paid_cash_coupons = format_scaled(sums.cash_coupons, d);
    report.paid_general_coupons = format_scaled(sums.general_coupons, d);
    report.paid_cash = format_scaled(sums.cash, d);
    report.bills_issued = sums.bills;
    report.lines = sums.lines;
    report.lines_with_unbilled_overage = sums.overage_lines;
    report.entered_arrears_count = sums.entered_count;
    let mut ids = sums.entered.clone();
    ids.sort();
    ids.truncate(LISTED);
    report.entered_arrears = ids;
}

/// What one batch did; stored with the batch so that the run's report adds up every batch,
/// whichever instance billed it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
struct BatchResult {
    bills: i64,
    lines: i64,
    overage_lines: i64,
    total: i64,
    cash_coupons: i64,
    general_coupons: i64,
    cash: i64,
    entered_count: i64,
    /// The first accounts (by id) of the batch that entered arrears.
    entered: Vec<String>,
    /// Accounts set aside because a meter they used has no price (the first, by id).
    #[serde(default)]
    unpriced: Vec<String>,
    #[serde(default)]
    unpriced_count: i64,
}

impl BatchResult {
    fn add(&mut self, o: &BatchResult) {
        self.bills += o.bills;
        self.lines += o.lines;
        self.overage_lines += o.overage_lines;
        self.total += o.total;
        self.cash_coupons += o.cash_coupons;
        self.general_coupons += o.general_coupons;
        self.cash += o.cash;
        self.entered_count += o.entered_count;
        self.entered.extend(o.entered.iter().cloned());
        self.entered.sort();
        self.entered.truncate(LISTED);
        self.unpriced_count += o.unpriced_count;
        self.unpriced.extend(o.unpriced.iter().cloned());
        self.unpriced.sort();
        // a resumed run's batches set aside again what its first attempt's batches did
        self.unpriced.dedup();
        self.unpriced.truncate(LISTED);
    }
}

fn batch_params(
    config: &Config,
    day: NaiveDate,
    slot: DateTime<Utc>,
    as_of: DateTime<Utc>,
) -> BatchParams {
    let digits = config.billing.minor_unit_digits;
    BatchParams {
        tz: config.billing.time_zone,
        slot,
        batch_size: config.billing.batch_size as i64,
        day,
        day_start: start_of_day(day, config.billing.time_zone),
        as_of,
        divisor: 10i64.pow(QUANTITY_DIGITS + PRICE_DIGITS - digits),
        digits,
        lo: String::new(),
        hi: String::new(),
        cause: format!("generate_bills@{}", slot.to_rfc3339()),
        workers: config.billing.workers.max(1),
    }
}

/// Days are billed in order: marks only move forward, and a late record of an earlier day goes
/// on the next bill rather than reopening an issued one. So a day is refused when a later one
/// is billed (wholly, or for some accounts by a run that failed part way), and while an
/// earlier day's run is still open (running elsewhere, interrupted or failed): billing past
/// it would bill its records on two bills, or never bill that day.
async fn check_order(
    client: &tokio_postgres::Client,
    day: NaiveDate,
    slot: DateTime<Utc>,
    tz: chrono_tz::Tz,
) -> Result<(), JobError> {
    let BillingFacts { latest, mark, open } = BillingFacts::read(client, slot).await?;
    if let Some(latest) = latest.filter(|l| *l > slot) {
        return Err(JobError::Refused(format!(
            "bills are issued up to the day ending {latest}; billing day {day} is earlier (late usage of an \
             earlier day is billed on the next day's bill)"
        )));
    }
    if let Some(mark) = mark.filter(|m| *m > day) {
        return Err(JobError::Refused(format!(
            "accounts are billed up to {mark}; billing day {day} is earlier (late usage of an earlier day is \
             billed on the next day's bill)"
        )));
    }
    if let Some(open) = open {
        let open_day = slot_day(open, tz);
        return Err(JobError::Refused(format!(
            "billing day {open_day} is not finished (its run was interrupted, failed or is \
             still running); days are billed in order: run `arrears run generate_bills --day \
             {open_day}` first, or let the service resume it"
        )));
    }
    // A day no run ever started (a one-off run that names a later day, an --as-of a day too
    // late): billed past, its records would go on the later day's bill as late ones and the
    // day would never have a bill of its own. The service runs every missed slot, oldest first.
    if let (Some(missing), Some(latest)) = (first_missed_day(latest, mark, day, tz), latest) {
        return Err(JobError::Refused(format!(
            "billing day {missing} has not been billed (bills are issued up to the day ending \
             {latest}); days are billed in order: run `arrears run generate_bills --day {missing}` \
             first, or let the service catch up"
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn bill(
    db: &Db,
    lease: &crate::jobs::SlotLease,
    client: &mut tokio_postgres::Client,
    config: &Config,
    day: NaiveDate,
    opts: &Options,
    report: &mut GenerateBillsReport,
) -> Result<(), JobError> {
    let params = batch_params(config, day, report.slot, opts.as_of);
    // Raw SQL: session advisory locks are functions the query builder does not know.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BILLING_LOCK])
        .await?;
    if opts.dry_run {
        // The same statements on private copies of the work tables: temporary tables come
        // first on the search path, so a dry run writes nothing another session can see.
        // Raw SQL: CREATE TEMP TABLE (LIKE ...) is DDL, which diesel's query builder does not say.
        client
            .batch_execute(
                "CREATE TEMP TABLE bill_candidates (LIKE public.bill_candidates INCLUDING INDEXES);
                 CREATE TEMP TABLE bill_skipped (LIKE public.bill_skipped INCLUDING INDEXES)",
            )
            .await?;
    }
    // Under the lock: a run that waited for another one sees what it did.
    let result = match check_order(client, day, report.slot, params.tz).await {
        Ok(()) if opts.dry_run => bill_locked(db, None, client, true, report, params).await,
        Ok(()) => bill_locked(db, Some(lease), client, false, report, params).await,
        Err(e) => Err(e),
    };
    let cleanup = if opts.dry_run {
        // Raw SQL: DROP TABLE is DDL, which diesel's query builder does not say.
        client
            .batch_execute("DROP TABLE IF EXISTS pg_temp.bill_candidates, pg_temp.bill_skipped")
            .await
    } else if result.is_ok() {
        let lap = std::time::Instant::now();
        let done = clean_up(client, report.slot).await;
        lap_mark(&mut report.timings, "clean_up", &mut { lap });
        done
    } else {
        Ok(())
    };
    // Raw SQL: session advisory locks are functions the query builder does not know.
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&BILLING_LOCK])
        .await?;
    let sums = result?;
    cleanup?;
    finish_amounts(report, &sums, config);
    Ok(())
}

/// Empties the work tables of a finished run: a TRUNCATE when they hold nothing else (the
/// usual case: deleting a night's candidates row by row cost a second per 100,000 accounts),
/// else a DELETE of the run's rows. Only one billing run is in progress at a time (the
/// advisory lock) and its batches are all done, so nothing else reads them.
async fn clean_up(
    client: &tokio_postgres::Client,
    slot: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    // Raw SQL: bill_candidates and bill_skipped have no key, so schema.rs cannot describe them.
    let others: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM bill_candidates WHERE slot <> $1)
                 OR EXISTS (SELECT 1 FROM bill_skipped WHERE slot <> $1)",
            &[&slot],
        )
        .await?
        .get(0);
    let tables = if others {
        "WITH a AS (DELETE FROM bill_candidates WHERE slot = $1),
              b AS (DELETE FROM bill_skipped WHERE slot = $1)"
    } else {
        // Raw SQL: TRUNCATE, which diesel's query builder does not say.
        client
            .batch_execute("TRUNCATE bill_candidates, bill_skipped")
            .await?;
        ""
    };
    // Raw SQL: a DELETE after optional data-modifying CTEs on the keyless work tables.
    client
        .execute(
            &format!("{tables} DELETE FROM job_batches WHERE job = 'generate_bills' AND slot = $1"),
            &[&slot],
        )
        .await?;
    Ok(())
}

#[derive(Clone)]
struct BatchParams {
    tz: chrono_tz::Tz,
    slot: DateTime<Utc>,
    batch_size: i64,
    day: NaiveDate,
    day_start: DateTime<Utc>,
    as_of: DateTime<Utc>,
    divisor: i64,
    digits: u32,
    lo: String,
    hi: String,
    cause: String,
    workers: usize,
}

impl BatchParams {
    fn day_start_for(&self, day: NaiveDate) -> DateTime<Utc> {
        start_of_day(day, self.tz)
    }
}

async fn bill_locked(
    db: &Db,
    lease: Option<&crate::jobs::SlotLease>,
    client: &mut tokio_postgres::Client,
    dry_run: bool,
    report: &mut GenerateBillsReport,
    params: BatchParams,
) -> Result<BatchResult, JobError> {
    let mut lap = std::time::Instant::now();
    // A dry run works on private (temporary) copies of the work tables, which only its own
    // connection sees.
    let params = BatchParams {
        workers: if dry_run { 1 } else { params.workers },
        ..params
    };
    crate::db::stats::refresh_stale_raw(client, crate::db::stats::BILLING).await;
    prepass(db, client, &params, dry_run, report).await?;
    lap_mark(&mut report.timings, "prepass", &mut lap);
    let bounds = batch_bounds(client, &params).await?;
    report.batches = bounds.len();
    if dry_run {
        let mut sums = BatchResult::default();
        for (lo, hi) in bounds {
            let p = BatchParams {
                lo,
                hi,
                ..params.clone()
            };
            let tx = client.transaction().await?;
            let r = bill_batch(&tx, &p, true, report).await?;
            tx.rollback().await?;
            sums.add(&r);
        }
        finish_skipped(report, &sums);
        return Ok(sums);
    }
    queue_batches(client, params.slot, bounds).await?;
    lap_mark(&mut report.timings, "plan_batches", &mut lap);
    drain(db, lease, client, &params, report).await?;
    lap = std::time::Instant::now();
    let sums = collect(client, params.slot, report).await?;
    finish_skipped(report, &sums);
    // Raw SQL: subqueries over bill_candidates and bill_skipped, which schema.rs does not describe.
    client
        .execute(
            "UPDATE billing_cursor SET low_water_seq = greatest(low_water_seq, coalesce(
               (SELECT min(min_seq) - 1 FROM bill_candidates
                WHERE slot = $2 AND (usage_day > $1
                      OR account_id IN (SELECT account_id FROM bill_skipped WHERE slot = $2))),
               (SELECT max(max_seq) FROM bill_candidates WHERE slot = $2),
               low_water_seq))",
            &[&params.day, &params.slot],
        )
        .await?;
    lap_mark(&mut report.timings, "finish", &mut lap);
    Ok(sums)
}

/// Pre-pass: what is unbilled, in one scan above the low-water mark, aggregated per account,
/// resource, meter and day into `bill_candidates`; accounts whose bill of the day exists are
/// set aside (their new records wait for the next day's bill: the account's mark says so, set
/// with the bill). A resumed run does it again: accounts its earlier attempt billed are then
/// found billed. Fills the report's counts.
///
/// With `billing.workers` > 1 the accounts are split in ranges, each aggregated on its own
/// connection in the same snapshot (exported by the transaction that holds the lock), so
/// that they see exactly the same records.
async fn prepass(
    db: &Db,
    client: &mut tokio_postgres::Client,
    params: &BatchParams,
    dry_run: bool,
    report: &mut GenerateBillsReport,
) -> Result<(), JobError> {
    // The helpers' connections before the lock: this instance's own batch workers may hold
    // pooled connections while they wait for it.
    let mut helpers = Vec::new();
    for _ in 1..params.workers {
        helpers.push(db.raw_client().await?);
    }
    // Session-level, released below whatever happens (and by the pool's recycling, or the
    // server when the connection dies): a batch (shared, per transaction) reads the candidates
    // either before the rewrite or after all of it. A dry run rewrites private copies.
    if !dry_run {
        // Raw SQL: session advisory locks are functions the query builder does not know.
        client
            .execute("SELECT pg_advisory_lock($1)", &[&CANDIDATES_LOCK])
            .await?;
    }
    let done = rewrite_candidates(client, &mut helpers, params, report).await;
    if !dry_run {
        // Raw SQL: session advisory locks are functions the query builder does not know.
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&CANDIDATES_LOCK])
            .await;
        done?;
        unlocked?;
    } else {
        done?;
    }
    // Statistics for the batches' plans: the table was empty when last analyzed.
    // Raw SQL: ANALYZE is a utility command, which diesel cannot issue.
    client.batch_execute("ANALYZE bill_candidates").await?;
    Ok(())
}

/// The pre-pass under `CANDIDATES_LOCK`. The helpers' transactions commit after the main one:
/// if this process dies in between, the helpers' ranges have no candidates (a batch then
/// bills none of them, and the next attempt's pre-pass finds them unbilled) rather than new
/// ones beside the old ones the main transaction's rollback restored.
async fn rewrite_candidates(
    client: &mut tokio_postgres::Client,
    pool: &mut [crate::db::RawClient],
    params: &BatchParams,
    report: &mut GenerateBillsReport,
) -> Result<(), JobError> {
    let slot = params.slot;
    let tx = client.transaction().await?;
    // Raw SQL: bill_candidates and bill_skipped have no key, so schema.rs cannot describe them.
    tx.execute("DELETE FROM bill_candidates WHERE slot = $1", &[&slot])
        .await?;
    tx.execute("DELETE FROM bill_skipped WHERE slot = $1", &[&slot])
        .await?;
    // No import is half way through handing out lower numbers while the low-water mark is
    // read (SHARE).
    // Raw SQL: diesel has no LOCK TABLE, nor SET LOCAL.
    tx.batch_execute("LOCK TABLE usage_records IN SHARE MODE; SET LOCAL work_mem = '256MB'")
        .await?;
    // Raw SQL: read under this transaction's SHARE lock, which a diesel connection would not hold.
    let low: i64 = tx
        .query_one("SELECT low_water_seq FROM billing_cursor", &[])
        .await?
        .get(0);
    let mut splits = split_points(&tx, params.workers).await?;
    // One helper connection per split (there are `workers - 1` of each).
    splits.truncate(pool.len());
    let mut helpers = Vec::new();
    if !splits.is_empty() {
        // Raw SQL: pg_export_snapshot() is a function the query builder does not know.
        let snapshot: String = tx
            .query_one("SELECT pg_export_snapshot()", &[])
            .await?
            .get(0);
        for c in pool.iter_mut().take(splits.len()) {
            helpers.push((c, snapshot.clone()));
        }
    }
    // Range k is [bounds[k], bounds[k+1]), None: unbounded.
    let mut bounds: Vec<Option<String>> = vec![None];
    bounds.extend(splits.into_iter().map(Some));
    bounds.push(None);
    let mine = aggregate(&tx, low, params, &bounds[0], &bounds[1]);
    let theirs = helpers
        .iter_mut()
        .zip(bounds.windows(2).skip(1))
        .map(|((c, snapshot), w)| aggregate_in(c, snapshot, low, params, &w[0], &w[1]));
    let (mine, theirs) =
        futures_util::future::join(mine, futures_util::future::try_join_all(theirs)).await;
    let mut counts = mine?;
    let mut open = Vec::new();
    for (helper_tx, c) in theirs? {
        open.push(helper_tx);
        for (total, part) in counts.iter_mut().zip(c) {
            *total += part;
        }
    }
    tx.commit().await?;
    for helper_tx in open {
        helper_tx.commit().await?;
    }
    report.accounts_with_usage = counts[0];
    report.unbilled_records = counts[1];
    report.late_records = counts[2];
    report.accounts_already_billed = counts[3];
    Ok(())
}

/// Account ids that split the accounts into `workers` ranges of about the same size, from
/// the planner's histogram (no scan); none for one worker or a table without statistics.
async fn split_points(
    tx: &tokio_postgres::Transaction<'_>,
    workers: usize,
) -> Result<Vec<String>, JobError> {
    if workers < 2 {
        return Ok(Vec::new());
    }
    // Raw SQL: pg_stats is a catalog view; its histogram_bounds is anyarray (read as text).
    let bounds: Option<String> = tx
        .query_opt(
            "SELECT histogram_bounds::text FROM pg_stats
             WHERE schemaname = current_schema() AND tablename = 'accounts' AND attname = 'id'",
            &[],
        )
        .await?
        .and_then(|r| r.get(0));
    let Some(bounds) = bounds else {
        return Ok(Vec::new());
    };
    // Raw SQL: a cast of the histogram's text to text[], parsed by PostgreSQL's array input.
    let bounds: Vec<String> = tx
        .query_one("SELECT $1::text::text[]", &[&bounds])
        .await?
        .get(0);
    if bounds.len() < workers * 2 {
        return Ok(Vec::new());
    }
    let mut splits: Vec<String> = (1..workers)
        .map(|k| bounds[k * (bounds.len() - 1) / workers].clone())
        .collect();
    splits.dedup();
    Ok(splits)
}

/// `aggregate` on a helper connection, in the snapshot `snapshot` of the pre-pass; its
/// transaction is returned open, for the caller to commit after its own.
async fn aggregate_in<'a>(
    client: &'a mut tokio_postgres::Client,
    snapshot: &str,
    low: i64,
    params: &BatchParams,
    from: &Option<String>,
    to: &Option<String>,
) -> Result<(tokio_postgres::Transaction<'a>, [i64; 4]), JobError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    // Raw SQL: the snapshot is a literal of SET TRANSACTION (no parameters there); it comes
    // from pg_export_snapshot(), digits and dashes only.
    if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(JobError::Refused(format!("unexpected snapshot name {snapshot:?}")));
    }
    tx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{snapshot}'; SET LOCAL work_mem = '256MB'"
    ))
    .await?;
    let counts = aggregate(&tx, low, params, from, to).await?;
    Ok((tx, counts))
}

/// The pre-pass of the accounts in `[from, to)`: candidates and already-billed accounts
/// written, and their counts (accounts with usage, records, late records, already billed).
async fn aggregate(
    tx: &tokio_postgres::Transaction<'_>,
    low: i64,
    params: &BatchParams,
    from: &Option<String>,
    to: &Option<String>,
) -> Result<[i64; 4], JobError> {
    // Raw SQL: data-modifying CTEs writing two tables from one aggregation.
    let row = tx
        .query_one(
            "WITH agg AS MATERIALIZED (
               SELECT u.account_id, u.resource_id, u.meter, u.usage_day, count(*)::int AS records,
                      sum(u.quantity)::bigint AS quantity, min(u.seq) AS min_seq, max(u.seq) AS max_seq,
                      coalesce(bool_or(a.billed_through_day >= $3), false) AS billed
               FROM usage_records u
               JOIN accounts a ON a.id = u.account_id
               WHERE u.seq > $1
                 AND ($4::text IS NULL OR u.account_id >= $4) AND ($5::text IS NULL OR u.account_id < $5)
                 AND ($4::text IS NULL OR a.id >= $4) AND ($5::text IS NULL OR a.id < $5)
                 AND (a.billed_through_day IS NULL OR u.usage_day > a.billed_through_day
                      OR u.seq > a.billed_through_seq)
               GROUP BY u.account_id, u.resource_id, u.meter, u.usage_day
             ), candidates AS (
               -- in account order: a batch then reads a few hundred consecutive pages, not a
               -- page per row scattered over the whole table (at 1,000,000 accounts that was
               -- 15,000 pages read, hint bits set and written back per batch: 2 s of it)
               INSERT INTO bill_candidates
               SELECT $2, account_id, resource_id, meter, usage_day, records, quantity, min_seq, max_seq
               FROM agg ORDER BY account_id
             ), billed AS (
               INSERT INTO bill_skipped
               SELECT DISTINCT $2::timestamptz, account_id, 'already_billed' FROM agg WHERE billed AND usage_day <= $3
               RETURNING 1
             )
             SELECT count(DISTINCT account_id) FILTER (WHERE usage_day <= $3),
                    coalesce(sum(records) FILTER (WHERE usage_day <= $3), 0)::bigint,
                    coalesce(sum(records) FILTER (WHERE usage_day < $3), 0)::bigint,
                    (SELECT count(*) FROM billed)
             FROM agg",
            &[&low, &params.slot, &params.day, from, to],
        )
        .await?;
    Ok([row.get(0), row.get(1), row.get(2), row.get(3)])
}

/// The run's batches: `batch_size` accounts each, in account order.
async fn batch_bounds(
    client: &tokio_postgres::Client,
    params: &BatchParams,
) -> Result<Vec<(String, String)>, JobError> {
    // Raw SQL: a window function (row_number()) over bill_candidates, which schema.rs lacks.
    Ok(client
        .query(
            "SELECT min(account_id), max(account_id) FROM (
               SELECT account_id, (row_number() OVER (ORDER BY account_id) - 1) / $2 AS b
               FROM (SELECT DISTINCT account_id FROM bill_candidates
                     WHERE slot = $3 AND usage_day <= $1
                       AND account_id NOT IN (SELECT account_id FROM bill_skipped WHERE slot = $3)) x) y
             GROUP BY b ORDER BY b",
            &[&params.day, &params.batch_size, &params.slot],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The batches go to the database, where this instance and any other claim them.
async fn queue_batches(
    client: &tokio_postgres::Client,
    slot: DateTime<Utc>,
    bounds: Vec<(String, String)>,
) -> Result<(), JobError> {
    // Raw SQL: on the run's raw connection; the INSERT is over unnest(...) WITH ORDINALITY.
    client
        .execute(
            "DELETE FROM job_batches WHERE job = 'generate_bills' AND slot = $1 AND status = 'pending'",
            &[&slot],
        )
        .await?;
    let first: i32 = client
        .query_one(
            "SELECT coalesce(max(batch_no), 0) + 1 FROM job_batches WHERE job = 'generate_bills' AND slot = $1",
            &[&slot],
        )
        .await?
        .get(0);
    let (los, his): (Vec<String>, Vec<String>) = bounds.into_iter().unzip();
    client
        .execute(
            "INSERT INTO job_batches (job, slot, batch_no, lo, hi)
             SELECT 'generate_bills', $1, $2::int + n::int - 1, lo, hi
             FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS b(lo, hi, n)",
            &[&slot, &first, &los, &his],
        )
        .await?;
    Ok(())
}

/// Bills the run's pending batches on `billing.workers` connections at once (this one and
/// more from the pool), then waits for the batches other instances hold (a batch whose
/// instance died is pending again and claimed here).
async fn drain(
    db: &Db,
    lease: Option<&crate::jobs::SlotLease>,
    client: &mut tokio_postgres::Client,
    params: &BatchParams,
    report: &mut GenerateBillsReport,
) -> Result<(), JobError> {
    let slot = params.slot;
    let mut helpers = Vec::new();
    for _ in 1..params.workers {
        helpers.push(db.raw_client().await?);
    }
    loop {
        let mine = work_batches(db, lease, client, params);
        let theirs = helpers
            .iter_mut()
            .map(|c| work_batches(db, lease, c, params));
        let (mine, theirs) =
            futures_util::future::join(mine, futures_util::future::join_all(theirs)).await;
        for timings in std::iter::once(mine).chain(theirs) {
            for (phase, secs) in timings? {
                *report.timings.entry(phase).or_insert(0.0) += secs;
            }
        }
        // Raw SQL: a count on the run's raw connection, which diesel does not drive.
        let pending: i64 = client
            .query_one(
                "SELECT count(*) FROM job_batches WHERE job = 'generate_bills' AND slot = $1 AND status = 'pending'",
                &[&slot],
            )
            .await?
            .get(0);
        if pending == 0 {
            return Ok(());
        }
        if db.stopping() {
            return Err(JobError::Interrupted);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// One worker of `drain`: bills free batches of the run on `client` until none is left.
/// Returns its phase timings.
async fn work_batches(
    db: &Db,
    lease: Option<&crate::jobs::SlotLease>,
    client: &mut tokio_postgres::Client,
    params: &BatchParams,
) -> Result<std::collections::BTreeMap<String, f64>, JobError> {
    let mut mine = GenerateBillsReport::default();
    while let Some(done) = work_one_batch(client, params, Some(params.slot), &mut mine).await? {
        tracing::debug!(job = "generate_bills", slot = %params.slot, batch = done, "batch billed");
        if db.stopping() {
            return Err(JobError::Interrupted);
        }
        if lease.is_some_and(|l| l.lost()) {
            return Err(JobError::LeaseLost);
        }
    }
    Ok(mine.timings)
}

/// What the run's batches did, whichever instance billed them.
async fn collect(
    client: &tokio_postgres::Client,
    slot: DateTime<Utc>,
    report: &mut GenerateBillsReport,
) -> Result<BatchResult, JobError> {
    let mut sums = BatchResult::default();
    // Raw SQL: a read on the run's raw connection, which diesel does not drive.
    for r in client
        .query(
            "SELECT result, done_by FROM job_batches WHERE job = 'generate_bills' AND slot = $1 AND status = 'done'",
            &[&slot],
        )
        .await?
    {
        let by: Option<String> = r.get(1);
        *report
            .batches_by_instance
            .entry(by.unwrap_or_default())
            .or_insert(0) += 1;
        let v: Option<serde_json::Value> = r.get(0);
        if let Some(b) = v.and_then(|v| serde_json::from_value::<BatchResult>(v).ok()) {
            sums.add(&b);
        }
    }
    Ok(sums)
}

/// Accounts left unbilled because a meter they used has no price at the bill day (set aside
/// whole by their batch: billing part of a day would hide the rest; fix the price list and
/// run again).
fn finish_skipped(report: &mut GenerateBillsReport, sums: &BatchResult) {
    report.accounts_skipped_unpriced = sums.unpriced.clone();
    if !report.accounts_skipped_unpriced.is_empty() {
        tracing::warn!(
            job = "generate_bills",
            accounts = sums.unpriced_count,
            "accounts left unbilled: a meter they used has no price"
        );
    }
}

/// Claims one pending batch (of `slot`, or of any running billing slot when `None`) and bills
/// it, claim and bills in one transaction. Returns the batch number, or `None` when no batch
/// is free.
async fn work_one_batch(
    client: &mut tokio_postgres::Client,
    params: &BatchParams,
    slot: Option<DateTime<Utc>>,
    report: &mut GenerateBillsReport,
) -> Result<Option<i32>, JobError> {
    let tx = client.transaction().await?;
    // The candidates are not being rewritten while this batch reads them (CANDIDATES_LOCK).
    // Raw SQL: advisory locks are functions the query builder does not know.
    tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&CANDIDATES_LOCK])
        .await?;
    // Raw SQL: FOR UPDATE OF b SKIP LOCKED over a join; diesel cannot name the locked table.
    let row = tx
        .query_opt(
            "SELECT b.slot, b.batch_no, b.lo, b.hi, r.as_of
             FROM job_batches b
             JOIN job_runs r ON r.job = b.job AND r.slot = b.slot AND r.status = 'running'
             WHERE b.job = 'generate_bills' AND b.status = 'pending' AND ($1::timestamptz IS NULL OR b.slot = $1)
             ORDER BY b.slot, b.batch_no
             LIMIT 1
             FOR UPDATE OF b SKIP LOCKED",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (bslot, batch_no): (DateTime<Utc>, i32) = (row.get(0), row.get(1));
    let p = BatchParams {
        lo: row.get(2),
        hi: row.get(3),
        ..if slot.is_some() {
            params.clone()
        } else {
            // Another instance's run: its day and instant come with the batch.
            let day = slot_day(bslot, params.tz);
            BatchParams {
                slot: bslot,
                day,
                day_start: params.day_start_for(day),
                as_of: row.get(4),
                cause: format!("generate_bills@{}", bslot.to_rfc3339()),
                ..params.clone()
            }
        }
    };
    let result = bill_batch(&tx, &p, false, report).await?;
    // Raw SQL: in the batch's raw transaction, with clock_timestamp() (unknown to diesel).
    tx.execute(
        "UPDATE job_batches SET status = 'done', done_by = $3, done_at = clock_timestamp(), result = $4
         WHERE job = 'generate_bills' AND slot = $1 AND batch_no = $2",
        &[
            &bslot,
            &batch_no,
            &crate::jobs::instance_id(),
            &serde_json::to_value(&result).unwrap_or_default(),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(batch_no))
}


/// Bills pending batches of billing runs that other instances (or this one) started, until
/// none is free or the service stops. Returns how many this call billed.
pub async fn work_open_batches(db: &Db, config: &Config) -> Result<usize, JobError> {
    let mut client = db.raw_client().await?;
    let mut report = GenerateBillsReport::default();
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    let params = batch_params(config, epoch.date_naive(), epoch, epoch);
    let mut n = 0;
    while !db.stopping() {
        match work_one_batch(&mut client, &params, None, &mut report).await? {
            Some(b) => {
                n += 1;
                tracing::info!(
                    job = "generate_bills",
                    batch = b,
                    "billed a batch of another instance's run"
                );
            }
            None => break,
        }
    }
    Ok(n)
}

/// The statement that bills one batch of accounts (`[$1, $2]`) once they are locked: rates
/// their unbilled usage into lines, settles each bill from cash coupons, general coupons and
/// cash, and writes the bills, lines, coupon draws, ledger entries, package use, balances,
/// billing marks, R1's start of arrears (episode and audit event) and the due-work index, in
/// one statement (data-modifying CTEs; one snapshot taken after the lock, so every value read
/// is the locked accounts' own). Raw SQL: the query builder cannot say data-modifying CTEs,
/// window functions or `prices_at`. Every join to a large table carries the batch's account
/// range, so its cost follows the batch, not the tables.
///
/// Returns one row per bill issued, and one per account set aside for a meter without a
/// price (`unpriced`).
const BILL_BATCH: &str = "
WITH d AS (
  -- the batch's unbilled usage, per resource, meter and day
  SELECT c.account_id, c.resource_id, c.meter, c.usage_day, c.records, c.quantity, c.max_seq,
         -- the record's day in the billing time zone
         (c.usage_day::timestamp AT TIME ZONE $9) AS day_start,
         ((c.usage_day + 1)::timestamp AT TIME ZONE $9) AS day_end
  FROM bill_candidates c
  JOIN accounts a ON a.id = c.account_id AND a.id >= $1 AND a.id <= $2
  WHERE c.slot = $6 AND c.account_id >= $1 AND c.account_id <= $2 AND c.usage_day <= $3
    AND c.account_id NOT IN (SELECT account_id FROM bill_skipped WHERE slot = $6)
    -- re-checked under the accounts' locks: a bill issued since the pre-pass (by an earlier
    -- attempt of this run) is never issued twice. The account's mark says so (set with the
    -- bill, in its transaction); a NOT EXISTS probe of `bills` was planned on statistics from
    -- before the run (no bills of the day) as a nested loop over a scan of every bill,
    -- quadratic as the run issued them
    AND (a.billed_through_day IS NULL OR a.billed_through_day < $3)
), t AS MATERIALIZED (
  SELECT d.*, p.unit_price_nanos, r.billing_mode, r.state AS resource_state, r.payg_enabled,
         r.package_used, r.package_quota,
         -- settlement by the record's own day: the newest package term in effect at some time
         -- of its day (0: the current one, else one a renewal closed; none: pay-as-you-go)
         CASE WHEN r.billing_mode = 'package' AND p.is_package_meter THEN
           CASE WHEN (r.package_starts_at IS NULL OR r.package_starts_at < d.day_end)
                     AND (r.package_expires_at IS NULL OR r.package_expires_at > d.day_start) THEN 0
                ELSE (SELECT pt.no FROM package_terms pt
                      WHERE pt.account_id = d.account_id AND pt.resource_id = d.resource_id
                        AND (pt.starts_at IS NULL OR pt.starts_at < d.day_end) AND pt.ends_at > d.day_start
                      ORDER BY pt.no DESC LIMIT 1) END
         END AS term
  FROM d
  LEFT JOIN resources r ON r.account_id = d.account_id AND r.id = d.resource_id
                       AND r.account_id >= $1 AND r.account_id <= $2
  -- the price list in effect at the start of the bill day (versioned prices)
  LEFT JOIN prices_at($4) p ON p.product = r.product AND p.meter = d.meter
), unpriced AS MATERIALIZED (
  -- accounts that used a meter without a price at the bill day: set aside whole (billing
  -- part of a day would hide the rest), for the report and the low-water mark
  SELECT DISTINCT account_id FROM t WHERE unit_price_nanos IS NULL
), set_aside AS (
  INSERT INTO bill_skipped (slot, account_id, why) SELECT $6, account_id, 'unpriced' FROM unpriced
), terms AS MATERIALIZED (
  -- what each package term covers: its usage of the bill, up to what the term has left
  SELECT t.account_id, t.resource_id, t.meter, t.term,
         least(sum(t.quantity), greatest(CASE WHEN t.term = 0 THEN min(coalesce(t.package_quota, 0) - t.package_used)
                                              ELSE min(pt.quota - pt.used) END, 0))::bigint AS included
  FROM t LEFT JOIN package_terms pt ON t.term > 0 AND pt.account_id = t.account_id
                                   AND pt.resource_id = t.resource_id AND pt.no = t.term
                                   AND pt.account_id >= $1 AND pt.account_id <= $2
  WHERE t.term IS NOT NULL AND t.account_id NOT IN (SELECT account_id FROM unpriced)
  GROUP BY 1, 2, 3, 4
), q AS (
  SELECT t.account_id, t.resource_id, t.meter, sum(t.records)::int AS records,
         sum(t.quantity)::bigint AS quantity,
         coalesce(sum(t.records) FILTER (WHERE t.usage_day < $3), 0)::int AS late_records,
         max(t.max_seq) AS max_seq,
         -- one price per line (its product and meter); NULL when the meter lost its price
         min(t.unit_price_nanos) AS unit_price_nanos,
         min(t.billing_mode) AS billing_mode, bool_and(t.resource_state = 'active') AS active,
         bool_and(t.payg_enabled) AS payg_enabled, min(t.package_used) AS package_used,
         min(t.package_quota) AS package_quota
  FROM t WHERE t.account_id NOT IN (SELECT account_id FROM unpriced)
  GROUP BY 1, 2, 3
), covered AS (
  SELECT account_id, resource_id, meter, sum(included)::bigint AS included,
         coalesce(sum(included) FILTER (WHERE term = 0), 0)::bigint AS included_now
  FROM terms GROUP BY 1, 2, 3
), lines AS MATERIALIZED (
  SELECT q.*, w.included,
         CASE WHEN w.payg THEN q.quantity - w.included ELSE 0 END AS billed,
         CASE WHEN w.payg THEN 0 ELSE q.quantity - w.included END AS unbilled,
         -- the rounding rule of domain::money::line_amount: once per line, half away from zero
         round((CASE WHEN w.payg THEN q.quantity - w.included ELSE 0 END)::numeric
               * q.unit_price_nanos / $5::bigint)::bigint AS amount,
         -- a package this bill uses up with pay-as-you-go off: enforcement looks at it now
         (coalesce(cv.included_now, 0) > 0 AND q.billing_mode = 'package' AND q.active AND NOT q.payg_enabled
          AND q.package_used + cv.included_now >= coalesce(q.package_quota, 0)) AS exhausts
  FROM q
  LEFT JOIN covered cv ON cv.account_id = q.account_id AND cv.resource_id = q.resource_id AND cv.meter = q.meter
  CROSS JOIN LATERAL (
    SELECT CASE WHEN q.billing_mode = 'prepaid' THEN q.quantity  -- covered by the prepaid term
                ELSE coalesce(cv.included, 0) END AS included,
           (q.billing_mode IS DISTINCT FROM 'package' OR q.payg_enabled) AS payg) w
), ins_lines AS (
  INSERT INTO bill_lines (account_id, bill_day, resource_id, meter, records, quantity, included_quantity,
                          billed_quantity, unbilled_quantity, unit_price_nanos, amount)
  SELECT account_id, $3, resource_id, meter, records, quantity, included, billed, unbilled,
         unit_price_nanos, amount
  FROM lines
), totals AS MATERIALIZED (
  SELECT account_id, sum(amount)::bigint AS total, sum(records)::int AS records,
         sum(late_records)::int AS late, count(*) AS lines,
         count(*) FILTER (WHERE unbilled > 0) AS overage_lines, max(max_seq) AS max_seq,
         bool_or(exhausts) AS exhausted
  FROM lines GROUP BY account_id
), usable AS (
  SELECT c.account_id, c.id, c.kind, c.remaining, t.total,
         coalesce(sum(c.remaining) OVER (PARTITION BY c.account_id
                    ORDER BY (c.kind = 'general'), c.expires_at, c.id
                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
  FROM coupons c JOIN totals t ON t.account_id = c.account_id
  -- settlement by the bill's own day: the coupons valid at the end of the bill day (granted
  -- before it ended, expiring at or after it), whenever the run happens
  WHERE c.account_id >= $1 AND c.account_id <= $2
    AND t.total > 0 AND c.remaining > 0 AND c.granted_at < $6 AND c.expires_at >= $6
), draws AS MATERIALIZED (
  SELECT account_id, id AS coupon_id, kind, least(remaining, total - before)::bigint AS draw
  FROM usable WHERE before < total
), upd_coupons AS (
  UPDATE coupons c SET remaining = c.remaining - d.draw
  FROM draws d WHERE c.account_id = d.account_id AND c.id = d.coupon_id
    AND c.account_id >= $1 AND c.account_id <= $2
), settled AS MATERIALIZED (
  -- one row per bill: settled from cash coupons, general coupons, then cash
  SELECT t.*, coalesce(d.cash_c, 0) AS cash_c, coalesce(d.gen_c, 0) AS gen_c,
         t.total - coalesce(d.cash_c, 0) - coalesce(d.gen_c, 0) AS paid_cash
  FROM totals t LEFT JOIN (
    SELECT account_id,
           coalesce(sum(draw) FILTER (WHERE kind = 'cash'), 0)::bigint AS cash_c,
           coalesce(sum(draw) FILTER (WHERE kind = 'general'), 0)::bigint AS gen_c
    FROM draws GROUP BY account_id) d ON d.account_id = t.account_id
), ins_bills AS (
  INSERT INTO bills (account_id, bill_day, total, paid_cash_coupons, paid_general_coupons, paid_cash,
                     records, late_records, issued_at)
  SELECT account_id, $3, total, cash_c, gen_c, paid_cash, records, late, $7 FROM settled
), ins_ledger AS (
  INSERT INTO ledger_entries (account_id, kind, amount, bill_day, coupon_id, effective_at)
  SELECT account_id, 'charge', -total, $3::date, NULL::bigint, $7::timestamptz FROM settled WHERE total > 0
  UNION ALL
  SELECT account_id, 'coupon_use', draw, $3::date, coupon_id, $7::timestamptz FROM draws
), upd_packages AS (
  UPDATE resources r SET package_used = r.package_used + x.included, updated_at = $7
  FROM terms x
  WHERE x.term = 0 AND x.included > 0 AND r.billing_mode = 'package'
    AND r.account_id = x.account_id AND r.id = x.resource_id
    AND r.account_id >= $1 AND r.account_id <= $2
), upd_terms AS (
  UPDATE package_terms pt SET used = pt.used + x.included
  FROM terms x
  WHERE x.term > 0 AND x.included > 0
    AND pt.account_id = x.account_id AND pt.resource_id = x.resource_id AND pt.no = x.term
    AND pt.account_id >= $1 AND pt.account_id <= $2
), charged AS MATERIALIZED (
  -- a LATERAL probe per account for a live resource: an EXISTS here was planned as a hashed
  -- scan of every resource
  SELECT a.id, a.state AS old_state, a.cash_balance - s.paid_cash AS new_cash, a.credit_quota,
         s.max_seq, coalesce(s.exhausted, false) AS exhausted,
         -- R1: an arrears episode opens when the account owes and has something live
         (a.episode IS NULL AND a.cash_balance - s.paid_cash + a.credit_quota < 0
          AND live.one IS NOT NULL) AS opens,
         -- R7: funds may have crossed below the threshold (coupons only add to them)
         (a.low_balance_threshold IS NOT NULL AND a.balance_alert_armed
          AND a.cash_balance - s.paid_cash + a.credit_quota < a.low_balance_threshold) AS low
  FROM accounts a JOIN settled s ON s.account_id = a.id
  LEFT JOIN LATERAL (SELECT 1 AS one FROM resources r
                     WHERE r.account_id = a.id AND r.state <> 'released' LIMIT 1) live ON true
  WHERE a.id >= $1 AND a.id <= $2
), upd AS (
  -- the new balance, R1's start of arrears and its episode, the account's billing mark, and
  -- the due-work index of the lifecycle jobs the bill gives work to
  UPDATE accounts a SET
    cash_balance = c.new_cash,
    billed_through_day = $3,
    billed_through_seq = greatest(a.billed_through_seq, c.max_seq),
    arrears_since = CASE WHEN c.new_cash + c.credit_quota < 0 THEN coalesce(a.arrears_since, $7)
                         ELSE a.arrears_since END,
    state = CASE WHEN c.opens AND a.state <> 'compliance_locked' THEN 'in_arrears'
                 WHEN a.state = 'good' AND c.new_cash + c.credit_quota < 0 THEN 'in_arrears'
                 ELSE a.state END,
    episode = CASE WHEN c.opens THEN a.episodes + 1 ELSE a.episode END,
    episodes = CASE WHEN c.opens THEN a.episodes + 1 ELSE a.episodes END,
    alerts_due_at = CASE WHEN c.opens OR c.low THEN least(coalesce(a.alerts_due_at, 'infinity'), $7)
                         ELSE a.alerts_due_at END,
    enforce_due_at = CASE WHEN c.opens OR c.exhausted THEN least(coalesce(a.enforce_due_at, 'infinity'), $7)
                          ELSE a.enforce_due_at END,
    updated_at = $7
  FROM charged c WHERE a.id = c.id AND a.id >= $1 AND a.id <= $2
  RETURNING a.id, c.old_state, a.state, c.opens, a.episode
), opened AS (
  INSERT INTO arrears_episodes (account_id, no, opened_at, opened_by)
  SELECT id, episode, $7, $8 FROM upd WHERE opens
), events AS (
  INSERT INTO lifecycle_events (account_id, from_state, to_state, reason, cause, occurred_at, episode)
  SELECT id, old_state, state,
         'arrears: settling the bill of ' || $3 || ' left cash + credit quota below zero', $8, $7, episode
  FROM upd WHERE old_state <> state
)
SELECT s.account_id, s.total, s.cash_c, s.gen_c, s.paid_cash, s.lines, s.overage_lines,
       coalesce(u.old_state <> u.state, false) AS entered, false AS unpriced
FROM settled s LEFT JOIN upd u ON u.id = s.account_id
UNION ALL
SELECT account_id, 0, 0, 0, 0, 0, 0, false, true FROM unpriced
ORDER BY 1";

/// Bills the accounts in `[lo, hi]` inside `tx` (the caller commits, or rolls back a dry run).
async fn bill_batch(
    tx: &tokio_postgres::Transaction<'_>,
    p: &BatchParams,
    dry_run: bool,
    report: &mut GenerateBillsReport,
) -> Result<BatchResult, JobError> {
    let (lo, hi) = (&p.lo, &p.hi);
    let mut lap = std::time::Instant::now();
    // The statement joins its CTEs to one another, whose sizes the planner can only guess
    // (at 1,000,000 accounts it guessed one row where there were 15,000, and a nested loop
    // over two CTE scans took 2 s of a batch); every join to a large table carries the
    // batch's account range, so hash joins over range scans serve them all. Room for the
    // batch's CTEs in memory. No JIT: the penalty that steers the planner away from nested
    // loops (which the LATERAL probes must stay) makes the statement look expensive enough
    // for an optimised JIT compilation, 2.5 s of CPU per batch for a statement of 0.3 s.
    // Raw SQL: SET LOCAL planner settings are session commands, not queries diesel builds.
    tx.batch_execute(
        "SET LOCAL enable_nestloop = off; SET LOCAL work_mem = '64MB'; SET LOCAL jit = off",
    )
    .await?;
    // Serialise with top-ups, coupon grants and lifecycle decisions on the same accounts;
    // the billing statement's snapshot is taken after this, so it reads what they wrote.
    // Raw SQL: a FOR UPDATE lock with subqueries over the keyless work tables (not in schema.rs).
    tx.execute(
        "SELECT 1 FROM accounts WHERE id >= $1 AND id <= $2
           AND id IN (SELECT account_id FROM bill_candidates WHERE slot = $4 AND account_id >= $1 AND account_id <= $2
                        AND usage_day <= $3)
           AND id NOT IN (SELECT account_id FROM bill_skipped WHERE slot = $4)
         ORDER BY id FOR UPDATE",
        &[lo, hi, &p.day, &p.slot],
    )
    .await?;
    lap_mark(&mut report.timings, "lock_accounts", &mut lap);
    let rows = tx
        .query(
            BILL_BATCH,
            &[
                lo,
                hi,
                &p.day,
                &p.day_start,
                &p.divisor,
                &p.slot,
                &p.as_of,
                &p.cause,
                &p.tz.name(),
            ],
        )
        .await?;
    lap_mark(&mut report.timings, "bill", &mut lap);
    let mut result = BatchResult::default();
    let (rows, unpriced): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| !r.get::<_, bool>(8));
    result.unpriced_count = unpriced.len() as i64;
    result.unpriced = unpriced.iter().take(LISTED).map(|r| r.get(0)).collect();
    for r in &rows {
        result.bills += 1;
        result.total += r.get::<_, i64>(1);
        result.cash_coupons += r.get::<_, i64>(2);
        result.general_coupons += r.get::<_, i64>(3);
        result.cash += r.get::<_, i64>(4);
        result.lines += r.get::<_, i64>(5);
        result.overage_lines += r.get::<_, i64>(6);
        if r.get::<_, bool>(7) {
            result.entered_count += 1;
            if result.entered.len() < LISTED {
                // rows come in account order: the first ones are the batch's first by id
                result.entered.push(r.get(0));
            }
        }
    }
    if dry_run {
        let room = LISTED.saturating_sub(report.would_issue.len());
        report
            .would_issue
            .extend(rows.iter().take(room).map(|b| BillPreview {
                account_id: b.get(0),
                total: format_scaled(b.get(1), p.digits),
                paid_cash_coupons: format_scaled(b.get(2), p.digits),
                paid_general_coupons: format_scaled(b.get(3), p.digits),
                paid_cash: format_scaled(b.get(4), p.digits),
                lines: b.get(5),
            }));
    }
    Ok(result)
}

// ------------------------------------------------------------------------------------------
// The job, as registered in `jobs!` (jobs/mod.rs)

use crate::jobs::registry::at_least_one;
use crate::jobs::{Job, JobCtx, Knobs, RunArgs, Runs, Simulated, SimulatedAt, Skipped};

/// The job (its registration is `generate_bills::GenerateBills` in `jobs!`).
pub struct GenerateBills;

/// generate_bills' knobs (`[knobs]` in jobs/generate_bills.toml).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingKnobs {
    /// Accounts per billing batch, a batch any instance can claim (`billing.batch_size`).
    pub batch_size: Option<usize>,
}

impl Knobs for BillingKnobs {
    fn check(&self) -> Result<(), (&'static str, String)> {
        at_least_one("batch_size", self.batch_size)
    }

    fn apply(&self, config: &mut Config) {
        if let Some(n) = self.batch_size {
            config.billing.batch_size = n;
        }
    }
}

impl Job for GenerateBills {
    const NAME: &'static str = "generate_bills";
    const SCHEDULE: &'static str = include_str!("../../jobs/generate_bills.toml");
    const RUNS: Runs = Runs::InEverySlot {
        why: "each missed day gets its bill",
    };
    const SIMULATED: Simulated = Simulated {
        at: SimulatedAt::BillingDayStart,
        order: 0,
    };
    /// Any instance bills batches of a run another instance started.
    const HELPS: bool = true;

    type Options = Options;
    type Knobs = BillingKnobs;
    type Report = GenerateBillsReport;

    fn options(args: &RunArgs, config: &Config, _: &BillingKnobs) -> Options {
        // A resumed run bills the day its slot closes, whatever instant it acts at now.
        let resumed = args
            .resuming
            .then(|| default_billing_day(args.slot, config.billing.time_zone));
        Options {
            as_of: args.as_of,
            bill_day: args.day.or(resumed),
            dry_run: args.dry_run,
            force: args.force,
        }
    }

    /// The run names its slot by the billing day it closes (`slot` is not used).
    async fn run(
        ctx: JobCtx<'_>,
        opts: &Options,
        _slot: DateTime<Utc>,
    ) -> Result<GenerateBillsReport, JobError> {
        run(ctx.db, ctx.config, opts).await
    }

    fn skipped(r: &GenerateBillsReport) -> Option<Skipped> {
        Skipped::from_report(&r.skipped, &r.held_by)
    }

    async fn help(ctx: JobCtx<'_>) -> Result<(), JobError> {
        work_open_batches(ctx.db, ctx.config).await.map(|_| ())
    }
}
