//! Arrears episodes and the due-work index against a real PostgreSQL, driven with as_of:
//! a second episode never reuses the first one's clocks or warnings, whatever the reason
//! changes in between; two products' resources suspended at the same instant are each
//! released on their own warnings; non-arrears suspensions get their warnings; tens of
//! thousands of accounts due in one slot are all handled in that slot, oldest first, with the
//! per-run cap deferring rather than starving; a policy change moves due instants; a run with
//! nothing due touches no account row.

mod common;

use arrears::jobs::{deliver_notifications, enforce_suspensions, release_resources, send_alerts};
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

async fn alerts(t: &TestDb, as_of: DateTime<Utc>) -> send_alerts::AlertsReport {
    let opts = send_alerts::Options {
        as_of,
        dry_run: false,
        force: false,
    };
    let r = send_alerts::run(&t.db, &t.config, &opts).await.unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    r
}

async fn deliver(t: &TestDb, as_of: DateTime<Utc>) -> deliver_notifications::DeliverReport {
    let ch = deliver_notifications::Channels::from_config(&t.config).unwrap();
    deliver_notifications::run(
        &t.db,
        &t.config,
        &ch,
        &deliver_notifications::Options {
            as_of,
            dry_run: false,
            max_batches: 1000,
        },
    )
    .await
    .unwrap()
}

async fn release(t: &TestDb, as_of: DateTime<Utc>) -> release_resources::ReleaseReport {
    let opts = release_resources::Options {
        as_of,
        service_now: Utc::now(),
        dry_run: false,
        force: false,
        allow_mass_release: false,
    };
    release_resources::run(&t.db, &t.config, &opts)
        .await
        .unwrap()
}

/// One pass of the schedule at `h`: alerts, delivery, enforcement, delivery, release, delivery.
async fn pass(t: &TestDb, h: DateTime<Utc>) {
    alerts(t, h).await;
    deliver(t, h).await;
    enforce(t, h).await;
    deliver(t, h).await;
    release(t, h).await;
    deliver(t, h).await;
}

/// Passes every `step` from `from` to `to` (both included).
async fn run(t: &TestDb, from: DateTime<Utc>, to: DateTime<Utc>, step: Duration) {
    let mut h = from;
    while h <= to {
        pass(t, h).await;
        h += step;
    }
}

/// A database whose notices are delivered by the file transport and the log adapter into a
/// temporary folder, counted as accepted (as the demo does), plus `env`.
async fn world(env: &[(&str, &str)]) -> (TestDb, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec![("ARREARS_EMBEDDED__STATE_DIR", dir.path().to_str().unwrap())];
    all.extend_from_slice(env);
    (TestDb::with_config(config_with(&all)).await, dir)
}

