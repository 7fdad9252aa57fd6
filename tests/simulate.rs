//! `arrears simulate` against a real PostgreSQL: it changes nothing, its counts are what the
//! real jobs do on the database itself at the same slots, and a longer grace suspends later.

mod common;

use arrears::config::Config;
use arrears::jobs::{
    deliver_notifications, enforce_suspensions, generate_bills, release_resources, send_alerts,
    DynJob,
};
use arrears::simulate::{self, Proposal, SimulateReport};
use chrono::{DateTime, Duration, Utc};
use common::*;

const FROM: &str = "2026-11-21T00:00:00Z";

/// Billing days in UTC (midnight on a whole hour), notices into a temporary folder.
fn test_config(dir: &tempfile::TempDir, extra: &[(&str, &str)]) -> Config {
    let state_dir = dir.path().display().to_string();
    let mut env = vec![
        ("ARREARS_BILLING__TIME_ZONE", "UTC"),
        ("ARREARS_EMBEDDED__STATE_DIR", state_dir.as_str()),
    ];
    env.extend_from_slice(extra);
    config_with(&env)
}

/// Five accounts: a1 and a2 (lcic) and a4 (sa) fall into arrears when the day before FROM is
/// billed at FROM; a3 stays good; a5 is in arrears from an earlier bill but its credit quota
/// was raised since, so the first enforcement puts it back to good.
async fn fixture(t: &TestDb) {
    t.import_accounts(&[
        "a1,Alice,a1@example.com,,en,UTC,1.00,0,",
        "a2,Bob,a2@example.com,+15550001111,en,UTC,0,0,",
        "a3,Carol,a3@example.com,,en,UTC,100.00,0,",
        "a4,Dan,a4@example.com,,en,UTC,0,0,",
        "a5,Eve,a5@example.com,,en,UTC,0,0,",
    ])
    .await;
    t.import_resources(&[
        "a1-class,a1,lcic,pay_per_use,,,,",
        "a2-class,a2,lcic,pay_per_use,,,,",
        "a3-class,a3,lcic,pay_per_use,,,,",
        "a4-sa,a4,sa,pay_per_use,,,,",
        "a5-class,a5,lcic,pay_per_use,,,,",
    ])
    .await;
    t.import_usage(
        &["e5,a5,a5-class,classroom_minutes,1000,2026-11-19T01:00:00Z,2026-11-19T02:00:00Z"],
        "2026-11-20T00:00:00Z",
    )
    .await;
    t.bill("2026-11-20T00:00:00Z").await;
    // a5 owes 15.00; a credit quota of 20.00 covers it (the import changes no state).
    t.import_accounts(&["a5,Eve,a5@example.com,,en,UTC,0,20.00,"])
        .await;
    t.import_usage(
        &[
            // 1000 minutes at 0.015 = 15.00 (a1 has 1.00)
            "e1,a1,a1-class,classroom_minutes,1000,2026-11-20T01:00:00Z,2026-11-20T02:00:00Z",
            "e2,a2,a2-class,classroom_minutes,2000,2026-11-20T01:00:00Z,2026-11-20T02:00:00Z",
            "e3,a3,a3-class,classroom_minutes,1000,2026-11-20T01:00:00Z,2026-11-20T02:00:00Z",
            // 100 assets at 0.02 = 2.00
            "e4,a4,a4-sa,assets_scanned,100,2026-11-20T01:00:00Z,2026-11-20T02:00:00Z",
        ],
        "2026-11-20T23:00:00Z",
    )
    .await;
}

/// Row count and checksum of every table of the schema (not only the business tables).
async fn fingerprint_all(t: &TestDb) -> Vec<(String, i64, String)> {
    let c = t.client().await;
    let tables: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 12, "{tables:?}");
    let mut out = Vec::new();
    for table in tables {
        let row = c
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM \"{table}\" t"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((table, row.get(0), row.get(1)));
    }
    out
}

async fn databases_named(t: &TestDb, names: &[String]) -> i64 {
    t.client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1)",
            &[&names],
        )
        .await
        .unwrap()
        .get(0)
}

async fn simulate(t: &TestDb, policy: &str, days: u32) -> SimulateReport {
    let proposal = Proposal::from_toml(&t.config, policy, "policy.toml").unwrap();
    let opts = simulate::Options {
        from: at(FROM),
        days,
        proposal,
    };
    let r = simulate::run(&t.db, &t.config, &opts).await.unwrap();
    for (name, tot) in &r.totals {
        assert_eq!(tot.job_errors, 0, "{name}: {:?}", tot.errors);
    }
    r
}

