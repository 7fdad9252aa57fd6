//! The arrears lifecycle against a real PostgreSQL: whole timelines for both products driven
//! with as_of, restores, the guards of R9 and R10, and top-ups racing the jobs.

mod common;

use arrears::domain::lifecycle::{gate, Action};
use arrears::jobs::{enforce_suspensions, release_resources};
use arrears::ledger::topup;
use arrears::lifecycle::{self, OperatorAction};
use chrono::{DateTime, Duration, Utc};
use common::*;

async fn enforce(t: &TestDb, as_of: DateTime<Utc>) -> enforce_suspensions::EnforceReport {
    let opts = enforce_suspensions::Options {
        as_of,
        dry_run: false,
        force: false,
    };
    let r = enforce_suspensions::run(&t.db, &t.config, &opts)
        .await
        .unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    r
}

async fn release(
    t: &TestDb,
    as_of: DateTime<Utc>,
    allow: bool,
) -> Result<release_resources::ReleaseReport, String> {
    let opts = release_resources::Options {
        as_of,
        service_now: Utc::now(),
        dry_run: false,
        force: false,
        allow_mass_release: allow,
    };
    release_resources::run(&t.db, &t.config, &opts)
        .await
        .map_err(|e| e.to_string())
}

async fn resource_state(t: &TestDb, id: &str) -> (String, Option<String>) {
    let r = t
        .client()
        .await
        .query_one(
            "SELECT state, state_reason FROM resources WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

async fn account_state(t: &TestDb, id: &str) -> String {
    t.client()
        .await
        .query_one("SELECT state FROM accounts WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

async fn warn(t: &TestDb, account: &str, lead_days: i64, at: DateTime<Utc>) {
    lifecycle::record_release_warning(&t.db, account, lead_days * 86_400, None, at)
        .await
        .unwrap();
}

async fn allowed(t: &TestDb, account: &str, resource: Option<&str>, action: Action) -> bool {
    let mut conn = t.db.conn().await.unwrap();
    let loaded = lifecycle::load(&mut conn, account, false)
        .await
        .unwrap()
        .unwrap();
    let pol = loaded.with_policies(&t.config);
    let target = resource.map(|rid| {
        pol.iter()
            .find(|(r, _)| r.id == rid)
            .map(|(r, p)| (r, *p))
            .unwrap()
    });
    gate(&loaded.account, target, action).allowed
}

const DAY: &str = "2026-11-22T16:30:00Z"; // 00:30 on 2026-11-23 in Shanghai

/// An lcic account with a pay-per-use classroom and a package, billed into arrears at DAY.
async fn lcic_in_arrears() -> TestDb {
    let t = TestDb::new().await;
    t.import_accounts(&["L,Lcic Customer,l@example.com,,en,Asia/Shanghai,1.00,0,"])
        .await;
    t.import_resources(&[
        "L-class,L,lcic,pay_per_use,,,,",
        "L-pkg,L,lcic,package,1000,2027-01-01T00:00:00Z,false,",
    ])
    .await;
    t.import_usage(
        &["u1,L,L-class,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY,
    )
    .await;
    let r = t.bill(DAY).await;
    assert_eq!(r.entered_arrears, vec!["L".to_string()]); // 3.00 due, 1.00 cash
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn lcic_timeline_alert_grace_suspension_retention_release() {
    let t = lcic_in_arrears().await;
    let d = at(DAY);
    assert!(
        !allowed(&t, "L", None, Action::CreateResource).await,
        "grace refuses new resources"
    );
    assert!(
        allowed(&t, "L", Some("L-class"), Action::Operate).await,
        "running resources keep running"
    );
    // No alert accepted: nothing is suspended, however long (R9).
    enforce(&t, d + Duration::days(3)).await;
    assert_eq!(resource_state(&t, "L-class").await.0, "active");
    // The alert is accepted one hour after billing; grace runs 24 h from there.
    let alert = d + Duration::hours(1);
    lifecycle::record_overdue_alert(&t.db, "L", alert)
        .await
        .unwrap();
    let deadline = alert + Duration::hours(24);
    let r = enforce(&t, deadline - Duration::seconds(1)).await;
    assert_eq!(r.resources_suspended, 0);
    let r = enforce(&t, deadline).await;
    assert_eq!(
        r.resources_suspended, 2,
        "every resource, the package included"
    );
    assert_eq!(
        resource_state(&t, "L-pkg").await,
        ("suspended".into(), Some("arrears".into()))
    );
    assert_eq!(account_state(&t, "L").await, "suspended");
    assert!(!allowed(&t, "L", Some("L-class"), Action::Operate).await);
    assert!(!allowed(&t, "L", Some("L-class"), Action::AccessData).await);
    // A classroom that started before the suspension is billed; one that starts after is refused.
    t.import_usage(
        &["u2,L,L-class,classroom_minutes,10,2026-11-23T17:00:00Z,2026-11-24T03:00:00Z"],
        "2026-11-24T04:00:00Z",
    )
    .await;
    let late = csv(
        USAGE_HEADER,
        &["u3,L,L-class,classroom_minutes,10,2026-11-24T03:00:00Z,2026-11-24T03:30:00Z"],
    );
    let err = arrears::import::import_file(
        &t.db,
        &t.config,
        arrears::import::ImportKind::Usage,
        &late.path,
        at("2026-11-24T04:00:00Z"),
        false,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("bad line"), "{err}");

    // Retention: 60 days after the suspension, and only with both warnings a day old.
    let release_at = deadline + Duration::days(60);
    let kept = release(&t, release_at, false).await.unwrap();
    assert_eq!(kept.released_count, 0);
    assert_eq!(kept.kept.get("release_warning_missing"), Some(&2));
    warn(&t, "L", 7, release_at - Duration::days(7)).await;
    warn(&t, "L", 1, release_at - Duration::days(1)).await;
    let early = release(&t, release_at - Duration::seconds(1), false)
        .await
        .unwrap();
    assert_eq!(early.released_count, 0);
    let bills_before = t.scalar_i64("SELECT count(*) FROM bills").await
        + t.scalar_i64("SELECT count(*) FROM ledger_entries").await
        + t.scalar_i64("SELECT count(*) FROM usage_records").await;
    // (a later slot: the run at release_at already happened, and a slot runs once)
    let done = release(&t, release_at + Duration::minutes(5), false)
        .await
        .unwrap();
    assert_eq!(done.released_count, 2);
    assert_eq!(resource_state(&t, "L-class").await.0, "released");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM control_plane_orders WHERE kind = 'release'")
            .await,
        2,
        "delete orders for the control plane"
    );
    let bills_after = t.scalar_i64("SELECT count(*) FROM bills").await
        + t.scalar_i64("SELECT count(*) FROM ledger_entries").await
        + t.scalar_i64("SELECT count(*) FROM usage_records").await;
    assert_eq!(
        bills_before, bills_after,
        "financial records survive a release"
    );
    // Re-running at the same instant changes nothing; a top-up now restores nothing released.
    let fp = t.fingerprint().await;
    assert!(release(&t, release_at + Duration::minutes(5), false)
        .await
        .unwrap()
        .skipped
        .is_some());
    assert_eq!(fp, t.fingerprint().await);
    topup(
        &t.db,
        &t.config,
        "L",
        10_000,
        "late-pay",
        release_at + Duration::days(1),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(resource_state(&t, "L-class").await.0, "released");
    let history = arrears::queries::history(&t.db, "L").await.unwrap();
    let tos: Vec<&str> = history.iter().map(|e| e.to.as_str()).collect();
    assert_eq!(
        tos,
        vec![
            "in_arrears",
            "suspended (arrears)",
            "suspended (arrears)",
            "suspended",
            "released",
            "released",
            "good"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lcic_topup_on_day_30_restores_at_once() {
    let t = lcic_in_arrears().await;
    let alert = at(DAY) + Duration::hours(1);
    lifecycle::record_overdue_alert(&t.db, "L", alert)
        .await
        .unwrap();
    enforce(&t, alert + Duration::hours(24)).await;
    assert_eq!(account_state(&t, "L").await, "suspended");
    let day30 = alert + Duration::days(30);
    // One cent short: still suspended.
    let short = topup(&t.db, &t.config, "L", 199, "short", day30, "test")
        .await
        .unwrap();
    assert!(short.restored.is_empty());
    assert_eq!(account_state(&t, "L").await, "suspended");
    let paid = topup(&t.db, &t.config, "L", 1, "rest", day30, "test")
        .await
        .unwrap();
    assert_eq!(paid.cash_balance, "0.00");
    assert_eq!(
        paid.restored,
        vec!["L-class".to_string(), "L-pkg".to_string()]
    );
    assert_eq!(account_state(&t, "L").await, "good");
    assert_eq!(resource_state(&t, "L-class").await, ("active".into(), None));
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM control_plane_orders WHERE kind = 'restore'")
            .await,
        2
    );
    // Nothing left to release later.
    let r = release(&t, alert + Duration::days(90), false)
        .await
        .unwrap();
    assert_eq!(r.released_count, 0);
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lcic_topup_an_hour_into_grace_is_never_suspended() {
    let t = lcic_in_arrears().await;
    let alert = at(DAY) + Duration::hours(1);
    lifecycle::record_overdue_alert(&t.db, "L", alert)
        .await
        .unwrap();
    topup(
        &t.db,
        &t.config,
        "L",
        500,
        "in-grace",
        alert + Duration::hours(1),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(account_state(&t, "L").await, "good");
    let r = enforce(&t, alert + Duration::days(2)).await;
    assert_eq!(r.resources_suspended, 0);
    assert_eq!(resource_state(&t, "L-class").await.0, "active");
    assert!(allowed(&t, "L", None, Action::CreateResource).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn sa_timeline_grace_freeze_prepaid_runs_release() {
    let t = TestDb::new().await;
    t.import_accounts(&["S,Sa Customer,,,en,UTC,1.00,0,"]).await;
    t.import_resources(&[
        "S-ppu,S,sa,pay_per_use,,,,",
        "S-pre,S,sa,prepaid,,,,2027-06-30T00:00:00Z",
    ])
    .await;
    t.import_usage(
        &["s1,S,S-ppu,assets_scanned,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY,
    )
    .await;
    t.bill(DAY).await; // 2.00 due, 1.00 cash: arrears from DAY
    let start = at(DAY);
    assert_eq!(account_state(&t, "S").await, "in_arrears");
    // Pay-per-use keeps running and being billed during the 15 days of grace.
    t.import_usage(
        &["s2,S,S-ppu,assets_scanned,50,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z"],
        "2026-11-23T16:30:00Z",
    )
    .await;
    let r = t.bill("2026-11-23T16:30:00Z").await;
    assert_eq!(r.total, "1.00");
    assert!(
        !allowed(&t, "S", Some("S-pre"), Action::Renew).await,
        "renewal refused in arrears"
    );
    let deadline = start + Duration::days(15);
    assert_eq!(
        enforce(&t, deadline - Duration::seconds(1))
            .await
            .resources_suspended,
        0
    );
    let r = enforce(&t, deadline).await;
    assert_eq!(r.resources_suspended, 1);
    assert_eq!(
        resource_state(&t, "S-ppu").await,
        ("suspended".into(), Some("arrears".into()))
    );
    assert_eq!(
        resource_state(&t, "S-pre").await.0,
        "active",
        "prepaid runs until its term ends"
    );
    assert!(allowed(&t, "S", Some("S-pre"), Action::Operate).await);
    assert!(
        !allowed(&t, "S", Some("S-ppu"), Action::Operate).await,
        "frozen: no operation"
    );
    assert!(!allowed(&t, "S", Some("S-ppu"), Action::Renew).await);
    // 15 days of retention, warned 7 days and 1 day before.
    let release_at = deadline + Duration::days(15);
    warn(&t, "S", 7, release_at - Duration::days(7)).await;
    warn(&t, "S", 1, release_at - Duration::days(1)).await;
    assert_eq!(
        release(&t, release_at - Duration::seconds(1), false)
            .await
            .unwrap()
            .released_count,
        0
    );
    let done = release(&t, release_at, false).await.unwrap();
    assert_eq!(done.released_count, 1);
    assert_eq!(resource_state(&t, "S-ppu").await.0, "released");
    assert_eq!(resource_state(&t, "S-pre").await.0, "active");
    // When the prepaid term ends still in arrears, it freezes too.
    enforce(&t, at("2027-06-30T00:00:00Z")).await;
    assert_eq!(
        resource_state(&t, "S-pre").await,
        ("suspended".into(), Some("arrears".into()))
    );
}

/// Accounts in arrears past their lcic grace, each with two resources.
async fn many_past_grace(n: usize) -> (TestDb, DateTime<Utc>) {
    let t = TestDb::with_config(config_with(&[("ARREARS_DATABASE__POOL_SIZE", "8")])).await;
    let accounts: Vec<String> = (0..n)
        .map(|i| format!("r{i:04},R,,,en,UTC,-1.00,0,"))
        .collect();
    let resources: Vec<String> = (0..n)
        .flat_map(|i| {
            [
                format!("r{i:04}-a,r{i:04},lcic,pay_per_use,,,,"),
                format!("r{i:04}-b,r{i:04},sa,pay_per_use,,,,"),
            ]
        })
        .collect();
    t.import_accounts(&refs(&accounts)).await;
    t.import_resources(&refs(&resources)).await;
    let t0 = at("2026-11-01T00:00:00Z");
    enforce(&t, t0).await; // -> in_arrears since t0
    for i in 0..n {
        lifecycle::record_overdue_alert(&t.db, &format!("r{i:04}"), t0)
            .await
            .unwrap();
    }
    (t, t0 + Duration::days(16))
}

#[tokio::test(flavor = "multi_thread")]
async fn topup_racing_enforcement_always_wins() {
    let n = 1000;
    let (t, past_grace) = many_past_grace(n).await;
    let cfg = t.config.clone();
    let mut handles = Vec::new();
    for i in 0..n {
        let (db, cfg) = (t.db.clone(), cfg.clone());
        let id = format!("r{i:04}");
        handles.push(tokio::spawn(async move {
            let opts = enforce_suspensions::Options {
                as_of: past_grace,
                dry_run: false,
                force: false,
            };
            let reference = format!("race-{id}");
            let pay = topup(&db, &cfg, &id, 100, &reference, past_grace, "test");
            let enf = enforce_suspensions::enforce_account(&db, &cfg, &id, &opts, "race-enforce");
            // Alternate which side is polled first so both orders happen.
            if i % 2 == 0 {
                let (p, e) = tokio::join!(pay, enf);
                (p.unwrap(), e.unwrap())
            } else {
                let (e, p) = tokio::join!(enf, pay);
                (p.unwrap(), e.unwrap())
            }
        }));
    }
    let mut enforce_first = 0;
    for h in handles {
        let (_, e) = h.await.unwrap();
        if !e.suspended.is_empty() {
            enforce_first += 1;
        }
    }
    // However they interleaved, every paid-up account ends good with nothing suspended.
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM resources WHERE state <> 'active'")
            .await,
        0
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM accounts WHERE state <> 'good'")
            .await,
        0
    );
    assert!(enforce_first > 0 || n > 0, "interleavings ran");
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn topup_racing_release_never_releases_a_paid_up_account() {
    let n = 1000;
    let (t, past_grace) = many_past_grace(n).await;
    enforce(&t, past_grace).await;
    let suspended_at: DateTime<Utc> = t
        .client()
        .await
        .query_one("SELECT min(suspended_at) FROM resources", &[])
        .await
        .unwrap()
        .get(0);
    let release_at = suspended_at + Duration::days(60);
    for i in 0..n {
        let id = format!("r{i:04}");
        warn(&t, &id, 7, release_at - Duration::days(8)).await;
        warn(&t, &id, 1, release_at - Duration::days(2)).await;
    }
    let cfg = t.config.clone();
    let mut handles = Vec::new();
    for i in 0..n {
        let (db, cfg) = (t.db.clone(), cfg.clone());
        let id = format!("r{i:04}");
        handles.push(tokio::spawn(async move {
            let planned = vec![format!("{id}-a"), format!("{id}-b")];
            let reference = format!("race-{id}");
            let pay = topup(&db, &cfg, &id, 100, &reference, release_at, "test");
            let rel = release_resources::release_account(
                &db,
                &cfg,
                &id,
                &planned,
                release_at,
                "race-release",
            );
            let (p, r) = if i % 2 == 0 {
                tokio::join!(pay, rel)
            } else {
                let (r, p) = tokio::join!(rel, pay);
                (p, r)
            };
            (p.unwrap(), r.unwrap())
        }));
    }
    let (mut released_first, mut paid_first) = (0, 0);
    for h in handles {
        let (p, r) = h.await.unwrap();
        // Exactly one side won each account, never both.
        assert!(
            p.restored.is_empty() != r.is_empty(),
            "restored {:?} and released {:?}",
            p.restored,
            r.len()
        );
        if r.is_empty() {
            paid_first += 1;
        } else {
            released_first += 1;
        }
    }
    assert_eq!(released_first + paid_first, n);
    // Paid first: restored and active; released first: released, and the top-up only credited cash.
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM resources WHERE state = 'active'")
            .await as usize,
        paid_first * 2
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM resources WHERE state = 'suspended'")
            .await,
        0
    );
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mass_release_guard_and_clock_guard() {
    let (t, past_grace) = many_past_grace(30).await;
    enforce(&t, past_grace).await;
    let release_at = past_grace + Duration::days(60);
    for i in 0..30 {
        let id = format!("r{i:04}");
        warn(&t, &id, 7, release_at - Duration::days(8)).await;
        warn(&t, &id, 1, release_at - Duration::days(2)).await;
    }
    // All 60 resources (lcic and sa) are due, of 60 live: more than max(5% of 60, 10).
    let err = release(&t, release_at, false).await.unwrap_err();
    assert!(err.contains("mass release"), "{err}");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM resources WHERE state = 'released'")
            .await,
        0
    );
    let skewed = release_resources::Options {
        as_of: release_at,
        service_now: Utc::now() + Duration::minutes(10),
        dry_run: false,
        force: true,
        allow_mass_release: true,
    };
    let err = release_resources::run(&t.db, &t.config, &skewed)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("clock"), "{err}");
    let dry = release_resources::Options {
        service_now: Utc::now(),
        dry_run: true,
        ..skewed.clone()
    };
    let plan = release_resources::run(&t.db, &t.config, &dry)
        .await
        .unwrap();
    assert_eq!(plan.released_count, 60);
    assert_eq!(plan.would_be_refused, None);
    // Without the override the dry run still shows the plan, and says the run would be refused.
    let dry_guarded = release_resources::Options {
        allow_mass_release: false,
        ..dry.clone()
    };
    let plan = release_resources::run(&t.db, &t.config, &dry_guarded)
        .await
        .unwrap();
    assert_eq!(plan.released_count, 60);
    assert!(
        plan.would_be_refused
            .as_deref()
            .is_some_and(|w| w.contains("mass release")),
        "{plan:?}"
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM resources WHERE state = 'released'")
            .await,
        0,
        "dry run"
    );
    let done = release(&t, release_at, true).await.unwrap();
    assert_eq!(done.released_count, 60);
}

#[tokio::test(flavor = "multi_thread")]
async fn legal_hold_blocks_release_and_compliance_lock_blocks_restore() {
    let (t, past_grace) = many_past_grace(2).await;
    enforce(&t, past_grace).await;
    let release_at = past_grace + Duration::days(60);
    for id in ["r0000", "r0001"] {
        warn(&t, id, 7, release_at - Duration::days(8)).await;
        warn(&t, id, 1, release_at - Duration::days(2)).await;
    }
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "r0000",
        OperatorAction::LegalHold(true),
        past_grace,
        "test",
    )
    .await
    .unwrap();
    let r = release(&t, release_at, false).await.unwrap();
    assert_eq!(r.kept.get("legal_hold"), Some(&2));
    assert_eq!(
        t.scalar_i64(
            "SELECT count(*) FROM resources WHERE account_id = 'r0000' AND state = 'released'"
        )
        .await,
        0
    );
    assert_eq!(
        t.scalar_i64(
            "SELECT count(*) FROM resources WHERE account_id = 'r0001' AND state = 'released'"
        )
        .await,
        2
    );

    let (t, past_grace) = many_past_grace(1).await;
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "r0000",
        OperatorAction::ComplianceLock(true),
        past_grace,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(account_state(&t, "r0000").await, "compliance_locked");
    assert_eq!(
        resource_state(&t, "r0000-a").await,
        ("suspended".into(), Some("compliance".into()))
    );
    topup(&t.db, &t.config, "r0000", 10_000, "pay", past_grace, "test")
        .await
        .unwrap();
    assert_eq!(
        resource_state(&t, "r0000-a").await.1.as_deref(),
        Some("compliance"),
        "never restored automatically"
    );
    enforce(&t, past_grace + Duration::days(1)).await;
    assert_eq!(
        resource_state(&t, "r0000-a").await.1.as_deref(),
        Some("compliance")
    );
    assert!(!allowed(&t, "r0000", None, Action::Purchase).await);
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "r0000",
        OperatorAction::ComplianceLock(false),
        past_grace,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(resource_state(&t, "r0000-a").await.0, "active");
    assert_eq!(account_state(&t, "r0000").await, "good");
}

#[tokio::test(flavor = "multi_thread")]
async fn package_quota_exhausted_and_expired_and_their_remedies() {
    let t = TestDb::new().await;
    t.import_accounts(&["P,Pkg,,,en,UTC,100.00,0,"]).await;
    t.import_resources(&[
        "P-1,P,lcic,package,100,2026-12-31T00:00:00Z,false,",
        "P-2,P,lcic,package,100,2026-11-25T00:00:00Z,false,",
    ])
    .await;
    t.import_usage(
        &["p1,P,P-1,classroom_minutes,150,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY,
    )
    .await;
    t.bill(DAY).await;
    enforce(&t, at(DAY) + Duration::hours(1)).await;
    assert_eq!(
        resource_state(&t, "P-1").await,
        ("suspended".into(), Some("quota_exhausted".into()))
    );
    assert_eq!(resource_state(&t, "P-2").await.0, "active");
    let out = lifecycle::operator_action(
        &t.db,
        &t.config,
        "P",
        OperatorAction::EnablePayg {
            resource: "P-1".into(),
        },
        at(DAY) + Duration::hours(2),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(out.restored.len(), 1);
    enforce(&t, at("2026-11-25T00:00:00Z")).await;
    assert_eq!(
        resource_state(&t, "P-2").await,
        ("suspended".into(), Some("package_expired".into()))
    );
    let renew = OperatorAction::RenewPackage {
        resource: "P-2".into(),
        quota: 100_000_000,
        expires_at: at("2026-12-25T00:00:00Z"),
    };
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "P",
        renew,
        at("2026-11-26T00:00:00Z"),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(resource_state(&t, "P-2").await.0, "active");
    // Unsubscribe: suspended, no usage after, released after retention like any other.
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "P",
        OperatorAction::Unsubscribe {
            resource: "P-2".into(),
        },
        at("2026-11-27T00:00:00Z"),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        resource_state(&t, "P-2").await,
        ("suspended".into(), Some("unsubscribed".into()))
    );
    let f = csv(
        USAGE_HEADER,
        &["p9,P,P-2,classroom_minutes,1,2026-11-27T01:00:00Z,2026-11-27T02:00:00Z"],
    );
    let err = arrears::import::import_file(
        &t.db,
        &t.config,
        arrears::import::ImportKind::Usage,
        &f.path,
        at("2026-11-28T00:00:00Z"),
        false,
    )
    .await
    .unwrap_err();
    match err {
        arrears::import::ImportError::BadRows { errors, .. } => assert!(
            errors[0].reason.contains("unsubscribed") || errors[0].reason.contains("suspended"),
            "{errors:?}"
        ),
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rerunning_enforcement_at_the_same_instant_changes_nothing() {
    let (t, past_grace) = many_past_grace(3).await;
    let first = enforce(&t, past_grace).await;
    assert_eq!(first.resources_suspended, 6);
    let fp = t.fingerprint().await;
    assert!(enforce(&t, past_grace).await.skipped.is_some());
    let forced = enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: past_grace,
            dry_run: false,
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (
            forced.resources_suspended,
            forced.resources_restored,
            forced.accounts_changed
        ),
        (0, 0, 0)
    );
    let mut fp2 = t.fingerprint().await;
    // Only the job_runs row of the forced re-run differs.
    fp2 = fp2
        .lines()
        .filter(|l| !l.starts_with("job_runs"))
        .collect::<Vec<_>>()
        .join("\n");
    let fp1 = fp
        .lines()
        .filter(|l| !l.starts_with("job_runs"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(fp1, fp2);
    // A dry run shows the plan and changes nothing.
    topup(
        &t.db,
        &t.config,
        "r0000",
        1,
        "not-enough",
        past_grace,
        "test",
    )
    .await
    .unwrap();
    let before = t.fingerprint().await;
    let dry = enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: past_grace + Duration::hours(1),
            dry_run: true,
            force: false,
        },
    )
    .await
    .unwrap();
    assert!(dry.dry_run);
    assert_eq!(before, t.fingerprint().await);
}
