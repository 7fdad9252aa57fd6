//! Top-ups and coupon grants: idempotent, exact, and always matching the ledger.

mod common;

use std::path::Path;

use arrears::domain::settle::CouponKind;
use arrears::ledger::{grant_coupon, topup, LedgerError};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn topup_is_idempotent_by_reference() {
    let t = TestDb::new().await;
    t.import_accounts(&["a1,Alpha,,,en,UTC,1.00,0,"]).await;
    let first = topup(
        &t.db,
        &t.config,
        "a1",
        500,
        "bank-1",
        at("2026-11-02T00:00:00Z"),
        "test",
    )
    .await
    .unwrap();
    assert!(!first.replayed);
    assert_eq!(first.cash_balance, "6.00");
    let again = topup(
        &t.db,
        &t.config,
        "a1",
        500,
        "bank-1",
        at("2026-11-03T00:00:00Z"),
        "test",
    )
    .await
    .unwrap();
    assert!(again.replayed);
    assert_eq!(t.balance("a1").await, 600);
    let err = topup(
        &t.db,
        &t.config,
        "a1",
        700,
        "bank-1",
        at("2026-11-03T00:00:00Z"),
        "test",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LedgerError::ReferenceReused { .. }), "{err}");
    assert!(matches!(
        topup(
            &t.db,
            &t.config,
            "a1",
            0,
            "x",
            at("2026-11-03T00:00:00Z"),
            "t"
        )
        .await,
        Err(LedgerError::NotPositive)
    ));
    assert!(matches!(
        topup(
            &t.db,
            &t.config,
            "zz",
            1,
            "x",
            at("2026-11-03T00:00:00Z"),
            "t"
        )
        .await,
        Err(LedgerError::UnknownAccount(_))
    ));
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM ledger_entries WHERE kind = 'topup'")
            .await,
        1
    );
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_topups_with_one_reference_apply_once() {
    let t = TestDb::new().await;
    t.import_accounts(&["a1,Alpha,,,en,UTC,0,0,"]).await;
    let mut handles = Vec::new();
    for _ in 0..8 {
        let db = t.db.clone();
        let cfg = t.config.clone();
        handles.push(tokio::spawn(async move {
            topup(
                &db,
                &cfg,
                "a1",
                1000,
                "same",
                at("2026-11-02T00:00:00Z"),
                "t",
            )
            .await
        }));
    }
    let mut applied = 0;
    for h in handles {
        if !h.await.unwrap().unwrap().replayed {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(t.balance("a1").await, 1000);
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coupon_grant_checks_its_input() {
    let t = TestDb::new().await;
    t.import_accounts(&["a1,Alpha,,,en,UTC,0,0,"]).await;
    let now = at("2026-11-02T00:00:00Z");
    let ok = grant_coupon(
        &t.db,
        2,
        "a1",
        1000,
        CouponKind::Cash,
        at("2026-12-01T00:00:00Z"),
        now,
        None,
    )
    .await
    .unwrap();
    assert_eq!(ok.amount, "10.00");
    assert!(matches!(
        grant_coupon(&t.db, 2, "a1", 1000, CouponKind::Cash, now, now, None).await,
        Err(LedgerError::AlreadyExpired(..))
    ));
    assert!(matches!(
        grant_coupon(
            &t.db,
            2,
            "nobody",
            1000,
            CouponKind::General,
            at("2026-12-01T00:00:00Z"),
            now,
            None
        )
        .await,
        Err(LedgerError::UnknownAccount(_))
    ));
    // Coupons are not cash: the balance and ledger are untouched.
    assert_eq!(t.balance("a1").await, 0);
    assert_eq!(t.scalar_i64("SELECT count(*) FROM ledger_entries").await, 0);
}

/// Every `diesel::table!` of src/db/schema.rs: its name and its columns in order.
fn diesel_tables() -> Vec<(String, Vec<String>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/db/schema.rs");
    let text = std::fs::read_to_string(path).unwrap();
    let mut tables = Vec::new();
    for block in text.split("diesel::table! {").skip(1) {
        let mut lines = block.lines().map(str::trim).filter(|l| !l.is_empty());
        let head = lines.next().unwrap();
        let name = head.split_whitespace().next().unwrap().to_string();
        let columns = lines
            .take_while(|l| *l != "}")
            .filter_map(|l| l.split_once(" -> ").map(|(c, _)| c.trim().to_string()))
            .collect();
        tables.push((name, columns));
    }
    tables
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_matches_the_diesel_definitions() {
    let t = TestDb::new().await;
    let c = t.client().await;
    let tables = diesel_tables();
    // Every table of the migrated database is described, but the two unlogged staging
    // tables without a primary key that diesel.toml leaves out (the billing job's raw SQL
    // alone reads them) and diesel's own migrations table.
    let mut described: Vec<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
    described.sort();
    let in_database: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'
               AND table_name NOT IN ('bill_candidates', 'bill_skipped', '__diesel_schema_migrations')
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(described, in_database);
    for (table, columns) in &tables {
        assert!(!columns.is_empty(), "table {table}");
        let have: Vec<String> = c
            .query("SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position", &[table])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(&have, columns, "table {table}");
    }
}
