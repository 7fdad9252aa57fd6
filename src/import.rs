//! CSV imports of accounts, resources and usage (PRODUCT.md §5).
//!
//! Each file is imported in one transaction: rows are checked one by one while they stream
//! into a temporary staging table with COPY, then checked together against the database
//! (unknown accounts and resources, duplicates in the file) and moved into place with one
//! set-based statement. Any bad row rolls the whole file back, and every bad line is reported
//! with its field and reason. Usage import takes a fast path when nothing is wrong: the
//! diagnostic queries run only when the insert took fewer rows than the file had.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Datelike, Utc};
use chrono_tz::Tz;
use futures_util::SinkExt;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{Config, Product};
use crate::db::{Db, DbError};
use crate::domain::calendar::billing_day_of;
use crate::domain::money::{self, QUANTITY_DIGITS};

/// At most this many bad lines are kept for the report; the rest are counted.
pub const MAX_REPORTED_ERRORS: usize = 10_000;
/// Usage may end at most this long after the import instant (clock skew of the meters).
const FUTURE_TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub line: u64,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: {count} bad line(s), nothing imported")]
    BadRows {
        file: PathBuf,
        count: usize,
        errors: Vec<LineError>,
    },
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for ImportError {
    fn from(e: tokio_postgres::Error) -> Self {
        ImportError::Db(DbError::Postgres(e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportKind {
    Accounts,
    Resources,
    Usage,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub kind: ImportKind,
    pub file: String,
    pub rows: u64,
    pub inserted: u64,
    pub updated: u64,
    /// Usage events already imported earlier (re-sent): no-ops.
    pub already_imported: u64,
    /// Of those, the ones whose fields differ from the record imported first (usage only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub already_imported_differing: Option<Differing>,
    /// A preview (`--dry-run`): the file was checked and imported in a transaction that was
    /// rolled back; the counts say what a real import would do now.
    pub dry_run: bool,
}

const ACCOUNT_COLUMNS: &[&str] = &[
    "id",
    "name",
    "email",
    "phone",
    "locale",
    "timezone",
    "cash_balance",
    "credit_quota",
    "low_balance_threshold",
];
const RESOURCE_COLUMNS: &[&str] = &[
    "id",
    "account_id",
    "product",
    "billing_mode",
    "package_quota",
    "package_expires_at",
    "payg_enabled",
    "term_ends_at",
];
const USAGE_COLUMNS: &[&str] = &[
    "event_id",
    "account_id",
    "resource_id",
    "meter",
    "quantity",
    "started_at",
    "ended_at",
];

pub use crate::contact::{mask_contact, LOCALES};

/// One CSV record with its columns looked up by name; empty cells are absent.
struct Row<'a> {
    rec: &'a csv::StringRecord,
    idx: &'a HashMap<&'static str, usize>,
}

impl<'a> Row<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        let v = self.rec.get(*self.idx.get(name)?)?.trim();
        (!v.is_empty()).then_some(v)
    }
}

/// Collects the bad lines of one file.
#[derive(Default)]
struct Errors {
    kept: Vec<LineError>,
    count: usize,
}

impl Errors {
    fn push(&mut self, line: u64, field: &str, reason: impl Into<String>) {
        self.count += 1;
        if self.kept.len() < MAX_REPORTED_ERRORS {
            self.kept.push(LineError {
                line,
                field: field.to_string(),
                reason: reason.into(),
            });
        }
    }

    fn into_result(mut self, file: &Path) -> Result<(), ImportError> {
        if self.count == 0 {
            return Ok(());
        }
        self.kept
            .sort_by(|a, b| (a.line, &a.field).cmp(&(b.line, &b.field)));
        Err(ImportError::BadRows {
            file: file.to_path_buf(),
            count: self.count,
            errors: self.kept,
        })
    }
}

/// Writes one field of COPY text format.
struct CopyLine<'a>(&'a mut BytesMut, bool);

impl<'a> CopyLine<'a> {
    fn new(buf: &'a mut BytesMut) -> Self {
        CopyLine(buf, true)
    }

    fn sep(&mut self) {
        if !self.1 {
            self.0.put_u8(b'\t');
        }
        self.1 = false;
    }

    fn text(&mut self, v: Option<&str>) -> &mut Self {
        self.sep();
        match v {
            None => self.0.put_slice(b"\\N"),
            Some(s) => {
                for b in s.bytes() {
                    match b {
                        b'\\' => self.0.put_slice(b"\\\\"),
                        b'\t' => self.0.put_slice(b"\\t"),
                        b'\n' => self.0.put_slice(b"\\n"),
                        b'\r' => self.0.put_slice(b"\\r"),
                        _ => self.0.put_u8(b),
                    }
                }
            }
        }
        self
    }

    fn int(&mut self, v: Option<i64>) -> &mut Self {
        self.sep();
        match v {
            None => self.0.put_slice(b"\\N"),
            Some(n) => self.0.put_slice(itoa::Buffer::new().format(n).as_bytes()),
        }
        self
    }

    fn time(&mut self, v: Option<DateTime<Utc>>) -> &mut Self {
        let s = v.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
        self.text(s.as_deref())
    }

    fn end(&mut self) {
        self.0.put_u8(b'\n');
    }
}

