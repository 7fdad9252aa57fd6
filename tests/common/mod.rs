//! Test support: every test gets its own database, created from a migrated template on the
//! real PostgreSQL named by DATABASE_URL (default: the local server), and dropped afterwards.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use arrears::config::{Config, EXAMPLE_CONFIG};
use arrears::db::{catalog, raw_connect, Db, MigrationMode};
use chrono::{DateTime, Utc};

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn with_db(url: &str, name: &str) -> String {
    arrears::db::with_database(url, name).expect("a database URL")
}

/// A digest of the migrations, so that a changed migration gets a fresh template.
fn migrations_digest() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut entries: Vec<PathBuf> = walk(&dir);
    entries.sort();
    let mut h: u64 = 0xcbf29ce484222325;
    for p in entries {
        for b in p
            .to_string_lossy()
            .bytes()
            .chain(std::fs::read(&p).unwrap_or_default())
        {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("migrations dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct TestDb {
    pub db: Db,
    pub url: String,
    pub name: String,
    pub config: Config,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::with_config(config()).await
    }

    pub async fn with_config(config: Config) -> TestDb {
        let admin_url = admin_url();
        let admin = raw_connect(&admin_url)
            .await
            .expect("connect to the test PostgreSQL (DATABASE_URL)");
        let template = format!("arrears_tpl_{}", migrations_digest());
        // One process creates the template; the others wait on the lock.
        admin
            .execute("SELECT pg_advisory_lock(4242)", &[])
            .await
            .unwrap();
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
            .await
            .unwrap()
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE {template}"))
                .await
                .unwrap();
            let db = Db::open_url(&with_db(&admin_url, &template), 1, MigrationMode::Apply)
                .await
                .expect("migrate template");
            drop(db);
            // Let the pool's connection go before the template is copied.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        admin
            .execute("SELECT pg_advisory_unlock(4242)", &[])
            .await
            .unwrap();
        let name = format!(
            "arrears_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            Utc::now().timestamp_micros() % 1_000_000
        );
        let mut tries = 0;
        loop {
            match admin
                .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .await
            {
                Ok(()) => break,
                // "source database is being accessed by other users": the template's
                // migrating connection is still closing.
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("create test database: {e}"),
            }
        }
        let url = with_db(&admin_url, &name);
        let db = Db::open_url(&url, 4, MigrationMode::Require)
            .await
            .expect("open test database");
        let mut conn = db.conn().await.unwrap();
        catalog::apply(&mut conn, &config, chrono::Utc::now(), false)
            .await
            .unwrap();
        drop(conn);
        TestDb {
            db,
            url,
            name,
            config,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        raw_connect(&self.url).await.unwrap()
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Accounts whose cash balance differs from the sum of their ledger: must be none, always.
    pub async fn assert_balances_match_ledger(&self) {
        let bad = self
            .scalar_i64(
                "SELECT count(*) FROM accounts a
                 WHERE a.cash_balance <> (SELECT coalesce(sum(amount), 0) FROM ledger_entries l WHERE l.account_id = a.id)",
            )
            .await;
        assert_eq!(
            bad, 0,
            "an account's cash balance differs from its ledger sum"
        );
    }

    /// A checksum of every business table, to prove that something changed nothing.
    pub async fn fingerprint(&self) -> String {
        let mut out = String::new();
        for t in [
            "accounts",
            "coupons",
            "resources",
            "usage_records",
            "billing_cursor",
            "bills",
            "bill_lines",
            "ledger_entries",
            "lifecycle_events",
            "job_runs",
        ] {
            let row = self
                .client()
                .await
                .query_one(&format!("SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {t} t"), &[])
                .await
                .unwrap();
            let (n, h): (i64, String) = (row.get(0), row.get(1));
            out.push_str(&format!("{t}:{n}:{h}\n"));
        }
        out
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = admin_url();
        let name = self.name.clone();
        if std::thread::panicking() && std::env::var_os("ARREARS_TEST_KEEP_FAILED").is_some() {
            eprintln!("kept the failed test's database {name}");
            return;
        }
        // Async drop is not a thing: drop the database from a short-lived runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = raw_connect(&admin_url).await {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The example configuration, for scratch test databases that travel in time.
pub fn config() -> Config {
    config_with(&[])
}

pub fn config_with(env: &[(&str, &str)]) -> Config {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut config = Config::from_toml(EXAMPLE_CONFIG, "test", &env).unwrap();
    config.lifecycle.allow_future = true;
    // The tests' channels are files and logs unless a test brings a real server.
    config.notifications.dev_channels_count_as_accepted = true;
    config
}

/// A TCP port free on 127.0.0.1 at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A program of the machine's newest PostgreSQL (`/usr/lib/postgresql/*/bin`), or its bare
/// name (found on PATH) when there is none there.
pub fn pg_bin(name: &str) -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.path().join("bin").join(name))
                .filter(|p| p.exists())
                .max()
        })
        .unwrap_or_else(|| name.into())
}

pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A CSV file in a temporary directory that lives as long as the returned guard.
pub struct Csv {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn csv(header: &str, rows: &[&str]) -> Csv {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{header}").unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
    Csv { _dir: dir, path }
}

pub const ACCOUNTS_HEADER: &str =
    "id,name,email,phone,locale,timezone,cash_balance,credit_quota,low_balance_threshold";
pub const RESOURCES_HEADER: &str =
    "id,account_id,product,billing_mode,package_quota,package_expires_at,payg_enabled,term_ends_at";
pub const USAGE_HEADER: &str = "event_id,account_id,resource_id,meter,quantity,started_at,ended_at";

impl TestDb {
    pub async fn import_accounts(&self, rows: &[&str]) {
        let f = csv(ACCOUNTS_HEADER, rows);
        arrears::import::import_file(
            &self.db,
            &self.config,
            arrears::import::ImportKind::Accounts,
            &f.path,
            at("2026-11-01T00:00:00Z"),
            false,
        )
        .await
        .unwrap();
    }

    pub async fn import_resources(&self, rows: &[&str]) {
        let f = csv(RESOURCES_HEADER, rows);
        arrears::import::import_file(
            &self.db,
            &self.config,
            arrears::import::ImportKind::Resources,
            &f.path,
            at("2026-11-01T00:00:00Z"),
            false,
        )
        .await
        .unwrap();
    }

    pub async fn import_usage(&self, rows: &[&str], as_of: &str) -> arrears::import::ImportReport {
        let f = csv(USAGE_HEADER, rows);
        arrears::import::import_file(
            &self.db,
            &self.config,
            arrears::import::ImportKind::Usage,
            &f.path,
            at(as_of),
            false,
        )
        .await
        .unwrap()
    }

    pub async fn bill(&self, as_of: &str) -> arrears::jobs::generate_bills::GenerateBillsReport {
        let opts = arrears::jobs::generate_bills::Options {
            as_of: at(as_of),
            bill_day: None,
            dry_run: false,
            force: false,
        };
        let r = arrears::jobs::generate_bills::run(&self.db, &self.config, &opts)
            .await
            .unwrap();
        self.assert_balances_match_ledger().await;
        r
    }

    pub async fn balance(&self, account: &str) -> i64 {
        self.client()
            .await
            .query_one(
                "SELECT cash_balance FROM accounts WHERE id = $1",
                &[&account],
            )
            .await
            .unwrap()
            .get(0)
    }
}

/// `&[String]` as `Vec<&str>`, for the import helpers.
pub fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
