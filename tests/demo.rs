//! `arrears demo` runs to completion and ends where its scenario says, with every notice in
//! its folder.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_runs_80_days_and_every_account_ends_in_its_declared_state() {
    let config = config_with(&[("DATABASE_URL", &admin_url())]);
    let out = tempfile::tempdir().unwrap();
    let name = format!("arrears_demo_test_{}", std::process::id());
    let report = arrears::demo::run(
        &config,
        &arrears::demo::DemoOptions {
            out_dir: out.path().to_path_buf(),
            database: name.clone(),
            print: false,
        },
    )
    .await
    .unwrap();
    for a in &report.accounts {
        assert_eq!(
            a.final_state, a.expected_state,
            "{}: {}",
            a.account, a.story
        );
    }
    assert!(report.all_match);
    // Every hour of 80 days has its alert and enforcement slots, every day its bill and release run.
    assert_eq!(report.slots_run, 80 * 24 * 2 + 80 * 2);
    let has = |account: &str, needle: &str| {
        report
            .timeline
            .iter()
            .any(|e| e.account == account && e.event.contains(needle))
    };
    // The paths the scenario exercises, each seen on the timeline.
    assert!(has("tops-up-in-grace", "notice overdue sent"));
    assert!(has("tops-up-in-grace", "in_arrears -> good"));
    assert!(
        !has("tops-up-in-grace", "-> suspended"),
        "topped up in grace"
    );
    assert!(has("suspended-restored", "-> suspended (grace period over"));
    assert!(has("suspended-restored", "restores sr-class"));
    assert!(has("released-lcic", "notice release_warning sent"));
    assert!(has("released-lcic", "-> released"));
    assert!(has("released-sa", "-> released"));
    assert!(has("package-runs-out", "suspended (quota_exhausted)"));
    assert!(has("compliance-locked", "good -> compliance_locked"));
    assert!(has("low-balance", "notice balance_low sent by email"));
    assert!(
        !has("pays-on-time", "->"),
        "nothing happens to a customer who pays"
    );
    // Both release warnings came at least a day before each release (R9).
    for (account, resource) in [("released-lcic", "rl-class"), ("released-sa", "rs-ppu")] {
        let released = report
            .timeline
            .iter()
            .find(|e| {
                e.account == account
                    && e.event.starts_with(&format!("{resource}: suspended"))
                    && e.event.contains("-> released")
            })
            .unwrap()
            .at;
        let warnings: Vec<_> = report
            .timeline
            .iter()
            .filter(|e| e.account == account && e.event.contains("release_warning"))
            .map(|e| e.at)
            .collect();
        assert_eq!(warnings.len(), 2, "{account}");
        assert!(warnings
            .iter()
            .all(|w| released - *w >= chrono::Duration::hours(24)));
    }
    // Every email sent is an .eml file; SMS are in the log, numbers masked.
    let emails: i64 = {
        let c = arrears::db::raw_connect(&report.database_url)
            .await
            .unwrap();
        c.query_one(
            "SELECT count(*) FROM notices WHERE status = 'sent' AND channel = 'email'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let eml = std::fs::read_dir(out.path().join("notices"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "eml")
        })
        .count();
    assert_eq!(eml as i64, emails);
    let sms = std::fs::read_to_string(out.path().join("notices/sms.log")).unwrap();
    assert!(sms.contains("kind=balance_low"));
    assert!(!sms.contains("+8613800000003"), "numbers are masked");
    assert!(out.path().join("timeline.txt").exists());
    let admin = arrears::db::raw_connect(&admin_url()).await.unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}