type Parser = Box<dyn FnMut(u64, &Row<'_>, &mut BytesMut, &mut Errors) + Send>;

/// Reads `file`, checks its header, and streams every good row, as formatted by `parse`, into
/// the COPY statement `copy_sql` inside `tx`. Returns the number of data rows and the errors.
async fn stream_file(
    tx: &tokio_postgres::Transaction<'_>,
    copy_sql: &str,
    file: &Path,
    columns: &'static [&'static str],
    mut parse: Parser,
) -> Result<(u64, Errors), ImportError> {
    let io_err = |source| ImportError::Io {
        file: file.to_path_buf(),
        source,
    };
    let reader = std::fs::File::open(file).map_err(io_err)?;
    let (chunks_tx, mut chunks_rx) = mpsc::channel::<Bytes>(8);
    let path = file.to_path_buf();
    let parser = tokio::task::spawn_blocking(move || -> Result<(u64, Errors), ImportError> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(std::io::BufReader::with_capacity(
                1 << 20,
                CrlfToLf::new(reader),
            ));
        let mut errors = Errors::default();
        let headers = rdr
            .headers()
            .map_err(|e| ImportError::Io {
                file: path.clone(),
                source: e.into(),
            })?
            .clone();
        let mut idx: HashMap<&'static str, usize> = HashMap::new();
        for (i, h) in headers.iter().enumerate() {
            let h = h.trim().trim_start_matches('\u{feff}');
            match columns.iter().find(|c| **c == h) {
                Some(c) if idx.contains_key(c) => {
                    errors.push(1, h, "column appears twice in the header")
                }
                Some(c) => {
                    idx.insert(c, i);
                }
                None => errors.push(
                    1,
                    h,
                    format!("unknown column; expected {}", columns.join(",")),
                ),
            }
        }
        for c in columns {
            if !idx.contains_key(c) {
                errors.push(1, c, "missing column in the header");
            }
        }
        if errors.count > 0 {
            return Ok((0, errors));
        }
        let mut buf = BytesMut::with_capacity(1 << 20);
        let mut rows = 0u64;
        let mut rec = csv::StringRecord::new();
        loop {
            let line = rdr.position().line() + 1;
            match rdr.read_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    // A malformed record (bad UTF-8, unbalanced quote): report and go on.
                    let line = e.position().map_or(line, |p| p.line());
                    errors.push(line, "record", e.to_string());
                    if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                        break;
                    }
                    continue;
                }
            }
            // The record's own line: the csv reader's position of a record is where its read
            // began, before any blank lines it skipped; after the read, the reader stands on
            // the line after the record's last one (its terminator read), less the line ends
            // inside its quoted fields.
            let inside: u64 = rec.iter().map(|f| bytecount_lf(f)).sum();
            let line = rdr
                .position()
                .line()
                .saturating_sub(1 + inside)
                .max(rec.position().map_or(line, |p| p.line()));
            rows += 1;
            if rec.len() != headers.len() {
                errors.push(
                    line,
                    "record",
                    format!("has {} fields, the header has {}", rec.len(), headers.len()),
                );
                continue;
            }
            parse(
                line,
                &Row {
                    rec: &rec,
                    idx: &idx,
                },
                &mut buf,
                &mut errors,
            );
            if buf.len() >= (1 << 20) {
                if chunks_tx.blocking_send(buf.split().freeze()).is_err() {
                    break; // the COPY side failed; its error is reported
                }
            }
        }
        if !buf.is_empty() {
            let _ = chunks_tx.blocking_send(buf.freeze());
        }
        Ok((rows, errors))
    });
    // Raw SQL: COPY FROM STDIN (the parsed rows stream into it), which diesel cannot issue.
    let sink = tx.copy_in::<_, Bytes>(copy_sql).await?;
    futures_util::pin_mut!(sink);
    let mut copy_result: Result<(), tokio_postgres::Error> = Ok(());
    while let Some(chunk) = chunks_rx.recv().await {
        if copy_result.is_ok() {
            copy_result = sink.send(chunk).await;
        }
    }
    let parsed = parser.await.map_err(|e| ImportError::Io {
        file: file.to_path_buf(),
        source: std::io::Error::other(e),
    })??;
    copy_result?;
    sink.as_mut().finish().await?;
    Ok(parsed)
}

/// Line ends inside a field (a quoted multi-line value).
fn bytecount_lf(field: &str) -> u64 {
    field.bytes().filter(|b| *b == b'\n').count() as u64
}

/// Reads CRLF line ends as LF. The csv reader splits records on either, but counts lines
/// one behind after each CRLF, so that an error in a file saved on Windows named the line
/// before the bad one; with LF it names the physical line, blank lines included. A lone CR is
/// kept; a CRLF inside a quoted field becomes LF.
struct CrlfToLf<R> {
    inner: R,
    /// The chunk read last ended with a CR: kept back until the next byte shows whether a
    /// LF follows it.
    pending_cr: bool,
    /// The last byte handed out, and whether the end of the input was reached: a file whose
    /// last line has no line end gets one, so that every record ends with one (the line of
    /// a record is read off the reader's count after it).
    last: Option<u8>,
    ended: bool,
}

impl<R> CrlfToLf<R> {
    fn new(inner: R) -> Self {
        CrlfToLf {
            inner,
            pending_cr: false,
            last: None,
            ended: false,
        }
    }
}