#[tokio::test]
async fn simulate_changes_nothing_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    // A deployment whose emails go to a folder of its own: simulated ones must not.
    let mail = tempfile::tempdir().unwrap();
    let mail_dir = mail.path().display().to_string();
    let t = TestDb::with_config(test_config(&dir, &[("ARREARS_EMAIL__FILE_DIR", &mail_dir)])).await;
    fixture(&t).await;
    let before = fingerprint_all(&t).await;
    let business_before = t.fingerprint().await;

    let r = simulate(&t, "[products.lcic.policy]\ngrace = \"72h\"\n", 3).await;
    // It did simulate something...
    assert_eq!(r.totals["current"].counts.accounts_suspended, 2);
    assert_eq!(r.copied_with.len(), 2);
    // (the test database has open connections, so the first copy may be a dump; the second
    // is always a template copy of the first)
    assert_eq!(r.copied_with[1], "template");

    // ... and nothing changed: every table, row for row, and no copy is left behind.
    assert_eq!(fingerprint_all(&t).await, before);
    assert_eq!(t.fingerprint().await, business_before);
    assert_eq!(r.copies.len(), 2);
    assert_eq!(databases_named(&t, &r.copies).await, 0);
    // No notice went anywhere but the simulation's scratch folder, which is gone.
    assert!(!dir.path().join("outbox").exists());
    assert_eq!(
        std::fs::read_dir(mail.path()).unwrap().count(),
        0,
        "nothing in the real mail folder"
    );
}

