//! `arrears report aging` against a real PostgreSQL: exact bucket counts and amounts on fixed
//! data, at the bucket edges (1 day vs 2 days, 60 vs 61), and an account billed into arrears.

mod common;

use arrears::report::{aging, AgingReport};
use chrono::{DateTime, Duration, Utc};
use common::*;

const AS_OF: &str = "2026-12-31T12:00:00Z";

/// Puts `id` in `state` since `since`. The report reads only the accounts table; setting the
/// columns directly pins every age to the second, which no job run can do as exactly.
async fn in_arrears_since(t: &TestDb, id: &str, state: &str, since: DateTime<Utc>) {
    let n = t
        .client()
        .await
        .execute(
            "UPDATE accounts SET state = $2::text, arrears_since = $3::timestamptz WHERE id = $1",
            &[&id, &state, &since],
        )
        .await
        .unwrap();
    assert_eq!(n, 1, "{id}");
}

fn bucket<'a>(r: &'a AgingReport, name: &str) -> (i64, &'a str) {
    let b = r
        .buckets
        .iter()
        .find(|b| b.bucket == name)
        .unwrap_or_else(|| panic!("bucket {name}"));
    assert_eq!(b.owed.len(), 1, "one currency per deployment");
    assert_eq!(b.owed[0].currency, "CNY");
    (b.accounts, b.owed[0].amount.as_str())
}

fn state<'a>(r: &'a AgingReport, name: &str) -> (i64, &'a str) {
    let s = r
        .by_state
        .iter()
        .find(|s| s.state == name)
        .unwrap_or_else(|| panic!("state {name}"));
    (s.accounts, s.owed[0].amount.as_str())
}

#[tokio::test]
async fn aging_buckets_accounts_by_whole_days_in_arrears_with_exact_amounts() {
    let t = TestDb::new().await;
    t.import_accounts(&[
        "d0,Zero,,,en,UTC,-1.00,0,",
        "d1,One,,,en,UTC,-2.00,0,",
        "d2,Two,,,en,UTC,-4.00,1.00,",
        "d7,Seven,,,en,UTC,-10.00,0,",
        "d8,Eight,,,en,UTC,-0.01,0,",
        "d30,Thirty,,,en,UTC,-20.00,0,",
        "d31,ThirtyOne,,,en,UTC,-30.00,0,",
        "d60,Sixty,,,en,UTC,-100.00,0,",
        "d61,SixtyOne,,,en,UTC,-1000.00,0,",
        "d400,Old,,,en,UTC,-0.05,0,",
        // credit quota raised after the arrears began: still marked, owes nothing
        "paid,Paid,,,en,UTC,-4.00,10.00,",
        // arrears that began after the report's instant
        "later,Later,,,en,UTC,-5.00,0,",
        "good,Good,,,en,UTC,50.00,0,",
        "locked,Locked,,,en,UTC,-7.00,0,",
    ])
    .await;
    let as_of = at(AS_OF);
    let s = Duration::seconds;
    let d = Duration::days;
    for (id, st, since) in [
        ("d0", "in_arrears", as_of),
        ("d1", "in_arrears", as_of - d(2) + s(1)), // 1 day 23:59:59: still "0-1"
        ("d2", "in_arrears", as_of - d(2)),        // exactly 2 days
        ("d7", "suspended", as_of - d(8) + s(1)),  // 7 days 23:59:59
        ("d8", "suspended", as_of - d(8)),
        ("d30", "suspended", as_of - d(31) + s(1)),
        ("d31", "suspended", as_of - d(31)),
        ("d60", "suspended", as_of - d(61) + s(1)), // 60 days 23:59:59: still "31-60"
        ("d61", "suspended", as_of - d(61)),        // exactly 61 days
        ("d400", "suspended", as_of - d(400)),
        ("paid", "suspended", as_of - d(3)),
        ("later", "in_arrears", as_of + s(1)),
    ] {
        in_arrears_since(&t, id, st, since).await;
    }
    t.client()
        .await
        .execute(
            "UPDATE accounts SET state = 'compliance_locked', compliance_locked = true WHERE id = 'locked'",
            &[],
        )
        .await
        .unwrap();

    let r = aging(&t.db, &t.config, as_of).await.unwrap();
    assert_eq!(bucket(&r, "0-1"), (2, "3.00"));
    assert_eq!(bucket(&r, "2-7"), (3, "13.00")); // d2 owes 3.00 (credit 1.00), d7 10.00, paid 0
    assert_eq!(bucket(&r, "8-30"), (2, "20.01"));
    assert_eq!(bucket(&r, "31-60"), (2, "130.00"));
    assert_eq!(bucket(&r, "over 60"), (2, "1000.05"));
    assert_eq!(r.accounts_in_arrears, 11);
    assert_eq!(r.owed[0].amount, "1166.06");
    assert_eq!(r.owed[0].minor, 116_606);
    assert_eq!(r.arrears_after_as_of, 1);
    let names: Vec<&str> = r.buckets.iter().map(|b| b.bucket).collect();
    assert_eq!(names, ["0-1", "2-7", "8-30", "31-60", "over 60"]);

    // Every account by state, whatever its arrears_since.
    assert_eq!(state(&r, "good"), (1, "0.00"));
    assert_eq!(state(&r, "in_arrears"), (4, "11.00")); // d0, d1, d2, later
    assert_eq!(state(&r, "suspended"), (8, "1160.06"));
    assert_eq!(state(&r, "compliance_locked"), (1, "7.00"));

    // One second later every account pinned a second before an edge crosses it: d1 into
    // "2-7", d7 into "8-30", d30 into "31-60", d60 into "over 60"; "later" is 0 days in.
    let r = aging(&t.db, &t.config, as_of + s(1)).await.unwrap();
    assert_eq!(bucket(&r, "0-1"), (2, "6.00")); // d0, later
    assert_eq!(bucket(&r, "2-7"), (3, "5.00")); // d1, d2, paid
    assert_eq!(bucket(&r, "8-30"), (2, "10.01")); // d7, d8
    assert_eq!(bucket(&r, "31-60"), (2, "50.00")); // d30, d31
    assert_eq!(bucket(&r, "over 60"), (3, "1100.05")); // d60, d61, d400
    assert_eq!(r.arrears_after_as_of, 0);
    assert_eq!(r.accounts_in_arrears, 12);
    assert_eq!(r.owed[0].amount, "1171.06");

    let table = arrears::report::aging_table(&r);
    assert!(table.contains("over 60"), "{table}");
    assert!(table.contains("1100.05 CNY"), "{table}");
}