impl<R: std::io::Read> std::io::Read for CrlfToLf<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.len() < 2 {
            // Never asked of it by the BufReader in front of it; kept correct anyway.
            return self.inner.read(out);
        }
        loop {
            let start = usize::from(self.pending_cr);
            let n = self.inner.read(&mut out[start..])?;
            if n == 0 {
                if std::mem::take(&mut self.pending_cr) {
                    out[0] = b'\r';
                } else if !self.ended && self.last.is_some_and(|b| b != b'\n') {
                    out[0] = b'\n';
                    self.ended = true;
                } else {
                    return Ok(0);
                }
                self.last = Some(out[0]);
                return Ok(1);
            }
            if self.pending_cr {
                out[0] = b'\r';
                self.pending_cr = false;
            }
            let total = start + n;
            if !out[..total].contains(&b'\r') {
                self.last = Some(out[total - 1]);
                return Ok(total);
            }
            let mut w = 0;
            for i in 0..total {
                let b = out[i];
                if b == b'\r' {
                    if i + 1 == total {
                        self.pending_cr = true;
                        continue;
                    }
                    if out[i + 1] == b'\n' {
                        continue;
                    }
                }
                out[w] = b;
                w += 1;
            }
            if w > 0 {
                self.last = Some(out[w - 1]);
                return Ok(w);
            }
        }
    }
}

fn parse_time(
    row: &Row<'_>,
    field: &str,
    line: u64,
    errors: &mut Errors,
) -> Result<Option<DateTime<Utc>>, ()> {
    match row.get(field) {
        None => Ok(None),
        Some(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) if !(MIN_YEAR..=MAX_YEAR).contains(&t.year()) => {
                errors.push(
                    line,
                    field,
                    format!("{s:?} is out of range (years {MIN_YEAR} to {MAX_YEAR})"),
                );
                Err(())
            }
            Ok(t) => Ok(Some(t.with_timezone(&Utc))),
            Err(e) => {
                errors.push(line, field, format!("{s:?} is not an RFC 3339 time ({e})"));
                Err(())
            }
        },
    }
}

/// The years an imported instant may fall in: PostgreSQL has no year 0, and an instant far
/// outside billing's lifetime is a typo, not a fact.
const MIN_YEAR: i32 = 1900;
const MAX_YEAR: i32 = 9999;

fn parse_amount(
    row: &Row<'_>,
    field: &str,
    digits: u32,
    line: u64,
    errors: &mut Errors,
    non_negative: bool,
) -> Result<Option<i64>, ()> {
    match row.get(field) {
        None => Ok(None),
        Some(s) => {
            let r = if non_negative {
                money::parse_amount(s, digits)
            } else {
                money::parse_scaled(s, digits).and_then(|v| money::bounded(s, v, digits))
            };
            r.map(Some)
                .map_err(|e| errors.push(line, field, e.to_string()))
        }
    }
}

fn require<'a>(row: &Row<'a>, field: &str, line: u64, errors: &mut Errors) -> Result<&'a str, ()> {
    row.get(field)
        .ok_or_else(|| errors.push(line, field, "is required"))
}

async fn begin(
    client: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'_>, ImportError> {
    Ok(client.transaction().await?)
}

/// Commits the import, or rolls it back for a preview.
async fn finish(tx: tokio_postgres::Transaction<'_>, dry_run: bool) -> Result<(), ImportError> {
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(())
}

/// Imports `file` as `kind`, all of it or nothing; with `dry_run`, checks and imports it in
/// a transaction that is rolled back (a preview: nothing is written, every bad line is
/// reported as a real import would).
pub async fn import_file(
    db: &Db,
    config: &Config,
    kind: ImportKind,
    file: &Path,
    as_of: DateTime<Utc>,
    dry_run: bool,
) -> Result<ImportReport, ImportError> {
    match kind {
        ImportKind::Accounts => accounts(db, config, file, as_of, dry_run).await,
        ImportKind::Resources => resources(db, config, file, as_of, dry_run).await,
        ImportKind::Usage => usage(db, config, file, as_of, dry_run).await,
    }
}

/// Reports every (line, field, reason) row of a diagnostic query.
async fn collect_sql_errors(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    errors: &mut Errors,
) -> Result<(), ImportError> {
    // Raw SQL: the diagnostics read temp staging tables, which schema.rs does not declare.
    for r in tx.query(sql, &[]).await? {
        let line: i64 = r.get(0);
        let field: String = r.get(1);
        let reason: String = r.get(2);
        errors.push(line as u64, &field, reason);
    }
    Ok(())
}

/// Reports lines whose `key` repeats an earlier line of the same staged file.
async fn collect_duplicates(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    key: &str,
    field: &str,
    errors: &mut Errors,
) -> Result<(), ImportError> {
    // Raw SQL: a window function over a staging table named at run time.
    let sql = format!(
        "SELECT line, '{field}', 'duplicate in this file: same ' || '{field}' || ' as line ' || first_line
         FROM (SELECT line, min(line) OVER (PARTITION BY {key}) AS first_line FROM {table}) d
         WHERE line <> first_line ORDER BY line LIMIT {MAX_REPORTED_ERRORS}"
    );
    collect_sql_errors(tx, &sql, errors).await
}

