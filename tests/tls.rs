//! TLS to PostgreSQL: a private cluster of the machine's PostgreSQL with `ssl = on`, a server
//! certificate for `localhost` from a CA this test makes, and plain connections refused by
//! pg_hba.conf. Every sslmode is tried, through the library and through the binary (whose
//! diesel pool and raw clients must both speak TLS to get anything done).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use arrears::db::{Db, MigrationMode};
use common::{free_port, pg_bin};

struct Cluster {
    _dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    ca: PathBuf,
    other_ca: PathBuf,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as the `postgres` user when this test runs as root (initdb refuses root).
fn as_owner(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("arrears-tls")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let data = dir.path().join("data");
        let (ca_cert, issuer) = ca("arrears test CA");
        let (other_cert, _) = ca("another CA");
        let key = rcgen::KeyPair::generate().unwrap();
        // For the name `localhost` only: 127.0.0.1 passes verify-ca but not verify-full.
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let init = as_owner(&pg_bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        std::fs::write(data.join("server.crt"), leaf.pem()).unwrap();
        std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\nfsync = off\n",
            dir.path().display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostnossl all all 127.0.0.1/32 reject\nhostssl all all 127.0.0.1/32 trust\nlocal all all trust\n",
        )
        .unwrap();
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap();
            assert!(chown.success());
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let ca = dir.path().join("ca.pem");
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&other_ca, other_cert.pem()).unwrap();
        let start = as_owner(&pg_bin("pg_ctl"))
            .args(["-w", "-l"])
            .arg(dir.path().join("log"))
            .arg("-D")
            .arg(&data)
            .arg("start")
            .output()
            .unwrap();
        assert!(
            start.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&start.stdout),
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        Cluster {
            _dir: dir,
            data,
            port,
            ca,
            other_ca,
        }
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_owner(&pg_bin("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
    }
}

async fn uses_tls(url: &str) -> Result<bool, String> {
    let c = arrears::db::raw_connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let row = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_connection_speaks_tls_as_the_url_says() {
    let c = Cluster::start();
    let ca = c.ca.display().to_string();
    let other = c.other_ca.display().to_string();
    // Plain is refused by the server; every TLS mode gets TLS.
    let plain = uses_tls(&c.url("127.0.0.1", "sslmode=disable")).await;
    assert!(plain.is_err(), "{plain:?}");
    for q in ["sslmode=prefer", "sslmode=require", "application_name=x"] {
        assert_eq!(uses_tls(&c.url("127.0.0.1", q)).await, Ok(true), "{q}");
    }
    // verify-full checks the chain and the name; verify-ca the chain only.
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert_eq!(uses_tls(&c.url("localhost", &full)).await, Ok(true));
    let wrong_name = uses_tls(&c.url("127.0.0.1", &full)).await;
    assert!(wrong_name.is_err(), "{wrong_name:?}");
    let verify_ca = format!("sslmode=verify-ca&sslrootcert={ca}");
    assert_eq!(uses_tls(&c.url("127.0.0.1", &verify_ca)).await, Ok(true));
    for q in [
        format!("sslmode=verify-ca&sslrootcert={other}"),
        format!("sslmode=verify-full&sslrootcert={other}"),
        // require with a root certificate checks the chain, as libpq does
        format!("sslmode=require&sslrootcert={other}"),
        // without one, the public web roots: a private CA is not among them
        "sslmode=verify-full".to_string(),
    ] {
        let r = uses_tls(&c.url("localhost", &q)).await;
        assert!(r.is_err(), "{q}: {r:?}");
    }
    let missing = uses_tls(&c.url(
        "localhost",
        "sslmode=verify-ca&sslrootcert=/nonexistent.pem",
    ))
    .await;
    assert!(missing
        .unwrap_err()
        .contains("sslrootcert /nonexistent.pem"));

    // The library's pools: diesel (migrations) and raw clients, over verify-full.
    let admin = arrears::db::raw_connect(&c.url("localhost", &full))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE arrears_tls")
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@localhost:{}/arrears_tls?{full}",
        c.port
    );
    let db = Db::open_url(&url, 2, MigrationMode::Apply).await.unwrap();
    let raw = db.raw_client().await.unwrap();
    let ssl: bool = raw
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    drop(raw);
    drop(db);

    // The binary, as an operator runs it against a managed database that requires TLS: the
    // URL's query reaches every connection, and nothing of it lands in a database name.
    let bin = env!("CARGO_BIN_EXE_arrears");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("ARREARS_CONFIG")
            .env("DATABASE_URL", &url)
            .env("ARREARS_BILLING__TIME_ZONE", "UTC")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["migrate"]);
    run(&[
        "import",
        "accounts",
        "samples/accounts.csv",
        "--as-of",
        "2026-11-22T00:00:00Z",
    ]);
    run(&[
        "import",
        "resources",
        "samples/resources.csv",
        "--as-of",
        "2026-11-22T00:00:00Z",
    ]);
    run(&[
        "import",
        "usage",
        "samples/usage.csv",
        "--as-of",
        "2026-11-22T23:00:00Z",
    ]);
    let bill = run(&["run", "generate_bills", "--as-of", "2026-11-23T00:30:00Z"]);
    assert!(bill.contains("\"accounts_with_usage\": 4"), "{bill}");
    let show = run(&["account", "show", "acme", "--json"]);
    assert!(show.contains("\"acme\""), "{show}");
    let names: Vec<String> = admin
        .query("SELECT datname::text FROM pg_database ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(names.iter().all(|n| !n.contains("ssl")), "{names:?}");
}
