//! `arrears serve` as a real process: several instances and the CLI over many slots, SIGKILL
//! and SIGTERM in the middle of a billing run, PostgreSQL stopped and started under it,
//! catch-up after downtime, a DST change, and the HTTP contract. The service's clock starts at
//! `--as-of` and runs `--speed` times faster: time travels, nobody sleeps it away.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as Days, Utc};
use common::*;

const TOKEN: &str = "test-token-0123456789abcdef";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_arrears")
}

/// One `arrears serve` process, killed when dropped.
struct Service {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(db_url: &str, as_of: &str, speed: u32, env: &[(&str, &str)]) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let out = std::fs::File::create(&log).unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--as-of", as_of, "--speed", &speed.to_string()])
            .env("DATABASE_URL", db_url)
            .env(
                "ARREARS_NOTIFICATIONS__DEV_CHANNELS_COUNT_AS_ACCEPTED",
                "true",
            )
            .env("ARREARS_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("ARREARS_API_TOKENS", TOKEN)
            .env("ARREARS_SERVICE__LEASE", "2s")
            .env("ARREARS_LOG", "info")
            // Emails go to .eml files under the state directory.
            .env("ARREARS_EMBEDDED__STATE_DIR", dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start arrears serve");
        Service {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Slot runs this process completed (one log line each).
    fn finished_slots(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"message\":\"slot finished\""))
            .count()
    }

    async fn status(&self, path: &str) -> Option<u16> {
        reqwest::Client::new()
            .get(self.url(path))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    async fn wait_readyz(&mut self, want: u16) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self.status("/readyz").await == Some(want) {
                return;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!(
                    "serve exited with {s} before /readyz said {want}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never said {want}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(60)).await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `sql` (one bigint) until it reaches `want`.
async fn wait_until(t: &TestDb, sql: &str, want: i64, services: &[&Service]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(c) = arrears::db::raw_connect(&t.url).await {
            if let Ok(row) = c.query_one(sql, &[]).await {
                if row.get::<_, i64>(0) >= want {
                    return;
                }
            }
        }
        if Instant::now() > deadline {
            for s in services {
                eprintln!("--- service log ---\n{}", s.log());
            }
            panic!("timed out waiting for {sql} >= {want}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `arrears ARGS` against `db_url`, with `env`.
fn cli_output(db_url: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).env("DATABASE_URL", db_url).env(
        "ARREARS_NOTIFICATIONS__DEV_CHANNELS_COUNT_AS_ACCEPTED",
        "true",
    );
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `arrears run JOB --as-of AS_OF`'s report; `None` when it was a billing run refused
/// (exit 1, nothing claimed) because the services' clocks, six hours a second, had already
/// billed past its day: on a loaded machine the CLI's start can lag them by more than the
/// half day it is given.
fn cli_run(
    db_url: &str,
    job: &str,
    as_of: &str,
    env: &[(&str, &str)],
) -> Option<serde_json::Value> {
    let out = cli_output(db_url, &["run", job, "--as-of", as_of], env);
    let err = String::from_utf8_lossy(&out.stderr);
    if job == "generate_bills"
        && out.status.code() == Some(1)
        && err
            .contains("is earlier (late usage of an earlier day is billed on the next day's bill)")
    {
        return None;
    }
    assert!(
        out.status.success(),
        "arrears run {job} --as-of {as_of}: {err}"
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn cli(db_url: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = cli_output(db_url, args, env);
    assert!(
        out.status.success(),
        "arrears {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A schedule folder: every job, with `generate_bills` in `zone` and small billing batches.
fn jobs_dir(zone: &str, batch_size: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
    w(
        "generate_bills.toml",
        format!("cron = \"30 0 * * *\"\ntime_zone = \"{zone}\"\ncatch_up = \"every\"\n[knobs]\nbatch_size = {batch_size}\n"),
    );
    w(
        "send_alerts.toml",
        format!("cron = \"5 * * * *\"\ntime_zone = \"{zone}\"\n"),
    );
    w(
        "enforce_suspensions.toml",
        format!("cron = \"*/5 * * * *\"\ntime_zone = \"{zone}\"\n"),
    );
    w(
        "release_resources.toml",
        format!("cron = \"0 10 * * *\"\ntime_zone = \"{zone}\"\n"),
    );
    w(
        "deliver_notifications.toml",
        format!("every_seconds = 1\ntime_zone = \"{zone}\"\n"),
    );
    dir
}

/// `n` lcic accounts with a pay-per-use classroom each and 100 minutes (1.50) of use on each
/// day of `days` (local days in `zone`, used at noon).
async fn customers(t: &TestDb, n: usize, days: &[&str], zone: &str) {
    let accounts: Vec<String> = (0..n)
        .map(|i| format!("c{i:05},Customer {i},,,en,{zone},1000.00,0,"))
        .collect();
    t.import_accounts(&refs(&accounts)).await;
    let resources: Vec<String> = (0..n)
        .map(|i| format!("r{i:05},c{i:05},lcic,pay_per_use,,,,"))
        .collect();
    t.import_resources(&refs(&resources)).await;
    let tz: chrono_tz::Tz = zone.parse().unwrap();
    let mut usage = Vec::new();
    let mut last = DateTime::<Utc>::UNIX_EPOCH;
    for d in days {
        let day: chrono::NaiveDate = d.parse().unwrap();
        let start = day
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_local_timezone(tz)
            .unwrap()
            .with_timezone(&Utc);
        let end = start + Days::minutes(100);
        last = last.max(end);
        for i in 0..n {
            usage.push(format!(
                "e{d}-{i},c{i:05},r{i:05},classroom_minutes,100,{},{}",
                start.to_rfc3339(),
                end.to_rfc3339()
            ));
        }
    }
    t.import_usage(&refs(&usage), &(last + Days::hours(1)).to_rfc3339())
        .await;
}

/// Every bill is one per account and day, each 1.50, and balances equal their ledgers.
async fn assert_billed_once(t: &TestDb, accounts: i64, days: i64) {
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM bills").await,
        accounts * days
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM bills WHERE total <> 150")
            .await,
        0,
        "every bill is exactly one day's 100 minutes"
    );
    assert_eq!(
        t.scalar_i64(
            "SELECT coalesce(sum(-amount), 0)::bigint FROM ledger_entries WHERE kind = 'charge'"
        )
        .await,
        accounts * days * 150,
        "every record charged once"
    );
    assert_eq!(
        t.scalar_i64(
            "SELECT count(*) FROM (SELECT account_id, bill_day FROM bill_lines GROUP BY 1, 2 HAVING sum(records) <> 1) x"
        )
        .await,
        0,
        "each bill carries exactly its one record"
    );
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_services_and_the_cli_run_each_slot_once_across_a_dst_change() {
    let zone = "Europe/Berlin";
    let t = TestDb::with_config(config_with(&[("ARREARS_BILLING__TIME_ZONE", zone)])).await;
    // Berlin springs forward on 2026-03-29: 23 hours that day.
    let days = [
        "2026-03-26",
        "2026-03-27",
        "2026-03-28",
        "2026-03-29",
        "2026-03-30",
        "2026-03-31",
    ];
    customers(&t, 40, &days, zone).await;
    let jobs = jobs_dir(zone, 4);
    let env = [
        ("ARREARS_BILLING__TIME_ZONE", zone),
        ("ARREARS_SERVICE__JOBS_DIR", jobs.path().to_str().unwrap()),
    ];
    let start = "2026-03-26T12:00:00+01:00";
    let speed = 6 * 3600; // six hours a second
    let mut a = Service::start(&t.url, start, speed, &env);
    let mut b = Service::start(&t.url, start, speed, &env);
    a.wait_readyz(200).await;
    b.wait_readyz(200).await;

    // Meanwhile one-off runs from the CLI claim the same slots.
    let begun = Instant::now();
    let mut cli_ran = 0;
    let mut cli_runs = 0;
    while cli_runs < 6 {
        let sim_now =
            at(start) + Days::milliseconds((begun.elapsed().as_millis() as i64) * speed as i64);
        // A while behind the services' clocks, so that days are billed in order.
        let as_of = (sim_now - Days::hours(12)).to_rfc3339();
        for job in ["send_alerts", "enforce_suspensions", "generate_bills"] {
            cli_runs += 1;
            let Some(r) = cli_run(&t.url, job, &as_of, &env) else {
                continue;
            };
            if r["skipped"].is_null() {
                cli_ran += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // Until the bill of the last day (2026-03-31) is issued.
    wait_until(
        &t,
        "SELECT count(*) FROM bills WHERE bill_day = '2026-03-31'",
        40,
        &[&a, &b],
    )
    .await;
    assert!(a.terminate().await.success(), "{}", a.log());
    assert!(b.terminate().await.success(), "{}", b.log());

    let c = t.client().await;
    // Each slot was claimed once (a second claim would count a second attempt) and ran once:
    // one "slot finished" per row, over both services and the CLI.
    let rows = c
        .query(
            "SELECT job, slot, status, attempts FROM job_runs ORDER BY slot",
            &[],
        )
        .await
        .unwrap();
    for r in &rows {
        let (job, slot, status, attempts): (String, DateTime<Utc>, String, i32) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        assert_eq!(
            (status.as_str(), attempts),
            ("succeeded", 1),
            "{job} {slot}"
        );
    }
    assert_eq!(
        a.finished_slots() + b.finished_slots() + cli_ran,
        rows.len(),
        "one run per slot"
    );
    // One billing slot per local day, across the spring-forward, none missing.
    let tz: chrono_tz::Tz = zone.parse().unwrap();
    let billed_days: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, String>(0) == "generate_bills")
        .map(|r| {
            (r.get::<_, DateTime<Utc>>(1) - Days::seconds(1))
                .with_timezone(&tz)
                .date_naive()
                .to_string()
        })
        .collect();
    for w in billed_days.windows(2) {
        let (a, b): (chrono::NaiveDate, chrono::NaiveDate) =
            (w[0].parse().unwrap(), w[1].parse().unwrap());
        assert_eq!(
            b - a,
            Days::days(1),
            "consecutive local days: {billed_days:?}"
        );
    }
    for d in days {
        assert!(
            billed_days.iter().any(|b| b == d),
            "{d} billed: {billed_days:?}"
        );
    }
    assert_billed_once(&t, 40, days.len() as i64).await;
}

/// A billing run large enough to interrupt: `n` accounts in batches of 25.
async fn big_billing_fixture(n: usize) -> (TestDb, tempfile::TempDir) {
    let zone = "Asia/Shanghai";
    let t = TestDb::new().await;
    customers(&t, n, &["2026-06-09"], zone).await;
    // Statistics, as autovacuum would have them after the import: billing's pre-pass then
    // splits the accounts between two connections (billing.workers), the path a cloud's
    // night takes.
    t.client()
        .await
        .batch_execute("ANALYZE accounts")
        .await
        .unwrap();
    (t, jobs_dir(zone, 25))
}

// The billing slot of 2026-06-09 is the latest at this instant: it runs at start.
const BILLING_START: &str = "2026-06-10T01:00:00+08:00";

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_in_the_middle_of_billing_then_restart_bills_each_account_once() {
    let n = 4000;
    let (t, jobs) = big_billing_fixture(n).await;
    let env = [("ARREARS_SERVICE__JOBS_DIR", jobs.path().to_str().unwrap())];
    let mut s = Service::start(&t.url, BILLING_START, 1, &env);
    wait_until(
        &t,
        "SELECT count(*) FROM job_batches WHERE status = 'done'",
        5,
        &[&s],
    )
    .await;
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(10)).await;
    let billed = t.scalar_i64("SELECT count(*) FROM bills").await;
    assert!(
        billed > 0 && billed < n as i64,
        "killed mid-run: {billed} of {n} billed"
    );
    assert_eq!(
        t.scalar_i64(
            "SELECT count(*) FROM job_runs WHERE job = 'generate_bills' AND status = 'running'"
        )
        .await,
        1,
        "the dead runner's claim stays until its lease expires"
    );
    // A new instance takes the slot over when the lease expires and finishes it.
    let mut s2 = Service::start(&t.url, BILLING_START, 1, &env);
    wait_until(
        &t,
        "SELECT count(*) FROM job_runs WHERE job = 'generate_bills' AND status = 'succeeded'",
        1,
        &[&s2],
    )
    .await;
    assert!(s2.terminate().await.success());
    assert_eq!(
        t.scalar_i64("SELECT attempts::bigint FROM job_runs WHERE job = 'generate_bills'")
            .await,
        2
    );
    assert_billed_once(&t, n as i64, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_between_batches_exits_zero_and_the_next_start_resumes_at_once() {
    let n = 4000;
    let (t, jobs) = big_billing_fixture(n).await;
    // A lease far longer than the test: resuming must not wait for it.
    let env = [
        ("ARREARS_SERVICE__JOBS_DIR", jobs.path().to_str().unwrap()),
        ("ARREARS_SERVICE__LEASE", "1h"),
    ];
    let mut s = Service::start(&t.url, BILLING_START, 1, &env);
    wait_until(
        &t,
        "SELECT count(*) FROM job_batches WHERE status = 'done'",
        5,
        &[&s],
    )
    .await;
    let asked = Instant::now();
    let status = s.terminate().await;
    assert!(status.success(), "exit 0 on SIGTERM: {status}\n{}", s.log());
    assert!(asked.elapsed() < Duration::from_secs(30));
    let c = t.client().await;
    let row = c
        .query_one(
            "SELECT status, lease_until IS NULL FROM job_runs WHERE job = 'generate_bills'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, bool>(1)),
        ("interrupted".to_string(), true),
        "the lease is released"
    );
    let billed = t.scalar_i64("SELECT count(*) FROM bills").await;
    assert!(
        billed > 0 && billed < n as i64,
        "stopped mid-run: {billed} of {n}"
    );
    // Whole batches only: every bill has its line and ledger entry.
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM bills b WHERE NOT EXISTS (SELECT 1 FROM ledger_entries l WHERE l.account_id = b.account_id AND l.kind = 'charge')")
            .await,
        0
    );
    t.assert_balances_match_ledger().await;
    let mut s2 = Service::start(&t.url, BILLING_START, 1, &env);
    wait_until(
        &t,
        "SELECT count(*) FROM job_runs WHERE job = 'generate_bills' AND status = 'succeeded'",
        1,
        &[&s2],
    )
    .await;
    assert!(s2.terminate().await.success());
    assert_billed_once(&t, n as i64, 1).await;
}

/// `/metrics` of `s` counts `runs` succeeded slot runs per job, and has a histogram of their
/// durations with those job and outcome labels: cumulative buckets ending in `+Inf`, a count
/// equal to the runs. A slot is recorded just after its row says succeeded: polled, briefly.
async fn assert_job_durations_scraped(s: &Service, runs: &[(&str, u64)]) {
    let value = |text: &str, series: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = reqwest::get(s.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let all_in = runs.iter().all(|(job, n)| {
            let series = format!("arrears_job_runs_total{{job=\"{job}\",outcome=\"succeeded\"}}");
            value(&text, &series) >= Some(*n)
        });
        if all_in || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        text.contains("# TYPE arrears_job_run_seconds histogram"),
        "{text}"
    );
    for (job, n) in runs {
        let labels = format!("job=\"{job}\",outcome=\"succeeded\"");
        assert_eq!(
            value(&text, &format!("arrears_job_runs_total{{{labels}}}")),
            Some(*n),
            "{job} in\n{text}"
        );
        assert_eq!(
            value(&text, &format!("arrears_job_run_seconds_count{{{labels}}}")),
            Some(*n),
            "{job} in\n{text}"
        );
        assert!(
            text.contains(&format!("arrears_job_run_seconds_sum{{{labels}}} ")),
            "{job} in\n{text}"
        );
        let buckets: Vec<(String, u64)> = text
            .lines()
            .filter_map(|l| {
                let rest =
                    l.strip_prefix(&format!("arrears_job_run_seconds_bucket{{{labels},le=\""))?;
                let (le, count) = rest.split_once("\"} ")?;
                Some((le.to_string(), count.parse().ok()?))
            })
            .collect();
        assert!(buckets.len() > 1, "{job}: buckets in\n{text}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{job}: cumulative buckets {buckets:?}"
        );
        assert_eq!(
            buckets.last(),
            Some(&("+Inf".to_string(), *n)),
            "{job}: {buckets:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn catch_up_after_26_hours_down_bills_every_missed_day_and_collapses_the_rest() {
    let zone = "Asia/Shanghai";
    let t = TestDb::new().await;
    customers(&t, 5, &["2026-06-09", "2026-06-10", "2026-06-11"], zone).await;
    let jobs = jobs_dir(zone, 100);
    let env = [("ARREARS_SERVICE__JOBS_DIR", jobs.path().to_str().unwrap())];
    let t0 = "2026-06-10T23:00:00+08:00";
    let mut a = Service::start(&t.url, t0, 1, &env);
    // A first start runs the latest slot of each job.
    wait_until(
        &t,
        "SELECT count(DISTINCT job) FROM job_runs WHERE status = 'succeeded'",
        4,
        &[&a],
    )
    .await;
    assert!(a.terminate().await.success());
    let before = t.scalar_i64("SELECT count(*) FROM job_runs").await;
    assert_eq!(before, 4, "one slot per job at first start");

    let t1 = (at(t0) + Days::hours(26)).to_rfc3339(); // 2026-06-12 01:00 local
    let mut b = Service::start(&t.url, &t1, 1, &env);
    // Two billing days, and one slot each for the other jobs.
    wait_until(
        &t,
        "SELECT count(*) FROM job_runs WHERE status = 'succeeded'",
        9,
        &[&b],
    )
    .await;
    assert_job_durations_scraped(&b, &[("generate_bills", 2), ("send_alerts", 1)]).await;
    assert!(b.terminate().await.success());
    let c = t.client().await;
    let slots = |job: &'static str| {
        let c = &c;
        async move {
            c.query(
                "SELECT slot FROM job_runs WHERE job = $1 ORDER BY slot",
                &[&job],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, DateTime<Utc>>(0))
            .collect::<Vec<_>>()
        }
    };
    // Billing: the day before t0's (at first start), then each missed day, oldest first.
    assert_eq!(
        slots("generate_bills").await,
        vec![
            at("2026-06-10T00:00:00+08:00"),
            at("2026-06-11T00:00:00+08:00"),
            at("2026-06-12T00:00:00+08:00")
        ]
    );
    assert_billed_once(&t, 5, 3).await;
    // Hourly alerts: 26 missed slots collapse into the latest one.
    assert_eq!(
        slots("send_alerts").await,
        vec![
            at("2026-06-10T22:05:00+08:00"),
            at("2026-06-12T00:05:00+08:00")
        ]
    );
    assert_eq!(
        slots("enforce_suspensions").await,
        vec![
            at("2026-06-10T23:00:00+08:00"),
            at("2026-06-12T01:00:00+08:00")
        ]
    );
    assert_eq!(
        slots("release_resources").await,
        vec![
            at("2026-06-10T10:00:00+08:00"),
            at("2026-06-11T10:00:00+08:00")
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_stopped_and_started_during_a_run_loses_and_doubles_no_slot() {
    // A private cluster, so that stopping it disturbs no other test.
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_path_buf();
    let emb = {
        let d = state_dir.clone();
        tokio::task::spawn_blocking(move || arrears::db::embedded::ensure_started(&d))
            .await
            .unwrap()
            .expect("start a private PostgreSQL")
    };
    let config = config_with(&[("ARREARS_EMBEDDED__STATE_DIR", state_dir.to_str().unwrap())]);
    let db = arrears::db::Db::open(&config, arrears::db::MigrationMode::Apply)
        .await
        .unwrap();
    let accounts = csv(
        ACCOUNTS_HEADER,
        &[
            "p1,P1,,,en,Asia/Shanghai,1000.00,0,",
            "p2,P2,,,en,Asia/Shanghai,1000.00,0,",
        ],
    );
    arrears::import::import_file(
        &db,
        &config,
        arrears::import::ImportKind::Accounts,
        &accounts.path,
        at("2026-06-01T00:00:00Z"),
        false,
    )
    .await
    .unwrap();
    drop(db);
    let url = emb.url.clone();
    let query = |sql: &'static str| {
        let url = url.clone();
        async move {
            let c = arrears::db::raw_connect(&url).await.unwrap();
            c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
        }
    };
    let mut s = Service::start(&url, "2026-06-10T00:00:00+08:00", 1800, &[]);
    s.wait_readyz(200).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while query("SELECT count(*) FROM job_runs WHERE job = 'send_alerts'").await < 2 {
        assert!(Instant::now() < deadline, "{}", s.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let d = state_dir.clone();
    tokio::task::spawn_blocking(move || arrears::db::embedded::stop(&d))
        .await
        .unwrap()
        .unwrap();
    s.wait_readyz(503).await;
    // Down long enough for the scheduler to meet the outage.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.log().contains("scheduler pass failed") {
        assert!(
            Instant::now() < deadline,
            "the outage was not seen:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the service keeps running"
    );
    let d = state_dir.clone();
    let again = tokio::task::spawn_blocking(move || arrears::db::embedded::ensure_started(&d))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.url, url, "same port again");
    s.wait_readyz(200).await;
    let before: i64 = query("SELECT count(*) FROM job_runs WHERE job = 'send_alerts'").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while query("SELECT count(*) FROM job_runs WHERE job = 'send_alerts'").await < before + 2 {
        assert!(
            Instant::now() < deadline,
            "slots resume after the outage:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.terminate().await.success());
    // Nothing left half-claimed; a slot that failed in the outage was followed by a later
    // success of its job (level-triggered jobs collapse); one successful run per slot.
    assert_eq!(
        query("SELECT count(*) FROM job_runs WHERE status = 'running'").await,
        0,
        "{}",
        s.log()
    );
    assert_eq!(
        query("SELECT count(*) FROM job_runs f WHERE f.status <> 'succeeded' AND NOT EXISTS (
                 SELECT 1 FROM job_runs l WHERE l.job = f.job AND l.slot > f.slot AND l.status = 'succeeded')")
        .await,
        0
    );
    assert_eq!(
        query("SELECT count(*) FROM job_runs WHERE status = 'succeeded'").await as usize,
        s.finished_slots()
    );
    let d = state_dir.clone();
    tokio::task::spawn_blocking(move || arrears::db::embedded::stop(&d))
        .await
        .unwrap()
        .unwrap();
}

// ------------------------------------------------------------------------------------------
// HTTP

async fn get(s: &Service, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().get(s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn post(s: &Service, path: &str, body: &str, json: bool) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(s.url(path))
        .bearer_auth(TOKEN)
        .body(body.to_string());
    if json {
        req = req.header("content-type", "application/json");
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn http_contract_auth_errors_gate_and_idempotent_topups_that_restore() {
    let t = TestDb::new().await;
    // L: lcic, billed into arrears, alerted, suspended after grace. G: in good standing.
    t.import_accounts(&[
        "L,Lcic Customer,l@example.com,,en,Asia/Shanghai,1.00,0,",
        "G,Good Customer,g@example.com,,en,Asia/Shanghai,500.00,0,",
    ])
    .await;
    t.import_resources(&[
        "L-class,L,lcic,pay_per_use,,,,",
        "G-class,G,lcic,pay_per_use,,,,",
    ])
    .await;
    t.import_usage(
        &["u1,L,L-class,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        "2026-11-22T16:30:00Z",
    )
    .await;
    t.bill("2026-11-22T16:30:00Z").await;
    arrears::lifecycle::record_overdue_alert(&t.db, "L", at("2026-11-22T17:00:00Z"))
        .await
        .unwrap();
    let r = arrears::jobs::enforce_suspensions::run(
        &t.db,
        &t.config,
        &arrears::jobs::enforce_suspensions::Options {
            as_of: at("2026-11-23T18:00:00Z"),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(r.resources_suspended, 1);

    let jobs = tempfile::tempdir().unwrap();
    for j in [
        "generate_bills",
        "send_alerts",
        "enforce_suspensions",
        "release_resources",
    ] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("jobs")
                .join(format!("{j}.toml")),
        )
        .unwrap();
        std::fs::write(
            jobs.path().join(format!("{j}.toml")),
            text.replace("enabled = true", "enabled = false"),
        )
        .unwrap();
    }
    let env = [("ARREARS_SERVICE__JOBS_DIR", jobs.path().to_str().unwrap())];
    let mut s = Service::start(&t.url, "2026-11-23T19:00:00Z", 1, &env);
    s.wait_readyz(200).await;

    assert_eq!(get(&s, "/healthz", None).await.0, 200);
    // Metrics: no auth, Prometheus text with the accounts by state.
    let metrics = reqwest::get(s.url("/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    for want in [
        "arrears_database_up 1",
        "arrears_accounts{state=\"good\"} 1",
        "arrears_accounts{state=\"suspended\"} 1",
        "# TYPE arrears_slots_behind gauge",
        "arrears_outbox_notices{status=",
        "# TYPE arrears_job_runs_total counter",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }

    // Auth: none, malformed, wrong.
    let (st, body) = get(&s, "/v1/accounts/L", None).await;
    assert_eq!((st, body["field"].as_str()), (401, Some("authorization")));
    let r = reqwest::Client::new()
        .get(s.url("/v1/accounts/L"))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        get(&s, "/v1/accounts/L", Some("test-token-0123456789abcdeX"))
            .await
            .0,
        401
    );
    assert_eq!(
        post(&s, "/v1/accounts/L/topups", "{}", true).await.0,
        400,
        "authorized but empty"
    );

    // The account, as `account show --json`.
    let (st, acc) = get(&s, "/v1/accounts/L", Some(TOKEN)).await;
    assert_eq!(st, 200);
    assert_eq!(acc["id"], "L");
    assert_eq!(acc["state"], "suspended");
    let shown = cli(&t.url, &["account", "show", "L", "--json"], &[]);
    assert_eq!(acc, shown, "same view as the CLI");
    let (st, body) = get(&s, "/v1/accounts/nobody", Some(TOKEN)).await;
    assert_eq!((st, body["field"].as_str()), (404, Some("id")));

    // The gate: same answers as `arrears gate`; bad or missing action named.
    let (st, gate) = get(
        &s,
        "/v1/accounts/L/gate?action=create_resource",
        Some(TOKEN),
    )
    .await;
    assert_eq!(st, 200);
    let out = Command::new(bin())
        .args(["gate", "L", "create_resource", "--json"])
        .env("DATABASE_URL", &t.url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let cli_gate: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(gate, cli_gate);
    assert_eq!(gate["allowed"], false);
    let (st, body) = get(&s, "/v1/accounts/L/gate", Some(TOKEN)).await;
    assert_eq!((st, body["field"].as_str()), (400, Some("action")));
    let (st, body) = get(&s, "/v1/accounts/L/gate?action=fly", Some(TOKEN)).await;
    assert_eq!((st, body["field"].as_str()), (400, Some("action")));
    // Another account's resource is not found on this one (and nothing about it is told).
    let (st, body) = get(
        &s,
        "/v1/accounts/L/gate?action=operate&resource=G-class",
        Some(TOKEN),
    )
    .await;
    assert_eq!((st, body["field"].as_str()), (404, Some("resource")));
    assert!(!body.to_string().contains("Good Customer"));

    // Top-ups: malformed bodies are 4xx naming the field, and change nothing.
    let bad: &[(&str, bool, u16, &str)] = &[
        (
            r#"{"amount":"10.00","reference":"r1"}"#,
            false,
            415,
            "content-type",
        ),
        (r#"{"amount":"10.00","reference":"#, true, 400, "body"),
        (r#"{"amount":10.0,"reference":"r1"}"#, true, 400, "amount"),
        (
            r#"{"amount":"-5.00","reference":"r1"}"#,
            true,
            400,
            "amount",
        ),
        (
            r#"{"amount":"1.001","reference":"r1"}"#,
            true,
            400,
            "amount",
        ),
        (r#"{"amount":"0","reference":"r1"}"#, true, 400, "amount"),
        (r#"{"amount":"10.00"}"#, true, 400, "body"),
        (
            r#"{"amount":"10.00","reference":""}"#,
            true,
            400,
            "reference",
        ),
        (
            r#"{"amount":"10.00","reference":"r1","extra":1}"#,
            true,
            400,
            "body",
        ),
    ];
    for (body, json, status, field) in bad {
        let (st, b) = post(&s, "/v1/accounts/L/topups", body, *json).await;
        assert_eq!(
            (st, b["field"].as_str()),
            (*status, Some(*field)),
            "{body}: {b}"
        );
        assert!(b["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(t.balance("L").await, -200, "nothing applied");

    // A top-up that clears the arrears restores at once (R5); replaying it changes nothing.
    let (st, r) = post(
        &s,
        "/v1/accounts/L/topups",
        r#"{"amount":"10.00","reference":"pay-1"}"#,
        true,
    )
    .await;
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["replayed"], false);
    assert_eq!(r["restored"], serde_json::json!(["L-class"]));
    assert_eq!(t.balance("L").await, 800);
    let (st, again) = post(
        &s,
        "/v1/accounts/L/topups",
        r#"{"amount":"10.00","reference":"pay-1"}"#,
        true,
    )
    .await;
    assert_eq!((st, again["replayed"].as_bool()), (200, Some(true)));
    assert_eq!(t.balance("L").await, 800, "applied once");
    let (st, body) = post(
        &s,
        "/v1/accounts/L/topups",
        r#"{"amount":"20.00","reference":"pay-1"}"#,
        true,
    )
    .await;
    assert_eq!((st, body["field"].as_str()), (409, Some("reference")));
    let (st, _) = post(
        &s,
        "/v1/accounts/nobody/topups",
        r#"{"amount":"1.00","reference":"x"}"#,
        true,
    )
    .await;
    assert_eq!(st, 404);
    t.assert_balances_match_ledger().await;
    assert!(s.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_watchdog_and_stopping() {
    let t = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock = socket_path.to_str().unwrap();
    let mut s = Service::start(
        &t.url,
        "2026-06-10T12:00:00+08:00",
        1,
        &[("NOTIFY_SOCKET", sock), ("WATCHDOG_USEC", "2000000")],
    );
    let mut heard = Vec::new();
    let recv_until = |want: &str, heard: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 256];
        while !heard.iter().any(|m| m == want) {
            assert!(Instant::now() < deadline, "never heard {want}: {heard:?}");
            if let Ok(n) = socket.recv(&mut buf) {
                heard.push(String::from_utf8_lossy(&buf[..n]).to_string());
            }
        }
    };
    recv_until("READY=1", &mut heard);
    // Ready means the database answers and the schedule is loaded.
    assert_eq!(s.status("/readyz").await, Some(200));
    recv_until("WATCHDOG=1", &mut heard);
    s.signal(libc::SIGTERM);
    recv_until("STOPPING=1", &mut heard);
    assert!(s.wait_exit(Duration::from_secs(30)).await.success());
    let ready = heard.iter().position(|m| m == "READY=1").unwrap();
    let stopping = heard.iter().position(|m| m == "STOPPING=1").unwrap();
    assert!(ready < stopping, "{heard:?}");
}