async fn accounts(
    db: &Db,
    config: &Config,
    file: &Path,
    as_of: DateTime<Utc>,
    dry_run: bool,
) -> Result<ImportReport, ImportError> {
    let digits = config.billing.minor_unit_digits;
    let mut client = db.raw_client().await?;
    let tx = begin(&mut client).await?;
    // Raw SQL: CREATE TEMP TABLE is DDL, which diesel's query builder does not say.
    tx.batch_execute(
        "CREATE TEMP TABLE accounts_staging (line bigint, id text, name text, email text, phone text, locale text,
           timezone text, cash_balance bigint, credit_quota bigint, low_balance_threshold bigint) ON COMMIT DROP",
    )
    .await?;
    let parse: Parser = Box::new(move |line, row, buf, errors| {
        let before = errors.count;
        let id = require(row, "id", line, errors).ok();
        let name = require(row, "name", line, errors).ok();
        let email = row.get("email");
        if let Some(e) = email {
            if !is_plausible_email(e) {
                errors.push(line, "email", "is not an email address");
            }
        }
        let phone = row.get("phone");
        if let Some(p) = phone {
            if !is_e164(p) {
                errors.push(
                    line,
                    "phone",
                    "is not an E.164 phone number (+ and 8 to 15 digits)",
                );
            }
        }
        let locale = row.get("locale").unwrap_or("en");
        if !LOCALES.contains(&locale) {
            errors.push(
                line,
                "locale",
                format!(
                    "{locale:?} is not a supported locale ({})",
                    LOCALES.join(", ")
                ),
            );
        }
        let timezone = row.get("timezone").unwrap_or("UTC");
        if timezone.parse::<Tz>().is_err() {
            errors.push(
                line,
                "timezone",
                format!("{timezone:?} is not an IANA time zone"),
            );
        }
        let cash = parse_amount(row, "cash_balance", digits, line, errors, false)
            .ok()
            .flatten();
        let credit = parse_amount(row, "credit_quota", digits, line, errors, true)
            .ok()
            .flatten();
        let threshold = parse_amount(row, "low_balance_threshold", digits, line, errors, true)
            .ok()
            .flatten();
        if errors.count > before {
            return;
        }
        CopyLine::new(buf)
            .int(Some(line as i64))
            .text(id)
            .text(name)
            .text(email)
            .text(phone)
            .text(Some(locale))
            .text(Some(timezone))
            .int(Some(cash.unwrap_or(0)))
            .int(Some(credit.unwrap_or(0)))
            .int(threshold)
            .end();
    });
    // Raw SQL: COPY into the staging table, which diesel cannot issue.
    let (rows, mut errors) = stream_file(
        &tx,
        "COPY accounts_staging FROM STDIN",
        file,
        ACCOUNT_COLUMNS,
        parse,
    )
    .await?;
    collect_duplicates(&tx, "accounts_staging", "id", "id", &mut errors).await?;
    errors.into_result(file)?;
    // Raw SQL: data-modifying CTEs over the temp staging table, which the query builder cannot say.
    let r = tx
        .query_one(
            "WITH upserted AS (
               INSERT INTO accounts (id, name, email, phone, locale, timezone, cash_balance, credit_quota,
                                     low_balance_threshold, created_at, updated_at)
               SELECT id, name, email, phone, locale, timezone, cash_balance, credit_quota, low_balance_threshold, $1, $1
               FROM accounts_staging
               ON CONFLICT (id) DO UPDATE SET
                 name = excluded.name, email = excluded.email, phone = excluded.phone, locale = excluded.locale,
                 timezone = excluded.timezone, credit_quota = excluded.credit_quota,
                 low_balance_threshold = excluded.low_balance_threshold, updated_at = excluded.updated_at
               RETURNING id, cash_balance, (xmax = 0) AS inserted
             ), opening AS (
               -- The balance of a new account starts as a ledger entry, so that it always equals
               -- the ledger's sum. An existing account's balance changes only through the ledger.
               INSERT INTO ledger_entries (account_id, kind, amount, reference, effective_at)
               SELECT id, 'opening_balance', cash_balance, 'import', $1 FROM upserted
               WHERE inserted AND cash_balance <> 0
             )
             SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM upserted",
            &[&as_of],
        )
        .await?;
    // The due-work index: accounts whose new figures may give the lifecycle jobs work (a debt
    // without a bill, funds below the threshold, a balance alert to re-arm, a raised credit
    // quota that pays an episode) are looked at by the next runs.
    // Raw SQL: an UPDATE ... FROM the temp staging table; diesel has no UPDATE ... FROM.
    tx.execute(
        "UPDATE accounts a SET alerts_due_at = least(coalesce(a.alerts_due_at, 'infinity'), $1),
                               enforce_due_at = least(coalesce(a.enforce_due_at, 'infinity'), $1)
         FROM accounts_staging s
         WHERE a.id = s.id
           AND (a.cash_balance + a.credit_quota < coalesce(a.low_balance_threshold, 0)
                OR a.episode IS NOT NULL OR NOT a.balance_alert_armed OR a.compliance_locked)",
        &[&as_of],
    )
    .await?;
    finish(tx, dry_run).await?;
    Ok(ImportReport {
        kind: ImportKind::Accounts,
        file: file.display().to_string(),
        rows,
        inserted: r.get::<_, i64>(0) as u64,
        updated: r.get::<_, i64>(1) as u64,
        already_imported: 0,
        already_imported_differing: None,
        dry_run,
    })
}

