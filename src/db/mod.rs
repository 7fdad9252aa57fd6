//! Database access: the connection pool, embedded migrations, the embedded default cluster,
//! and a raw client for the statements diesel cannot say (COPY).

pub mod catalog;
pub mod embedded;
pub mod schema;

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
}

pub type Conn = Object<AsyncPgConnection>;

/// The database of one process: a diesel-async pool and the URL for raw clients.
#[derive(Clone)]
pub struct Db {
    pub pool: Pool<AsyncPgConnection>,
    pub url: String,
    /// Set when the service shuts down: long jobs stop between batches.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Idle raw clients, reused (a connection costs a PostgreSQL backend start).
    idle: std::sync::Arc<std::sync::Mutex<Vec<tokio_postgres::Client>>>,
}

/// Idle raw clients kept per `Db`.
const IDLE_RAW_CLIENTS: usize = 8;

/// A raw client borrowed from its `Db`: goes back to the idle list when dropped (unless its
/// connection closed). Its session is reset before it is lent again.
pub struct RawClient {
    client: Option<tokio_postgres::Client>,
    idle: std::sync::Arc<std::sync::Mutex<Vec<tokio_postgres::Client>>>,
}

impl std::ops::Deref for RawClient {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        self.client
            .as_ref()
            .expect("a RawClient holds its client until dropped")
    }
}

impl std::ops::DerefMut for RawClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.client
            .as_mut()
            .expect("a RawClient holds its client until dropped")
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                if let Ok(mut idle) = self.idle.lock() {
                    if idle.len() < IDLE_RAW_CLIENTS {
                        idle.push(c);
                    }
                }
            }
        }
    }
}

/// How `Db::open` treats migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// Apply pending migrations (the embedded default, `arrears migrate`).
    Apply,
    /// Refuse to run against a database with pending migrations.
    Require,
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
                (emb.url, MigrationMode::Apply)
            }
        };
        Self::open_url(&url, config.database.pool_size, mode).await
    }

    pub async fn open_url(url: &str, pool_size: usize, mode: MigrationMode) -> Result<Db, DbError> {
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))?;
        let db = Db {
            pool,
            url: url.to_string(),
            stop: Default::default(),
            idle: Default::default(),
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
            .map_err(|e| DbError::Pool(e.to_string()))
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

    async fn pending_migrations(&self) -> Result<usize, DbError> {
        let conn = self.conn().await?;
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

    /// A plain tokio-postgres client on its own connection (COPY, set-based SQL), reused
    /// from earlier callers when one is idle.
    pub async fn raw_client(&self) -> Result<RawClient, DbError> {
        loop {
            let cached = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            let Some(c) = cached else { break };
            // Advisory locks, temporary tables and settings of the last borrower go (not
            // DISCARD ALL: tokio-postgres keeps prepared type lookups on the connection).
            if !c.is_closed()
                && c.batch_execute("DISCARD TEMP; SELECT pg_advisory_unlock_all(); RESET ALL")
                    .await
                    .is_ok()
            {
                return Ok(RawClient {
                    client: Some(c),
                    idle: self.idle.clone(),
                });
            }
        }
        Ok(RawClient {
            client: Some(raw_connect(&self.url).await?),
            idle: self.idle.clone(),
        })
    }

    /// The database's clock, for the clock-agreement guard of destructive jobs.
    pub async fn database_now(&self) -> Result<chrono::DateTime<chrono::Utc>, DbError> {
        let mut conn = self.conn().await?;
        let now = diesel::select(diesel::dsl::sql::<diesel::sql_types::Timestamptz>("now()"))
            .get_result::<chrono::DateTime<chrono::Utc>>(&mut conn)
            .await?;
        Ok(now)
    }
}

/// `url` without its password, for anything printed or logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `url` without its password, and the password (percent-decoded), for tools that take the
/// password from the environment (PGPASSWORD) rather than a command line anyone can read.
pub fn split_password(url: &str) -> (String, Option<String>) {
    if let (Some(scheme), Some(at)) = (url.find("://"), url.rfind('@')) {
        if at > scheme {
            if let Some((user, pass)) = url[scheme + 3..at].split_once(':') {
                return (
                    format!("{}{user}{}", &url[..scheme + 3], &url[at..]),
                    Some(crate::notify::email::percent_decode(pass)),
                );
            }
        }
    }
    (url.to_string(), None)
}

pub async fn raw_connect(url: &str) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed with an error");
        }
    });
    Ok(client)
}

/// `postgres://u@h:5432/db` -> (`postgres://u@h:5432`, `db`).
pub fn split_database(url: &str) -> Result<(&str, &str), DbError> {
    url.rsplit_once('/')
        .ok_or_else(|| DbError::Connect(format!("no database name in {}", redact_url(url))))
}

/// Drops database `name` on the server of `url` (when it exists) and creates it empty: the
/// scratch databases of the benchmarks and the demo. Returns its URL. `name` is the
/// program's own, or checked by the caller: it is not quoted.
pub async fn recreate_database(url: &str, name: &str) -> Result<String, DbError> {
    let (server, _) = split_database(url)?;
    let admin = raw_connect(&format!("{server}/postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(format!("{server}/{name}"))
}

/// Creates the database named in `url` when it does not exist, connecting to `postgres`.
async fn create_database_if_missing(url: &str) -> Result<(), DbError> {
    let (base, name) = split_database(url)?;
    let admin = raw_connect(&format!("{base}/postgres")).await?;
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

/// `SELECT 1`, for readiness.
pub async fn ping(conn: &mut AsyncPgConnection) -> QueryResult<()> {
    diesel::sql_query("SELECT 1")
        .execute(conn)
        .await
        .map(|_| ())
}
