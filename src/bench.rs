//! `arrears bench`: generates N accounts with resources and M usage records for one day,
//! loads them through the import path, runs generate_bills, and compares both with what
//! PostgreSQL does on its own: a plain COPY of the same usage CSV into a table with the same
//! unique key, and one hand-written set-based statement that rates the same data.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::SinkExt;
use serde::Serialize;

use crate::config::Config;
use crate::db::{self, catalog, Db, DbError, MigrationMode};
use crate::domain::money::{PRICE_DIGITS, QUANTITY_DIGITS};
use crate::import;
use crate::jobs::generate_bills;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub accounts: u64,
    pub usage: u64,
    /// Where the generated CSV files go.
    pub dir: PathBuf,
    /// Consecutive billing days: day 1 is compared with the references, the days after it
    /// (the same number of records each, imported then billed as a deployment would) show
    /// whether billing's cost grows with history.
    pub days: u32,
}

/// One billing day of a `--days` run.
#[derive(Debug, Clone, Serialize)]
pub struct DayFigures {
    pub bill_day: chrono::NaiveDate,
    pub import_usage_seconds: f64,
    pub billing_seconds: f64,
    /// WAL the cluster wrote while the day was billed, MiB: the day's writes, full-page images
    /// of the index pages they touched included (each day starts after a CHECKPOINT). Unlike
    /// the seconds, it does not move with the machine's load.
    pub billing_wal_mib: f64,
    pub bills_issued: i64,
    /// Usage records in the database when the day was billed (history included).
    pub usage_records_in_database: i64,
    /// Where generate_bills spent its time, by phase.
    pub billing_phases: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub accounts: u64,
    pub usage_records: u64,
    pub generate_seconds: f64,
    pub import_accounts_seconds: f64,
    pub import_resources_seconds: f64,
    pub import_usage_seconds: f64,
    pub import_usage_rows_per_second: f64,
    pub plain_copy_seconds: f64,
    pub plain_copy_rows_per_second: f64,
    /// arrears' usage import rate / plain COPY rate (target >= 0.7).
    pub import_ratio: f64,
    pub billing_seconds: f64,
    pub bills_issued: i64,
    pub handwritten_rating_seconds: f64,
    /// arrears' billing time / hand-written rating statement time.
    pub billing_ratio: f64,
    /// One hand-written transaction doing the same durable writes (lines, bills, ledger
    /// entries, balances into copies of the tables with the same keys and indexes).
    pub same_writes_seconds: f64,
    /// arrears' billing time / same-writes transaction time (target <= 1.3).
    pub same_writes_ratio: f64,
    /// Every billed day, the first one included (`--days`).
    pub days: Vec<DayFigures>,
    /// Billing time of the last day / of the first (target <= 1.1).
    pub last_to_first_day: f64,
    /// The same ratio read off the least-squares line through every day's billing time: how
    /// the cost grows with history, less the noise of any one day.
    pub last_to_first_day_trend: f64,
    /// WAL written billing the last day / the first.
    pub last_to_first_day_wal: f64,
    /// Where generate_bills spent its time, by phase.
    pub billing_phases: std::collections::BTreeMap<String, f64>,
    /// Peak resident memory of this process (the arrears code under test), MiB.
    pub peak_rss_mib: f64,
    pub database: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Import(#[from] import::ImportError),
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<tokio_postgres::Error> for BenchError {
    fn from(e: tokio_postgres::Error) -> Self {
        BenchError::Db(DbError::Postgres(e))
    }
}

const BENCH_DB: &str = "arrears_bench";
const DAY_START: &str = "2026-11-22T00:00:00+08:00";

pub async fn run(config: &Config, opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    // A fresh database next to the configured (or embedded) one.
    let base = Db::open(config, MigrationMode::Apply).await?;
    let admin = db::raw_connect(&db::with_database(&base.url, "postgres")?).await?;
    let url = db::recreate_database(&base.url, BENCH_DB).await?;
    let db = Db::open_url(&url, 2, MigrationMode::Apply).await?;
    catalog::apply_to_new(&db, config).await?;

    std::fs::create_dir_all(&opts.dir)?;
    let t = Instant::now();
    let files = generate(&opts.dir, opts.accounts, opts.usage)?;
    let generate_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "generated {} accounts and {} usage records in {generate_seconds:.1}s",
        opts.accounts, opts.usage
    );

    let as_of: DateTime<Utc> = "2026-11-23T00:30:00+08:00"
        .parse()
        .expect("literal instant");
    let t = Instant::now();
    import::import_file(
        &db,
        config,
        import::ImportKind::Accounts,
        &files.accounts,
        as_of,
        false,
    )
    .await?;
    let import_accounts_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    import::import_file(
        &db,
        config,
        import::ImportKind::Resources,
        &files.resources,
        as_of,
        false,
    )
    .await?;
    let import_resources_seconds = t.elapsed().as_secs_f64();
    // Raw SQL: CHECKPOINT, a utility command diesel cannot issue (benchmark scaffolding).
    admin.batch_execute("CHECKPOINT").await?;
    let t = Instant::now();
    let rep = import::import_file(
        &db,
        config,
        import::ImportKind::Usage,
        &files.usage,
        as_of,
        false,
    )
    .await?;
    let import_usage_seconds = t.elapsed().as_secs_f64();
    assert_eq!(
        rep.inserted, opts.usage,
        "every generated record is imported"
    );
    eprintln!("imported usage in {import_usage_seconds:.1}s");

    let client = db.raw_client().await?;
    // Raw SQL: benchmark scaffolding (DDL, CHECKPOINT), which diesel cannot issue.
    client
        .batch_execute(
            "DROP TABLE IF EXISTS copy_baseline;
             CREATE TABLE copy_baseline (event_id text, account_id text, resource_id text, meter text,
               quantity numeric, started_at timestamptz, ended_at timestamptz, PRIMARY KEY (account_id, event_id));
             CHECKPOINT",
        )
        .await?;
    let t = Instant::now();
    // Raw SQL: COPY, which diesel cannot issue (the plain-COPY baseline).
    copy_file(
        &client,
        "COPY copy_baseline FROM STDIN (FORMAT csv, HEADER true)",
        &files.usage,
    )
    .await?;
    let plain_copy_seconds = t.elapsed().as_secs_f64();
    // Raw SQL: benchmark scaffolding (DDL, VACUUM, CHECKPOINT).
    for sql in [
        "DROP TABLE copy_baseline",
        "VACUUM ANALYZE usage_records",
        "CHECKPOINT",
    ] {
        client.batch_execute(sql).await?;
    }
    eprintln!("plain COPY in {plain_copy_seconds:.1}s");

    let bill_day = crate::domain::calendar::default_billing_day(as_of, config.billing.time_zone);
    let same_writes_seconds = same_writes(&client, &admin, config, bill_day, as_of).await?;
    eprintln!("same-writes transaction in {same_writes_seconds:.1}s");

    let wal = wal_position(&client).await?;
    let t = Instant::now();
    let bills = bill(&db, config, as_of).await?;
    let billing_seconds = t.elapsed().as_secs_f64();
    let billing_wal_mib = wal_since(&client, &wal).await?;
    eprintln!("billed in {billing_seconds:.1}s ({billing_wal_mib:.0} MiB of WAL)");

    let handwritten_rating_seconds = rating_only(&client, config, bills.bill_day).await?;

    let mut days = vec![DayFigures {
        bill_day: bills.bill_day,
        import_usage_seconds,
        billing_seconds,
        billing_wal_mib,
        bills_issued: bills.bills_issued,
        usage_records_in_database: opts.usage as i64,
        billing_phases: bills.timings.clone(),
    }];
    later_days(&db, &client, &admin, config, opts, as_of, &mut days).await?;
    let last_to_first_day = days.last().map_or(1.0, |l| l.billing_seconds) / billing_seconds;
    let seconds: Vec<f64> = days.iter().map(|d| d.billing_seconds).collect();
    let last_to_first_day_trend = trend_last_to_first(&seconds);
    let last_to_first_day_wal = days.last().map_or(1.0, |l| l.billing_wal_mib) / billing_wal_mib;

    let rows = opts.usage as f64;
    Ok(BenchReport {
        accounts: opts.accounts,
        usage_records: opts.usage,
        generate_seconds,
        import_accounts_seconds,
        import_resources_seconds,
        import_usage_seconds,
        import_usage_rows_per_second: rows / import_usage_seconds,
        plain_copy_seconds,
        plain_copy_rows_per_second: rows / plain_copy_seconds,
        import_ratio: plain_copy_seconds / import_usage_seconds,
        billing_seconds,
        bills_issued: bills.bills_issued,
        handwritten_rating_seconds,
        billing_ratio: billing_seconds / handwritten_rating_seconds,
        same_writes_seconds,
        same_writes_ratio: billing_seconds / same_writes_seconds,
        days,
        last_to_first_day,
        last_to_first_day_trend,
        last_to_first_day_wal,
        billing_phases: bills.timings.clone(),
        peak_rss_mib: peak_rss_mib(),
        database: if config.database.url.is_some() {
            "configured".into()
        } else {
            "embedded".into()
        },
    })
}

/// The rating-only reference: one statement that rates the day's usage into a scratch table.
async fn rating_only(
    client: &tokio_postgres::Client,
    config: &Config,
    bill_day: chrono::NaiveDate,
) -> Result<f64, BenchError> {
    let divisor = 10i64.pow(QUANTITY_DIGITS + PRICE_DIGITS - config.billing.minor_unit_digits);
    let t = Instant::now();
    // Raw SQL: the hand-written reference, a CREATE TEMP TABLE ... AS SELECT diesel cannot say.
    client
        .execute(
            "CREATE TEMP TABLE handwritten AS
             SELECT u.account_id, u.resource_id, u.meter, count(*) AS records, sum(u.quantity) AS quantity,
                    round(sum(u.quantity) * p.unit_price_nanos / $1::bigint) AS amount
             FROM usage_records u
             JOIN resources r ON r.account_id = u.account_id AND r.id = u.resource_id
             JOIN prices p ON p.product = r.product AND p.meter = u.meter
             WHERE u.usage_day = $2
             GROUP BY u.account_id, u.resource_id, u.meter, p.unit_price_nanos",
            &[&divisor, &bill_day],
        )
        .await?;
    let seconds = t.elapsed().as_secs_f64();
    // Raw SQL: DROP TABLE is DDL, which diesel's query builder does not say.
    client.batch_execute("DROP TABLE handwritten").await?;
    Ok(seconds)
}

/// The cluster's WAL insert position, as text (pg_lsn has no Rust type here).
async fn wal_position(client: &tokio_postgres::Client) -> Result<String, BenchError> {
    // Raw SQL: a server function on the bench's raw client.
    Ok(client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0))
}

