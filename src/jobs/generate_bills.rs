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
//!   every account either billed and marked or untouched;
//! - at the end the low-water mark rises to just below the oldest record still unbilled.
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
use crate::jobs::{begin_slot, end_slot, JobError, JobName};

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
    /// Seconds spent per phase, summed over batches (where the time goes).
    pub timings: std::collections::BTreeMap<String, f64>,
}

fn lap_mark(
    timings: &mut std::collections::BTreeMap<String, f64>,
    phase: &str,
    lap: &mut std::time::Instant,
) {
    *timings.entry(phase.to_string()).or_insert(0.0) += lap.elapsed().as_secs_f64();
    *lap = std::time::Instant::now();
}

#[derive(Default)]
struct Sums {
    total: i64,
    cash_coupons: i64,
    general_coupons: i64,
    cash: i64,
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
        job: JobName::GenerateBills.as_str(),
        bill_day: day,
        slot,
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        currency: config.billing.currency.clone(),
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    if let Some(skip) = begin_slot(
        &client,
        JobName::GenerateBills,
        slot,
        opts.as_of,
        opts.force,
        opts.dry_run,
    )
    .await?
    {
        report.skipped = Some(skip);
        finish_amounts(&mut report, &Sums::default(), config);
        return Ok(report);
    }
    let result = bill(&mut client, config, day, opts, &mut report).await;
    end_slot(
        &client,
        JobName::GenerateBills,
        slot,
        opts.dry_run,
        result,
        &report,
    )
    .await?;
    tracing::info!(job = report.job, slot = %slot, bills = report.bills_issued, dry_run = opts.dry_run, "generate_bills finished");
    Ok(report)
}

fn finish_amounts(report: &mut GenerateBillsReport, sums: &Sums, config: &Config) {
    let d = config.billing.minor_unit_digits;
    report.total = format_scaled(sums.total, d);
    report.paid_cash_coupons = format_scaled(sums.cash_coupons, d);
    report.paid_general_coupons = format_scaled(sums.general_coupons, d);
    report.paid_cash = format_scaled(sums.cash, d);
}

async fn bill(
    client: &mut tokio_postgres::Client,
    config: &Config,
    day: NaiveDate,
    opts: &Options,
    report: &mut GenerateBillsReport,
) -> Result<(), JobError> {
    let digits = config.billing.minor_unit_digits;
    let cause = format!("generate_bills@{}", report.slot.to_rfc3339());
    let params = BatchParams {
        batch_size: config.billing.batch_size as i64,
        day,
        day_start: start_of_day(day, config.billing.time_zone),
        as_of: opts.as_of,
        divisor: 10i64.pow(QUANTITY_DIGITS + PRICE_DIGITS - digits),
        digits,
        lo: "",
        hi: "",
        cause: &cause,
    };
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BILLING_LOCK])
        .await?;
    let result = bill_locked(client, opts.dry_run, report, params).await;
    let cleanup = client
        .batch_execute("DROP TABLE IF EXISTS bill_candidates, bill_skipped")
        .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&BILLING_LOCK])
        .await?;
    let sums = result?;
    cleanup?;
    finish_amounts(report, &sums, config);
    Ok(())
}

#[derive(Clone, Copy)]
struct BatchParams<'a> {
    batch_size: i64,
    day: NaiveDate,
    day_start: DateTime<Utc>,
    as_of: DateTime<Utc>,
    divisor: i64,
    digits: u32,
    lo: &'a str,
    hi: &'a str,
    cause: &'a str,
}

