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
    /// Seconds spent per phase, summed over the batches this instance billed.
    pub timings: std::collections::BTreeMap<String, f64>,
    /// Batches billed by each instance (`host:pid`): any instance claims a run's batches.
    pub batches_by_instance: std::collections::BTreeMap<String, i64>,
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

pub async fn run(
    db: &Db,
    config: &Config,
    opts: &Options,
) -> Result<GenerateBillsReport, JobError> {
    let tz = config.billing.time_zone;
    let day = opts
        .bill_day
        .unwrap_or_else(|| default_billing_day(opts.as_of, tz));
    let slot = end_of_day(day, tz);
    if slot > opts.as_of {
        return Err(JobError::Refused(format!(
            "billing day {day} ({tz}) has not ended at {}: it ends at {slot}",
            opts.as_of
        )));
    }
    let mut report = GenerateBillsReport {
        job: GenerateBills::NAME,
        bill_day: day,
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        currency: config.billing.currency.clone(),
        ..Default::default()
    };
    // Zero amounts until a run says otherwise (a skipped run reports them so).
    finish_amounts(&mut report, &BatchResult::default(), config);
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
        check_order(&client, day, slot).await?;
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
) -> Result<(), JobError> {
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
    let (latest, mark, open): (
        Option<DateTime<Utc>>,
        Option<NaiveDate>,
        Option<DateTime<Utc>>,
    ) = (row.get(0), row.get(1), row.get(2));
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
        return Err(JobError::Refused(format!(
            "the billing day ending {open} is not finished; it is billed before {day}"
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
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BILLING_LOCK])
        .await?;
    if opts.dry_run {
        // The same statements on private copies of the work tables: temporary tables come
        // first on the search path, so a dry run writes nothing another session can see.
        client
            .batch_execute(
                "CREATE TEMP TABLE bill_candidates (LIKE public.bill_candidates INCLUDING INDEXES);
                 CREATE TEMP TABLE bill_skipped (LIKE public.bill_skipped INCLUDING INDEXES)",
            )
            .await?;
    }
    // Under the lock: a run that waited for another one sees what it did.
    let result = match check_order(client, day, report.slot).await {
        Ok(()) if opts.dry_run => bill_locked(db, None, client, true, report, params).await,
        Ok(()) => bill_locked(db, Some(lease), client, false, report, params).await,
        Err(e) => Err(e),
    };
    let cleanup = if opts.dry_run {
        client
            .batch_execute("DROP TABLE IF EXISTS pg_temp.bill_candidates, pg_temp.bill_skipped")
            .await
    } else if result.is_ok() {
        client
            .execute(
                "WITH a AS (DELETE FROM bill_candidates WHERE slot = $1),
                      b AS (DELETE FROM bill_skipped WHERE slot = $1)
                 DELETE FROM job_batches WHERE job = 'generate_bills' AND slot = $1",
                &[&report.slot],
            )
            .await
            .map(|_| ())
    } else {
        Ok(())
    };
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&BILLING_LOCK])
        .await?;
    let sums = result?;
    cleanup?;
    finish_amounts(report, &sums, config);
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
    let day = params.day;
    let slot = params.slot;
    // Pre-pass: what is unbilled, in one scan above the low-water mark. A resumed run does it
    // again: accounts its earlier attempt billed are then found already billed.
    let mut lap = std::time::Instant::now();
    let tx = client.transaction().await?;
    tx.execute("DELETE FROM bill_candidates WHERE slot = $1", &[&slot])
        .await?;
    tx.execute("DELETE FROM bill_skipped WHERE slot = $1", &[&slot])
        .await?;
    tx.batch_execute("LOCK TABLE usage_records IN SHARE MODE")
        .await?;
    let low: i64 = tx
        .query_one("SELECT low_water_seq FROM billing_cursor", &[])
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO bill_candidates
         SELECT $2, u.account_id, u.resource_id, u.meter, u.usage_day, count(*)::int AS records,
                sum(u.quantity)::bigint AS quantity, min(u.seq) AS min_seq, max(u.seq) AS max_seq
         FROM usage_records u
         JOIN accounts a ON a.id = u.account_id
         WHERE u.seq > $1
           AND (a.billed_through_day IS NULL OR u.usage_day > a.billed_through_day OR u.seq > a.billed_through_seq)
         GROUP BY u.account_id, u.resource_id, u.meter, u.usage_day",
        &[&low, &slot],
    )
    .await?;
    tx.commit().await?;
    client.batch_execute("ANALYZE bill_candidates").await?;
    lap_mark(&mut report.timings, "prepass", &mut lap);
    // Accounts this run leaves alone: the day's bill exists (new records wait for the next
    // day's bill), or a meter they used has no price any more (billing part of a day would
    // hide the rest: fix the price list and run again).
    client
        .execute(
            "INSERT INTO bill_skipped
             SELECT DISTINCT $2::timestamptz, c.account_id, 'already_billed' AS why FROM bill_candidates c
             JOIN bills b ON b.account_id = c.account_id AND b.bill_day = $1
             WHERE c.slot = $2 AND c.usage_day <= $1
             UNION
             SELECT DISTINCT $2::timestamptz, c.account_id, 'unpriced' FROM bill_candidates c
             JOIN resources r ON r.account_id = c.account_id AND r.id = c.resource_id
             -- the price list in effect at the start of the bill day (versioned prices)
             LEFT JOIN prices_at($3) p ON p.product = r.product AND p.meter = c.meter
             WHERE c.slot = $2 AND c.usage_day <= $1 AND p.meter IS NULL",
            &[&day, &slot, &params.day_start],
        )
        .await?;
    report.accounts_already_billed = client
        .query_one(
            "SELECT count(*) FROM bill_skipped WHERE slot = $1 AND why = 'already_billed'",
            &[&slot],
        )
        .await?
        .get(0);
    report.accounts_skipped_unpriced = client
        .query(&format!("SELECT account_id FROM bill_skipped WHERE slot = $1 AND why = 'unpriced' ORDER BY 1 LIMIT {LISTED}"), &[&slot])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    if !report.accounts_skipped_unpriced.is_empty() {
        tracing::warn!(
            job = "generate_bills",
            "accounts left unbilled: a meter they used has no price"
        );
    }

    let row = client
        .query_one(
            "SELECT count(DISTINCT account_id), coalesce(sum(records), 0)::bigint,
                    coalesce(sum(records) FILTER (WHERE usage_day < $1), 0)::bigint
             FROM bill_candidates WHERE slot = $2 AND usage_day <= $1",
            &[&day, &slot],
        )
        .await?;
    report.accounts_with_usage = row.get(0);
    report.unbilled_records = row.get(1);
    report.late_records = row.get(2);

    let bounds: Vec<(String, String)> = client
        .query(
            "SELECT min(account_id), max(account_id) FROM (
               SELECT account_id, (row_number() OVER (ORDER BY account_id) - 1) / $2 AS b
               FROM (SELECT DISTINCT account_id FROM bill_candidates
                     WHERE slot = $3 AND usage_day <= $1
                       AND account_id NOT IN (SELECT account_id FROM bill_skipped WHERE slot = $3)) x) y
             GROUP BY b ORDER BY b",
            &[&day, &params.batch_size, &slot],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    report.batches = bounds.len();

    let mut sums = BatchResult::default();
    if dry_run {
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
        return Ok(sums);
    }

    // The batches go to the database, where this instance and any other claim them.
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
    loop {
        while let Some(done) = work_one_batch(client, &params, Some(slot), report).await? {
            tracing::debug!(job = "generate_bills", slot = %slot, batch = done, "batch billed");
            if db.stopping() {
                return Err(JobError::Interrupted);
            }
            if lease.is_some_and(|l| l.lost()) {
                return Err(JobError::LeaseLost);
            }
        }
        // What is left is being billed by other instances: wait for them (a batch whose
        // instance died is pending again and claimed above).
        let pending: i64 = client
            .query_one(
                "SELECT count(*) FROM job_batches WHERE job = 'generate_bills' AND slot = $1 AND status = 'pending'",
                &[&slot],
            )
            .await?
            .get(0);
        if pending == 0 {
            break;
        }
        if db.stopping() {
            return Err(JobError::Interrupted);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
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
    client
        .execute(
            "UPDATE billing_cursor SET low_water_seq = greatest(low_water_seq, coalesce(
               (SELECT min(min_seq) - 1 FROM bill_candidates
                WHERE slot = $2 AND (usage_day > $1
                      OR account_id IN (SELECT account_id FROM bill_skipped WHERE slot = $2))),
               (SELECT max(max_seq) FROM bill_candidates WHERE slot = $2),
               low_water_seq))",
            &[&day, &slot],
        )
        .await?;
    Ok(sums)
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
            let day = params_day(bslot, params);
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

