//! Database access: the connection pool, embedded migrations, the embedded default cluster,
//! and a raw client for the statements diesel cannot say (COPY).

pub mod catalog;
pub mod embedded;
pub mod schema;
pub mod stats;
pub mod url;

pub use url::{database_name, with_database, DbUrl};

use diesel::prelude::*;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::config::Config;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("migrations: {0}")]
    Migration(String),
    #[error("the database has {0} pending migration(s): run `arrears migrate`")]
    PendingMigrations(usize),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("price list: {0}")]
    Prices(#[from] catalog::PricesError),
    #[error("{0}")]
    MoneyMismatch(String),
}

pub type Conn = Object<AsyncPgConnection>;

/// The database of one process: a diesel-async pool and a pool of raw tokio-postgres clients
/// (COPY and set-based SQL), both bounded and both over TLS as the URL says.
#[derive(Clone)]
pub struct Db {
    pub pool: Pool<AsyncPgConnection>,
    pub url: String,
    /// Set when the service shuts down: long jobs stop between batches.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    raw: deadpool_postgres::Pool,
}

/// Raw clients per `Db`: the jobs hold one or two each (a run's client, a lease renewal), so
/// this bounds connections without ever starving a run of the one it waits for.
/// Every raw connection's session: PostgreSQL checks every 100 ms while it runs a statement
/// that the client is still there, so that a runner killed mid-statement (SIGKILL, a crash)
/// releases its slot's advisory lock and its row locks at once, not when the statement ends.
/// Raw SQL: a DO block, so that a server before PostgreSQL 14 (no such setting) ignores it.
const RAW_SESSION_SETUP: &str = "DO $$ BEGIN
  PERFORM set_config('client_connection_check_interval', '100', false);
EXCEPTION WHEN undefined_object THEN NULL;
END $$";

fn raw_pool_size(pool_size: usize) -> usize {
    (pool_size * 2).max(16)
}

/// A raw client borrowed from its `Db`'s pool; goes back when dropped. Its session (temporary
/// tables, advisory locks, settings of the last borrower) is reset before it is lent again.
pub struct RawClient {
    client: deadpool_postgres::Object,
}

impl std::ops::Deref for RawClient {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl std::ops::DerefMut for RawClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
    }
}

/// How `Db::open` treats migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// Apply pending migrations (the embedded default, `arrears migrate`).
    Apply,
    /// Refuse to run against a database with pending migrations.
    Require,
    /// Leave them to the caller (`arrears migrate`, which reports what it applies, then
    /// checks the money settings itself).
    Caller,
}

impl Db {
    /// Opens the configured database, or the embedded default when none is configured (which
    /// is created and migrated on first use).
    pub async fn open(config: &Config, mode: MigrationMode) -> Result<Db, DbError> {
        let (url, mode) = match &config.database.url {
            Some(url) => (url.clone(), mode),
            None => {
                let state_dir = config.embedded.state_dir.clone();
                let emb = tokio::task::spawn_blocking(move || embedded::ensure_started(&state_dir))
                    .await
                    .map_err(|e| DbError::Connect(e.to_string()))??;
                create_database_if_missing(&emb.url).await?;
                // Created and migrated on first use, and priced then too (what `migrate`
                // does), so that a new user's first commands bill; after that, only `prices
                // apply` changes its price list, as for any database.
                let db = Self::open_url(&emb.url, config.database.pool_size, MigrationMode::Apply)
                    .await?;
                let mut conn = db.conn().await?;
                let priced: i64 = schema::prices::table.count().get_result(&mut conn).await?;
                if priced == 0 {
                    catalog::apply(&mut conn, config, chrono::Utc::now(), false).await?;
                }
                drop(conn);
                db.check_money(config).await?;
                return Ok(db);
            }
        };
        let db = Self::open_url(&url, config.database.pool_size, mode).await?;
        if mode != MigrationMode::Caller {
            db.check_money(config).await?;
        }
        Ok(db)
    }