async fn bill_locked(
    client: &mut tokio_postgres::Client,
    dry_run: bool,
    report: &mut GenerateBillsReport,
    params: BatchParams<'_>,
) -> Result<Sums, JobError> {
    let day = params.day;
    // Days are billed in order: marks only move forward, and a late record of an earlier day
    // goes on the next bill rather than reopening an issued one.
    let latest: Option<DateTime<Utc>> = client
        .query_one(
            "SELECT max(slot) FROM job_runs WHERE job = 'generate_bills' AND status = 'succeeded'",
            &[],
        )
        .await?
        .get(0);
    if let Some(latest) = latest.filter(|l| *l > report.slot) {
        return Err(JobError::Refused(format!(
            "bills are issued up to the day ending {latest}; billing day {day} is earlier (late usage of an \
             earlier day is billed on the next day's bill)"
        )));
    }

    // A run that failed part way leaves some accounts billed and marked for a later day:
    // billing an earlier day for them would move their marks backwards.
    let latest_mark: Option<NaiveDate> = client
        .query_one("SELECT max(billed_through_day) FROM accounts", &[])
        .await?
        .get(0);
    if let Some(mark) = latest_mark.filter(|m| *m > day) {
        return Err(JobError::Refused(format!(
            "accounts are billed up to {mark}; billing day {day} is earlier (late usage of an earlier day is \
             billed on the next day's bill)"
        )));
    }

    // Pre-pass: what is unbilled, in one scan above the low-water mark.
    let mut lap = std::time::Instant::now();
    let tx = client.transaction().await?;
    tx.batch_execute("LOCK TABLE usage_records IN SHARE MODE")
        .await?;
    let low: i64 = tx
        .query_one("SELECT low_water_seq FROM billing_cursor", &[])
        .await?
        .get(0);
    tx.execute(
        "CREATE TEMP TABLE bill_candidates AS
         SELECT u.account_id, u.resource_id, u.meter, u.usage_day, count(*)::int AS records,
                sum(u.quantity)::bigint AS quantity, min(u.seq) AS min_seq, max(u.seq) AS max_seq
         FROM usage_records u
         JOIN accounts a ON a.id = u.account_id
         WHERE u.seq > $1
           AND (a.billed_through_day IS NULL OR u.usage_day > a.billed_through_day OR u.seq > a.billed_through_seq)
         GROUP BY 1, 2, 3, 4",
        &[&low],
    )
    .await?;
    tx.commit().await?;
    client
        .batch_execute("CREATE INDEX ON bill_candidates (account_id); ANALYZE bill_candidates")
        .await?;
    lap_mark(&mut report.timings, "prepass", &mut lap);
    // Accounts this run leaves alone: the day's bill exists (new records wait for the next
    // day's bill), or a meter they used has no price any more (billing part of a day would
    // hide the rest: fix the price list and run again).
    client
        .execute(
            "CREATE TEMP TABLE bill_skipped AS
             SELECT DISTINCT c.account_id, 'already_billed' AS why FROM bill_candidates c
             JOIN bills b ON b.account_id = c.account_id AND b.bill_day = $1
             WHERE c.usage_day <= $1
             UNION
             SELECT DISTINCT c.account_id, 'unpriced' FROM bill_candidates c
             JOIN resources r ON r.account_id = c.account_id AND r.id = c.resource_id
             LEFT JOIN prices p ON p.product = r.product AND p.meter = c.meter
             WHERE c.usage_day <= $1 AND p.meter IS NULL",
            &[&day],
        )
        .await?;
    report.accounts_already_billed = client
        .query_one(
            "SELECT count(*) FROM bill_skipped WHERE why = 'already_billed'",
            &[],
        )
        .await?
        .get(0);
    report.accounts_skipped_unpriced = client
        .query(&format!("SELECT account_id FROM bill_skipped WHERE why = 'unpriced' ORDER BY 1 LIMIT {LISTED}"), &[])
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
             FROM bill_candidates WHERE usage_day <= $1",
            &[&day],
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
                     WHERE usage_day <= $1 AND account_id NOT IN (SELECT account_id FROM bill_skipped)) x) y
             GROUP BY b ORDER BY b",
            &[&day, &params.batch_size],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    report.batches = bounds.len();

    let mut sums = Sums::default();
    for (lo, hi) in &bounds {
        bill_batch(
            client,
            BatchParams { lo, hi, ..params },
            dry_run,
            report,
            &mut sums,
        )
        .await?;
    }

    if !dry_run {
        client
            .execute(
                "UPDATE billing_cursor SET low_water_seq = greatest(low_water_seq, coalesce(
                   (SELECT min(min_seq) - 1 FROM bill_candidates
                    WHERE usage_day > $1 OR account_id IN (SELECT account_id FROM bill_skipped)),
                   (SELECT max(max_seq) FROM bill_candidates),
                   low_water_seq))",
                &[&day],
            )
            .await?;
    }
    Ok(sums)
}