async fn resources(
    db: &Db,
    config: &Config,
    file: &Path,
    as_of: DateTime<Utc>,
    dry_run: bool,
) -> Result<ImportReport, ImportError> {
    let mut client = db.raw_client().await?;
    let tx = begin(&mut client).await?;
    // Raw SQL: CREATE TEMP TABLE is DDL, which diesel's query builder does not say.
    tx.batch_execute(
        "CREATE TEMP TABLE resources_staging (line bigint, id text, account_id text, product text, billing_mode text,
           package_quota bigint, package_expires_at timestamptz, payg_enabled boolean, term_ends_at timestamptz)
         ON COMMIT DROP",
    )
    .await?;
    let parse = resource_parser(config.products.clone());
    // Raw SQL: COPY into the staging table, which diesel cannot issue.
    let (rows, mut errors) = stream_file(
        &tx,
        "COPY resources_staging FROM STDIN",
        file,
        RESOURCE_COLUMNS,
        parse,
    )
    .await?;
    collect_duplicates(
        &tx,
        "resources_staging",
        "account_id, id",
        "id",
        &mut errors,
    )
    .await?;
    resource_conflicts(&tx, &mut errors).await?;
    errors.into_result(file)?;
    // Raw SQL: a CTE around an upsert from the temp staging table, counting inserts by xmax = 0.
    let r = tx
        .query_one(
            "WITH upserted AS (
               INSERT INTO resources (account_id, id, product, billing_mode, package_quota, package_expires_at,
                                      payg_enabled, term_ends_at, created_at, updated_at)
               SELECT account_id, id, product, billing_mode, package_quota, package_expires_at, payg_enabled,
                      term_ends_at, $1, $1
               FROM resources_staging
               ON CONFLICT (account_id, id) DO UPDATE SET
                 package_quota = excluded.package_quota, package_expires_at = excluded.package_expires_at,
                 payg_enabled = excluded.payg_enabled, term_ends_at = excluded.term_ends_at,
                 updated_at = excluded.updated_at
               RETURNING (xmax = 0) AS inserted
             )
             SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM upserted",
            &[&as_of],
        )
        .await?;
    mark_resources_due(&tx, as_of).await?;
    finish(tx, dry_run).await?;
    Ok(ImportReport {
        kind: ImportKind::Resources,
        file: file.display().to_string(),
        rows,
        inserted: r.get::<_, i64>(0) as u64,
        updated: r.get::<_, i64>(1) as u64,
        already_imported: 0,
        already_imported_differing: None,
        dry_run,
    })
}

/// Checks one resources.csv row against the configured products and writes it in COPY text
/// format for the staging table (line number first).
fn resource_parser(products: std::collections::BTreeMap<String, Product>) -> Parser {
    Box::new(move |line, row, buf, errors| {
        let before = errors.count;
        let id = require(row, "id", line, errors).ok();
        let account = require(row, "account_id", line, errors).ok();
        let product = require(row, "product", line, errors).ok();
        let product_cfg = product.and_then(|p| {
            let found = products.get(p);
            if found.is_none() {
                let known: Vec<&str> = products.keys().map(String::as_str).collect();
                errors.push(
                    line,
                    "product",
                    format!("{p:?} is not a configured product ({})", known.join(", ")),
                );
            }
            found
        });
        let mode = require(row, "billing_mode", line, errors).ok();
        if let Some(m) = mode {
            if !["prepaid", "pay_per_use", "package"].contains(&m) {
                errors.push(
                    line,
                    "billing_mode",
                    format!("{m:?} is not one of prepaid, pay_per_use, package"),
                );
            }
        }
        let quota = parse_amount(row, "package_quota", QUANTITY_DIGITS, line, errors, true)
            .ok()
            .flatten();
        let expires = parse_time(row, "package_expires_at", line, errors)
            .ok()
            .flatten();
        let term_ends = parse_time(row, "term_ends_at", line, errors).ok().flatten();
        let payg = match row
            .get("payg_enabled")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("false") | Some("0") | Some("no") => Some(false),
            Some("true") | Some("1") | Some("yes") => Some(true),
            Some(other) => {
                errors.push(
                    line,
                    "payg_enabled",
                    format!("{other:?} is not true or false"),
                );
                None
            }
        };
        // PRODUCT.md §2: a prepaid resource is paid up front for a term and has a term end;
        // without one it would keep running in arrears for ever.
        if mode == Some("prepaid") && term_ends.is_none() && row.get("term_ends_at").is_none() {
            errors.push(line, "term_ends_at", "is required for a prepaid resource");
        }
        if mode == Some("package") {
            if quota.is_none() {
                errors.push(line, "package_quota", "is required for a package resource");
            }
            if let Some(p) = product_cfg {
                if p.package_meter.is_none() {
                    errors.push(
                        line,
                        "billing_mode",
                        format!("product {:?} has no package meter", p.id),
                    );
                }
            }
        } else if quota.is_some() || expires.is_some() {
            let field = if quota.is_some() {
                "package_quota"
            } else {
                "package_expires_at"
            };
            errors.push(line, field, "is only for package resources");
        }
        if errors.count > before {
            return;
        }
        CopyLine::new(buf)
            .int(Some(line as i64))
            .text(id)
            .text(account)
            .text(product)
            .text(mode)
            .int(quota)
            .time(expires)
            .text(payg.map(|b| if b { "t" } else { "f" }))
            .time(term_ends)
            .end();
    })
}

/// Staged resources the database refuses: an unknown account, or a change of what cannot
/// change (product, billing mode, a released resource).
async fn resource_conflicts(
    tx: &tokio_postgres::Transaction<'_>,
    errors: &mut Errors,
) -> Result<(), ImportError> {
    // Raw SQL: a UNION ALL of diagnostics over the temp staging table, not in schema.rs.
    collect_sql_errors(
        tx,
        &format!(
            "SELECT s.line, 'account_id', 'unknown account ' || quote_literal(s.account_id)
             FROM resources_staging s LEFT JOIN accounts a ON a.id = s.account_id WHERE a.id IS NULL
             UNION ALL
             SELECT s.line, 'product', 'resource exists with product ' || quote_literal(r.product) || ', which cannot change'
             FROM resources_staging s JOIN resources r ON (r.account_id, r.id) = (s.account_id, s.id)
             WHERE r.product <> s.product
             UNION ALL
             SELECT s.line, 'billing_mode', 'resource exists with billing mode ' || r.billing_mode || ', which cannot change'
             FROM resources_staging s JOIN resources r ON (r.account_id, r.id) = (s.account_id, s.id)
             WHERE r.billing_mode <> s.billing_mode
             UNION ALL
             SELECT s.line, 'id', 'resource was released and cannot be changed'
             FROM resources_staging s JOIN resources r ON (r.account_id, r.id) = (s.account_id, s.id)
             WHERE r.state = 'released'
             LIMIT {MAX_REPORTED_ERRORS}"
        ),
        errors,
    )
    .await
}