/// MiB of WAL written since `from` (a `wal_position`).
async fn wal_since(client: &tokio_postgres::Client, from: &str) -> Result<f64, BenchError> {
    // Raw SQL: a server function on the bench's raw client.
    let bytes: i64 = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)::bigint",
            &[&from],
        )
        .await?
        .get(0);
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// The least-squares line through `ys` (one per day), its value at the last day over its value
/// at the first; 1 for fewer than two days.
fn trend_last_to_first(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 1.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    let slope = sxy / sxx;
    let first = mean_y - slope * mean_x;
    (first + slope * (n - 1.0)) / first
}

/// `--days`: each later day's usage generated, imported and billed, as the nights would.
async fn later_days(
    db: &Db,
    client: &tokio_postgres::Client,
    admin: &tokio_postgres::Client,
    config: &Config,
    opts: &BenchOptions,
    as_of: DateTime<Utc>,
    days: &mut Vec<DayFigures>,
) -> Result<(), BenchError> {
    for d in 1..opts.days.max(1) {
        let as_of = as_of + chrono::Duration::days(i64::from(d));
        let file = opts.dir.join(format!("usage-{d}.csv"));
        generate_usage(&file, opts.accounts, opts.usage, d)?;
        let t = Instant::now();
        let rep =
            import::import_file(db, config, import::ImportKind::Usage, &file, as_of, false).await?;
        let import_usage_seconds = t.elapsed().as_secs_f64();
        assert_eq!(
            rep.inserted, opts.usage,
            "every generated record is imported"
        );
        // What autovacuum would have done during the day (this machine runs with it off):
        // the day's rows analyzed, the previous night's updates vacuumed.
        // Raw SQL: benchmark scaffolding (VACUUM, CHECKPOINT).
        client.batch_execute("VACUUM ANALYZE").await?;
        admin.batch_execute("CHECKPOINT").await?;
        let wal = wal_position(client).await?;
        let t = Instant::now();
        let r = bill(db, config, as_of).await?;
        let billing_seconds = t.elapsed().as_secs_f64();
        let billing_wal_mib = wal_since(client, &wal).await?;
        // Raw SQL: a count on the bench's raw client, which diesel does not drive.
        let in_db: i64 = client
            .query_one("SELECT count(*) FROM usage_records", &[])
            .await?
            .get(0);
        eprintln!(
            "day {} ({}): imported in {import_usage_seconds:.1}s, billed in {billing_seconds:.1}s \
             ({billing_wal_mib:.0} MiB of WAL)",
            d + 1,
            r.bill_day
        );
        days.push(DayFigures {
            bill_day: r.bill_day,
            import_usage_seconds,
            billing_seconds,
            billing_wal_mib,
            bills_issued: r.bills_issued,
            usage_records_in_database: in_db,
            billing_phases: r.timings,
        });
    }
    Ok(())
}

