//! generate_bills against a real PostgreSQL: rating, rounding, package quota, coupons,
//! settlement, arrears start, idempotency, late events, dry runs.

mod common;

use arrears::domain::money::{line_amount, parse_scaled, PRICE_DIGITS, QUANTITY_DIGITS};
use arrears::domain::settle::{settle, Coupon, CouponKind};
use arrears::jobs::generate_bills::{run, Options};
use common::*;

const DAY_END: &str = "2026-11-22T16:30:00Z"; // 00:30 on 2026-11-23 in Shanghai: bills 2026-11-22

async fn basic() -> TestDb {
    let t = TestDb::new().await;
    t.import_accounts(&[
        "a1,Alpha,a@example.com,,en,UTC,100.00,0,",
        "a2,Beta,,,zh-CN,Asia/Shanghai,1.00,0,",
    ])
    .await;
    t.import_resources(&["r1,a1,lcic,pay_per_use,,,,", "r2,a2,sa,pay_per_use,,,,"])
        .await;
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn billing_a_day_twice_bills_it_once() {
    let t = basic().await;
    t.import_usage(
        &[
            "e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "e2,a1,r1,classroom_minutes,50,2026-11-22T03:00:00Z,2026-11-22T04:00:00Z",
            "e3,a2,r2,assets_scanned,10,2026-11-22T03:00:00Z,2026-11-22T04:00:00Z",
        ],
        DAY_END,
    )
    .await;
    let first = t.bill(DAY_END).await;
    assert_eq!(first.bills_issued, 2);
    assert_eq!(first.unbilled_records, 3);
    assert_eq!(first.total, "2.45"); // 150 x 0.015 + 10 x 0.02
    assert_eq!(t.balance("a1").await, 10_000 - 225);
    let before = t.fingerprint().await;

    let again = t.bill(DAY_END).await;
    assert!(again.skipped.is_some(), "a finished slot is a no-op");
    assert_eq!(before, t.fingerprint().await);

    let forced = run(
        &t.db,
        &t.config,
        &Options {
            as_of: at(DAY_END),
            bill_day: None,
            dry_run: false,
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(forced.bills_issued, 0);
    assert_eq!(
        forced.accounts_already_billed, 0,
        "nothing left unbilled, so no account is even considered"
    );
    assert_eq!(t.scalar_i64("SELECT count(*) FROM bills").await, 2);
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM ledger_entries WHERE kind = 'charge'")
            .await,
        2
    );
    assert_eq!(t.balance("a1").await, 10_000 - 225);
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn late_event_is_billed_by_the_next_run() {
    let t = basic().await;
    t.import_usage(
        &["e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    // Arrives after the bill of its day was issued.
    t.import_usage(
        &["late,a1,r1,classroom_minutes,200,2026-11-22T05:00:00Z,2026-11-22T06:00:00Z"],
        "2026-11-22T17:00:00Z",
    )
    .await;
    let forced = run(
        &t.db,
        &t.config,
        &Options {
            as_of: at(DAY_END),
            bill_day: None,
            dry_run: false,
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        forced.bills_issued, 0,
        "the day's bill is issued and immutable"
    );
    assert_eq!(forced.accounts_already_billed, 1);

    let next = t.bill("2026-11-23T16:30:00Z").await;
    assert_eq!(next.bills_issued, 1);
    assert_eq!(next.late_records, 1);
    let c = t.client().await;
    let row = c
        .query_one("SELECT total, late_records, records FROM bills WHERE account_id = 'a1' AND bill_day = '2026-11-23'", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i32>(1),
            row.get::<_, i32>(2)
        ),
        (300, 1, 1)
    );
    // Every record billed exactly once across both bills.
    assert_eq!(
        t.scalar_i64("SELECT sum(records)::bigint FROM bill_lines WHERE account_id = 'a1'")
            .await,
        2
    );
    // A third run finds nothing.
    let third = t.bill("2026-11-24T16:30:00Z").await;
    assert_eq!((third.bills_issued, third.unbilled_records), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_of_the_next_day_waits_for_its_own_bill() {
    let t = basic().await;
    // The next day's record arrives first, so arrival numbers interleave with billing days.
    t.import_usage(
        &[
            // 2026-11-23 in Shanghai already
            "d2,a1,r1,classroom_minutes,100,2026-11-22T16:05:00Z,2026-11-22T16:10:00Z",
            "d1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        ],
        DAY_END,
    )
    .await;
    let r = t.bill(DAY_END).await;
    assert_eq!(r.unbilled_records, 1);
    let r2 = t.bill("2026-11-23T16:30:00Z").await;
    assert_eq!(
        (r2.bills_issued, r2.unbilled_records, r2.late_records),
        (1, 1, 0)
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM bills WHERE account_id = 'a1'")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_rounding_agrees_with_the_domain_rule() {
    let t = TestDb::new().await;
    t.import_accounts(&["a1,Alpha,,,en,UTC,1000.00,0,"]).await;
    // One resource per quantity so that each becomes its own line.
    let quantities = [
        "0.333333",
        "0.5",
        "1",
        "3.1",
        "33.333333",
        "66.666667",
        "0.000001",
        "1234.567891",
    ];
    let resources: Vec<String> = (0..quantities.len())
        .map(|i| format!("r{i},a1,lcic,pay_per_use,,,,"))
        .collect();
    t.import_resources(&resources.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let mut usage = Vec::new();
    for (i, q) in quantities.iter().enumerate() {
        usage.push(format!(
            "e{i}a,a1,r{i},classroom_minutes,{q},2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"
        ));
        usage.push(format!(
            "e{i}b,a1,r{i},storage_gb_days,{q},2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"
        ));
    }
    t.import_usage(
        &usage.iter().map(String::as_str).collect::<Vec<_>>(),
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    let rows = t
        .client()
        .await
        .query(
            "SELECT quantity, unit_price_nanos, amount FROM bill_lines",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), quantities.len() * 2);
    for r in rows {
        let (q, p, amount): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(amount, line_amount(q, p, 2), "quantity {q} price {p}");
    }
    // 0.333333 min x 0.015 = 0.004999995 -> 0.00; 0.5 x 0.015 = 0.0075 -> 0.01.
    assert_eq!(
        line_amount(
            parse_scaled("0.333333", QUANTITY_DIGITS).unwrap(),
            parse_scaled("0.015", PRICE_DIGITS).unwrap(),
            2
        ),
        0
    );
    assert_eq!(
        line_amount(
            parse_scaled("0.5", QUANTITY_DIGITS).unwrap(),
            parse_scaled("0.015", PRICE_DIGITS).unwrap(),
            2
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn package_quota_first_then_overage_only_with_pay_as_you_go() {
    let t = TestDb::new().await;
    t.import_accounts(&["on,On,,,en,UTC,100.00,0,", "off,Off,,,en,UTC,100.00,0,"])
        .await;
    t.import_resources(&[
        "p-on,on,lcic,package,1000,2026-12-31T00:00:00Z,true,",
        "p-off,off,lcic,package,1000,2026-12-31T00:00:00Z,false,",
    ])
    .await;
    t.import_usage(
        &[
            "a,on,p-on,classroom_minutes,600,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "b,off,p-off,classroom_minutes,600,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        ],
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    // Day 1: within quota for both.
    assert_eq!(t.balance("on").await, 10_000);
    assert_eq!(t.balance("off").await, 10_000);
    t.import_usage(
        &[
            "c,on,p-on,classroom_minutes,600,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z",
            "d,off,p-off,classroom_minutes,600,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z",
        ],
        "2026-11-23T16:30:00Z",
    )
    .await;
    t.bill("2026-11-23T16:30:00Z").await;
    let c = t.client().await;
    let line = |acct: &'static str| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT included_quantity, billed_quantity, unbilled_quantity, amount FROM bill_lines
                     WHERE account_id = $1 AND bill_day = '2026-11-23'",
                    &[&acct],
                )
                .await
                .unwrap();
            (
                r.get::<_, i64>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, i64>(3),
            )
        }
    };
    // 400 left in the quota, 200 over: billed at 0.015 with pay-as-you-go on...
    assert_eq!(line("on").await, (400_000_000, 200_000_000, 0, 300));
    assert_eq!(t.balance("on").await, 10_000 - 300);
    // ...recorded but not charged with it off.
    assert_eq!(line("off").await, (400_000_000, 0, 200_000_000, 0));
    assert_eq!(t.balance("off").await, 10_000);
    assert_eq!(
        t.scalar_i64("SELECT package_used FROM resources WHERE id = 'p-off'")
            .await,
        1_000_000_000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn coupons_pay_first_in_order_and_expired_ones_do_not() {
    let t = basic().await;
    let db = &t.db;
    let grant = |kind, amount: i64, expires: &'static str| async move {
        arrears::ledger::grant_coupon(
            db,
            2,
            "a1",
            amount,
            kind,
            at(expires),
            at("2026-11-01T00:00:00Z"),
            None,
        )
        .await
        .unwrap()
    };
    let g1 = grant(CouponKind::General, 100, "2026-12-31T00:00:00Z").await;
    let expired = grant(CouponKind::Cash, 10_000, "2026-11-20T00:00:00Z").await;
    let c_late = grant(CouponKind::Cash, 50, "2026-12-31T00:00:00Z").await;
    let c_soon = grant(CouponKind::Cash, 30, "2026-12-01T00:00:00Z").await;
    // 300 minutes x 0.015 = 4.50
    t.import_usage(
        &["e1,a1,r1,classroom_minutes,300,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    let c = t.client().await;
    let bill = c
        .query_one("SELECT total, paid_cash_coupons, paid_general_coupons, paid_cash FROM bills WHERE account_id = 'a1'", &[])
        .await
        .unwrap();
    let got: (i64, i64, i64, i64) = (bill.get(0), bill.get(1), bill.get(2), bill.get(3));
    assert_eq!(got, (450, 80, 100, 270));
    let uses: Vec<(i64, i64)> = c
        .query(
            "SELECT coupon_id, amount FROM ledger_entries WHERE kind = 'coupon_use' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        uses,
        vec![
            (c_soon.coupon_id, 30),
            (c_late.coupon_id, 50),
            (g1.coupon_id, 100)
        ]
    );
    assert_eq!(
        t.scalar_i64(&format!(
            "SELECT remaining FROM coupons WHERE id = {}",
            expired.coupon_id
        ))
        .await,
        10_000
    );
    assert_eq!(t.balance("a1").await, 10_000 - 270);

    // The SQL settlement and the domain rule agree on the same coupons.
    let coupons = [
        Coupon {
            id: g1.coupon_id,
            kind: CouponKind::General,
            remaining: 100,
            expires_at: at("2026-12-31T00:00:00Z"),
        },
        Coupon {
            id: expired.coupon_id,
            kind: CouponKind::Cash,
            remaining: 10_000,
            expires_at: at("2026-11-20T00:00:00Z"),
        },
        Coupon {
            id: c_late.coupon_id,
            kind: CouponKind::Cash,
            remaining: 50,
            expires_at: at("2026-12-31T00:00:00Z"),
        },
        Coupon {
            id: c_soon.coupon_id,
            kind: CouponKind::Cash,
            remaining: 30,
            expires_at: at("2026-12-01T00:00:00Z"),
        },
    ];
    let s = settle(450, &coupons, at(DAY_END));
    assert_eq!(
        (s.paid_cash_coupons, s.paid_general_coupons, s.paid_cash),
        (80, 100, 270)
    );
    assert_eq!(s.coupon_uses, uses);
}

#[tokio::test(flavor = "multi_thread")]
async fn arrears_start_when_cash_plus_credit_goes_below_zero() {
    let t = TestDb::new().await;
    t.import_accounts(&[
        "poor,Poor,,,en,UTC,1.00,0,",
        "credit,Credit,,,en,UTC,0.00,10.00,",
        "ok,Ok,,,en,UTC,10.00,0,",
    ])
    .await;
    t.import_resources(&[
        "r1,poor,lcic,pay_per_use,,,,",
        "r2,credit,lcic,pay_per_use,,,,",
        "r3,ok,lcic,pay_per_use,,,,",
    ])
    .await;
    t.import_usage(
        &[
            "e1,poor,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 1.50 > 1.00
            "e2,credit,r2,classroom_minutes,600,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 9.00 < 10.00 credit
            "e3,ok,r3,classroom_minutes,600,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 9.00 <= 10.00
        ],
        DAY_END,
    )
    .await;
    let r = t.bill(DAY_END).await;
    assert_eq!(r.entered_arrears, vec!["poor".to_string()]);
    let c = t.client().await;
    let row = c
        .query_one(
            "SELECT state, arrears_since, cash_balance FROM accounts WHERE id = 'poor'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "in_arrears");
    assert_eq!(
        row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(1),
        Some(at(DAY_END))
    );
    assert_eq!(row.get::<_, i64>(2), -50);
    for id in ["credit", "ok"] {
        let s: String = c
            .query_one("SELECT state FROM accounts WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(s, "good", "{id}");
    }
    let ev = c
        .query_one("SELECT from_state, to_state, cause, occurred_at FROM lifecycle_events WHERE account_id = 'poor'", &[])
        .await
        .unwrap();
    assert_eq!(
        (ev.get::<_, String>(0), ev.get::<_, String>(1)),
        ("good".into(), "in_arrears".into())
    );
    assert!(ev.get::<_, String>(2).starts_with("generate_bills@"));
    assert_eq!(ev.get::<_, chrono::DateTime<chrono::Utc>>(3), at(DAY_END));

    // A top-up of exactly the debt ends arrears; the ledger still matches.
    let rep = arrears::ledger::topup(
        &t.db,
        &t.config,
        "poor",
        50,
        "pay-1",
        at("2026-11-23T00:00:00Z"),
        "test",
    )
    .await
    .unwrap();
    assert!(rep.arrears_cleared);
    assert_eq!(rep.cash_balance, "0.00");
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_reports_the_plan_and_writes_nothing() {
    let t = basic().await;
    t.import_usage(
        &["e1,a2,r2,assets_scanned,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    let before = t.fingerprint().await;
    let r = run(
        &t.db,
        &t.config,
        &Options {
            as_of: at(DAY_END),
            bill_day: None,
            dry_run: true,
            force: false,
        },
    )
    .await
    .unwrap();
    assert!(r.dry_run);
    assert_eq!(r.bills_issued, 1);
    assert_eq!(r.would_issue.len(), 1);
    assert_eq!(r.would_issue[0].total, "2.00");
    assert_eq!(r.entered_arrears, vec!["a2".to_string()]);
    assert_eq!(before, t.fingerprint().await, "a dry run changes nothing");
    // The real run then does what the dry run said.
    let real = t.bill(DAY_END).await;
    assert_eq!(
        (
            real.bills_issued,
            real.total.as_str(),
            real.entered_arrears.clone()
        ),
        (1, "2.00", vec!["a2".to_string()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_day_that_has_not_ended_is_refused() {
    let t = basic().await;
    let err = run(
        &t.db,
        &t.config,
        &Options {
            as_of: at("2026-11-22T10:00:00Z"),
            bill_day: Some(chrono::NaiveDate::from_ymd_opt(2026, 11, 22).unwrap()),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("has not ended"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_split_accounts_and_bill_each_once() {
    let t = TestDb::with_config(config_with(&[("ARREARS_BILLING__BATCH_SIZE", "3")])).await;
    let accounts: Vec<String> = (0..10)
        .map(|i| format!("acc{i:02},A{i},,,en,UTC,10.00,0,"))
        .collect();
    let resources: Vec<String> = (0..10)
        .map(|i| format!("r{i},acc{i:02},sa,pay_per_use,,,,"))
        .collect();
    let usage: Vec<String> = (0..10)
        .flat_map(|i| (0..3).map(move |j| format!("e{i}-{j},acc{i:02},r{i},assets_scanned,5,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z")))
        .collect();
    t.import_accounts(&refs(&accounts)).await;
    t.import_resources(&refs(&resources)).await;
    t.import_usage(&refs(&usage), DAY_END).await;
    let r = t.bill(DAY_END).await;
    assert_eq!(r.batches, 4);
    assert_eq!(r.bills_issued, 10);
    assert_eq!(
        t.scalar_i64("SELECT sum(records)::bigint FROM bills").await,
        30
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM accounts WHERE cash_balance = 1000 - 30")
            .await,
        10
    );
    let run_row = t
        .client()
        .await
        .query_one("SELECT status, report->>'bills_issued' FROM job_runs", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            run_row.get::<_, String>(0),
            run_row.get::<_, Option<String>>(1)
        ),
        ("succeeded".into(), Some("10".into()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn financial_records_refuse_update_and_delete() {
    let t = basic().await;
    t.import_usage(
        &["e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    let c = t.client().await;
    for sql in [
        "DELETE FROM ledger_entries",
        "UPDATE ledger_entries SET amount = 0",
        "DELETE FROM bills",
        "DELETE FROM bill_lines",
        "DELETE FROM usage_records",
        "UPDATE usage_records SET quantity = 0",
    ] {
        let e = c.execute(sql, &[]).await.unwrap_err();
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(msg.contains("append-only"), "{sql}: {e:?}");
    }
    // Bills and ledger entries name their account without a foreign key (billing writes them
    // from locked accounts): an account with financial records is never deleted, even one
    // with no resource, coupon or notice left to hold it.
    let e = c
        .execute("DELETE FROM accounts WHERE id = 'a1'", &[])
        .await
        .unwrap_err();
    let msg = e.as_db_error().map(|d| d.message()).unwrap_or_default();
    assert!(msg.contains("never deleted"), "{e:?}");
    // Every line belongs to a bill of the same account and day.
    let orphans: i64 = c
        .query_one(
            "SELECT count(*) FROM bill_lines l
             WHERE NOT EXISTS (SELECT 1 FROM bills b WHERE b.account_id = l.account_id AND b.bill_day = l.bill_day)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_earlier_day_after_a_later_one_is_refused() {
    let t = basic().await;
    t.import_usage(
        &["e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    t.bill("2026-11-23T16:30:00Z").await;
    let err = run(
        &t.db,
        &t.config,
        &Options {
            as_of: at("2026-11-23T16:30:00Z"),
            bill_day: Some(chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("is earlier"), "{err}");
    assert_eq!(t.scalar_i64("SELECT count(*) FROM bills").await, 1);
    // Refused before anything was claimed: no record that a scheduler would retry for ever.
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM job_runs WHERE status <> 'succeeded'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_day_waits_while_an_earlier_day_is_open() {
    let t = basic().await;
    t.import_usage(
        &["e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    // 2026-11-21's run is held by another instance: its row, and its slot lock on a live
    // connection.
    let holder = t.client().await;
    holder
        .execute(
            "INSERT INTO job_runs (job, slot, status, as_of, started_at, owner, lease_until)
             VALUES ('generate_bills', '2026-11-21T00:00:00+08:00', 'running', '2026-11-21T00:30:00+08:00',
                     now(), 'elsewhere:1:0', now() + interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
    let key = arrears::jobs::slot_lock_key(
        arrears::jobs::JobName::parse("generate_bills").unwrap(),
        at("2026-11-21T00:00:00+08:00"),
    );
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    let opts = Options {
        as_of: at(DAY_END),
        bill_day: None,
        dry_run: false,
        force: false,
    };
    let r = run(&t.db, &t.config, &opts).await.unwrap();
    assert_eq!(r.held_by.as_deref(), Some("elsewhere:1:0"), "{r:?}");
    assert!(
        r.skipped
            .as_deref()
            .unwrap_or_default()
            .contains("billing day 2026-11-20 is being billed"),
        "{r:?}"
    );
    assert_eq!(t.scalar_i64("SELECT count(*) FROM bills").await, 0);
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM job_runs").await,
        1,
        "nothing claimed"
    );
    // Its runner dies: the next run resumes that day first, then bills its own.
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    drop(holder);
    let r = run(&t.db, &t.config, &opts).await.unwrap();
    // (and the 21st, which no run had billed)
    let days: Vec<String> = r.caught_up.iter().map(|c| c.bill_day.to_string()).collect();
    assert_eq!(days, ["2026-11-20", "2026-11-21"], "{r:?}");
    assert_eq!(r.bills_issued, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_run_that_failed_part_way_an_earlier_day_is_refused() {
    let t = basic().await;
    t.import_usage(
        &["e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    // As if the run for 2026-11-22 had committed this batch and then failed: no succeeded slot.
    t.client()
        .await
        .batch_execute("DELETE FROM job_runs")
        .await
        .unwrap();
    let err = run(
        &t.db,
        &t.config,
        &Options {
            as_of: at(DAY_END),
            bill_day: Some(chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("billed up to 2026-11-22"), "{err}");
}

/// Three days of usage for a1 (100 minutes a day: 1.50), a cash coupon of 2.00 that expires at
/// the end of the first day (midnight in the billing zone) and a general one of 1.00 granted
/// during the second day and expiring at its end.
async fn three_days_with_coupons() -> TestDb {
    let t = basic().await;
    let grant = |kind, amount: i64, expires: &str, granted: &str| {
        let (db, expires, granted) = (&t.db, at(expires), at(granted));
        async move {
            arrears::ledger::grant_coupon(db, 2, "a1", amount, kind, expires, granted, None)
                .await
                .unwrap()
        }
    };
    // Midnight of 2026-11-22 -> 23 in Shanghai.
    grant(
        CouponKind::Cash,
        200,
        "2026-11-22T16:00:00Z",
        "2026-11-01T00:00:00Z",
    )
    .await;
    grant(
        CouponKind::General,
        100,
        "2026-11-23T16:00:00Z",
        "2026-11-23T05:00:00Z",
    )
    .await;
    t.import_usage(
        &[
            "e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "e2,a1,r1,classroom_minutes,100,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z",
            "e3,a1,r1,classroom_minutes,100,2026-11-24T01:00:00Z,2026-11-24T02:00:00Z",
        ],
        "2026-11-24T12:00:00Z",
    )
    .await;
    t
}

async fn bills_of(t: &TestDb) -> Vec<(String, i64, i64, i64, i64)> {
    t.client()
        .await
        .query(
            "SELECT bill_day::text, total, paid_cash_coupons, paid_general_coupons, paid_cash FROM bills ORDER BY bill_day",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn settlement_follows_the_bill_day_so_a_catch_up_run_bills_as_the_on_time_ones() {
    // On time: each day at 00:30 of the next (Shanghai).
    let on_time = three_days_with_coupons().await;
    for run_at in [
        "2026-11-22T16:30:00Z",
        "2026-11-23T16:30:00Z",
        "2026-11-24T16:30:00Z",
    ] {
        on_time.bill(run_at).await;
    }
    let expected = vec![
        // the coupon expiring at midnight still settles the day it was valid for (1.50 of 2.00)
        ("2026-11-22".to_string(), 150, 150, 0, 0),
        // its 0.50 left expired with it; the general coupon granted during the 23rd pays 1.00
        ("2026-11-23".to_string(), 150, 0, 100, 50),
        ("2026-11-24".to_string(), 150, 0, 0, 150),
    ];
    assert_eq!(bills_of(&on_time).await, expected);
    // Catch-up: the service was down; one run days later bills the three days in order, and
    // settles each by its own day.
    let late = three_days_with_coupons().await;
    let opts = Options {
        as_of: at("2026-11-27T09:00:00Z"),
        bill_day: None,
        dry_run: false,
        force: false,
    };
    for day in ["2026-11-22", "2026-11-23", "2026-11-24"] {
        run(
            &late.db,
            &late.config,
            &Options {
                bill_day: Some(day.parse().unwrap()),
                ..opts.clone()
            },
        )
        .await
        .unwrap();
    }
    assert_eq!(bills_of(&late).await, expected);
    late.assert_balances_match_ledger().await;
    assert_eq!(late.balance("a1").await, on_time.balance("a1").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_that_used_a_retired_meter_is_set_aside_whole_and_billed_once_priced_again() {
    let t = basic().await;
    t.import_accounts(&["a3,Gamma,,,en,UTC,100.00,0,"]).await;
    t.import_resources(&["r3,a3,lcic,pay_per_use,,,,"]).await;
    t.import_usage(
        &[
            "e1,a1,r1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "e2,a1,r1,recording_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "e3,a3,r3,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        ],
        DAY_END,
    )
    .await;
    // recording_minutes is no longer sold from before the bill day
    let retired = arrears::config::EXAMPLE_CONFIG.replace(
        "[[products.lcic.prices]]\nmeter = \"recording_minutes\"\nunit = \"minute\"\nunit_price = \"0.0050\"\n",
        "",
    );
    assert_ne!(retired, arrears::config::EXAMPLE_CONFIG);
    let retired: arrears::config::Config =
        arrears::config::Config::from_toml(&retired, "test", &[]).expect("config");
    let mut conn = t.db.conn().await.unwrap();
    arrears::db::catalog::apply(&mut conn, &retired, at("2026-11-20T00:00:00Z"), false)
        .await
        .unwrap();
    let r = t.bill(DAY_END).await;
    // a1 is left alone whole (not billed for its priced meter only); a3 is billed
    assert_eq!(r.accounts_skipped_unpriced, vec!["a1".to_string()]);
    assert_eq!(r.bills_issued, 1);
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM bills WHERE account_id = 'a1'")
            .await,
        0
    );
    // Priced again from before the day: the next day's run bills a1's usage of the 22nd
    // (once), on its bill.
    arrears::db::catalog::apply(&mut conn, &t.config, at("2026-11-21T00:00:00Z"), false)
        .await
        .unwrap();
    let next = t.bill("2026-11-23T16:30:00Z").await;
    assert_eq!(next.late_records, 2, "{next:?}");
    assert_eq!(
        t.scalar_i64("SELECT sum(records) FROM bill_lines WHERE account_id = 'a1'")
            .await,
        2
    );
    t.assert_balances_match_ledger().await;
}

/// (quantity, included, billed, unbilled) of `account`'s line on `day`, in micro-units.
async fn line_of(t: &TestDb, account: &str, day: &str) -> (i64, i64, i64, i64) {
    let c = t.client().await;
    let r = c
        .query_one(
            "SELECT quantity, included_quantity, billed_quantity, unbilled_quantity FROM bill_lines
             WHERE account_id = $1 AND bill_day = $2::text::date",
            &[&account, &day],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

const MINUTES: i64 = 1_000_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_late_record_of_a_day_the_package_covered_draws_on_it_after_it_expired() {
    let t = TestDb::new().await;
    t.import_accounts(&["pk,Pk,,,en,UTC,100.00,0,"]).await;
    // 1000 minutes, expiring at the end of the 22nd (Shanghai), pay-as-you-go on
    t.import_resources(&["p1,pk,lcic,package,1000,2026-11-22T16:00:00Z,true,"])
        .await;
    t.import_usage(
        &["a,pk,p1,classroom_minutes,600,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    assert_eq!(
        line_of(&t, "pk", "2026-11-22").await,
        (600 * MINUTES, 600 * MINUTES, 0, 0)
    );
    // The 23rd: a late record of the 22nd (when the package was valid) and one of the 23rd.
    t.import_usage(
        &[
            "b,pk,p1,classroom_minutes,300,2026-11-22T02:00:00Z,2026-11-22T03:00:00Z",
            "c,pk,p1,classroom_minutes,100,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z",
        ],
        "2026-11-23T16:30:00Z",
    )
    .await;
    let r = t.bill("2026-11-23T16:30:00Z").await;
    assert_eq!(r.late_records, 1);
    // the late 300 from the package's remaining 400; the 23rd's 100 pay-as-you-go
    assert_eq!(
        line_of(&t, "pk", "2026-11-23").await,
        (400 * MINUTES, 300 * MINUTES, 100 * MINUTES, 0)
    );
    // 100 minutes at 0.015
    assert_eq!(t.balance("pk").await, 10_000 - 150);
    assert_eq!(
        t.scalar_i64("SELECT package_used FROM resources WHERE id = 'p1'")
            .await,
        900 * MINUTES
    );
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_keeps_the_old_terms_remainder_for_late_records_of_its_days() {
    use arrears::lifecycle::{self, OperatorAction};
    let t = TestDb::new().await;
    t.import_accounts(&["pk,Pk,,,en,UTC,100.00,0,"]).await;
    // 1000 minutes, pay-as-you-go off: what no term covers is recorded, not charged
    t.import_resources(&["p1,pk,lcic,package,1000,2026-12-31T00:00:00Z,false,"])
        .await;
    t.import_usage(
        &["a,pk,p1,classroom_minutes,600,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY_END,
    )
    .await;
    t.bill(DAY_END).await;
    // Renewed at noon on the 23rd (Shanghai): 200 minutes.
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "pk",
        OperatorAction::RenewPackage {
            resource: "p1".into(),
            quota: 200 * MINUTES,
            expires_at: at("2027-01-31T00:00:00Z"),
        },
        at("2026-11-23T04:00:00Z"),
        "test",
    )
    .await
    .unwrap();
    // The 23rd's own 150 minutes draw on the renewed package (it covers its first day); a
    // late 500 of the 22nd draws on the term that covered the 22nd, which had 400 left.
    t.import_usage(
        &[
            "b,pk,p1,classroom_minutes,150,2026-11-23T05:00:00Z,2026-11-23T06:00:00Z",
            "c,pk,p1,classroom_minutes,500,2026-11-22T02:00:00Z,2026-11-22T03:00:00Z",
        ],
        "2026-11-23T16:30:00Z",
    )
    .await;
    t.bill("2026-11-23T16:30:00Z").await;
    assert_eq!(
        line_of(&t, "pk", "2026-11-23").await,
        (650 * MINUTES, 550 * MINUTES, 0, 100 * MINUTES)
    );
    assert_eq!(
        t.scalar_i64("SELECT package_used FROM resources WHERE id = 'p1'")
            .await,
        150 * MINUTES,
        "the renewed term paid only for its own days"
    );
    assert_eq!(
        t.scalar_i64("SELECT used FROM package_terms WHERE account_id = 'pk' AND resource_id = 'p1' AND no = 1")
            .await,
        1000 * MINUTES
    );
    assert_eq!(t.balance("pk").await, 10_000);
    t.assert_balances_match_ledger().await;
}