/// The due-work index after a resources import.
async fn mark_resources_due(
    tx: &tokio_postgres::Transaction<'_>,
    as_of: DateTime<Utc>,
) -> Result<(), ImportError> {
    // The due-work index: a package is looked at when it expires (or now, when it has no
    // quota left); an account in the lifecycle (or owing) is looked at now, its new resources
    // being something to act on.
    // Raw SQL: an UPDATE ... FROM an aggregating CTE over the staging table; diesel has neither.
    tx.execute(
        "WITH due AS (
           SELECT r.account_id,
                  min(CASE WHEN a.episode IS NOT NULL OR a.compliance_locked OR a.cash_balance + a.credit_quota < 0
                             OR (r.billing_mode = 'package' AND NOT r.payg_enabled
                                 AND r.package_used >= coalesce(r.package_quota, 0))
                           THEN $1
                           WHEN r.billing_mode = 'package' THEN r.package_expires_at END) AS at
           FROM resources_staging s
           JOIN resources r ON r.account_id = s.account_id AND r.id = s.id
           JOIN accounts a ON a.id = s.account_id
           GROUP BY r.account_id
         )
         UPDATE accounts a SET enforce_due_at = least(coalesce(a.enforce_due_at, 'infinity'), d.at),
                               alerts_due_at = CASE WHEN d.at <= $1 THEN least(coalesce(a.alerts_due_at, 'infinity'), $1)
                                                    ELSE a.alerts_due_at END
         FROM due d WHERE a.id = d.account_id AND d.at IS NOT NULL",
        &[&as_of],
    )
    .await?;
    Ok(())
}

/// The conditions under which a staged usage row `s` of resource `r` is accepted, shared by
/// the insert and the diagnostics so the two can never disagree.
const USAGE_ACCEPTED: &str = "(r.state <> 'released' OR s.started_at < r.released_at)
     AND (r.state <> 'suspended' OR s.started_at < r.suspended_at)
     AND (r.unsubscribed_at IS NULL OR s.started_at < r.unsubscribed_at)";

/// Checks one usage row and writes it in COPY text format: for the staging table (with the
/// line number first) or straight into `usage_records` (with the import instant last).
fn usage_parser(tz: Tz, as_of: DateTime<Utc>, staging: bool) -> Parser {
    let latest_end = as_of + chrono::Duration::seconds(FUTURE_TOLERANCE_SECS);
    Box::new(move |line, row, buf, errors| {
        let before = errors.count;
        let event = require(row, "event_id", line, errors).ok();
        let account = require(row, "account_id", line, errors).ok();
        let resource = require(row, "resource_id", line, errors).ok();
        let meter = require(row, "meter", line, errors).ok();
        let quantity = match row.get("quantity") {
            None => {
                errors.push(line, "quantity", "is required");
                None
            }
            Some(q) => money::parse_non_negative(q, QUANTITY_DIGITS)
                .and_then(|v| money::bounded(q, v, QUANTITY_DIGITS))
                .map_err(|e| errors.push(line, "quantity", e.to_string()))
                .ok(),
        };
        let started = parse_time(row, "started_at", line, errors).ok().flatten();
        let ended = parse_time(row, "ended_at", line, errors).ok().flatten();
        for (f, v) in [("started_at", started), ("ended_at", ended)] {
            if v.is_none() && row.get(f).is_none() {
                errors.push(line, f, "is required");
            }
        }
        if let (Some(s), Some(e)) = (started, ended) {
            if e < s {
                errors.push(line, "ended_at", "is before started_at");
            } else if e > latest_end {
                errors.push(
                    line,
                    "ended_at",
                    format!("is in the future (after the import instant {as_of})"),
                );
            }
        }
        if errors.count > before {
            return;
        }
        let day = ended.map(|e| billing_day_of(e, tz).to_string());
        let mut out = CopyLine::new(buf);
        if staging {
            out.int(Some(line as i64));
        }
        out.text(account)
            .text(event)
            .text(resource)
            .text(meter)
            .int(quantity)
            .time(started)
            .time(ended)
            .text(day.as_deref());
        if !staging {
            out.time(Some(as_of));
        }
        out.end();
    })
}

// Raw SQL: COPY, which diesel cannot issue.
const USAGE_COPY: &str =
    "COPY usage_records (account_id, event_id, resource_id, meter, quantity, started_at, ended_at,
                                             usage_day, imported_at) FROM STDIN";