    /// Refuses a configuration whose currency or minor-unit digits differ from the ones the
    /// database's amounts are counted in (`money_settings`, pinned by the first price list
    /// applied): every amount would be read and written in the wrong unit.
    pub async fn check_money(&self, config: &Config) -> Result<(), DbError> {
        let mut conn = self.conn().await?;
        let pinned: Option<(String, i32)> = schema::money_settings::table
            .select((
                schema::money_settings::currency,
                schema::money_settings::minor_unit_digits,
            ))
            .first(&mut conn)
            .await
            .optional()?;
        let (cur, digits) = (&config.billing.currency, config.billing.minor_unit_digits);
        match pinned {
            Some((c, d)) if c != *cur || u32::try_from(d).ok() != Some(digits) => {
                Err(DbError::MoneyMismatch(format!(
                    "configuration: billing.currency = {cur:?} with {digits} minor-unit digits, \
                     but this database counts its amounts in {c} with {d} digits (pinned by its \
                     first price list): use the configuration this database was set up with"
                )))
            }
            _ => Ok(()),
        }
    }

    pub async fn open_url(url: &str, pool_size: usize, mode: MigrationMode) -> Result<Db, DbError> {
        let parsed = DbUrl::parse(url)?;
        // Every diesel connection is made like the raw ones: rustls as the URL says.
        let mut manager_config = diesel_async::pooled_connection::ManagerConfig::default();
        manager_config.custom_setup = Box::new(|url: &str| {
            let url = url.to_string();
            Box::pin(async move {
                let parsed = DbUrl::parse(&url)
                    .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                let tls = parsed
                    .tls()
                    .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                let (client, conn) = parsed
                    .pg
                    .connect(tls)
                    .await
                    .map_err(|e| diesel::ConnectionError::BadConnection(with_causes(&e)))?;
                AsyncPgConnection::try_from_client_and_connection(client, conn).await
            })
        });
        let manager =
            AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, manager_config);
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))?;
        let raw_manager = deadpool_postgres::Manager::from_config(
            parsed.pg.clone(),
            parsed.tls()?,
            deadpool_postgres::ManagerConfig {
                // Not DISCARD ALL: tokio-postgres keeps prepared type lookups on the session.
                // Raw SQL: session commands (DISCARD, RESET) are no queries diesel can build.
                recycling_method: deadpool_postgres::RecyclingMethod::Custom(format!(
                    "DISCARD TEMP; SELECT pg_advisory_unlock_all(); RESET ALL; {RAW_SESSION_SETUP}"
                )),
            },
        );
        let raw = deadpool_postgres::Pool::builder(raw_manager)
            .max_size(raw_pool_size(pool_size))
            // A pool exhausted for this long is an error to report, not a hang.
            .wait_timeout(Some(std::time::Duration::from_secs(120)))
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute(RAW_SESSION_SETUP)
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)
                })
            }))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))?;
        let db = Db {
            pool,
            url: url.to_string(),
            stop: Default::default(),
            raw,
        };
        match mode {
            MigrationMode::Apply => {
                db.migrate().await?;
            }
            MigrationMode::Require => {
                let pending = db.pending_migrations().await?;
                if pending > 0 {
                    return Err(DbError::PendingMigrations(pending));
                }
            }
            MigrationMode::Caller => {}
        }
        Ok(db)
    }

    /// Asks long-running jobs on this handle (and its clones) to stop between batches.
    pub fn request_stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn stopping(&self) -> bool {
        std::sync::atomic::AtomicBool::load(&self.stop, std::sync::atomic::Ordering::SeqCst)
    }

    pub async fn conn(&self) -> Result<Conn, DbError> {
        self.pool
            .get()
            .await
            .map_err(|e| DbError::Pool(with_causes(&e)))
    }

    /// Applies pending migrations; returns the versions applied.
    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        let conn = self.conn().await?;
        tokio::task::spawn_blocking(move || {
            let mut harness = AsyncMigrationHarness::new(conn);
            harness
                .run_pending_migrations(MIGRATIONS)
                .map(|v| v.iter().map(|m| m.to_string()).collect())
                .map_err(|e| DbError::Migration(e.to_string()))
        })
        .await
        .map_err(|e| DbError::Migration(e.to_string()))?
    }

    /// Pending migrations, read without writing: diesel's harness creates its bookkeeping
    /// table when it is missing, which a read-only command on a database never migrated must
    /// not do (every migration is pending there).
    async fn pending_migrations(&self) -> Result<usize, DbError> {
        let mut conn = self.conn().await?;
        let tracked: bool = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(
            "to_regclass('__diesel_schema_migrations') IS NOT NULL",
        ))
        .get_result(&mut conn)
        .await?;
        if !tracked {
            return diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
                .map(|m| m.len())
                .map_err(|e| DbError::Migration(e.to_string()));
        }
        tokio::task::spawn_blocking(move || {
            let mut harness = AsyncMigrationHarness::new(conn);
            harness
                .pending_migrations(MIGRATIONS)
                .map(|v| v.len())
                .map_err(|e| DbError::Migration(e.to_string()))
        })
        .await
        .map_err(|e| DbError::Migration(e.to_string()))?
    }

    /// A raw tokio-postgres client from the bounded pool (COPY, set-based SQL).
    pub async fn raw_client(&self) -> Result<RawClient, DbError> {
        let client = self.raw.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::Connect(with_causes(&e)),
            e => DbError::Pool(with_causes(&e)),
        })?;
        Ok(RawClient { client })
    }

    /// The database's clock, for the clock-agreement guard of destructive jobs.
    pub async fn database_now(&self) -> Result<chrono::DateTime<chrono::Utc>, DbError> {
        let mut conn = self.conn().await?;
        // A raw fragment: diesel's `now` is typed `timestamp` (no time zone); this is timestamptz.
        let now = diesel::select(diesel::dsl::sql::<diesel::sql_types::Timestamptz>("now()"))
            .get_result::<chrono::DateTime<chrono::Utc>>(&mut conn)
            .await?;
        Ok(now)
    }
}