/// Bills the accounts in `[lo, hi]` in one transaction (rolled back on a dry run).
async fn bill_batch(
    client: &mut tokio_postgres::Client,
    p: BatchParams<'_>,
    dry_run: bool,
    report: &mut GenerateBillsReport,
    sums: &mut Sums,
) -> Result<(), JobError> {
    let BatchParams {
        day,
        day_start,
        as_of,
        divisor,
        digits,
        lo,
        hi,
        cause,
        ..
    } = p;
    let tx = client.transaction().await?;
    let mut lap = std::time::Instant::now();
    // Serialise with top-ups, coupon grants and lifecycle decisions on the same accounts.
    tx.execute(
        "SELECT 1 FROM accounts WHERE id >= $1 AND id <= $2
           AND id IN (SELECT account_id FROM bill_candidates WHERE account_id >= $1 AND account_id <= $2
                        AND usage_day <= $3)
           AND id NOT IN (SELECT account_id FROM bill_skipped)
         ORDER BY id FOR UPDATE",
        &[&lo, &hi, &day],
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
               WHERE c.account_id >= $1 AND c.account_id <= $2 AND c.usage_day <= $3
                 AND c.account_id NOT IN (SELECT account_id FROM bill_skipped)
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
               LEFT JOIN prices p ON p.product = r.product AND p.meter = g.meter
             )
             SELECT account_id, resource_id, meter, records, late_records, max_seq, quantity, included,
                    CASE WHEN payg THEN quantity - included ELSE 0 END AS billed,
                    CASE WHEN payg THEN 0 ELSE quantity - included END AS unbilled,
                    unit_price_nanos,
                    -- the rounding rule of domain::money::line_amount: once per line, half away from zero
                    round((CASE WHEN payg THEN quantity - included ELSE 0 END)::numeric
                          * unit_price_nanos / $5::bigint)::bigint AS amount
             FROM q",
            &[&lo, &hi, &day, &day_start, &divisor],
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
           WHERE t.total > 0 AND c.remaining > 0 AND c.expires_at > $1
         )
         SELECT account_id, id AS coupon_id, kind, least(remaining, total - before)::bigint AS draw
         FROM usable WHERE before < total",
        &[&as_of],
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
            "WITH charged AS (
               SELECT a.id, a.state AS old_state, a.cash_balance - b.paid_cash AS new_cash, a.credit_quota,
                      b.max_seq
               FROM accounts a JOIN batch_bills b ON b.account_id = a.id
             ), upd AS (
               -- the new balance, R1's start of arrears, and the account's billing mark
               UPDATE accounts a SET
                 cash_balance = c.new_cash,
                 billed_through_day = $1,
                 billed_through_seq = greatest(a.billed_through_seq, c.max_seq),
                 arrears_since = CASE WHEN c.new_cash + c.credit_quota < 0 THEN coalesce(a.arrears_since, $2)
                                      ELSE a.arrears_since END,
                 state = CASE WHEN a.state = 'good' AND c.new_cash + c.credit_quota < 0 THEN 'in_arrears'
                              ELSE a.state END,
                 updated_at = $2
               FROM charged c WHERE a.id = c.id
               RETURNING a.id, c.old_state, a.state
             )
             INSERT INTO lifecycle_events (account_id, from_state, to_state, reason, cause, occurred_at)
             SELECT id, old_state, state,
                    'arrears: settling the bill of ' || $1 || ' left cash + credit quota below zero', $3, $2
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
    sums.total += totals.get::<_, i64>(0);
    sums.cash_coupons += totals.get::<_, i64>(1);
    sums.general_coupons += totals.get::<_, i64>(2);
    sums.cash += totals.get::<_, i64>(3);
    report.lines += totals.get::<_, i64>(4);
    report.lines_with_unbilled_overage += totals.get::<_, i64>(5);
    report.bills_issued += inserted as i64;
    report.entered_arrears_count += entered.len() as i64;
    let mut ids: Vec<String> = entered.iter().map(|r| r.get(0)).collect();
    ids.sort();
    report.entered_arrears.extend(
        ids.into_iter()
            .take(LISTED.saturating_sub(report.entered_arrears.len())),
    );
    if dry_run {
        if report.would_issue.len() < LISTED {
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
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    lap_mark(&mut report.timings, "commit", &mut lap);
    Ok(())
}
