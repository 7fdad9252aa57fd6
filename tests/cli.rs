//! The `arrears` binary as scripts use it: the PRODUCT.md §5 command names, JSON output, exit
//! codes, and the embedded default database.

mod common;

use std::process::{Command, Output};

use common::*;

fn arrears(db_url: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arrears"));
    // The timelines run days ahead of the database clock, on purpose.
    cmd.args(args)
        .arg("--allow-future")
        // The timelines' notices go to files: they count as warnings here.
        .env(
            "ARREARS_NOTIFICATIONS__DEV_CHANNELS_COUNT_AS_ACCEPTED",
            "true",
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ARREARS_CONFIG");
    match db_url {
        Some(u) => cmd.env("DATABASE_URL", u),
        None => cmd.env_remove("DATABASE_URL"),
    };
    cmd.output().expect("run arrears")
}

/// `arrears import KIND PATH [--as-of AS_OF]` on `u`, which must succeed: its report.
fn import(u: Option<&str>, kind: &str, path: &str, as_of: Option<&str>) -> serde_json::Value {
    let mut args = vec!["import", kind, path];
    args.extend(as_of.iter().flat_map(|a| ["--as-of", *a]));
    ok_json(arrears(u, &args))
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
    import(
        u,
        "accounts",
        "samples/accounts.csv",
        Some("2026-11-22T00:00:00Z"),
    );
    import(
        u,
        "resources",
        "samples/resources.csv",
        Some("2026-11-22T00:00:00Z"),
    );
    let usage = import(
        u,
        "usage",
        "samples/usage.csv",
        Some("2026-11-22T23:00:00Z"),
    );
    assert_eq!(usage["inserted"], 8);
    let again = import(
        u,
        "usage",
        "samples/usage.csv",
        Some("2026-11-22T23:00:00Z"),
    );
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
    assert_eq!(code(&out), 1, "bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("products.lcic.policy.grace"), "{err}");
    // A bad file in the jobs folder is bad input too, named with its key.
    let jobs = tempfile::tempdir().unwrap();
    std::fs::write(
        jobs.path().join("send_alerts.toml"),
        "cron = \"61 * * * *\"\ntime_zone = \"UTC\"\n",
    )
    .unwrap();
    for args in [&["check"][..], &["schedule", "--count", "1"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_arrears"))
            .args(args)
            .env("ARREARS_SERVICE__JOBS_DIR", jobs.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 1, "{args:?}: {err}");
        assert!(
            err.contains("send_alerts.toml: key `cron`: minute: 61 is outside 0-59"),
            "{err}"
        );
    }
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

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn lcic_and_sa_timelines_through_the_cli() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(
        ACCOUNTS_HEADER,
        &[
            "L,Lcic,l@example.com,,en,UTC,1.00,0,",
            "S,Sa,,,zh-CN,UTC,1.00,0,",
        ],
    );
    let resources = csv(
        RESOURCES_HEADER,
        &[
            "L-1,L,lcic,pay_per_use,,,,",
            "S-ppu,S,sa,pay_per_use,,,,",
            "S-pre,S,sa,prepaid,,,,2027-12-31T00:00:00Z",
        ],
    );
    let usage = csv(
        USAGE_HEADER,
        &[
            "l1,L,L-1,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "s1,S,S-ppu,assets_scanned,100,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        ],
    );
    import(
        u,
        "accounts",
        &accounts.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    import(
        u,
        "resources",
        &resources.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    import(
        u,
        "usage",
        &usage.path.to_str().unwrap(),
        Some("2026-11-22T12:00:00Z"),
    );
    ok_json(arrears(
        u,
        &["run", "generate_bills", "--as-of", "2026-11-22T16:30:00Z"],
    ));

    // lcic: in grace, new resources refused.
    let gate = arrears(u, &["gate", "L", "create_resource", "--json"]);
    assert_eq!(code(&gate), 1);
    let g: serde_json::Value = serde_json::from_slice(&gate.stdout).unwrap();
    assert_eq!(
        (g["allowed"].as_bool(), g["code"].as_str()),
        (Some(false), Some("in_arrears"))
    );
    ok_json(arrears(
        u,
        &[
            "facts",
            "overdue-alert",
            "L",
            "--as-of",
            "2026-11-22T17:00:00Z",
        ],
    ));
    let dry = ok_json(arrears(
        u,
        &[
            "run",
            "enforce_suspensions",
            "--as-of",
            "2026-11-23T17:00:00Z",
            "--dry-run",
        ],
    ));
    assert_eq!(dry["resources_suspended"], 1);
    let l = ok_json(arrears(u, &["account", "show", "L", "--json"]));
    assert_eq!(l["state"], "in_arrears", "the dry run changed nothing");
    ok_json(arrears(
        u,
        &[
            "run",
            "enforce_suspensions",
            "--as-of",
            "2026-11-23T17:00:00Z",
        ],
    ));
    let l = ok_json(arrears(u, &["account", "show", "L", "--json"]));
    assert_eq!(
        (l["state"].as_str(), l["suspended_at"].as_str()),
        (Some("suspended"), Some("2026-11-23T17:00:00Z"))
    );
    assert_eq!(
        (
            l["resources"][0]["state"].as_str(),
            l["resources"][0]["reason"].as_str()
        ),
        (Some("suspended"), Some("arrears"))
    );
    assert_eq!(
        code(&arrears(
            u,
            &["gate", "L", "access_data", "--resource", "L-1"]
        )),
        1
    );
    // sa: frozen when its 15 days of grace are over, the prepaid resource keeps running.
    let r = ok_json(arrears(
        u,
        &[
            "run",
            "enforce_suspensions",
            "--as-of",
            "2026-12-07T16:30:00Z",
        ],
    ));
    assert_eq!(r["resources_suspended"], 1, "{r}");
    let s = ok_json(arrears(u, &["account", "show", "S", "--json"]));
    assert_eq!(s["state"], "suspended");
    let by_id = |v: &serde_json::Value, id: &str| {
        v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(&s, "S-ppu")["state"], "suspended");
    assert_eq!(by_id(&s, "S-pre")["state"], "active");
    assert_eq!(
        code(&arrears(
            u,
            &["gate", "S", "operate", "--resource", "S-pre"]
        )),
        0
    );
    assert_eq!(
        code(&arrears(
            u,
            &["gate", "S", "operate", "--resource", "S-ppu"]
        )),
        1
    );
    assert_eq!(
        code(&arrears(u, &["gate", "S", "renew", "--resource", "S-pre"])),
        1
    );
    // 15 days of retention, both warnings accepted: released.
    ok_json(arrears(
        u,
        &[
            "facts",
            "release-warning",
            "S",
            "--lead",
            "7d",
            "--as-of",
            "2026-12-15T16:30:00Z",
        ],
    ));
    ok_json(arrears(
        u,
        &[
            "facts",
            "release-warning",
            "S",
            "--lead",
            "24h",
            "--as-of",
            "2026-12-21T16:30:00Z",
        ],
    ));
    let rel = ok_json(arrears(
        u,
        &[
            "run",
            "release_resources",
            "--as-of",
            "2026-12-22T16:30:00Z",
            "--dry-run",
        ],
    ));
    assert_eq!(rel["released_count"], 1, "{rel}");
    let rel = ok_json(arrears(
        u,
        &[
            "run",
            "release_resources",
            "--as-of",
            "2026-12-22T16:30:00Z",
        ],
    ));
    assert_eq!(rel["released_count"], 1, "{rel}");
    assert_eq!(rel["released"][0]["resource_id"], "S-ppu");
    assert_eq!(
        by_id(
            &ok_json(arrears(u, &["account", "show", "S", "--json"])),
            "S-ppu"
        )["state"],
        "released"
    );

    // lcic: 60 days after its suspension, after both warnings, released.
    ok_json(arrears(
        u,
        &[
            "facts",
            "release-warning",
            "L",
            "--lead",
            "7d",
            "--as-of",
            "2027-01-15T17:00:00Z",
        ],
    ));
    ok_json(arrears(
        u,
        &[
            "facts",
            "release-warning",
            "L",
            "--lead",
            "24h",
            "--as-of",
            "2027-01-21T17:00:00Z",
        ],
    ));
    let rel = ok_json(arrears(
        u,
        &[
            "run",
            "release_resources",
            "--as-of",
            "2027-01-22T17:00:00Z",
        ],
    ));
    assert_eq!(rel["released_count"], 1, "{rel}");
    let l = ok_json(arrears(u, &["account", "show", "L", "--json"]));
    assert_eq!(l["resources"][0]["state"], "released");
    let hist = ok_json(arrears(u, &["account", "history", "L", "--json"]));
    let tos: Vec<&str> = hist
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        tos,
        vec!["in_arrears", "suspended (arrears)", "suspended", "released"]
    );
    let text = arrears(u, &["account", "history", "L"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("enforce_suspensions@"),
        "the cause is named"
    );

    // Paying S's debt ends its arrears; renewal is allowed again.
    let topup = ok_json(arrears(
        u,
        &[
            "topup",
            "S",
            "1.00",
            "--reference",
            "pay-S",
            "--as-of",
            "2027-01-23T00:00:00Z",
        ],
    ));
    assert_eq!(topup["state"], "good");
    assert_eq!(
        code(&arrears(u, &["gate", "S", "renew", "--resource", "S-pre"])),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn send_alerts_dry_run_prints_the_plan_and_account_show_the_episode_and_next_due() {
    let t = TestDb::new().await;
    t.import_accounts(&["D,Debtor,d@example.com,+8613800138000,en,UTC,1.00,0,"])
        .await;
    t.import_resources(&["D-1,D,lcic,pay_per_use,,,,"]).await;
    t.import_usage(
        &["d1,D,D-1,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        "2026-11-22T16:30:00Z",
    )
    .await;
    t.bill("2026-11-22T16:30:00Z").await;
    let u = Some(t.url.as_str());
    let before = t.fingerprint().await;
    let dry = ok_json(arrears(
        u,
        &[
            "run",
            "send_alerts",
            "--dry-run",
            "--as-of",
            "2026-11-22T17:05:00Z",
        ],
    ));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        (dry["accounts_due"].as_i64(), dry["overdue"].as_i64()),
        (Some(1), Some(2))
    );
    let plan = dry["plan"].as_array().unwrap();
    assert_eq!(plan.len(), 1, "{dry}");
    assert_eq!(plan[0]["account_id"], "D");
    assert_eq!(plan[0]["kind"], "overdue");
    assert_eq!(plan[0]["channels"], serde_json::json!(["email", "sms"]));
    assert!(
        plan[0]["why"].as_str().unwrap().contains("episode 1"),
        "{dry}"
    );
    assert_eq!(before, t.fingerprint().await, "a dry run writes nothing");
    assert_eq!(t.scalar_i64("SELECT count(*) FROM notices").await, 0);

    let show = ok_json(arrears(u, &["account", "show", "D", "--json"]));
    assert_eq!(show["episode"]["no"], 1);
    assert_eq!(show["episode"]["opened_at"], "2026-11-22T16:30:00Z");
    assert_eq!(show["next_due"]["send_alerts"], "2026-11-22T16:30:00Z");
    // Once written, neither alerts nor enforcement are due until a channel accepts the alert
    // (lcic's grace and reminders count from it, R9).
    let r = ok_json(arrears(
        u,
        &["run", "send_alerts", "--as-of", "2026-11-22T17:05:00Z"],
    ));
    assert_eq!(r["overdue"], 2);
    let show = ok_json(arrears(u, &["account", "show", "D", "--json"]));
    assert!(show["next_due"]["send_alerts"].is_null(), "{show}");
    assert!(show["next_due"]["enforce_suspensions"].is_null(), "{show}");
    let eps = ok_json(arrears(u, &["account", "episodes", "D", "--json"]));
    assert_eq!(eps["episodes"][0]["no"], 1);
    assert!(eps["episodes"][0]["closed_at"].is_null());
    let hist = ok_json(arrears(u, &["account", "history", "D", "--json"]));
    assert_eq!(hist[0]["episode"], 1, "{hist}");
}

/// R9 when no send_alerts run came in a release warning's window: the warning goes out late,
/// quoting a release a day after it is sent, and the release waits for its acceptance. (They
/// used to be dropped once the release instant passed: the account was then due for no job
/// again and its resources stayed suspended for ever.)
#[tokio::test(flavor = "multi_thread")]
async fn a_release_warning_missed_in_its_window_goes_out_late_and_the_release_waits_for_it() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(
        ACCOUNTS_HEADER,
        &["W,Warned,w@example.com,,en,UTC,-1.00,0,"],
    );
    let resources = csv(RESOURCES_HEADER, &["W-1,W,sa,pay_per_use,,,,"]);
    let run = |args: &[&str]| ok_json(arrears(u, args));
    import(
        u,
        "accounts",
        &accounts.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    import(
        u,
        "resources",
        &resources.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    run(&[
        "run",
        "enforce_suspensions",
        "--as-of",
        "2026-11-20T01:00:00Z",
    ]);
    // sa: 15 days of grace, then 15 of retention.
    let r = run(&[
        "run",
        "enforce_suspensions",
        "--as-of",
        "2026-12-06T01:00:00Z",
    ]);
    assert_eq!(r["resources_suspended"], 1, "{r}");
    let w = run(&["account", "show", "W", "--json"]);
    assert_eq!(
        w["resources"][0]["release_at"], "2026-12-21T01:00:00Z",
        "{w}"
    );

    // No alerts run in either warning's window: kept, not released.
    let rel = run(&[
        "run",
        "release_resources",
        "--as-of",
        "2026-12-21T02:00:00Z",
    ]);
    assert_eq!(rel["released_count"], 0, "{rel}");
    assert_eq!(rel["kept"]["release_warning_missing"], 1, "{rel}");
    // The next alerts run sends both, late, each quoting a release a day after it.
    let a = run(&["run", "send_alerts", "--as-of", "2026-12-21T03:00:00Z"]);
    assert_eq!(a["release_warnings"], 2, "{a}");
    let quoted = t
        .client()
        .await
        .query(
            "SELECT payload->>'lead', payload->>'release_at' FROM notices
             WHERE account_id = 'W' AND kind = 'release_warning' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{}: {}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect::<Vec<_>>();
    assert_eq!(
        quoted,
        vec!["24h: 2026-12-22 03:00 (UTC)", "7d: 2026-12-22 03:00 (UTC)"]
    );
    // Delivered (with them the overdue alert no run had sent either, and the suspension
    // notice), and written once: the next alerts run writes nothing more.
    let d = run(&[
        "run",
        "deliver_notifications",
        "--as-of",
        "2026-12-21T03:01:00Z",
    ]);
    assert_eq!(d["sent"], 4, "{d}");
    assert_eq!(
        t.scalar_i64(
            "SELECT count(*) FROM notices WHERE account_id = 'W' AND kind = 'release_warning'
               AND status = 'sent' AND accepted_at = '2026-12-21T03:01:00Z'"
        )
        .await,
        2
    );
    let again = run(&["run", "send_alerts", "--as-of", "2026-12-21T04:00:00Z"]);
    assert_eq!(again["notices_written"], 0, "{again}");
    // Accepted less than a day ago: still kept (release_resources runs daily at 02:00).
    let rel = run(&[
        "run",
        "release_resources",
        "--as-of",
        "2026-12-22T02:00:00Z",
    ]);
    assert_eq!(rel["released_count"], 0, "{rel}");
    let w = run(&["account", "show", "W", "--json"]);
    assert_eq!(w["resources"][0]["state"], "suspended", "{w}");
    let rel = run(&[
        "run",
        "release_resources",
        "--as-of",
        "2026-12-23T02:30:00Z",
    ]);
    assert_eq!(rel["released_count"], 1, "{rel}");
    assert_eq!(rel["released"][0]["resource_id"], "W-1");
}

/// A one-off billing run that names a later day than the next one bills the missed days
/// first, each on its own bill (PRODUCT.md: daily billing catches up every missed day): the
/// missed day's usage is not swept onto the later bill as late records, and that day is not
/// left for ever without a bill.
#[tokio::test(flavor = "multi_thread")]
async fn a_billing_run_past_a_missed_day_bills_that_day_first_on_its_own_bill() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let run = |args: &[&str]| ok_json(arrears(u, args));
    let accounts = csv(
        ACCOUNTS_HEADER,
        &["C,Catch,c@example.com,,en,UTC,100.00,0,"],
    );
    let resources = csv(RESOURCES_HEADER, &["C-1,C,lcic,pay_per_use,,,,"]);
    import(
        u,
        "accounts",
        &accounts.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    import(
        u,
        "resources",
        &resources.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    // Billing days are Asia/Shanghai's (UTC+8): 01:00Z is 09:00 there, the same day.
    let day1 = csv(
        USAGE_HEADER,
        &["c1,C,C-1,classroom_minutes,100,2026-11-21T01:00:00Z,2026-11-21T02:00:00Z"],
    );
    import(
        u,
        "usage",
        &day1.path.to_str().unwrap(),
        Some("2026-11-21T12:00:00Z"),
    );
    let r = run(&["run", "generate_bills", "--as-of", "2026-11-21T16:30:00Z"]);
    assert_eq!(r["bill_day"], "2026-11-21", "{r}");
    let later = csv(
        USAGE_HEADER,
        &[
            "c2,C,C-1,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "c3,C,C-1,classroom_minutes,300,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z",
        ],
    );
    import(
        u,
        "usage",
        &later.path.to_str().unwrap(),
        Some("2026-11-23T12:00:00Z"),
    );
    // The dry run of the later day is refused, naming the missed one.
    let dry = arrears(
        u,
        &[
            "run",
            "generate_bills",
            "--as-of",
            "2026-11-23T16:30:00Z",
            "--dry-run",
        ],
    );
    assert_eq!(code(&dry), 1, "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(
        String::from_utf8_lossy(&dry.stderr).contains("--day 2026-11-22"),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    // The run of the 23rd bills the 22nd first.
    let r = run(&["run", "generate_bills", "--as-of", "2026-11-23T16:30:00Z"]);
    assert_eq!(r["bill_day"], "2026-11-23", "{r}");
    assert_eq!(r["caught_up"][0]["bill_day"], "2026-11-22", "{r}");
    assert_eq!(r["caught_up"][0]["bills_issued"], 1, "{r}");
    assert_eq!(r["caught_up"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["late_records"], 0, "{r}");
    let bills = run(&["bills", "C", "--json"]);
    let days: Vec<String> = bills
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{} {} records, {} late",
                b["bill_day"].as_str().unwrap(),
                b["records"],
                b["late_records"]
            )
        })
        .collect();
    assert_eq!(
        days,
        vec![
            "2026-11-21 1 records, 0 late",
            "2026-11-22 1 records, 0 late",
            "2026-11-23 1 records, 0 late"
        ],
        "{bills}"
    );
    // Each day was billed once: naming the 22nd again is refused, a later day being billed.
    let again = arrears(
        u,
        &[
            "run",
            "generate_bills",
            "--day",
            "2026-11-22",
            "--as-of",
            "2026-11-23T17:00:00Z",
        ],
    );
    assert_eq!(code(&again), 1);
    assert!(String::from_utf8_lossy(&again.stderr).contains("is earlier"));
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM bills WHERE account_id = 'C'")
            .await,
        3
    );
    t.assert_balances_match_ledger().await;
}

/// Read commands given something that does not exist or cannot be answered exit 1 naming it,
/// rather than printing an empty answer that looks like "no bills"; a reader that goes away
/// (`| head`) ends the command quietly.
#[tokio::test(flavor = "multi_thread")]
async fn read_commands_refuse_unknown_accounts_bad_filters_and_stop_quietly_on_a_closed_pipe() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(ACCOUNTS_HEADER, &["K,Known,,,en,UTC,1.00,0,"]);
    import(
        u,
        "accounts",
        accounts.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    let cases: [(&[&str], &str); 5] = [
        (&["bills", "nobody", "--json"], "unknown account"),
        (
            &["notices", "list", "--account", "nobody", "--json"],
            "unknown account",
        ),
        (&["notices", "list", "--status", "bogus"], "bogus"),
        (
            &["bills", "K", "--from", "2026-11-05", "--to", "2026-11-01"],
            "after --to",
        ),
        (&["schedule", "--count", "100000000"], "100000000"),
    ];
    for (args, says) in cases {
        let out = arrears(u, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // The known account answers (no bills yet).
    assert_eq!(
        ok_json(arrears(u, &["bills", "K", "--json"])),
        serde_json::json!([])
    );
    // `| head`: the reader closes the pipe before the output is written; no panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_arrears"))
        .args(["schedule", "--count", "10000", "--json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ARREARS_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}

/// Amounts are counts of the currency's minor unit: a configuration naming another currency or
/// other digits than the database was priced with is refused by every command (exit 1),
/// reading or writing, instead of showing 79.90 CNY as 7990 or topping up in the wrong unit.
#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_with_another_currency_or_digits_is_refused() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(ACCOUNTS_HEADER, &["M,Money,,,en,UTC,79.90,0,"]);
    import(
        u,
        "accounts",
        accounts.path.to_str().unwrap(),
        Some("2026-11-20T00:00:00Z"),
    );
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, from: &str, to: &str| {
        let path = dir.path().join(name);
        let text = arrears::config::EXAMPLE_CONFIG.replace(from, to);
        assert_ne!(text, arrears::config::EXAMPLE_CONFIG, "{from}");
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let jpy = write("jpy.toml", "currency = \"CNY\"", "currency = \"JPY\"");
    let digits = write(
        "digits.toml",
        "minor_unit_digits = 2",
        "minor_unit_digits = 0",
    );
    let before = t.fingerprint().await;
    for cfg in [&jpy, &digits] {
        for args in [
            &["account", "show", "M", "--json"][..],
            &["topup", "M", "5", "--reference", "pay-1"][..],
            &["migrate"][..],
        ] {
            let mut all = vec!["--config", cfg.as_str()];
            all.extend_from_slice(args);
            let out = arrears(u, &all);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(code(&out), 1, "{all:?}: {err}");
            assert!(
                err.contains("counts its amounts in CNY with 2 digits"),
                "{all:?}: {err}"
            );
        }
    }
    assert_eq!(t.fingerprint().await, before, "nothing written");
    // The configuration it was set up with still works.
    let m = ok_json(arrears(u, &["account", "show", "M", "--json"]));
    assert_eq!(m["cash_balance"], "79.90");
}

#[tokio::test(flavor = "multi_thread")]
async fn read_commands_on_a_database_never_migrated_write_nothing_and_say_why() {
    let admin = arrears::db::raw_connect(&admin_url()).await.unwrap();
    let name = format!("arrears_unmigrated_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let url = arrears::db::with_database(&admin_url(), &name).unwrap();
    for args in [
        &["account", "show", "A", "--json"][..],
        &["bills", "A"][..],
        &["notices", "list"][..],
        &["report", "aging"][..],
        &["run", "send_alerts", "--dry-run"][..],
    ] {
        let out = arrears(Some(&url), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{args:?}: {err}");
        assert!(
            err.contains("pending migration(s): run `arrears migrate`"),
            "{args:?}: {err}"
        );
    }
    let db = arrears::db::raw_connect(&url).await.unwrap();
    let tables: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(db);
    assert_eq!(tables, 0, "not even diesel's bookkeeping table");
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    // A database that does not exist is named as such, not as a bare "db error".
    let out = arrears(Some(&url), &["account", "show", "A", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains(&format!("database \"{name}\" does not exist")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn top_ups_and_coupons_beyond_the_amount_bound_are_refused_before_anything_is_written() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(ACCOUNTS_HEADER, &["B,Bound,,,en,UTC,1.00,0,"]);
    ok_json(arrears(
        u,
        &["import", "accounts", accounts.path.to_str().unwrap()],
    ));
    let before = t.fingerprint().await;
    for args in [
        // 2 * 10^15 minor units: past the bound, within i64
        &["topup", "B", "20000000000000.00", "--reference", "big-1"][..],
        &["topup", "B", "99999999999999999999", "--reference", "big-2"][..],
        &[
            "coupon",
            "grant",
            "B",
            "20000000000000",
            "--kind",
            "cash",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ][..],
    ] {
        let out = arrears(u, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 1, "{args:?}: {err}");
        assert!(err.contains("amount"), "{args:?}: {err}");
    }
    assert_eq!(t.fingerprint().await, before, "nothing written");
    // The bound itself is accepted.
    let r = ok_json(arrears(
        u,
        &["topup", "B", "10000000000000.00", "--reference", "max-1"],
    ));
    assert_eq!(r["reference"], "max-1");
    let b = ok_json(arrears(u, &["account", "show", "B", "--json"]));
    assert_eq!(b["cash_balance"], "10000000000001.00");
}

#[tokio::test(flavor = "multi_thread")]
async fn import_dry_run_checks_and_counts_and_writes_nothing() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(
        ACCOUNTS_HEADER,
        &["D1,Dry,,,en,UTC,1.00,0,", "D2,Run,,,en,UTC,2.00,0,"],
    );
    let resources = csv(RESOURCES_HEADER, &["d1-class,D1,lcic,pay_per_use,,,,"]);
    let usage = csv(
        USAGE_HEADER,
        &["e1,D1,d1-class,classroom_minutes,10,2026-11-20T10:00:00Z,2026-11-20T10:10:00Z"],
    );
    let path = |f: &Csv| f.path.to_str().unwrap().to_string();
    let before = t.fingerprint().await;
    let r = ok_json(arrears(
        u,
        &["import", "accounts", &path(&accounts), "--dry-run"],
    ));
    assert_eq!(
        (r["dry_run"].as_bool(), r["inserted"].as_u64()),
        (Some(true), Some(2))
    );
    assert_eq!(t.fingerprint().await, before, "a preview writes nothing");
    // A bad line is named in a preview as in a real import.
    let bad = csv(ACCOUNTS_HEADER, &["D3,Bad,,,en,UTC,1.001,0,"]);
    let out = arrears(u, &["import", "accounts", &path(&bad), "--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 1, "{err}");
    assert!(
        err.contains("line 2") && err.contains("cash_balance"),
        "{err}"
    );
    assert_eq!(t.fingerprint().await, before);
    // Once imported for real, a preview of the same usage says it is already there.
    ok_json(arrears(u, &["import", "accounts", &path(&accounts)]));
    ok_json(arrears(u, &["import", "resources", &path(&resources)]));
    let r = ok_json(arrears(
        u,
        &[
            "import",
            "usage",
            &path(&usage),
            "--dry-run",
            "--as-of",
            "2026-11-21T00:00:00Z",
        ],
    ));
    assert_eq!(
        (r["inserted"].as_u64(), r["dry_run"].as_bool()),
        (Some(1), Some(true))
    );
    import(
        u,
        "usage",
        &usage.path.to_str().unwrap(),
        Some("2026-11-21T00:00:00Z"),
    );
    let middle = t.fingerprint().await;
    let r = ok_json(arrears(
        u,
        &[
            "import",
            "usage",
            &path(&usage),
            "--dry-run",
            "--as-of",
            "2026-11-21T00:00:00Z",
        ],
    ));
    assert_eq!(
        (r["inserted"].as_u64(), r["already_imported"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(r["already_imported_differing"]["count"], 0);
    assert_eq!(t.fingerprint().await, middle);
    // An event re-sent with another quantity is still a no-op, but counted, with its line.
    let changed = csv(
        USAGE_HEADER,
        &[
            "e2,D1,d1-class,classroom_minutes,5,2026-11-20T11:00:00Z,2026-11-20T11:05:00Z",
            "e1,D1,d1-class,classroom_minutes,99,2026-11-20T10:00:00Z,2026-11-20T10:10:00Z",
        ],
    );
    let out = arrears(
        u,
        &[
            "import",
            "usage",
            &path(&changed),
            "--as-of",
            "2026-11-21T00:00:00Z",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let r = ok_json(out);
    assert_eq!(
        (r["inserted"].as_u64(), r["already_imported"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(r["already_imported_differing"]["count"], 1);
    assert_eq!(
        r["already_imported_differing"]["lines"],
        serde_json::json!([3])
    );
    assert!(err.contains("re-sent usage events differ"), "{err}");
    assert_eq!(
        t.scalar_i64("SELECT quantity FROM usage_records WHERE event_id = 'e1'")
            .await,
        10_000_000,
        "the first record stands"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coupon_grant_with_a_reference_is_granted_once_however_often_it_is_retried() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(
        ACCOUNTS_HEADER,
        &["C1,Coupon,,,en,UTC,1.00,0,", "C2,Other,,,en,UTC,1.00,0,"],
    );
    ok_json(arrears(
        u,
        &["import", "accounts", accounts.path.to_str().unwrap()],
    ));
    let grant = |account: &'static str, amount: &'static str, reference: &'static str| {
        arrears(
            u,
            &[
                "coupon",
                "grant",
                account,
                amount,
                "--kind",
                "cash",
                "--expires-at",
                "2030-01-01T00:00:00Z",
                "--reference",
                reference,
            ],
        )
    };
    let first = ok_json(grant("C1", "5.00", "promo-1"));
    assert_eq!(first["replayed"], false);
    let again = ok_json(grant("C1", "5.00", "promo-1"));
    assert_eq!(again["replayed"], true);
    assert_eq!(again["coupon_id"], first["coupon_id"]);
    let before = t.fingerprint().await;
    // The same reference for another amount or account is refused, naming both grants.
    for (account, amount) in [("C1", "6.00"), ("C2", "5.00")] {
        let out = grant(account, amount, "promo-1");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 1, "{err}");
        assert!(
            err.contains("reference \"promo-1\" was already used"),
            "{err}"
        );
    }
    assert_eq!(t.fingerprint().await, before, "nothing granted");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM coupons WHERE account_id = 'C1'")
            .await,
        1
    );
    // Concurrent retries of one grant: one coupon.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = t.url.clone();
            std::thread::spawn(move || {
                ok_json(arrears(
                    Some(&url),
                    &[
                        "coupon",
                        "grant",
                        "C2",
                        "3.00",
                        "--kind",
                        "general",
                        "--expires-at",
                        "2030-01-01T00:00:00Z",
                        "--reference",
                        "promo-2",
                    ],
                ))
            })
        })
        .collect();
    let replays: Vec<bool> = handles
        .into_iter()
        .map(|h| h.join().unwrap()["replayed"].as_bool().unwrap())
        .collect();
    assert_eq!(replays.iter().filter(|r| !**r).count(), 1, "{replays:?}");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM coupons WHERE account_id = 'C2'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_off_delivery_run_delivers_every_notice_due_however_many_batches() {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let n = 150;
    let rows: Vec<String> = (0..n)
        .map(|i| format!("o{i:03},Owes {i},o{i}@example.com,,en,UTC,0.00,0,"))
        .collect();
    let accounts = csv(
        ACCOUNTS_HEADER,
        &rows.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let rows: Vec<String> = (0..n)
        .map(|i| format!("o{i:03}-class,o{i:03},lcic,pay_per_use,,,,"))
        .collect();
    let resources = csv(
        RESOURCES_HEADER,
        &rows.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let at = "2026-11-20T08:00:00Z";
    import(u, "accounts", accounts.path.to_str().unwrap(), Some(at));
    import(u, "resources", resources.path.to_str().unwrap(), Some(at));
    // A day's use each (1.50) on nothing: every account is in arrears on its first bill.
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!("u{i},o{i:03},o{i:03}-class,classroom_minutes,100,2026-11-19T10:00:00Z,2026-11-19T11:40:00Z")
        })
        .collect();
    let usage = csv(
        USAGE_HEADER,
        &rows.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    import(u, "usage", usage.path.to_str().unwrap(), Some(at));
    ok_json(arrears(u, &["run", "generate_bills", "--as-of", at]));
    let alerts = ok_json(arrears(u, &["run", "send_alerts", "--as-of", at]));
    assert_eq!(alerts["overdue"], n, "{alerts}");
    // Batches of one notice: the 150 notices take 150 batches, more than any fixed cap of
    // a pass would let one run take.
    let jobs = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/jobs")).unwrap() {
        let f = f.unwrap().path();
        let text = std::fs::read_to_string(&f).unwrap();
        let text = text.replace("batch_size = 200", "batch_size = 1");
        std::fs::write(jobs.path().join(f.file_name().unwrap()), text).unwrap();
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arrears"));
    let out = cmd
        .args([
            "run",
            "deliver_notifications",
            "--as-of",
            "2026-11-20T08:01:00Z",
            "--allow-future",
        ])
        .env("DATABASE_URL", &t.url)
        .env("ARREARS_SERVICE__JOBS_DIR", jobs.path())
        .env("ARREARS_EMBEDDED__STATE_DIR", jobs.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ARREARS_CONFIG")
        .output()
        .unwrap();
    let d = ok_json(out);
    assert_eq!(d["sent"], n, "{d}");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM notices WHERE status <> 'sent'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_billing_run_waits_for_an_earlier_day_held_by_a_live_runner_and_resumes_an_interrupted_one(
) {
    let t = TestDb::new().await;
    let u = Some(t.url.as_str());
    let accounts = csv(ACCOUNTS_HEADER, &["H,Held,,,en,UTC,100.00,0,"]);
    let resources = csv(RESOURCES_HEADER, &["H-1,H,lcic,pay_per_use,,,,"]);
    let usage = csv(
        USAGE_HEADER,
        &[
            "h1,H,H-1,classroom_minutes,100,2026-11-21T01:00:00Z,2026-11-21T02:00:00Z",
            "h2,H,H-1,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            "h3,H,H-1,classroom_minutes,300,2026-11-23T01:00:00Z,2026-11-23T02:00:00Z",
        ],
    );
    let at = "2026-11-20T00:00:00Z";
    import(u, "accounts", &accounts.path.to_str().unwrap(), Some(at));
    import(u, "resources", &resources.path.to_str().unwrap(), Some(at));
    import(
        u,
        "usage",
        &usage.path.to_str().unwrap(),
        Some("2026-11-23T12:00:00Z"),
    );
    let r = ok_json(arrears(
        u,
        &["run", "generate_bills", "--as-of", "2026-11-21T16:30:00Z"],
    ));
    assert_eq!(r["bill_day"], "2026-11-21", "{r}");
    // The 22nd's run is under way on a live runner: its slot's row and its lock (the day
    // ends at 16:00Z, midnight in Asia/Shanghai).
    let slot: chrono::DateTime<chrono::Utc> = "2026-11-22T16:00:00Z".parse().unwrap();
    let holder = t.client().await;
    holder
        .execute(
            "INSERT INTO job_runs (job, slot, status, as_of, started_at, owner, lease_until)
             VALUES ('generate_bills', $1, 'running', $1, now(), 'other-host:4242:1', now() + interval '1 hour')",
            &[&slot],
        )
        .await
        .unwrap();
    let key = arrears::jobs::slot_lock_key(
        arrears::jobs::JobName::parse("generate_bills").unwrap(),
        slot,
    );
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    let before = t.fingerprint().await;
    let out = arrears(
        u,
        &["run", "generate_bills", "--as-of", "2026-11-23T16:30:00Z"],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        code(&out),
        75,
        "the 23rd waits for the 22nd's live runner: {err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["held_by"], "other-host:4242:1", "{r}");
    assert!(
        r["skipped"]
            .as_str()
            .unwrap()
            .contains("billing day 2026-11-22 is being billed"),
        "{r}"
    );
    assert_eq!(
        t.fingerprint().await,
        before,
        "nothing billed, nothing claimed"
    );
    // The runner dies (its connection, and so its lock, goes): the 23rd's run resumes the
    // 22nd first, in its own slot, then bills its own day.
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    drop(holder);
    let r = ok_json(arrears(
        u,
        &["run", "generate_bills", "--as-of", "2026-11-23T16:30:00Z"],
    ));
    assert_eq!(r["bill_day"], "2026-11-23", "{r}");
    assert_eq!(r["caught_up"][0]["bill_day"], "2026-11-22", "{r}");
    assert_eq!(r["caught_up"][0]["bills_issued"], 1, "{r}");
    assert_eq!(r["bills_issued"], 1, "{r}");
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM bills WHERE account_id = 'H'")
            .await,
        3
    );
    assert_eq!(
        t.scalar_i64(
            "SELECT count(*) FROM job_runs WHERE job = 'generate_bills' AND status = 'succeeded'"
        )
        .await,
        3
    );
    // Each day's bill carries its own day's use: 1.50, 3.00, 4.50.
    assert_eq!(
        t.scalar_i64("SELECT sum(total * extract(day FROM bill_day))::bigint FROM bills")
            .await,
        150 * 21 + 300 * 22 + 450 * 23
    );
    t.assert_balances_match_ledger().await;
}