/// An error with the errors that caused it ("db error: FATAL: database \"x\" does not
/// exist", not only "db error"), each once.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// `url` without its password, for anything printed or logged.
pub fn redact_url(url: &str) -> String {
    match ::url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => url.to_string(),
        // Not a URL: shown only up to its user info, if any.
        Err(_) => match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_string(),
        },
    }
}

/// `url` without its password, and the password (percent-decoded), for tools that take the
/// password from the environment (PGPASSWORD) rather than a command line anyone can read.
pub fn split_password(url: &str) -> (String, Option<String>) {
    match ::url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let pass = u.password().map(|p| {
                percent_encoding::percent_decode_str(p)
                    .decode_utf8_lossy()
                    .into_owned()
            });
            let _ = u.set_password(None);
            (u.to_string(), pass)
        }
        _ => (url.to_string(), None),
    }
}

/// One connection on its own to `url` (TLS as the URL says).
pub async fn raw_connect(url: &str) -> Result<tokio_postgres::Client, DbError> {
    url::connect(&DbUrl::parse(url)?).await
}

/// Drops database `name` on the server of `url` (when it exists) and creates it empty: the
/// scratch databases of the benchmarks and the demo. Returns its URL. `name` is the
/// program's own, or checked by the caller: it is not quoted.
pub async fn recreate_database(url: &str, name: &str) -> Result<String, DbError> {
    let admin = raw_connect(&with_database(url, "postgres")?).await?;
    // Raw SQL: DROP / CREATE DATABASE are DDL, which diesel's query builder does not say.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    with_database(url, name)
}

/// Creates the database named in `url` when it does not exist, connecting to `postgres`.
async fn create_database_if_missing(url: &str) -> Result<(), DbError> {
    let name = database_name(url)?;
    let admin = raw_connect(&with_database(url, "postgres")?).await?;
    // Raw SQL: pg_database is a catalog outside schema.rs (and CREATE DATABASE is DDL).
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // Identifier from our own embedded URL: quoted, never user input.
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
    }
    Ok(())
}