#[tokio::test]
async fn aging_reports_an_account_billed_into_arrears_in_the_first_bucket() {
    let t = TestDb::new().await;
    t.import_accounts(&["a1,Alice,a1@example.com,,en,UTC,1.00,0,"])
        .await;
    t.import_resources(&["a1-class,a1,lcic,pay_per_use,,,,"])
        .await;
    // 1000 minutes at 0.015 = 15.00; the account has 1.00.
    t.import_usage(
        &["e1,a1,a1-class,classroom_minutes,1000,2026-11-20T01:00:00Z,2026-11-20T02:00:00Z"],
        "2026-11-21T00:00:00Z",
    )
    .await;
    t.bill("2026-11-21T00:00:00Z").await;
    let r = aging(&t.db, &t.config, at("2026-11-22T23:59:59Z"))
        .await
        .unwrap();
    assert_eq!(r.accounts_in_arrears, 1);
    assert_eq!(bucket(&r, "0-1"), (1, "14.00"));
    assert_eq!(state(&r, "in_arrears"), (1, "14.00"));
    let r = aging(&t.db, &t.config, at("2026-11-23T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(bucket(&r, "0-1"), (0, "0.00"));
    assert_eq!(bucket(&r, "2-7"), (1, "14.00"));
}

#[tokio::test]
async fn aging_of_a_database_without_arrears_is_all_zero() {
    let t = TestDb::new().await;
    t.import_accounts(&["g1,Good,,,en,UTC,5.00,0,"]).await;
    let r = aging(&t.db, &t.config, at(AS_OF)).await.unwrap();
    assert_eq!(r.accounts_in_arrears, 0);
    assert_eq!(r.owed[0].amount, "0.00");
    assert!(r.buckets.iter().all(|b| b.accounts == 0));
    assert_eq!(state(&r, "good"), (1, "0.00"));
}

/// The binary, with stdout piped (not a terminal).
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
async fn report_aging_prints_json_when_stdout_is_not_a_terminal() {
    let t = TestDb::new().await;
    t.import_accounts(&["x1,X,,,en,UTC,-12.34,0,"]).await;
    in_arrears_since(&t, "x1", "in_arrears", at("2026-12-01T00:00:00Z")).await;
    for args in [
        &["report", "aging", "--as-of", "2026-12-03T00:00:00Z"][..],
        &[
            "report",
            "aging",
            "--json",
            "--as-of",
            "2026-12-03T00:00:00Z",
        ][..],
    ] {
        let out = arrears_cli(&t.url, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["accounts_in_arrears"], 1);
        assert_eq!(v["buckets"][1]["bucket"], "2-7");
        assert_eq!(v["buckets"][1]["accounts"], 1);
        assert_eq!(v["buckets"][1]["owed"][0]["amount"], "12.34");
        assert_eq!(v["buckets"][1]["owed"][0]["currency"], "CNY");
    }
}