async fn bill(
    db: &Db,
    config: &Config,
    as_of: DateTime<Utc>,
) -> Result<generate_bills::GenerateBillsReport, BenchError> {
    Ok(generate_bills::run(
        db,
        config,
        &generate_bills::Options {
            as_of,
            bill_day: None,
            dry_run: false,
            force: false,
        },
    )
    .await?)
}

/// The fair floor of billing: one hand-written transaction that writes what a bill run must
/// write durably — a line per account, resource and meter (rated at the day's prices), a bill
/// per account, a charge per bill in the ledger, each account's new balance and billing mark —
/// into copies of `bill_lines`, `bills`, `ledger_entries` and `accounts` with the same keys,
/// indexes, defaults and checks (`LIKE ... INCLUDING ALL`; no foreign keys or triggers).
/// It skips what arrears does besides (packages, coupons, late records, R1, the due-work
/// index, batches any instance can claim, crash safety per batch). Returns its seconds.
async fn same_writes(
    client: &tokio_postgres::Client,
    admin: &tokio_postgres::Client,
    config: &Config,
    day: chrono::NaiveDate,
    as_of: DateTime<Utc>,
) -> Result<f64, BenchError> {
    // Raw SQL: benchmark scaffolding (DDL, VACUUM, CHECKPOINT) for the ref_* copies.
    client
        .batch_execute(
            "DROP TABLE IF EXISTS ref_bill_lines, ref_bills, ref_ledger_entries, ref_accounts;
             CREATE TABLE ref_bill_lines (LIKE bill_lines INCLUDING ALL);
             CREATE TABLE ref_bills (LIKE bills INCLUDING ALL);
             CREATE TABLE ref_ledger_entries (LIKE ledger_entries INCLUDING ALL);
             CREATE TABLE ref_accounts (LIKE accounts INCLUDING ALL);
             INSERT INTO ref_accounts SELECT * FROM accounts",
        )
        .await?;
    client
        .batch_execute("VACUUM ANALYZE ref_accounts, ref_bill_lines, ref_bills, ref_ledger_entries")
        .await?;
    admin.batch_execute("CHECKPOINT").await?;
    let divisor = 10i64.pow(QUANTITY_DIGITS + PRICE_DIGITS - config.billing.minor_unit_digits);
    let day_start = crate::domain::calendar::start_of_day(day, config.billing.time_zone);
    let t = Instant::now();
    // Raw SQL: the hand-written reference, over ref_* tables that schema.rs does not declare.
    client.batch_execute("BEGIN").await?;
    client
        .execute(
            "INSERT INTO ref_bill_lines (account_id, bill_day, resource_id, meter, records, quantity,
                                         included_quantity, billed_quantity, unbilled_quantity, unit_price_nanos, amount)
             SELECT u.account_id, $2, u.resource_id, u.meter, count(*), sum(u.quantity), 0, sum(u.quantity), 0,
                    p.unit_price_nanos, round(sum(u.quantity)::numeric * p.unit_price_nanos / $1::bigint)::bigint
             FROM usage_records u
             JOIN resources r ON r.account_id = u.account_id AND r.id = u.resource_id
             JOIN prices_at($3) p ON p.product = r.product AND p.meter = u.meter
             WHERE u.usage_day = $2
             GROUP BY u.account_id, u.resource_id, u.meter, p.unit_price_nanos",
            &[&divisor, &day, &day_start],
        )
        .await?;
    client
        .execute(
            "INSERT INTO ref_bills (account_id, bill_day, total, paid_cash_coupons, paid_general_coupons, paid_cash,
                                    records, late_records, issued_at)
             SELECT account_id, bill_day, sum(amount), 0, 0, sum(amount), sum(records), 0, $1
             FROM ref_bill_lines GROUP BY account_id, bill_day",
            &[&as_of],
        )
        .await?;
    client
        .execute(
            "INSERT INTO ref_ledger_entries (account_id, kind, amount, bill_day, effective_at)
             SELECT account_id, 'charge', -total, bill_day, $1 FROM ref_bills WHERE total > 0",
            &[&as_of],
        )
        .await?;
    client
        .execute(
            "UPDATE ref_accounts a SET cash_balance = a.cash_balance - b.total, billed_through_day = b.bill_day,
                                       updated_at = $1
             FROM ref_bills b WHERE a.id = b.account_id",
            &[&as_of],
        )
        .await?;
    client.batch_execute("COMMIT").await?;
    let seconds = t.elapsed().as_secs_f64();
    // Raw SQL: benchmark scaffolding (DDL, CHECKPOINT).
    client
        .batch_execute("DROP TABLE ref_bill_lines, ref_bills, ref_ledger_entries, ref_accounts")
        .await?;
    admin.batch_execute("CHECKPOINT").await?;
    Ok(seconds)
}