/// The job functions themselves, called directly at each slot, the way a scheduler would.
async fn run_for_real(t: &TestDb, slots: &[(DateTime<Utc>, &'static dyn DynJob)]) {
    let channels = deliver_notifications::Channels::from_config(&t.config).unwrap();
    for (at, job) in slots {
        let (at, c) = (*at, &t.config);
        let ok = match job.name().as_str() {
            "generate_bills" => generate_bills::run(
                &t.db,
                c,
                &generate_bills::Options {
                    as_of: at,
                    bill_day: None,
                    dry_run: false,
                    force: false,
                },
            )
            .await
            .map(|_| ()),
            "send_alerts" => send_alerts::run(
                &t.db,
                c,
                &send_alerts::Options {
                    as_of: at,
                    dry_run: false,
                    force: false,
                },
            )
            .await
            .map(|_| ()),
            "deliver_notifications" => deliver_notifications::run(
                &t.db,
                c,
                &channels,
                &deliver_notifications::Options {
                    as_of: at,
                    dry_run: false,
                    max_batches: 100,
                },
            )
            .await
            .map(|_| ()),
            "enforce_suspensions" => enforce_suspensions::run(
                &t.db,
                c,
                &enforce_suspensions::Options {
                    as_of: at,
                    dry_run: false,
                    force: false,
                },
            )
            .await
            .map(|_| ()),
            "release_resources" => release_resources::run(
                &t.db,
                c,
                &release_resources::Options {
                    as_of: at,
                    service_now: Utc::now(),
                    dry_run: false,
                    force: false,
                    allow_mass_release: false,
                },
            )
            .await
            .map(|_| ()),
            other => panic!("a job the simulation does not know: {other}"),
        };
        ok.unwrap_or_else(|e| panic!("{} at {at}: {e}", job.name()));
    }
}

/// What happened in [from, to) on the test database, counted independently of the
/// simulation's own query: (alerted, suspended accounts, suspended resources, released
/// resources, restored accounts, accounts in arrears now, owed now in minor units).
async fn observed(t: &TestDb, from: DateTime<Utc>, to: DateTime<Utc>) -> [i64; 7] {
    let c = t.client().await;
    let q = |sql: &'static str| {
        let c = &c;
        async move {
            c.query_one(sql, &[&from, &to])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get::<_, i64>(0)
        }
    };
    [
        q("SELECT count(DISTINCT account_id) FROM notices WHERE kind IN ('overdue', 'overdue_reminder') AND created_at >= $1 AND created_at < $2").await,
        q("SELECT count(*) FROM lifecycle_events WHERE resource_id IS NULL AND to_state = 'suspended' AND occurred_at >= $1 AND occurred_at < $2").await,
        q("SELECT count(*) FROM lifecycle_events WHERE resource_id IS NOT NULL AND from_state = 'active' AND to_state LIKE 'suspended%' AND occurred_at >= $1 AND occurred_at < $2").await,
        q("SELECT count(*) FROM lifecycle_events WHERE to_state = 'released' AND occurred_at >= $1 AND occurred_at < $2").await,
        q("SELECT count(*) FROM lifecycle_events WHERE resource_id IS NULL AND to_state = 'good' AND occurred_at >= $1 AND occurred_at < $2").await,
        q("SELECT count(*) FROM accounts WHERE arrears_since IS NOT NULL AND $1::timestamptz IS NOT NULL AND $2::timestamptz IS NOT NULL").await,
        q("SELECT coalesce(sum(-(cash_balance + credit_quota)) FILTER (WHERE cash_balance + credit_quota < 0), 0)::bigint FROM accounts WHERE arrears_since IS NOT NULL AND $1::timestamptz IS NOT NULL AND $2::timestamptz IS NOT NULL").await,
    ]
}

#[tokio::test]
async fn simulated_counts_are_what_the_real_jobs_do_at_the_same_slots() {
    let dir = tempfile::tempdir().unwrap();
    // A short retention so that releases happen inside the window too.
    let t = TestDb::with_config(test_config(
        &dir,
        &[
            ("ARREARS_PRODUCTS__LCIC__POLICY__RETENTION", "3d"),
            (
                "ARREARS_PRODUCTS__LCIC__POLICY__RELEASE_WARNINGS",
                "[\"2d\", \"1d\"]",
            ),
        ],
    ))
    .await;
    fixture(&t).await;
    let days = 5;
    let r = simulate(&t, "[products.lcic.policy]\ngrace = \"48h\"\n", days).await;

    // Now the same slots for real, on the test database itself, day by day.
    let from = at(FROM);
    for d in 0..i64::from(days) {
        let (a, b) = (from + Duration::days(d), from + Duration::days(d + 1));
        run_for_real(&t, &simulate::slots(a, b, &t.config)).await;
        let got = observed(&t, a, b).await;
        let sim = &r.per_day[d as usize].current;
        let want = [
            sim.accounts_alerted,
            sim.accounts_suspended,
            sim.resources_suspended,
            sim.resources_released,
            sim.accounts_restored,
            sim.accounts_in_arrears,
            sim.arrears_at_risk_minor,
        ];
        assert_eq!(got, want, "day {}: real vs simulated", d + 1);
    }
    t.assert_balances_match_ledger().await;

    // And the story is the one the fixture tells: alerts on day 1 (a1, a2, a4), a5 back to
    // good, a1 and a2 suspended when their 24 h grace ends (day 2) and released after 3 days
    // of retention (day 5); a4 (sa, 15 days of grace) still in grace.
    let cur = &r.totals["current"].counts;
    let day = |i: usize| &r.per_day[i].current;
    assert_eq!(day(0).accounts_alerted, 3);
    assert_eq!(day(0).accounts_restored, 1);
    assert_eq!(day(1).accounts_suspended, 2);
    assert_eq!(day(4).resources_released, 2);
    assert_eq!(
        (
            cur.accounts_suspended,
            cur.resources_released,
            cur.accounts_restored
        ),
        (2, 2, 1)
    );
    // a1 owes 14.00, a2 30.00, a4 2.00.
    assert_eq!(cur.arrears_at_risk, "46.00");
    assert_eq!(cur.accounts_in_arrears, 3);
}

#[tokio::test]
async fn a_longer_grace_suspends_later() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::with_config(test_config(&dir, &[])).await;
    fixture(&t).await;
    let r = simulate(&t, "[products.lcic.policy]\ngrace = \"72h\"\n", 4).await;
    let per = |f: fn(&simulate::Counts) -> i64| -> (Vec<i64>, Vec<i64>) {
        (
            r.per_day.iter().map(|d| f(&d.current)).collect(),
            r.per_day.iter().map(|d| f(&d.proposed)).collect(),
        )
    };
    // 24 h from the alert accepted at FROM: suspended on day 2; 72 h: on day 4.
    assert_eq!(
        per(|c| c.accounts_suspended),
        (vec![0, 2, 0, 0], vec![0, 0, 0, 2])
    );
    assert_eq!(
        per(|c| c.resources_suspended),
        (vec![0, 2, 0, 0], vec![0, 0, 0, 2])
    );
    // Nothing is released within 60 days of retention, under either policy.
    assert_eq!(per(|c| c.resources_released), (vec![0; 4], vec![0; 4]));
    // The debt at risk is the same: nobody pays in a simulation.
    assert!(r
        .per_day
        .iter()
        .all(|d| d.current.arrears_at_risk == "46.00" && d.proposed.arrears_at_risk == "46.00"));
    assert_eq!(r.totals["current"].counts.accounts_suspended, 2);
    assert_eq!(r.totals["proposed"].counts.accounts_suspended, 2);
    assert_eq!(r.overrides.len(), 1);
    assert_eq!(r.overrides[0].key, "products.lcic.policy.grace");

    let table = simulate::table(&r);
    assert!(table.contains("2 / 0"), "{table}");
    assert!(table.contains("0 / 2"), "{table}");
}

fn arrears_cli(db_url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_arrears"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ARREARS_CONFIG")
        .env("DATABASE_URL", db_url)
        .output()
        .expect("run arrears")
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_on_the_command_line_validates_the_policy_file_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::new().await;
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[products.lcic.policy]\ngrace = \"soon\"\n").unwrap();
    let out = arrears_cli(
        &t.url,
        &[
            "simulate",
            "--policy",
            &bad.display().to_string(),
            "--days",
            "1",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `products.lcic.policy.grace`"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[products.sa.policy]\ngrace = \"20d\"\n").unwrap();
    let out = arrears_cli(
        &t.url,
        &[
            "simulate",
            "--policy",
            &good.display().to_string(),
            "--days",
            "1",
            "--from",
            FROM,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["days"], 1);
    assert_eq!(v["per_day"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["overrides"][0]["key"], "products.sa.policy.grace");
    assert_eq!(v["overrides"][0]["to"], "20d");
    assert_eq!(v["totals"]["current"]["job_errors"], 0);
}