async fn resource(t: &TestDb, id: &str) -> (String, Option<String>) {
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

/// The resource's current suspension: (number, reason, episode, started_at, release_at).
async fn current_suspension(
    t: &TestDb,
    id: &str,
) -> (
    i32,
    String,
    Option<i32>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
) {
    let r = t
        .client()
        .await
        .query_one(
            "SELECT s.no, s.reason, s.episode, s.started_at, s.release_at
             FROM resources r JOIN resource_suspensions s ON s.account_id = r.account_id AND s.no = r.suspension
             WHERE r.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// Release warnings accepted for the suspension `no` of `account`: (lead seconds, accepted_at).
async fn accepted_warnings(t: &TestDb, account: &str, no: i32) -> Vec<(i32, DateTime<Utc>)> {
    t.client()
        .await
        .query(
            "SELECT lead_seconds, accepted_at FROM release_warnings
             WHERE account_id = $1 AND suspension = $2 ORDER BY lead_seconds",
            &[&account, &no],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Every account's enforce_due_at, by id.
async fn due(t: &TestDb) -> Vec<Option<DateTime<Utc>>> {
    t.client()
        .await
        .query("SELECT enforce_due_at FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn episode_count(t: &TestDb, account: &str) -> i64 {
    t.client()
        .await
        .query_one(
            "SELECT count(*) FROM arrears_episodes WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0)
}

/// 00:30 on 2026-11-23 in Shanghai: the bill of 2026-11-22.
const DAY: &str = "2026-11-22T16:30:00Z";

/// An lcic account with a classroom and a package whose quota its first day uses up, billed
/// into arrears (episode 1) at DAY.
async fn lcic_with_package(env: &[(&str, &str)]) -> (TestDb, tempfile::TempDir) {
    let (t, dir) = world(env).await;
    t.import_accounts(&["A,Acme,a@example.com,,en,Asia/Shanghai,1.00,0,"])
        .await;
    t.import_resources(&[
        "A-class,A,lcic,pay_per_use,,,,",
        "A-pkg,A,lcic,package,100,2027-12-31T00:00:00Z,false,",
    ])
    .await;
    t.import_usage(
        &[
            "u1,A,A-class,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "u2,A,A-pkg,classroom_minutes,150,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        ],
        DAY,
    )
    .await;
    let r = t.bill(DAY).await;
    assert_eq!(r.entered_arrears, vec!["A".to_string()]);
    (t, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_episode_after_arrears_then_quota_exhausted_then_arrears_needs_its_own_warnings() {
    let (t, _dir) = lcic_with_package(&[]).await;
    let step = Duration::hours(6);
    // Episode 1: alerted at 17:00 (accepted by the file transport), suspended 24 h later.
    let first = at("2026-11-22T17:00:00Z");
    let s1 = first + Duration::hours(24);
    run(&t, first, s1, step).await;
    assert_eq!(
        resource(&t, "A-pkg").await,
        ("suspended".into(), Some("arrears".into()))
    );
    let (pkg1, reason, ep, started, release_at1) = current_suspension(&t, "A-pkg").await;
    assert_eq!((reason.as_str(), ep, started), ("arrears", Some(1), s1));
    assert_eq!(release_at1, Some(s1 + Duration::days(60)));
    let release_at1 = release_at1.unwrap();
    // Both of episode 1's warnings go out and are accepted.
    run(
        &t,
        release_at1 - Duration::days(8),
        release_at1 - Duration::hours(24),
        step,
    )
    .await;
    let w1 = accepted_warnings(&t, "A", pkg1).await;
    assert_eq!(w1.len(), 2, "{w1:?}");
    // Paid half a day before the release: episode 1 closes, the classroom is restored, the
    // package (quota used up, pay-as-you-go off) stays suspended for that reason: a new clock,
    // which the shipped policy never releases.
    let paid = release_at1 - Duration::hours(12);
    let r = topup(&t.db, &t.config, "A", 200, "pay-1", paid, "test")
        .await
        .unwrap();
    assert_eq!(r.restored, vec!["A-class".to_string()]);
    assert_eq!(
        resource(&t, "A-pkg").await,
        ("suspended".into(), Some("quota_exhausted".into()))
    );
    let (pkg2, reason, ep, started, release_at) = current_suspension(&t, "A-pkg").await;
    assert!(pkg2 > pkg1);
    assert_eq!(
        (reason.as_str(), ep, started, release_at),
        ("quota_exhausted", None, paid, None)
    );
    run(&t, paid, release_at1 + Duration::hours(12), step).await;
    assert_eq!(resource(&t, "A-class").await.0, "active");
    assert_eq!(
        resource(&t, "A-pkg").await.0,
        "suspended",
        "not released: paid"
    );

    // Episode 2: a new bill leaves the account short again.
    t.import_usage(
        &["u3,A,A-class,classroom_minutes,300,2027-01-23T01:00:00Z,2027-01-23T02:00:00Z"],
        "2027-01-23T16:30:00Z",
    )
    .await;
    let r = t.bill("2027-01-23T16:30:00Z").await;
    assert_eq!(r.entered_arrears, vec!["A".to_string()]);
    assert_eq!(episode_count(&t, "A").await, 2);
    let first2 = at("2027-01-23T17:00:00Z");
    let s2 = first2 + Duration::hours(24);
    run(&t, first2, s2, step).await;
    // The package changed reason (quota_exhausted -> arrears): a new suspension of episode 2,
    // counted from now, with none of episode 1's warnings.
    let (pkg3, reason, ep, started, release_at3) = current_suspension(&t, "A-pkg").await;
    assert!(pkg3 > pkg2);
    assert_eq!((reason.as_str(), ep, started), ("arrears", Some(2), s2));
    assert_eq!(release_at3, Some(s2 + Duration::days(60)));
    assert!(accepted_warnings(&t, "A", pkg3).await.is_empty());
    // Episode 2 got its own overdue alert.
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM notices WHERE kind = 'overdue' AND channel = 'email'")
            .await,
        2
    );
    // Days after episode 1's release instant nothing is released: no warning of episode 2
    // has gone out yet.
    run(&t, s2, s2 + Duration::days(3), Duration::hours(12)).await;
    assert_eq!(resource(&t, "A-pkg").await.0, "suspended");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM resources WHERE state = 'released'")
            .await,
        0
    );
    // Released at episode 2's own release instant, on its own warnings, accepted a day before.
    let release_at3 = release_at3.unwrap();
    run(&t, release_at3 - Duration::days(8), release_at3, step).await;
    assert_eq!(resource(&t, "A-pkg").await.0, "released");
    let w3 = accepted_warnings(&t, "A", pkg3).await;
    assert_eq!(w3.len(), 2, "{w3:?}");
    for (_, accepted) in &w3 {
        assert!(*accepted > s2 && *accepted + Duration::hours(24) <= release_at3);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compliance_lock_and_unlock_between_two_episodes_leaves_no_clock_behind() {
    let (t, _dir) = lcic_with_package(&[]).await;
    let step = Duration::hours(6);
    let first = at("2026-11-22T17:00:00Z");
    let s1 = first + Duration::hours(24);
    run(&t, first, s1, step).await;
    let (c1, _, _, _, r1) = current_suspension(&t, "A-class").await;
    let r1 = r1.unwrap();
    run(&t, r1 - Duration::days(8), r1 - Duration::hours(24), step).await;
    assert_eq!(accepted_warnings(&t, "A", c1).await.len(), 2);
    let paid = r1 - Duration::hours(12);
    topup(&t.db, &t.config, "A", 200, "pay-1", paid, "test")
        .await
        .unwrap();
    for (on, at_) in [
        (true, paid + Duration::hours(1)),
        (false, paid + Duration::hours(2)),
    ] {
        lifecycle::operator_action(
            &t.db,
            &t.config,
            "A",
            OperatorAction::ComplianceLock(on),
            at_,
            "test",
        )
        .await
        .unwrap();
    }
    assert_eq!(resource(&t, "A-class").await.0, "active");
    // Episode 2 with the same resource, suspended again.
    t.import_usage(
        &["u3,A,A-class,classroom_minutes,300,2027-01-22T01:00:00Z,2027-01-22T02:00:00Z"],
        "2027-01-22T16:30:00Z",
    )
    .await;
    t.bill("2027-01-22T16:30:00Z").await;
    let first2 = at("2027-01-22T17:00:00Z");
    run(&t, first2, first2 + Duration::hours(24), step).await;
    let (c2, reason, ep, started, r2) = current_suspension(&t, "A-class").await;
    assert!(c2 > c1);
    assert_eq!((reason.as_str(), ep), ("arrears", Some(2)));
    assert_eq!(started, first2 + Duration::hours(24));
    // The old release instant passes: nothing released.
    run(&t, r1, r1 + Duration::days(2), Duration::hours(12)).await;
    assert_eq!(resource(&t, "A-class").await.0, "suspended");
    assert!(accepted_warnings(&t, "A", c2).await.is_empty());
    assert_eq!(r2, Some(started + Duration::days(60)));
    // The history names each change's episode.
    let history = arrears::queries::history(&t.db, "A").await.unwrap();
    let suspended: Vec<Option<i32>> = history
        .iter()
        .filter(|e| e.resource_id.as_deref() == Some("A-class") && e.to == "suspended (arrears)")
        .map(|e| e.episode)
        .collect();
    assert_eq!(suspended, vec![Some(1), Some(2)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn package_expired_then_renewed_then_arrears_starts_a_new_clock() {
    // The policy releases non-arrears suspensions too, so the expiry has warnings of its own.
    let (t, _dir) = world(&[(
        "ARREARS_PRODUCTS__LCIC__POLICY__RELEASE_NON_ARREARS_SUSPENSIONS",
        "true",
    )])
    .await;
    t.import_accounts(&["P,Pkg,p@example.com,,en,UTC,1.00,0,"])
        .await;
    t.import_resources(&[
        "P-pkg,P,lcic,package,1000,2026-12-01T00:00:00Z,false,",
        "P-class,P,lcic,pay_per_use,,,,",
    ])
    .await;
    let expiry = at("2026-12-01T00:00:00Z");
    let step = Duration::hours(12);
    run(&t, expiry - Duration::days(1), expiry, step).await;
    let (n1, reason, ep, started, r1) = current_suspension(&t, "P-pkg").await;
    assert_eq!(
        (reason.as_str(), ep, started),
        ("package_expired", None, expiry)
    );
    let r1 = r1.unwrap();
    assert_eq!(r1, expiry + Duration::days(60));
    // Its warnings go out and are accepted, though the account owes nothing.
    run(&t, r1 - Duration::days(8), r1 - Duration::hours(24), step).await;
    assert_eq!(accepted_warnings(&t, "P", n1).await.len(), 2);
    // Renewed half a day before its release: active again.
    let renewed = r1 - Duration::hours(12);
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "P",
        OperatorAction::RenewPackage {
            resource: "P-pkg".into(),
            quota: 1_000_000_000,
            expires_at: at("2027-12-01T00:00:00Z"),
        },
        renewed,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(resource(&t, "P-pkg").await.0, "active");
    // Then arrears: usage billed into a debt, grace, suspension (arrears) with a new clock.
    t.import_usage(
        &["u1,P,P-class,recording_minutes,1000,2027-01-29T01:00:00Z,2027-01-29T02:00:00Z"],
        "2027-01-29T16:30:00Z",
    )
    .await;
    t.bill("2027-01-29T16:30:00Z").await;
    let first = at("2027-01-29T17:00:00Z");
    run(&t, first, first + Duration::hours(24), step).await;
    let (n2, reason, ep, started, r2) = current_suspension(&t, "P-pkg").await;
    assert!(n2 > n1);
    assert_eq!((reason.as_str(), ep), ("arrears", Some(1)));
    assert_eq!(r2, Some(started + Duration::days(60)));
    // Past the expiry's release instant: kept.
    run(&t, r1, r1 + Duration::days(2), step).await;
    assert_eq!(resource(&t, "P-pkg").await.0, "suspended");
    assert!(accepted_warnings(&t, "P", n2).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_lcic_and_an_sa_resource_suspended_at_one_instant_each_go_by_their_own_product() {
    let (t, _dir) = world(&[]).await;
    t.import_accounts(&["M,Mixed,m@example.com,,en,UTC,1.00,0,"])
        .await;
    t.import_resources(&[
        "M-class,M,lcic,pay_per_use,,,,",
        "M-sa,M,sa,pay_per_use,,,,",
    ])
    .await;
    t.import_usage(
        &["u1,M,M-sa,assets_scanned,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        DAY,
    )
    .await;
    t.bill(DAY).await;
    let opened = at(DAY);
    // lcic's 24 h grace counts from the accepted alert: accepted 14 days in, both deadlines
    // fall on the same instant (sa: 15 days from the start of arrears).
    let same = opened + Duration::days(15);
    lifecycle::record_overdue_alert(&t.db, "M", same - Duration::hours(24))
        .await
        .unwrap();
    let r = enforce(&t, same).await;
    assert_eq!(r.resources_suspended, 2);
    let (nc, _, _, sc, rc) = current_suspension(&t, "M-class").await;
    let (ns, _, _, ss, rs) = current_suspension(&t, "M-sa").await;
    assert_eq!((sc, ss), (same, same));
    assert_ne!(nc, ns, "one suspension each");
    assert_eq!(rs, Some(same + Duration::days(15)));
    assert_eq!(rc, Some(same + Duration::days(60)));
    // The sa resource goes at 15 days on sa's warnings; the lcic one stays.
    run(&t, same, same + Duration::days(15), Duration::hours(12)).await;
    assert_eq!(resource(&t, "M-sa").await.0, "released");
    assert_eq!(resource(&t, "M-class").await.0, "suspended");
    assert_eq!(accepted_warnings(&t, "M", ns).await.len(), 2);
    assert!(
        accepted_warnings(&t, "M", nc).await.is_empty(),
        "sa's warnings are not lcic's"
    );
    // lcic's own warnings come 7 days and 1 day before its own release instant.
    let rc = rc.unwrap();
    run(&t, rc - Duration::days(8), rc, Duration::hours(12)).await;
    assert_eq!(resource(&t, "M-class").await.0, "released");
    let w = accepted_warnings(&t, "M", nc).await;
    assert_eq!(w.len(), 2);
    assert!(w.iter().all(|(_, a)| *a >= rc - Duration::days(7)));
    // The account's episode closed once nothing was left.
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM arrears_episodes WHERE close_reason = 'released'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsubscribed_resource_of_a_good_account_is_warned_and_released() {
    let (t, _dir) = world(&[]).await;
    t.import_accounts(&["U,Unsub,u@example.com,,en,UTC,100.00,0,"])
        .await;
    t.import_resources(&["U-1,U,sa,pay_per_use,,,,", "U-2,U,sa,pay_per_use,,,,"])
        .await;
    let gone = at("2026-11-25T00:00:00Z");
    lifecycle::operator_action(
        &t.db,
        &t.config,
        "U",
        OperatorAction::Unsubscribe {
            resource: "U-1".into(),
        },
        gone,
        "test",
    )
    .await
    .unwrap();
    let (n, reason, _, _, r) = current_suspension(&t, "U-1").await;
    assert_eq!(reason, "unsubscribed");
    let r = r.unwrap();
    assert_eq!(r, gone + Duration::days(15));
    run(&t, gone, r, Duration::hours(12)).await;
    assert_eq!(resource(&t, "U-1").await.0, "released");
    assert_eq!(resource(&t, "U-2").await.0, "active");
    assert_eq!(accepted_warnings(&t, "U", n).await.len(), 2);
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM accounts WHERE state = 'good'")
            .await,
        1
    );
}

/// `n` sa accounts (phone only: SMS through the log adapter) and `m` lcic accounts, every one
/// billed into arrears at DAY, plus `paying` accounts that are billed and stay good.
async fn many_debtors(
    n: usize,
    m: usize,
    paying: usize,
    env: &[(&str, &str)],
) -> (TestDb, tempfile::TempDir) {
    let (t, dir) = world(env).await;
    let mut accounts = Vec::new();
    let mut resources = Vec::new();
    let mut usage = Vec::new();
    for i in 0..n + m + paying {
        let (product, meter) = if i < n {
            ("sa", "assets_scanned")
        } else {
            ("lcic", "classroom_minutes")
        };
        let cash = if i < n + m { "0.00" } else { "100.00" };
        accounts.push(format!("d{i:06},Debtor,,+86138{i:08},en,UTC,{cash},0,"));
        resources.push(format!("d{i:06}-r,d{i:06},{product},pay_per_use,,,,"));
        usage.push(format!(
            "e{i},d{i:06},d{i:06}-r,{meter},100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"
        ));
    }
    t.import_accounts(&refs(&accounts)).await;
    t.import_resources(&refs(&resources)).await;
    t.import_usage(&refs(&usage), DAY).await;
    let r = t.bill(DAY).await;
    assert_eq!(r.entered_arrears_count, (n + m) as i64);
    (t, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_debtors_due_in_one_slot_are_all_alerted_and_all_suspended_at_grace() {
    let (t, _dir) = many_debtors(10_000, 10_000, 2_000, &[]).await;
    // One alerts slot: every debtor, with the shipped configuration.
    let slot = at("2026-11-22T17:05:00Z");
    let a = alerts(&t, slot).await;
    assert_eq!(a.due.accounts_due, 20_000);
    assert_eq!(a.due.accounts_evaluated, 20_000);
    assert_eq!(a.due.deferred, 0);
    assert_eq!(a.overdue, 20_000);
    assert_eq!(
        t.scalar_i64("SELECT count(DISTINCT account_id) FROM notices WHERE kind = 'overdue'")
            .await,
        20_000
    );
    // Delivered (SMS through the log adapter, accepted): lcic's grace starts for all of them.
    let d = deliver(&t, slot).await;
    assert_eq!(d.sent, 20_000, "{:?}", d.failures);
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM arrears_episodes WHERE first_overdue_alert_at = '2026-11-22T17:05:00Z'")
            .await,
        20_000
    );
    // Before the grace slot nothing is suspended; at it, every lcic debtor in one run; at
    // sa's, every sa debtor.
    let e = enforce(&t, slot + Duration::hours(24) - Duration::minutes(5)).await;
    assert_eq!(e.resources_suspended, 0);
    let e = enforce(&t, slot + Duration::hours(24)).await;
    assert_eq!(e.resources_suspended, 10_000);
    assert_eq!(e.due.deferred, 0);
    // The planner knows the notices the slot wrote (the jobs analyze what they read when its
    // statistics went stale, autovacuum or not): planned as empty, each batch's look-up of
    // its accounts' notices was a scan of the whole table.
    assert!(
        t.scalar_i64("SELECT reltuples::bigint FROM pg_class WHERE oid = 'notices'::regclass")
            .await
            >= 20_000
    );
    let e = enforce(&t, at(DAY) + Duration::days(15)).await;
    assert_eq!(e.resources_suspended, 10_000);
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM accounts WHERE state = 'suspended'")
            .await,
        20_000
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM accounts WHERE state = 'good'")
            .await,
        2_000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_per_run_cap_defers_the_rest_to_the_next_run_oldest_first() {
    let (t, _dir) = many_debtors(
        0,
        3_000,
        0,
        &[("ARREARS_LIFECYCLE__ENFORCE_MAX_ACCOUNTS", "1200")],
    )
    .await;
    let slot = at("2026-11-22T17:05:00Z");
    let first = alerts(&t, slot).await;
    assert_eq!(
        (first.due.accounts_evaluated, first.due.deferred),
        (1200, 1800)
    );
    // A new debtor falls due a day later: the deferred ones, due earlier, come first.
    t.import_accounts(&["late,Late,,+8613999999999,en,UTC,0.00,0,"])
        .await;
    t.import_resources(&["late-r,late,lcic,pay_per_use,,,,"])
        .await;
    t.import_usage(
        &["l1,late,late-r,classroom_minutes,100,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z"],
        "2026-11-23T16:30:00Z",
    )
    .await;
    t.bill("2026-11-23T16:30:00Z").await;
    let second = alerts(&t, at("2026-11-23T17:05:00Z")).await;
    assert_eq!(
        (second.due.accounts_evaluated, second.due.deferred),
        (1200, 601)
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM notices WHERE account_id = 'late'")
            .await,
        0,
        "the newcomer waits behind the older due work"
    );
    let third = alerts(&t, at("2026-11-23T18:05:00Z")).await;
    assert_eq!(
        (third.due.accounts_evaluated, third.due.deferred),
        (601, 0),
        "the last 600 and the newcomer"
    );
    assert_eq!(
        t.scalar_i64("SELECT count(DISTINCT account_id) FROM notices WHERE kind = 'overdue'")
            .await,
        3_001
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_with_nothing_due_touches_no_account_row() {
    let (t, _dir) = many_debtors(50, 50, 50, &[]).await;
    let slot = at("2026-11-22T17:05:00Z");
    run(&t, slot, slot + Duration::days(2), Duration::hours(6)).await;
    // Nothing is due between two passes an hour apart in the middle of sa's grace.
    let quiet = slot + Duration::days(3);
    pass(&t, quiet).await;
    let rows = "SELECT string_agg(id || ':' || xmin::text, ',' ORDER BY id) FROM accounts";
    let before: String = t.client().await.query_one(rows, &[]).await.unwrap().get(0);
    let fp = t.fingerprint().await;
    let a = alerts(&t, quiet + Duration::hours(1)).await;
    let e = enforce(&t, quiet + Duration::hours(1)).await;
    let r = release(&t, quiet + Duration::hours(1)).await;
    assert_eq!(
        (a.due.accounts_due, e.due.accounts_due, r.due.accounts_due),
        (0, 0, 0)
    );
    let after: String = t.client().await.query_one(rows, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "no account row was written");
    let strip = |s: String| {
        s.lines()
            .filter(|l| !l.starts_with("job_runs"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(fp), strip(t.fingerprint().await));
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_lcic_grace_from_24h_to_72h_moves_the_due_instant_of_accounts_in_grace() {
    let (t, _dir) = many_debtors(0, 5, 0, &[]).await;
    let slot = at("2026-11-22T17:05:00Z");
    alerts(&t, slot).await;
    deliver(&t, slot).await;
    enforce(&t, slot + Duration::hours(1)).await;
    assert!(due(&t)
        .await
        .iter()
        .all(|d| *d == Some(slot + Duration::hours(24))));
    // The operator lengthens lcic's grace: `policies apply` (run by migrate and at service
    // start) moves the due instant of every account in grace.
    let longer = config_with(&[
        ("ARREARS_EMBEDDED__STATE_DIR", _dir.path().to_str().unwrap()),
        ("ARREARS_PRODUCTS__LCIC__POLICY__GRACE", "72h"),
    ]);
    let dry = lifecycle::policies::apply(&t.db, &longer, slot + Duration::hours(2), true)
        .await
        .unwrap();
    assert_eq!(dry.changed, vec!["lcic".to_string()]);
    assert_eq!(dry.accounts_due_moved, 5);
    assert!(
        due(&t)
            .await
            .iter()
            .all(|d| *d == Some(slot + Duration::hours(24))),
        "dry run"
    );
    let report = lifecycle::policies::apply(&t.db, &longer, slot + Duration::hours(2), false)
        .await
        .unwrap();
    assert_eq!(report.accounts_due_moved, 5);
    assert_eq!(report.due_moved_by_job.get("enforce_suspensions"), Some(&5));
    assert!(due(&t)
        .await
        .iter()
        .all(|d| *d == Some(slot + Duration::hours(72))));
    let again = lifecycle::policies::apply(&t.db, &longer, slot + Duration::hours(3), false)
        .await
        .unwrap();
    assert!(again.up_to_date);
    // Under the new policy nobody is suspended at 24 h, everybody at 72 h.
    let opts = |as_of| enforce_suspensions::Options {
        as_of,
        dry_run: false,
        force: false,
    };
    let r = enforce_suspensions::run(&t.db, &longer, &opts(slot + Duration::hours(24)))
        .await
        .unwrap();
    assert_eq!(r.resources_suspended, 0);
    let r = enforce_suspensions::run(&t.db, &longer, &opts(slot + Duration::hours(72)))
        .await
        .unwrap();
    assert_eq!(r.resources_suspended, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_run_under_a_changed_policy_recomputes_the_due_index_first() {
    let (t, _dir) = many_debtors(3, 0, 0, &[]).await;
    // sa's grace shortened from 15 days to 2 after the accounts fell due in 15 days.
    enforce(&t, at(DAY) + Duration::hours(1)).await;
    let shorter = config_with(&[("ARREARS_PRODUCTS__SA__POLICY__GRACE", "2d")]);
    let r = enforce_suspensions::run(
        &t.db,
        &shorter,
        &enforce_suspensions::Options {
            as_of: at(DAY) + Duration::days(2),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    assert!(r.policies.is_some(), "the policies were applied first");
    assert_eq!(r.resources_suspended, 3);
}