/// Imports usage. Fast path: COPY straight into `usage_records` under a savepoint, then one
/// set-based check of the new rows; any duplicate, unknown reference or bad row rolls the
/// savepoint back and the slow path stages the file to find and report every bad line (or,
/// when the only "problem" is events imported before, to skip them).
async fn usage(
    db: &Db,
    config: &Config,
    file: &Path,
    as_of: DateTime<Utc>,
    dry_run: bool,
) -> Result<ImportReport, ImportError> {
    let tz = config.billing.time_zone;
    let mut client = db.raw_client().await?;
    let tx = begin(&mut client).await?;
    // Rows this import inserts get numbers above the sequence's current value.
    // Raw SQL: the sequence usage_records_seq_seq is a relation schema.rs does not declare.
    let before: i64 = tx
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM usage_records_seq_seq",
            &[],
        )
        .await?
        .get(0);
    // Raw SQL: SAVEPOINT is transaction control, not a query diesel builds.
    tx.batch_execute("SAVEPOINT fast_path").await?;
    match stream_file(
        &tx,
        USAGE_COPY,
        file,
        USAGE_COLUMNS,
        usage_parser(tz, as_of, false),
    )
    .await
    {
        Ok((rows, errors)) if errors.count == 0 => {
            // Raw SQL: the shared USAGE_ACCEPTED condition is SQL text, spliced into the statement.
            let bad: i64 = tx
                .query_one(
                    &format!(
                        "SELECT count(*) FROM usage_records s
                         LEFT JOIN resources r ON r.account_id = s.account_id AND r.id = s.resource_id
                         LEFT JOIN prices p ON p.product = r.product AND p.meter = s.meter
                         WHERE s.seq > $1 AND (r.id IS NULL OR p.meter IS NULL OR NOT ({USAGE_ACCEPTED}))"
                    ),
                    &[&before],
                )
                .await?
                .get(0);
            if bad == 0 {
                finish(tx, dry_run).await?;
                return Ok(ImportReport {
                    kind: ImportKind::Usage,
                    file: file.display().to_string(),
                    rows,
                    inserted: rows,
                    updated: 0,
                    already_imported: 0,
                    already_imported_differing: Some(Differing::default()),
                    dry_run,
                });
            }
        }
        Ok(_) => {}
        Err(ImportError::Db(DbError::Postgres(e)))
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
        Err(e) => return Err(e),
    }
    // Raw SQL: ROLLBACK TO SAVEPOINT is transaction control, not a query diesel builds.
    tx.batch_execute("ROLLBACK TO SAVEPOINT fast_path").await?;
    let (rows, inserted, differing) = import_usage_staged(&tx, file, tz, as_of).await?;
    finish(tx, dry_run).await?;
    if differing.count > 0 {
        tracing::warn!(
            events = differing.count,
            first_lines = ?differing.lines,
            "re-sent usage events differ from the records imported first; the first records stand"
        );
    }
    Ok(ImportReport {
        kind: ImportKind::Usage,
        file: file.display().to_string(),
        rows,
        inserted,
        updated: 0,
        already_imported: rows - inserted,
        already_imported_differing: Some(differing),
        dry_run,
    })
}

/// The slow path: stage the file, insert what is new and valid, and if anything is wrong,
/// report every bad line. Returns (rows, inserted).
async fn import_usage_staged(
    tx: &tokio_postgres::Transaction<'_>,
    file: &Path,
    tz: Tz,
    as_of: DateTime<Utc>,
) -> Result<(u64, u64, Differing), ImportError> {
    // Raw SQL: CREATE TEMP TABLE is DDL, which diesel's query builder does not say.
    tx.batch_execute(
        "CREATE TEMP TABLE usage_staging (line bigint, account_id text, event_id text, resource_id text, meter text,
           quantity bigint, started_at timestamptz, ended_at timestamptz, usage_day date) ON COMMIT DROP",
    )
    .await?;
    // Raw SQL: COPY into the staging table, which diesel cannot issue.
    let (rows, mut errors) = stream_file(
        tx,
        "COPY usage_staging FROM STDIN",
        file,
        USAGE_COLUMNS,
        usage_parser(tz, as_of, true),
    )
    .await?;
    // Raw SQL: ANALYZE is a utility command; usage_staging is a temp table not in schema.rs.
    tx.batch_execute("ANALYZE usage_staging").await?;
    let staged: i64 = tx
        .query_one("SELECT count(*) FROM usage_staging", &[])
        .await?
        .get(0);
    let inserted = if errors.count == 0 {
        // Raw SQL: INSERT ... SELECT from the temp staging table, with the USAGE_ACCEPTED text.
        tx.execute(
            &format!(
                "INSERT INTO usage_records (account_id, event_id, resource_id, meter, quantity, started_at, ended_at,
                                            usage_day, imported_at)
                 SELECT s.account_id, s.event_id, s.resource_id, s.meter, s.quantity, s.started_at, s.ended_at,
                        s.usage_day, $1
                 FROM usage_staging s
                 JOIN resources r ON r.account_id = s.account_id AND r.id = s.resource_id
                 JOIN prices p ON p.product = r.product AND p.meter = s.meter
                 WHERE {USAGE_ACCEPTED}
                 ON CONFLICT (account_id, event_id) DO NOTHING"
            ),
            &[&as_of],
        )
        .await?
    } else {
        0
    };
    if errors.count > 0 || inserted < staged as u64 {
        // Find out why rows were left out: duplicates within the file, bad references.
        collect_duplicates(
            tx,
            "usage_staging",
            "account_id, event_id",
            "event_id",
            &mut errors,
        )
        .await?;
        // Raw SQL: diagnostics over the temp staging table, with the USAGE_ACCEPTED text.
        collect_sql_errors(
            tx,
            &format!(
                "SELECT s.line,
                   CASE WHEN a.id IS NULL THEN 'account_id' WHEN r.id IS NULL THEN 'resource_id'
                        WHEN p.meter IS NULL THEN 'meter' ELSE 'started_at' END,
                   CASE WHEN a.id IS NULL THEN 'unknown account ' || quote_literal(s.account_id)
                        WHEN r.id IS NULL THEN 'unknown resource ' || quote_literal(s.resource_id) || ' of account ' || quote_literal(s.account_id)
                        WHEN p.meter IS NULL THEN 'meter ' || quote_literal(s.meter) || ' has no price in product ' || r.product
                        WHEN r.state = 'released' AND s.started_at >= r.released_at THEN 'resource was released at ' || r.released_at
                        WHEN r.state = 'suspended' AND s.started_at >= r.suspended_at THEN 'resource was suspended (' || r.state_reason || ') at ' || r.suspended_at || '; usage starting after that is refused'
                        ELSE 'resource was unsubscribed at ' || r.unsubscribed_at END
                 FROM usage_staging s
                 LEFT JOIN accounts a ON a.id = s.account_id
                 LEFT JOIN resources r ON r.account_id = s.account_id AND r.id = s.resource_id
                 LEFT JOIN prices p ON p.product = r.product AND p.meter = s.meter
                 WHERE a.id IS NULL OR r.id IS NULL OR p.meter IS NULL OR NOT ({USAGE_ACCEPTED})
                 ORDER BY s.line LIMIT {MAX_REPORTED_ERRORS}"
            ),
            &mut errors,
        )
        .await?;
        errors.into_result(file)?;
    }
    let differing = if inserted < staged as u64 {
        differing_resends(tx).await?
    } else {
        Differing::default()
    };
    Ok((rows, inserted, differing))
}