/// What `arrears bench-instances` measured: one billing run billed by one instance, then the
/// same run (on an identical copy of the data) with helper instances claiming its batches.
#[derive(Debug, Serialize)]
pub struct InstancesReport {
    pub accounts: u64,
    pub usage_records: u64,
    pub batch_size: usize,
    pub one_instance_seconds: f64,
    pub with_helpers_seconds: f64,
    pub helpers: usize,
    pub speedup: f64,
    pub bills_one: i64,
    pub bills_with_helpers: i64,
}

pub struct InstancesOptions {
    pub accounts: u64,
    pub usage: u64,
    pub dir: PathBuf,
    pub helpers: usize,
}

/// Bills the same generated day twice, on two identical copies: once by one instance alone,
/// once with `helpers` more instances (each its own pool and connections, as a separate
/// process would have) claiming batches with FOR UPDATE SKIP LOCKED.
pub async fn run_instances(
    config: &Config,
    opts: &InstancesOptions,
) -> Result<InstancesReport, BenchError> {
    let base = Db::open(config, MigrationMode::Apply).await?;
    let server = base.url.clone();
    let names = [
        "arrears_bench_src",
        "arrears_bench_one",
        "arrears_bench_many",
    ];
    db::recreate_database(&base.url, names[0]).await?;
    drop(base);
    let admin = db::raw_connect(&db::with_database(&server, "postgres")?).await?;
    let as_of: DateTime<Utc> = "2026-11-23T00:30:00+08:00"
        .parse()
        .expect("literal instant");
    {
        let db = Db::open_url(
            &db::with_database(&server, names[0])?,
            2,
            MigrationMode::Apply,
        )
        .await?;
        catalog::apply_to_new(&db, config).await?;
        std::fs::create_dir_all(&opts.dir)?;
        let files = generate(&opts.dir, opts.accounts, opts.usage)?;
        use import::ImportKind::{Accounts, Resources, Usage};
        for (kind, file) in [
            (Accounts, &files.accounts),
            (Resources, &files.resources),
            (Usage, &files.usage),
        ] {
            import::import_file(&db, config, kind, file, as_of, false).await?;
        }
        // Raw SQL: VACUUM ANALYZE, a utility command diesel cannot issue.
        db.raw_client()
            .await?
            .batch_execute("VACUUM ANALYZE")
            .await?;
        db.pool.close();
    }
    // Raw SQL: DROP / CREATE DATABASE ... TEMPLATE are DDL, which diesel does not say.
    for n in &names[1..] {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
            .await?;
        let mut tries = 0;
        loop {
            match admin
                .batch_execute(&format!("CREATE DATABASE {n} TEMPLATE {}", names[0]))
                .await
            {
                Ok(()) => break,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    // Raw SQL: CHECKPOINT, a utility command diesel cannot issue.
    admin.batch_execute("CHECKPOINT").await?;
    let options = generate_bills::Options {
        as_of,
        bill_day: None,
        dry_run: false,
        force: false,
    };

    let one = Db::open_url(
        &db::with_database(&server, names[1])?,
        2,
        MigrationMode::Require,
    )
    .await?;
    let t = Instant::now();
    let r1 = generate_bills::run(&one, config, &options).await?;
    let one_instance_seconds = t.elapsed().as_secs_f64();
    eprintln!("one instance: {one_instance_seconds:.1}s");
    // Raw SQL: CHECKPOINT, a utility command diesel cannot issue.
    admin.batch_execute("CHECKPOINT").await?;

    let url = db::with_database(&server, names[2])?;
    let many = Db::open_url(&url, 2, MigrationMode::Require).await?;
    let mut helpers = Vec::new();
    for _ in 0..opts.helpers {
        let db = Db::open_url(&url, 2, MigrationMode::Require).await?;
        let config = config.clone();
        helpers.push(tokio::spawn(async move {
            // Poll for open batches as the service's batch loop does, until aborted.
            loop {
                if let Err(e) = generate_bills::work_open_batches(&db, &config).await {
                    eprintln!("helper: {e}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }));
    }
    let t = Instant::now();
    let r2 = generate_bills::run(&many, config, &options).await?;
    let with_helpers_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "with {} helper(s): {with_helpers_seconds:.1}s",
        opts.helpers
    );
    for h in helpers {
        h.abort();
    }
    drop(many);
    for n in names {
        // Raw SQL: DROP DATABASE is DDL, which diesel's query builder does not say.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
            .await?;
    }
    Ok(InstancesReport {
        accounts: opts.accounts,
        usage_records: opts.usage,
        batch_size: config.billing.batch_size,
        one_instance_seconds,
        with_helpers_seconds,
        helpers: opts.helpers,
        speedup: one_instance_seconds / with_helpers_seconds,
        bills_one: r1.bills_issued,
        bills_with_helpers: r2.bills_issued,
    })
}

struct Files {
    accounts: PathBuf,
    resources: PathBuf,
    usage: PathBuf,
}

/// Writes the three CSV files. Every account has one pay-per-use resource; every tenth also
/// a package with pay-as-you-go on. Usage is spread evenly over the accounts, within one day.
fn generate(dir: &Path, accounts: u64, usage: u64) -> std::io::Result<Files> {
    let files = Files {
        accounts: dir.join("accounts.csv"),
        resources: dir.join("resources.csv"),
        usage: dir.join("usage.csv"),
    };
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&files.accounts)?);
    writeln!(
        w,
        "id,name,email,phone,locale,timezone,cash_balance,credit_quota,low_balance_threshold"
    )?;
    for i in 0..accounts {
        writeln!(
            w,
            "acc{i:08},Account {i},,,en,Asia/Shanghai,{}.00,0,",
            20 + i % 80
        )?;
    }
    w.flush()?;
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&files.resources)?);
    writeln!(w, "id,account_id,product,billing_mode,package_quota,package_expires_at,payg_enabled,term_ends_at")?;
    for i in 0..accounts {
        writeln!(w, "res{i:08},acc{i:08},lcic,pay_per_use,,,,")?;
        if i % 10 == 0 {
            writeln!(
                w,
                "pkg{i:08},acc{i:08},lcic,package,300,2027-01-01T00:00:00Z,true,"
            )?;
        }
    }
    w.flush()?;
    generate_usage(&files.usage, accounts, usage, 0)?;
    Ok(files)
}

/// Writes `usage` records of billing day `day` (0: the first), spread evenly over the
/// accounts; event ids are unique across days.
fn generate_usage(path: &Path, accounts: u64, usage: u64, day: u32) -> std::io::Result<()> {
    let start_of: DateTime<Utc> = DAY_START.parse().expect("literal instant");
    let start_of = start_of + chrono::Duration::days(i64::from(day));
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(
        w,
        "event_id,account_id,resource_id,meter,quantity,started_at,ended_at"
    )?;
    let meters = ["classroom_minutes", "recording_minutes", "storage_gb_days"];
    for n in 0..usage {
        let i = n % accounts.max(1);
        let resource = if i % 10 == 0 && n % 3 == 0 {
            format!("pkg{i:08}")
        } else {
            format!("res{i:08}")
        };
        let meter = if resource.starts_with("pkg") {
            meters[0]
        } else {
            meters[(n % 3) as usize]
        };
        let start = start_of + chrono::Duration::seconds(((n * 7919) % 80_000) as i64);
        let end = start + chrono::Duration::seconds(60 + (n % 3000) as i64);
        writeln!(
            w,
            "ev{day:03}{n:010},acc{i:08},{resource},{meter},{}.{:02},{},{}",
            1 + n % 90,
            n % 100,
            start.format("%Y-%m-%dT%H:%M:%SZ"),
            end.format("%Y-%m-%dT%H:%M:%SZ")
        )?;
    }
    w.flush()
}

async fn copy_file(
    client: &tokio_postgres::Client,
    sql: &str,
    file: &Path,
) -> Result<(), BenchError> {
    use tokio::io::AsyncReadExt;
    // Raw SQL: COPY FROM STDIN, which diesel cannot issue.
    let sink = client.copy_in::<_, Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    let mut f = tokio::fs::File::open(file).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        sink.send(Bytes::copy_from_slice(&buf[..n])).await?;
    }
    sink.as_mut().finish().await?;
    Ok(())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::trend_last_to_first;

    #[test]
    fn trend_reads_growth_off_the_fitted_line() {
        assert_eq!(trend_last_to_first(&[4.0]), 1.0);
        assert!((trend_last_to_first(&[4.0, 4.0, 4.0]) - 1.0).abs() < 1e-12);
        // A straight line: the fit is the line itself.
        assert!((trend_last_to_first(&[1.0, 2.0, 3.0]) - 3.0).abs() < 1e-12);
        // One slow last day moves the fit, not as far as the raw last/first (5/4).
        let t = trend_last_to_first(&[4.0, 4.0, 4.0, 4.0, 5.0]);
        assert!(t > 1.0 && t < 1.25, "{t}");
    }
}
