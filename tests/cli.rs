//! The `arrears` binary as scripts use it: the PRODUCT.md §5 command names, JSON output, exit
//! codes, and the embedded default database.

mod common;

use std::process::{Command, Output};

use common::*;

fn arrears(db_url: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arrears"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ARREARS_CONFIG");
    match db_url {
        Some(u) => cmd.env("DATABASE_URL", u),
        None => cmd.env_remove("DATABASE_URL"),
    };
    cmd.output().expect("run arrears")
}

fn ok_json(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread")]
async fn sample_data_loads_bills_and_reports_through_the_cli() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    ok_json(arrears(
        u,
        &[
            "import",
            "accounts",
            "samples/accounts.csv",
            "--as-of",
            "2026-11-22T00:00:00Z",
        ],
    ));
    ok_json(arrears(
        u,
        &[
            "import",
            "resources",
            "samples/resources.csv",
            "--as-of",
            "2026-11-22T00:00:00Z",
        ],
    ));
    let usage = ok_json(arrears(
        u,
        &[
            "import",
            "usage",
            "samples/usage.csv",
            "--as-of",
            "2026-11-22T23:00:00Z",
        ],
    ));
    assert_eq!(usage["inserted"], 8);
    let again = ok_json(arrears(
        u,
        &[
            "import",
            "usage",
            "samples/usage.csv",
            "--as-of",
            "2026-11-22T23:00:00Z",
        ],
    ));
    assert_eq!(
        (
            again["inserted"].as_u64(),
            again["already_imported"].as_u64()
        ),
        (Some(0), Some(8))
    );

    let dry = ok_json(arrears(
        u,
        &[
            "run",
            "generate_bills",
            "--as-of",
            "2026-11-23T00:30:00+08:00",
            "--dry-run",
        ],
    ));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(t.scalar_i64("SELECT count(*) FROM bills").await, 0);

    let report = ok_json(arrears(
        u,
        &[
            "run",
            "generate_bills",
            "--as-of",
            "2026-11-23T00:30:00+08:00",
        ],
    ));
    assert_eq!(report["bill_day"], "2026-11-22");
    assert_eq!(report["bills_issued"], 4);
    assert_eq!(report["total"], dry["total"]);

    let globex = ok_json(arrears(u, &["account", "show", "globex", "--json"]));
    assert_eq!(globex["state"], "in_arrears");
    assert_eq!(globex["cash_balance"], "-4.38"); // 5.00 - (250 x 0.02 + 12.5 x 0.35 = 9.38)
    assert_eq!(globex["cash_balance"], globex["ledger_sum"]);
    assert_eq!(globex["arrears_since"], "2026-11-22T16:30:00Z");
    assert_eq!(globex["resources"][0]["state"], "active");
    assert!(
        !globex.to_string().contains("ops@globex.example"),
        "contacts are masked"
    );

    let bills = ok_json(arrears(
        u,
        &[
            "bills",
            "acme",
            "--from",
            "2026-11-22",
            "--to",
            "2026-11-22",
            "--json",
        ],
    ));
    assert_eq!(bills[0]["total"], "18.60");
    let pkg = bills[0]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["resource_id"] == "acme-pkg")
        .unwrap()
        .clone();
    assert_eq!(
        (
            pkg["included_quantity"].as_str(),
            pkg["unbilled_quantity"].as_str()
        ),
        (Some("1000"), Some("200"))
    );

    let topup = ok_json(arrears(
        u,
        &[
            "topup",
            "globex",
            "4.38",
            "--reference",
            "wire-1",
            "--as-of",
            "2026-11-23T01:00:00Z",
        ],
    ));
    assert_eq!(
        (topup["cash_balance"].as_str(), topup["state"].as_str()),
        (Some("0.00"), Some("good"))
    );
    let coupon = ok_json(arrears(
        u,
        &[
            "coupon",
            "grant",
            "acme",
            "5.00",
            "--kind",
            "cash",
            "--expires-at",
            "2026-12-31T00:00:00Z",
            "--as-of",
            "2026-11-23T01:00:00Z",
        ],
    ));
    assert_eq!(coupon["kind"], "cash");

    let products = ok_json(arrears(u, &["products", "--json"]));
    let lcic = products
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "lcic")
        .unwrap()
        .clone();
    assert_eq!(lcic["policy"]["grace"], "24h");
    assert_eq!(lcic["prices"][0]["meter"], "classroom_minutes");
    assert_eq!(lcic["prices"][0]["unit"], "minute");
    assert_eq!(lcic["prices"][0]["unit_price"], "0.015000000");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_csv_exits_non_zero_naming_the_line() {
    let t = TestDb::new().await;
    let f = csv(
        ACCOUNTS_HEADER,
        &["a1,Alpha,,,en,UTC,1.00,0,", "a2,Beta,,,en,UTC,lots,0,"],
    );
    let out = arrears(
        Some(&t.url),
        &["import", "accounts", f.path.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3: cash_balance:"), "{err}");
    assert!(err.contains("nothing imported"), "{err}");
    assert_eq!(t.scalar_i64("SELECT count(*) FROM accounts").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_names_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_arrears"))
        .args(["check"])
        .env("ARREARS_PRODUCTS__LCIC__POLICY__GRACE", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("products.lcic.policy.grace"), "{err}");
}

#[test]
fn embedded_default_needs_no_setup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let state = dir.path().join("state");
    let state_env = state.to_str().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_arrears"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("DATABASE_URL")
            .env_remove("ARREARS_CONFIG")
            .env("ARREARS_EMBEDDED__STATE_DIR", state_env)
            .output()
            .unwrap()
    };
    let out = run(&[
        "import",
        "accounts",
        "samples/accounts.csv",
        "--as-of",
        "2026-11-22T00:00:00Z",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second command reuses the running cluster and sees the data.
    let show = run(&["account", "show", "acme", "--json"]);
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["cash_balance"], "100.00");
    let stop = run(&["embedded", "stop"]);
    assert_eq!(String::from_utf8_lossy(&stop.stdout).trim(), "stopped");
}