/// The billing day whose end is `slot`.
fn params_day(slot: DateTime<Utc>, params: &BatchParams) -> NaiveDate {
    (slot - chrono::Duration::seconds(1))
        .with_timezone(&params.tz)
        .date_naive()
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

/// Bills the accounts in `[lo, hi]` inside `tx` (the caller commits, or rolls back a dry run).
async fn bill_batch(
    tx: &tokio_postgres::Transaction<'_>,
    p: &BatchParams,
    dry_run: bool,
    report: &mut GenerateBillsReport,
) -> Result<BatchResult, JobError> {
    let BatchParams {
        slot,
        day,
        day_start,
        as_of,
        divisor,
        digits,
        ..
    } = p.clone();
    let (lo, hi, cause) = (&p.lo, &p.hi, &p.cause);
    let mut lap = std::time::Instant::now();
    // Serialise with top-ups, coupon grants and lifecycle decisions on the same accounts.
    tx.execute(
        "SELECT 1 FROM accounts WHERE id >= $1 AND id <= $2
           AND id IN (SELECT account_id FROM bill_candidates WHERE slot = $4 AND account_id >= $1 AND account_id <= $2
                        AND usage_day <= $3)
           AND id NOT IN (SELECT account_id FROM bill_skipped WHERE slot = $4)
         ORDER BY id FOR UPDATE",
        &[lo, hi, &day, &slot],
    )
    .await?;
    lap_mark(&mut report.timings, "lock_accounts", &mut lap);
    let groups = tx
        .execute(
            "CREATE TEMP TABLE batch_lines ON COMMIT DROP AS
             WITH g AS (
               SELECT c.account_id, c.resource_id, c.meter, sum(c.records)::int AS records,
                      sum(c.quantity)::bigint AS quantity,
                      coalesce(sum(c.records) FILTER (WHERE c.usage_day < $3), 0)::int AS late_records,
                      max(c.max_seq) AS max_seq
               FROM bill_candidates c
               WHERE c.slot = $6 AND c.account_id >= $1 AND c.account_id <= $2 AND c.usage_day <= $3
                 AND c.account_id NOT IN (SELECT account_id FROM bill_skipped WHERE slot = $6)
                 -- re-checked under the accounts' locks: a bill issued since the pre-pass (by an
                 -- earlier attempt of this run) is never issued twice
                 AND NOT EXISTS (SELECT 1 FROM bills b WHERE b.account_id = c.account_id AND b.bill_day = $3)
               GROUP BY 1, 2, 3
             ), q AS (
               SELECT g.*, p.unit_price_nanos,
                 CASE WHEN r.billing_mode = 'prepaid' THEN g.quantity  -- covered by the prepaid term
                      WHEN r.billing_mode = 'package' AND p.is_package_meter
                           AND (r.package_expires_at IS NULL OR r.package_expires_at > $4)
                      THEN least(g.quantity, greatest(coalesce(r.package_quota, 0) - r.package_used, 0))
                      ELSE 0 END AS included,
                 (r.billing_mode <> 'package' OR r.payg_enabled) AS payg
               FROM g
               LEFT JOIN resources r ON r.account_id = g.account_id AND r.id = g.resource_id
               LEFT JOIN prices_at($4) p ON p.product = r.product AND p.meter = g.meter
             )
             SELECT account_id, resource_id, meter, records, late_records, max_seq, quantity, included,
                    CASE WHEN payg THEN quantity - included ELSE 0 END AS billed,
                    CASE WHEN payg THEN 0 ELSE quantity - included END AS unbilled,
                    unit_price_nanos,
                    -- the rounding rule of domain::money::line_amount: once per line, half away from zero
                    round((CASE WHEN payg THEN quantity - included ELSE 0 END)::numeric
                          * unit_price_nanos / $5::bigint)::bigint AS amount
             FROM q",
            &[lo, hi, &day, &day_start, &divisor, &slot],
        )
        .await?;
    lap_mark(&mut report.timings, "rate_lines", &mut lap);
    // Statistics for the planner: a temp table without them looks tiny or huge at random,
    // and the joins below then scan whole tables once per batch.
    tx.batch_execute("ANALYZE batch_lines").await?;
    let unpriced: i64 = tx
        .query_one(
            "SELECT count(*) FROM batch_lines WHERE unit_price_nanos IS NULL",
            &[],
        )
        .await?
        .get(0);
    lap_mark(&mut report.timings, "price_check", &mut lap);
    if unpriced > 0 {
        // The price list changed since the pre-pass: bill nothing rather than part of a day.
        return Err(JobError::Refused(format!(
            "{unpriced} of {groups} lines in accounts {lo}..{hi} lost their price during the run; run again"
        )));
    }
    tx.execute(
        "CREATE TEMP TABLE batch_draws ON COMMIT DROP AS
         WITH totals AS (SELECT account_id, sum(amount)::bigint AS total FROM batch_lines GROUP BY account_id),
         usable AS (
           SELECT c.account_id, c.id, c.kind, c.remaining, t.total,
                  coalesce(sum(c.remaining) OVER (PARTITION BY c.account_id
                             ORDER BY (c.kind = 'general'), c.expires_at, c.id
                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
           FROM coupons c JOIN totals t ON t.account_id = c.account_id
           -- settlement by the bill's own day: the coupons valid at the end of the bill day
           -- (granted before it ended, expiring at or after it), whenever the run happens
           WHERE t.total > 0 AND c.remaining > 0 AND c.granted_at < $1 AND c.expires_at >= $1
         )
         SELECT account_id, id AS coupon_id, kind, least(remaining, total - before)::bigint AS draw
         FROM usable WHERE before < total",
        &[&slot],
    )
    .await?;
    lap_mark(&mut report.timings, "coupon_draws", &mut lap);
    // One row per bill: settled from cash coupons, general coupons, then cash.
    tx.batch_execute(
        "CREATE TEMP TABLE batch_bills ON COMMIT DROP AS
         WITH totals AS (
           SELECT account_id, sum(amount)::bigint AS total, sum(records)::int AS records,
                  sum(late_records)::int AS late, count(*) AS lines, max(max_seq) AS max_seq
           FROM batch_lines GROUP BY account_id
         ), draws AS (
           SELECT account_id,
                  coalesce(sum(draw) FILTER (WHERE kind = 'cash'), 0)::bigint AS cash_c,
                  coalesce(sum(draw) FILTER (WHERE kind = 'general'), 0)::bigint AS gen_c
           FROM batch_draws GROUP BY account_id
         )
         SELECT t.account_id, t.total, coalesce(d.cash_c, 0) AS cash_c, coalesce(d.gen_c, 0) AS gen_c,
                t.total - coalesce(d.cash_c, 0) - coalesce(d.gen_c, 0) AS paid_cash,
                t.records, t.late, t.lines, t.max_seq
         FROM totals t LEFT JOIN draws d ON d.account_id = t.account_id",
    )
    .await?;
    tx.batch_execute("ANALYZE batch_bills").await?;
    lap_mark(&mut report.timings, "settle", &mut lap);
    let inserted = tx
        .execute(
            "INSERT INTO bills (account_id, bill_day, total, paid_cash_coupons, paid_general_coupons, paid_cash,
                                records, late_records, issued_at)
             SELECT account_id, $1, total, cash_c, gen_c, paid_cash, records, late, $2 FROM batch_bills",
            &[&day, &as_of],
        )
        .await?;
    lap_mark(&mut report.timings, "insert_bills", &mut lap);
    tx.execute(
        "INSERT INTO bill_lines (account_id, bill_day, resource_id, meter, records, quantity, included_quantity,
                                 billed_quantity, unbilled_quantity, unit_price_nanos, amount)
         SELECT account_id, $1, resource_id, meter, records, quantity, included, billed, unbilled,
                unit_price_nanos, amount
         FROM batch_lines",
        &[&day],
    )
    .await?;
    lap_mark(&mut report.timings, "insert_lines", &mut lap);
    tx.batch_execute(
        "UPDATE coupons c SET remaining = c.remaining - d.draw
         FROM batch_draws d WHERE c.account_id = d.account_id AND c.id = d.coupon_id",
    )
    .await?;
    lap_mark(&mut report.timings, "update_coupons", &mut lap);
    tx.execute(
        "INSERT INTO ledger_entries (account_id, kind, amount, bill_day, coupon_id, effective_at)
         SELECT account_id, 'charge', -total, $1::date, NULL::bigint, $2::timestamptz FROM batch_bills WHERE total > 0
         UNION ALL
         SELECT account_id, 'coupon_use', draw, $1::date, coupon_id, $2::timestamptz FROM batch_draws",
        &[&day, &as_of],
    )
    .await?;
    lap_mark(&mut report.timings, "insert_ledger", &mut lap);
    tx.execute(
        "UPDATE resources r SET package_used = r.package_used + l.included, updated_at = $1
         FROM batch_lines l
         WHERE l.included > 0 AND r.billing_mode = 'package' AND r.account_id = l.account_id AND r.id = l.resource_id",
        &[&as_of],
    )
    .await?;
    lap_mark(&mut report.timings, "update_packages", &mut lap);
    let entered = tx
        .query(
            "WITH exhausted AS (
               -- packages this bill used up with pay-as-you-go off: enforcement looks at them now
               SELECT DISTINCT l.account_id FROM batch_lines l
               JOIN resources r ON r.account_id = l.account_id AND r.id = l.resource_id
               WHERE l.included > 0 AND r.billing_mode = 'package' AND r.state = 'active'
                 AND NOT r.payg_enabled AND r.package_used >= coalesce(r.package_quota, 0)
             ), charged AS MATERIALIZED (
               -- MATERIALIZED, with a LATERAL probe per account for a live resource: inlined,
               -- an EXISTS here was planned as a hashed scan of every resource, once per
               -- reference to `opens` (five scans of the whole table per batch)
               SELECT a.id, a.state AS old_state, a.cash_balance - b.paid_cash AS new_cash, a.credit_quota,
                      b.max_seq, x.account_id IS NOT NULL AS exhausted,
                      -- R1: an arrears episode opens when the account owes and has something live
                      (a.episode IS NULL AND a.cash_balance - b.paid_cash + a.credit_quota < 0
                       AND live.one IS NOT NULL) AS opens,
                      -- R7: funds may have crossed below the threshold (coupons only add to them)
                      (a.low_balance_threshold IS NOT NULL AND a.balance_alert_armed
                       AND a.cash_balance - b.paid_cash + a.credit_quota < a.low_balance_threshold) AS low
               FROM accounts a JOIN batch_bills b ON b.account_id = a.id
               LEFT JOIN exhausted x ON x.account_id = a.id
               LEFT JOIN LATERAL (SELECT 1 AS one FROM resources r
                                  WHERE r.account_id = a.id AND r.state <> 'released' LIMIT 1) live ON true
             ), upd AS (
               -- the new balance, R1's start of arrears and its episode, the account's billing mark,
               -- and the due-work index of the lifecycle jobs the bill gives work to
               UPDATE accounts a SET
                 cash_balance = c.new_cash,
                 billed_through_day = $1,
                 billed_through_seq = greatest(a.billed_through_seq, c.max_seq),
                 arrears_since = CASE WHEN c.new_cash + c.credit_quota < 0 THEN coalesce(a.arrears_since, $2)
                                      ELSE a.arrears_since END,
                 state = CASE WHEN c.opens AND a.state <> 'compliance_locked' THEN 'in_arrears'
                              WHEN a.state = 'good' AND c.new_cash + c.credit_quota < 0 THEN 'in_arrears'
                              ELSE a.state END,
                 episode = CASE WHEN c.opens THEN a.episodes + 1 ELSE a.episode END,
                 episodes = CASE WHEN c.opens THEN a.episodes + 1 ELSE a.episodes END,
                 alerts_due_at = CASE WHEN c.opens OR c.low THEN least(coalesce(a.alerts_due_at, 'infinity'), $2)
                                      ELSE a.alerts_due_at END,
                 enforce_due_at = CASE WHEN c.opens OR c.exhausted THEN least(coalesce(a.enforce_due_at, 'infinity'), $2)
                                       ELSE a.enforce_due_at END,
                 updated_at = $2
               FROM charged c WHERE a.id = c.id
               RETURNING a.id, c.old_state, a.state, c.opens, a.episode
             ), opened AS (
               INSERT INTO arrears_episodes (account_id, no, opened_at, opened_by)
               SELECT id, episode, $2, $3 FROM upd WHERE opens
             )
             INSERT INTO lifecycle_events (account_id, from_state, to_state, reason, cause, occurred_at, episode)
             SELECT id, old_state, state,
                    'arrears: settling the bill of ' || $1 || ' left cash + credit quota below zero', $3, $2, episode
             FROM upd WHERE old_state <> state
             RETURNING account_id",
            &[&day, &as_of, &cause],
        )
        .await?;
    lap_mark(&mut report.timings, "update_accounts", &mut lap);
    let totals = tx
        .query_one(
            "SELECT coalesce(sum(total), 0)::bigint, coalesce(sum(cash_c), 0)::bigint, coalesce(sum(gen_c), 0)::bigint,
                    coalesce(sum(paid_cash), 0)::bigint, coalesce(sum(lines), 0)::bigint,
                    (SELECT count(*) FROM batch_lines WHERE unbilled > 0)
             FROM batch_bills",
            &[],
        )
        .await?;
    lap_mark(&mut report.timings, "totals", &mut lap);
    let mut entered_ids: Vec<String> = entered.iter().map(|r| r.get(0)).collect();
    entered_ids.sort();
    entered_ids.truncate(LISTED);
    let result = BatchResult {
        bills: inserted as i64,
        lines: totals.get(4),
        overage_lines: totals.get(5),
        total: totals.get(0),
        cash_coupons: totals.get(1),
        general_coupons: totals.get(2),
        cash: totals.get(3),
        entered_count: entered.len() as i64,
        entered: entered_ids,
    };
    if dry_run && report.would_issue.len() < LISTED {
        let rows = tx
            .query(
                &format!(
                    "SELECT account_id, total, cash_c, gen_c, paid_cash, lines FROM batch_bills
                     ORDER BY account_id LIMIT {}",
                    LISTED - report.would_issue.len()
                ),
                &[],
            )
            .await?;
        report.would_issue.extend(rows.iter().map(|b| BillPreview {
            account_id: b.get(0),
            total: format_scaled(b.get(1), digits),
            paid_cash_coupons: format_scaled(b.get(2), digits),
            paid_general_coupons: format_scaled(b.get(3), digits),
            paid_cash: format_scaled(b.get(4), digits),
            lines: b.get(5),
        }));
    }
    lap_mark(&mut report.timings, "results", &mut lap);
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