/// Re-sent events (an `event_id` the account already has) whose fields differ from the
/// record imported first: still no-ops (the first record stands, PRODUCT.md §2), but counted
/// and their lines listed, so that a meter that re-sends corrected records is noticed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Differing {
    pub count: u64,
    /// The first lines (up to 100).
    pub lines: Vec<u64>,
}

async fn differing_resends(tx: &tokio_postgres::Transaction<'_>) -> Result<Differing, ImportError> {
    // Raw SQL: a join of the temp staging table, which schema.rs does not declare.
    let row = tx
        .query_one(
            "SELECT count(*), coalesce((array_agg(line ORDER BY line))[1:100], '{}')
             FROM usage_staging s JOIN usage_records u ON u.account_id = s.account_id AND u.event_id = s.event_id
             WHERE (u.resource_id, u.meter, u.quantity, u.started_at, u.ended_at)
                   IS DISTINCT FROM (s.resource_id, s.meter, s.quantity, s.started_at, s.ended_at)",
            &[],
        )
        .await?;
    let lines: Vec<i64> = row.get(1);
    Ok(Differing {
        count: row.get::<_, i64>(0) as u64,
        lines: lines.into_iter().map(|l| l as u64).collect(),
    })
}
/// An address with a dotted domain that lettre (the mailer) also accepts: anything it would
/// refuse at delivery is refused here, at its line.
fn is_plausible_email(s: &str) -> bool {
    if s.parse::<lettre::Address>().is_err() {
        return false;
    }
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !s.chars().any(|c| c.is_whitespace() || c == ',')
        }
        None => false,
    }
}

fn is_e164(s: &str) -> bool {
    s.strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_checks() {
        assert!(is_plausible_email("a@example.com"));
        assert!(!is_plausible_email("a@b"));
        assert!(!is_plausible_email("no-at.example.com"));
        // Refused by lettre's address parser: would die at delivery.
        assert!(!is_plausible_email("a..b@example.com"));
        assert!(!is_plausible_email(".a@example.com"));
        assert!(!is_plausible_email("a(b)@example.com"));
        assert!(is_plausible_email("first.last+tag@mail.example.co.uk"));
        assert!(is_e164("+8613800138000"));
        assert!(!is_e164("13800138000"));
        assert_eq!(mask_contact("alice@example.com"), "a***@example.com");
        assert_eq!(mask_contact("+8613800138000"), "***00");
    }

    #[test]
    fn copy_text_escapes_separators() {
        let mut b = BytesMut::new();
        CopyLine::new(&mut b)
            .text(Some("a\tb\\c\nd"))
            .int(None)
            .int(Some(-5))
            .end();
        assert_eq!(&b[..], b"a\\tb\\\\c\\nd\t\\N\t-5\n");
    }
}

#[cfg(test)]
mod crlf_tests {
    use super::CrlfToLf;
    use std::io::Read;

    /// Reads through the adapter `size` bytes at a time from a reader that hands out `chunk`
    /// bytes a call, so that CRs fall on every boundary.
    fn through(input: &[u8], chunk: usize, size: usize) -> Vec<u8> {
        struct Chunks<'a>(&'a [u8], usize);
        impl Read for Chunks<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(self.1).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut r = CrlfToLf::new(Chunks(input, chunk));
        let mut all = Vec::new();
        let mut buf = vec![0u8; size];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                return all;
            }
            all.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn crlf_becomes_lf_on_every_boundary_and_a_lone_cr_stays() {
        let input = b"a,b\r\n1,2\r\n\r\nx\ry\r\nend\r";
        for chunk in 1..8 {
            for size in 2..8 {
                assert_eq!(
                    through(input, chunk, size),
                    b"a,b\n1,2\n\nx\ry\nend\r\n".to_vec(),
                    "chunk {chunk}, size {size}"
                );
            }
        }
        assert_eq!(through(b"plain\nlines\n", 4, 3), b"plain\nlines\n".to_vec());
        // A last line without its line end gets one; an empty input stays empty.
        assert_eq!(through(b"a\nb", 4, 3), b"a\nb\n".to_vec());
        assert_eq!(through(b"", 4, 3), b"".to_vec());
    }
}
