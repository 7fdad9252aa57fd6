//! Operating safely next to the service (issue 11), through the binary as an operator or a
//! script uses it: read-only commands change nothing, the price list changes only by `prices
//! apply`, time travel is guarded, exit statuses tell refusals from errors, concurrent
//! commands never fail because of each other, and a killed run is taken over at once.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

const UTC: (&str, &str) = ("ARREARS_BILLING__TIME_ZONE", "UTC");

fn arrears_env(db_url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    command(db_url, env, args).output().expect("run arrears")
}

fn command(db_url: &str, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arrears"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ARREARS_CONFIG")
        .env("DATABASE_URL", db_url)
        .env("ARREARS_BILLING__TIME_ZONE", "UTC");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn arrears(db_url: &str, args: &[&str]) -> Output {
    arrears_env(db_url, &[], args)
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok_json(out: Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every row of every table, sequences included, as pg_dump prints them.
fn dump(url: &str) -> String {
    let out = Command::new(pg_bin("pg_dump"))
        .args(["--data-only", "--no-owner", "--inserts", "--dbname", url])
        .output()
        .expect("pg_dump");
    assert!(out.status.success(), "pg_dump: {}", stderr(&out));
    // Without the random \restrict key of each dump (pg_dump 15.14 and later).
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Two accounts with usage billed on 2026-11-22, one of them in arrears, and a notice.
async fn world(t: &TestDb) {
    t.import_accounts(&[
        "A,Alpha,a@example.com,+8613800000001,en,UTC,100.00,0,5.00",
        "B,Beta,b@example.com,,en,UTC,0.10,0,",
    ])
    .await;
    t.import_resources(&["A-1,A,lcic,pay_per_use,,,,", "B-1,B,sa,pay_per_use,,,,"])
        .await;
    t.import_usage(
        &[
            "e1,A,A-1,classroom_minutes,600,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "e2,B,B-1,assets_scanned,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        ],
        "2026-11-22T23:00:00Z",
    )
    .await;
    let url = t.url.as_str();
    ok_json(arrears(
        url,
        &["run", "generate_bills", "--as-of", "2026-11-23T00:30:00Z"],
    ));
    ok_json(arrears(
        url,
        &["run", "send_alerts", "--as-of", "2026-11-23T01:05:00Z"],
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_commands_change_nothing_under_another_configuration() {
    let t = TestDb::with_config(config_with(&[UTC])).await;
    world(&t).await;
    let url = t.url.as_str();
    // Another configuration: other prices, a product less, another price list time zone.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.toml");
    let text = arrears::config::EXAMPLE_CONFIG
        .replace("unit_price = \"0.0150\"", "unit_price = \"9.9999\"")
        .replace("unit_price = \"0.3500\"", "unit_price = \"0.0001\"");
    std::fs::write(&other, text).unwrap();
    let cfg = other.to_str().unwrap();
    let before = dump(url);
    let at = "2026-11-24T00:00:00Z";
    let commands: Vec<Vec<&str>> = vec![
        vec!["account", "show", "A", "--json"],
        vec!["account", "show", "B"],
        vec!["account", "history", "B", "--json"],
        vec!["account", "episodes", "B", "--json"],
        vec!["bills", "A", "--json"],
        vec!["products", "--json"],
        vec!["gate", "A", "create_resource"],
        vec!["gate", "B", "create_resource", "--json"],
        vec!["gate", "B", "access_data", "--resource", "B-1"],
        vec!["notices", "list", "--json"],
        vec!["notices", "list", "--status", "cancelled", "--json"],
        vec!["report", "aging", "--json"],
        vec!["schedule", "--json"],
        vec!["check"],
        vec!["prices", "apply", "--dry-run"],
        vec!["policies", "apply", "--dry-run"],
        vec![
            "run",
            "generate_bills",
            "--dry-run",
            "--as-of",
            "2026-11-24T00:30:00Z",
        ],
        vec!["run", "send_alerts", "--dry-run", "--as-of", at],
        vec!["run", "enforce_suspensions", "--dry-run", "--as-of", at],
        vec!["run", "release_resources", "--dry-run", "--as-of", at],
        vec!["run", "deliver_notifications", "--dry-run", "--as-of", at],
    ];
    for args in &commands {
        let mut full = vec!["--config", cfg];
        full.extend(args.iter().copied());
        let out = arrears(url, &full);
        assert!(
            matches!(code(&out), 0 | 1),
            "{args:?}: exit {}: {}",
            code(&out),
            stderr(&out)
        );
        let after = dump(url);
        assert!(before == after, "{args:?} changed the database");
    }
    // The other configuration's prices were seen as a difference, and left alone.
    let plan = ok_json(arrears(
        url,
        &["--config", cfg, "prices", "apply", "--dry-run"],
    ));
    assert_eq!(plan["up_to_date"], false, "{plan}");
    assert_eq!(plan["changes"].as_array().unwrap().len(), 2, "{plan}");
    let check = arrears(url, &["--config", cfg, "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("warning: price list: changed lcic/classroom_minutes"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_price_change_takes_effect_from_its_instant_and_only_by_prices_apply() {
    let t = TestDb::with_config(config_with(&[UTC])).await;
    let url = t.url.as_str();
    t.import_accounts(&[
        "A,Alpha,a@example.com,,en,UTC,100.00,0,",
        "B,Beta,b@example.com,,en,UTC,100.00,0,",
    ])
    .await;
    t.import_resources(&["A-1,A,lcic,pay_per_use,,,,", "B-1,B,lcic,pay_per_use,,,,"])
        .await;
    t.import_usage(
        &[
            "e1,A,A-1,classroom_minutes,100,2026-11-21T01:00:00Z,2026-11-21T02:00:00Z",
            "e2,A,A-1,classroom_minutes,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "e3,B,B-1,classroom_minutes,40,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        ],
        "2026-11-22T23:00:00Z",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("new.toml");
    std::fs::write(
        &cfg_path,
        arrears::config::EXAMPLE_CONFIG
            .replace("unit_price = \"0.0150\"", "unit_price = \"0.0300\"")
            // recording_minutes is no longer sold
            .replace(
                "[[products.lcic.prices]]\nmeter = \"recording_minutes\"\nunit = \"minute\"\nunit_price = \"0.0050\"\n",
                "",
            ),
    )
    .unwrap();
    let cfg = cfg_path.to_str().unwrap();
    // Another configuration run with any other command bills nothing differently.
    ok_json(arrears(url, &["--config", cfg, "products", "--json"]));
    // The preview names the change and writes nothing; then it is applied from the 22nd.
    let plan = ok_json(arrears(
        url,
        &[
            "--config",
            cfg,
            "prices",
            "apply",
            "--effective-from",
            "2026-11-22T00:00:00Z",
            "--dry-run",
        ],
    ));
    let changes = plan["changes"].as_array().unwrap();
    assert!(
        changes.iter().any(|c| c["meter"] == "classroom_minutes"
            && c["change"] == "changed"
            && c["from"] == "0.015"
            && c["to"] == "0.03"),
        "{plan}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c["meter"] == "recording_minutes" && c["change"] == "retired"),
        "{plan}"
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM prices WHERE effective_from > '2000-01-01'")
            .await,
        0
    );
    let applied = ok_json(arrears(
        url,
        &[
            "--config",
            cfg,
            "prices",
            "apply",
            "--effective-from",
            "2026-11-22T00:00:00Z",
        ],
    ));
    assert_eq!(applied["changes"].as_array().unwrap().len(), 2, "{applied}");
    let again = ok_json(arrears(url, &["--config", cfg, "prices", "apply"]));
    assert_eq!(again["up_to_date"], true, "{again}");
    // A version before the latest is refused, naming what to do.
    let early = arrears(
        url,
        // the example configuration's prices again, but before the version just written
        &[
            "prices",
            "apply",
            "--effective-from",
            "2026-11-21T00:00:00Z",
        ],
    );
    assert_eq!(code(&early), 1, "{}", stderr(&early));
    assert!(
        stderr(&early).contains("--effective-from later than"),
        "{}",
        stderr(&early)
    );
    // Day 21 is rated at the old price, day 22 at the new one (100 minutes each).
    ok_json(arrears(
        url,
        &[
            "run",
            "generate_bills",
            "--day",
            "2026-11-21",
            "--as-of",
            "2026-11-22T00:30:00Z",
        ],
    ));
    ok_json(arrears(
        url,
        &[
            "run",
            "generate_bills",
            "--day",
            "2026-11-22",
            "--as-of",
            "2026-11-23T00:30:00Z",
        ],
    ));
    let bills = ok_json(arrears(url, &["bills", "A", "--json"]));
    let totals: Vec<String> = bills
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{}={}",
                b["bill_day"].as_str().unwrap(),
                b["total"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        totals,
        vec!["2026-11-21=1.50", "2026-11-22=3.00"],
        "{bills}"
    );
    // Each bill carries its own day's lines of its own account, whatever the lines' key order
    // (bill lines are keyed day first): B's line of the 22nd is on B's bill only.
    let lines = |bills: &serde_json::Value| -> Vec<String> {
        bills
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|b| {
                let day = b["bill_day"].as_str().unwrap().to_owned();
                b["lines"].as_array().unwrap().iter().map(move |l| {
                    format!(
                        "{day} {} {} {}@{}={}",
                        l["resource_id"].as_str().unwrap(),
                        l["meter"].as_str().unwrap(),
                        l["quantity"].as_str().unwrap(),
                        l["unit_price"].as_str().unwrap(),
                        l["amount"].as_str().unwrap()
                    )
                })
            })
            .collect()
    };
    assert_eq!(
        lines(&bills),
        vec![
            "2026-11-21 A-1 classroom_minutes 100@0.015000000=1.50",
            "2026-11-22 A-1 classroom_minutes 100@0.030000000=3.00"
        ],
        "{bills}"
    );
    let b = ok_json(arrears(url, &["bills", "B", "--json"]));
    assert_eq!(
        lines(&b),
        vec!["2026-11-22 B-1 classroom_minutes 40@0.030000000=1.20"],
        "{b}"
    );
    let one_day = ok_json(arrears(
        url,
        &[
            "bills",
            "A",
            "--from",
            "2026-11-22",
            "--to",
            "2026-11-22",
            "--json",
        ],
    ));
    assert_eq!(
        lines(&one_day),
        vec!["2026-11-22 A-1 classroom_minutes 100@0.030000000=3.00"],
        "{one_day}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_statuses_tell_refusals_from_errors() {
    let t = TestDb::with_config(config_with(&[UTC])).await;
    world(&t).await;
    let url = t.url.as_str();
    let dead = "postgres://postgres@127.0.0.1:1/nothing";
    // gate: 0 allowed, 1 refused, 2 every error.
    assert_eq!(code(&arrears(url, &["gate", "A", "create_resource"])), 0);
    let refused = arrears(url, &["gate", "B", "create_resource"]);
    assert_eq!(code(&refused), 1, "{}", stderr(&refused));
    let unknown = arrears(url, &["gate", "nobody", "create_resource"]);
    assert_eq!(code(&unknown), 2);
    assert!(
        stderr(&unknown).contains("unknown account \"nobody\""),
        "{}",
        stderr(&unknown)
    );
    assert_eq!(code(&arrears(dead, &["gate", "A", "create_resource"])), 2);
    assert_eq!(code(&arrears(url, &["gate", "A", "fly"])), 2);
    assert_eq!(
        code(&arrears(
            url,
            &["gate", "A", "access_data", "--resource", "nope"]
        )),
        2
    );
    // Other commands: 1 bad input, 2 any other error.
    assert_eq!(
        code(&arrears(
            url,
            &["topup", "nobody", "1.00", "--reference", "r"]
        )),
        1
    );
    assert_eq!(
        code(&arrears(url, &["topup", "A", "1.0.0", "--reference", "r"])),
        1
    );
    assert_eq!(
        code(&arrears(url, &["topup", "A", "1.00"])),
        1,
        "a missing argument"
    );
    assert_eq!(code(&arrears(url, &["account", "show", "nobody"])), 1);
    assert_eq!(code(&arrears(dead, &["account", "show", "A"])), 2);
    assert_eq!(code(&arrears(dead, &["run", "send_alerts"])), 2);
    let bad = csv(ACCOUNTS_HEADER, &["X,Ex,not-an-email,,en,UTC,abc,0,"]);
    assert_eq!(
        code(&arrears(
            url,
            &["import", "accounts", bad.path.to_str().unwrap()]
        )),
        1
    );
    // A reference is one payment of one account.
    let topup = |account: &str| {
        arrears(
            url,
            &[
                "topup",
                account,
                "10.00",
                "--reference",
                "gw-777",
                "--as-of",
                "2026-11-23T02:00:00Z",
            ],
        )
    };
    ok_json(topup("A"));
    let other = topup("B");
    assert_eq!(code(&other), 1);
    assert!(
        stderr(&other).contains("already credited account A"),
        "{}",
        stderr(&other)
    );
    let replay = ok_json(topup("A"));
    assert_eq!(replay["replayed"], true, "{replay}");
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn time_travel_is_refused_without_allow_future() {
    let t = TestDb::with_config(config_with(&[UTC])).await;
    world(&t).await;
    let url = t.url.as_str();
    let future = (chrono::Utc::now() + chrono::Duration::days(365)).to_rfc3339();
    let before = dump(url);
    for args in [
        vec![
            "topup",
            "A",
            "5.00",
            "--reference",
            "future-1",
            "--as-of",
            &future,
        ],
        vec!["run", "generate_bills", "--as-of", &future],
        vec!["run", "send_alerts", "--as-of", &future],
        vec!["run", "enforce_suspensions", "--as-of", &future],
        vec!["run", "release_resources", "--as-of", &future],
        vec!["resource", "unsubscribe", "A", "A-1", "--as-of", &future],
        vec!["account", "legal-hold", "A", "--as-of", &future],
    ] {
        let out = arrears(url, &args);
        assert_eq!(code(&out), 1, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--allow-future"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(
        before == dump(url),
        "a refused command changed the database"
    );
    // A preview may look ahead; a command within the allowed skew acts.
    ok_json(arrears(
        url,
        &["run", "send_alerts", "--dry-run", "--as-of", &future],
    ));
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    ok_json(arrears(
        url,
        &[
            "topup",
            "A",
            "5.00",
            "--reference",
            "soon",
            "--as-of",
            &soon,
        ],
    ));
    // Billing a day that has not ended by the database clock is refused even when --as-of
    // says it has (a clock ahead): it would block every real day before it.
    let today = chrono::Utc::now().date_naive().to_string();
    let out = arrears(
        url,
        &["run", "generate_bills", "--day", &today, "--as-of", &future],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    // On purpose (a scratch database), it travels.
    let out = arrears(
        url,
        &[
            "--allow-future",
            "topup",
            "A",
            "5.00",
            "--reference",
            "future-1",
            "--as-of",
            &future,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = arrears(
        url,
        &[
            "--allow-future",
            "run",
            "generate_bills",
            "--day",
            &today,
            "--as-of",
            &future,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commands_never_fail_because_of_each_other() {
    let t = TestDb::with_config(config_with(&[UTC])).await;
    world(&t).await;
    let url = t.url.as_str();
    let spawn = |args: &[&str]| {
        command(url, &[], args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut children = Vec::new();
    for i in 0..24 {
        let reference = format!("c-{i}");
        children.push(spawn(&["gate", "A", "create_resource"]));
        children.push(spawn(&[
            "topup",
            "A",
            "1.00",
            "--reference",
            &reference,
            "--as-of",
            "2026-11-23T03:00:00Z",
        ]));
        if i % 8 == 0 {
            children.push(spawn(&[
                "run",
                "enforce_suspensions",
                "--force",
                "--as-of",
                "2026-11-23T03:00:00Z",
            ]));
        }
    }
    for c in children {
        let out = c.wait_with_output().unwrap();
        // 75: another enforcement run held the slot at that moment, which is an answer.
        assert!(
            matches!(code(&out), 0 | 75),
            "exit {}: {}",
            code(&out),
            stderr(&out)
        );
    }
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM ledger_entries WHERE reference LIKE 'c-%'")
            .await,
        24
    );
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_held_by_a_live_runner_exits_75_and_a_dead_ones_is_taken_over_at_once() {
    let t = TestDb::with_config(config_with(&[UTC])).await;
    world(&t).await;
    let url = t.url.as_str();
    let slot: chrono::DateTime<chrono::Utc> = "2026-11-23T04:00:00Z".parse().unwrap();
    // A live runner: its claim row and its session lock, on a connection of this test.
    let holder = t.client().await;
    holder
        .execute(
            "INSERT INTO job_runs (job, slot, status, as_of, started_at, owner, lease_until)
             VALUES ('enforce_suspensions', $1, 'running', $1, now(), 'other-host:1:1', now() + interval '1 hour')",
            &[&slot],
        )
        .await
        .unwrap();
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&arrears::jobs::slot_lock_key(
                arrears::jobs::JobName::parse("enforce_suspensions").unwrap(),
                slot,
            )],
        )
        .await
        .unwrap();
    let out = arrears(
        url,
        &[
            "run",
            "enforce_suspensions",
            "--as-of",
            "2026-11-23T04:00:00Z",
        ],
    );
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["held_by"], "other-host:1:1", "{report}");
    assert!(stderr(&out).contains("not done"), "{}", stderr(&out));
    // The runner dies (its connection goes): the next run takes the slot over at once,
    // although the lease has most of an hour left.
    drop(holder);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let report = ok_json(arrears(
        url,
        &[
            "run",
            "enforce_suspensions",
            "--as-of",
            "2026-11-23T04:00:00Z",
        ],
    ));
    assert!(report["skipped"].is_null(), "{report}");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM job_runs WHERE job = 'enforce_suspensions' AND status = 'succeeded' AND attempts = 2").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_billing_then_an_immediate_second_run_bills_every_account_once() {
    let t = TestDb::with_config(config_with(&[UTC])).await;
    let url = t.url.as_str();
    let n = 12_000;
    let accounts: Vec<String> = (0..n)
        .map(|i| format!("acc{i:06},Account {i},,,en,UTC,100.00,0,"))
        .collect();
    let resources: Vec<String> = (0..n)
        .map(|i| format!("res{i:06},acc{i:06},lcic,pay_per_use,,,,"))
        .collect();
    let usage: Vec<String> = (0..n * 5)
        .map(|j| {
            let i = j / 5;
            format!(
                "ev{j:07},acc{i:06},res{i:06},classroom_minutes,{},2026-11-22T0{}:00:00Z,2026-11-22T0{}:30:00Z",
                10 + j % 7,
                j % 5,
                j % 5
            )
        })
        .collect();
    t.import_accounts(&common::refs(&accounts)).await;
    t.import_resources(&common::refs(&resources)).await;
    t.import_usage(&common::refs(&usage), "2026-11-22T23:00:00Z")
        .await;
    let env = [("ARREARS_BILLING__BATCH_SIZE", "200")];
    let mut first = command(
        url,
        &env,
        &["run", "generate_bills", "--as-of", "2026-11-23T00:30:00Z"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Killed once some batches are committed and before the last one.
    let mut billed = 0;
    for _ in 0..2000 {
        billed = t.scalar_i64("SELECT count(*) FROM bills").await;
        if billed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = t.scalar_i64("SELECT count(*) FROM bills").await;
    assert!(
        billed > 0 && at_kill < n,
        "the kill came mid-run: {at_kill} bills of {n}"
    );
    // At once: no waiting for the lease.
    let started = std::time::Instant::now();
    let report = ok_json(arrears_env(
        url,
        &env,
        &["run", "generate_bills", "--as-of", "2026-11-23T00:30:00Z"],
    ));
    assert!(report["skipped"].is_null(), "{report}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(t.scalar_i64("SELECT count(*) FROM bills").await, n);
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM (SELECT account_id FROM bills GROUP BY account_id HAVING count(*) > 1) d").await,
        0
    );
    assert_eq!(
        t.scalar_i64("SELECT sum(records)::bigint FROM bill_lines")
            .await,
        n * 5
    );
    t.assert_balances_match_ledger().await;
}
