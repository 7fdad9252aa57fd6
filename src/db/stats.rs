//! Planner statistics kept current by the jobs that change tables fast.
//!
//! PostgreSQL plans from the statistics of the last ANALYZE. Autovacuum keeps them current,
//! but a database where it is off (or behind) plans a batch's look-up of its accounts' notices
//! as a sequential scan of a table it believes empty, while a slot writes tens of thousands of
//! notices: every batch then reads the whole table, and the job's rate falls as the table
//! grows (measured: 500 accounts' notices in 1 s instead of 5 ms). So each job that writes in
//! bulk analyzes, before it reads and again as it goes, the tables it reads whose rows changed
//! by more than a fifth since their last ANALYZE (a little above autovacuum's default tenth,
//! so that where autovacuum runs this rarely does anything).

use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// Rows changed since the last ANALYZE, above which a table is analyzed: this many plus a
/// fifth of its rows.
const BASE: i64 = 1000;
const FRACTION: f64 = 0.2;

/// The tables the lifecycle jobs read for each batch of accounts.
pub const LIFECYCLE: &[&str] = &[
    "accounts",
    "arrears_episodes",
    "resources",
    "resource_suspensions",
    "release_warnings",
    "notices",
    "coupons",
];

/// The tables whose statistics billing's plans and its pre-pass split rest on (the accounts'
/// histogram divides the pre-pass among `billing.workers` connections).
pub const BILLING: &[&str] = &["accounts", "resources"];

/// The tables a delivery claim reads (its staleness check and its contacts).
pub const DELIVERY: &[&str] = &[
    "notices",
    "accounts",
    "arrears_episodes",
    "resources",
    "resource_suspensions",
];

// Raw SQL: pg_stat_user_tables and pg_class are catalog views outside schema.rs.
const STALE: &str = "SELECT s.relname::text AS name, s.n_mod_since_analyze AS changed
     FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
     WHERE s.schemaname = current_schema() AND s.relname = ANY($1)
       AND s.n_mod_since_analyze > $2::bigint + $3::float8 * greatest(c.reltuples, 0)";

/// The ANALYZE of `stale` (those of them in `tables`). Raw SQL: ANALYZE is a utility
/// statement; the names are matched against the fixed lists above, so quoting is enough.
fn analyze(tables: &[&str], stale: &[(String, i64)]) -> Option<String> {
    let list: Vec<String> = stale
        .iter()
        .filter(|(n, _)| tables.contains(&n.as_str()))
        .map(|(n, changed)| {
            tracing::debug!(table = %n, changed, "refreshing planner statistics");
            format!("\"{n}\"")
        })
        .collect();
    (!list.is_empty()).then(|| format!("ANALYZE (SKIP_LOCKED) {}", list.join(", ")))
}

/// Analyzes those of `tables` whose statistics are stale (see the module). A table another
/// session is analyzing or vacuuming is left alone (SKIP_LOCKED). A failure only costs speed,
/// so it is logged, not returned.
pub async fn refresh_stale(conn: &mut AsyncPgConnection, tables: &[&str]) {
    #[derive(QueryableByName)]
    struct Stale {
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = BigInt)]
        changed: i64,
    }
    let run = async {
        let stale: Vec<(String, i64)> = diesel::sql_query(STALE)
            .bind::<diesel::sql_types::Array<Text>, _>(tables)
            .bind::<BigInt, _>(BASE)
            .bind::<diesel::sql_types::Double, _>(FRACTION)
            .load::<Stale>(conn)
            .await?
            .into_iter()
            .map(|s| (s.name, s.changed))
            .collect();
        if let Some(sql) = analyze(tables, &stale) {
            diesel::sql_query(sql).execute(conn).await?;
        }
        Ok::<_, diesel::result::Error>(())
    };
    if let Err(e) = run.await {
        tracing::warn!(error = %e, "could not refresh planner statistics");
    }
}

/// [`refresh_stale`] on a raw client (the delivery pipeline's connections).
pub async fn refresh_stale_raw(client: &tokio_postgres::Client, tables: &[&str]) {
    let run = async {
        let stale: Vec<(String, i64)> = client
            .query(STALE, &[&tables, &BASE, &FRACTION])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if let Some(sql) = analyze(tables, &stale) {
            client.batch_execute(&sql).await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    if let Err(e) = run.await {
        tracing::warn!(error = %e, "could not refresh planner statistics");
    }
}

/// Whether the server's autovacuum is on (`arrears check` warns when it is not).
pub async fn autovacuum_on(conn: &mut AsyncPgConnection) -> diesel::QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        on: bool,
    }
    // Raw SQL: a server setting, not a table.
    let s: Setting = diesel::sql_query("SELECT current_setting('autovacuum') = 'on' AS on")
        .get_result(conn)
        .await?;
    Ok(s.on)
}
