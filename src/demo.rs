//! `arrears demo`: the guided first run. A fresh database on the embedded default (or the
//! configured server), the lcic and sa products, a handful of accounts that each walk one path
//! of the lifecycle, and the real jobs driven slot by slot over 80 simulated days, with the
//! file email transport and the log SMS adapter writing every notice into a folder. Prints a
//! timeline and a summary of final states against the states the scenario declares.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use tokio_postgres::types::Type;

use crate::config::Config;
use crate::db::{self, catalog, Db, DbError, MigrationMode};
use crate::domain::money::format_scaled;
use crate::import;
use crate::jobs::enforce_suspensions::EnforceSuspensions;
use crate::jobs::{deliver_notifications, JobCtx, JobError, JobName};
use crate::lifecycle::{self, OperatorAction};
use crate::scheduler::{JobSchedule, Schedule};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{0}")]
    Step(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

pub struct DemoOptions {
    /// Where notices, the timeline and the input files go.
    pub out_dir: PathBuf,
    /// The scratch database (dropped and created afresh).
    pub database: String,
    /// Print the timeline as it happens (and a progress bar when stderr is a terminal).
    pub print: bool,
}

/// The demo's first instant: midnight in the billing zone of the example configuration.
pub const START: &str = "2026-01-01T00:00:00+08:00";
/// How long the scenario runs: its usage, acts and declared final states are written for it.
pub const DAYS: i64 = 80;

/// How many accounts the scenario has.
pub fn accounts() -> usize {
    STORIES.len()
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub day: i64,
    pub at: DateTime<Utc>,
    pub account: String,
    pub event: String,
    pub state: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountOutcome {
    pub account: String,
    pub product: &'static str,
    pub story: &'static str,
    pub expected_state: &'static str,
    pub final_state: String,
    /// Resource states at the end, `id=state(reason)`.
    pub resources: Vec<String>,
    pub cash_balance: String,
    pub matches: bool,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub database_url: String,
    pub out_dir: PathBuf,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub slots_run: usize,
    pub notices_sent: i64,
    pub timeline: Vec<TimelineEntry>,
    pub accounts: Vec<AccountOutcome>,
    pub all_match: bool,
}

/// One account of the scenario: who it is, what happens to it, and how it must end.
struct Story {
    id: &'static str,
    product: &'static str,
    story: &'static str,
    expected: &'static str,
    /// accounts.csv columns after the id.
    account: &'static str,
    /// resources.csv rows without the account column: (id, rest after account_id)
    resources: &'static [(&'static str, &'static str)],
    /// (resource, meter, minutes per day, first day, last day)
    usage: (&'static str, &'static str, u32, i64, i64),
}

const STORIES: &[Story] = &[
    Story {
        id: "pays-on-time",
        product: "lcic",
        story: "plenty of cash: billed daily, never in arrears",
        expected: "good",
        account: "Pays On Time,ontime@example.com,,en,Asia/Shanghai,500.00,0,",
        resources: &[("pot-class", "lcic,pay_per_use,,,,")],
        usage: ("pot-class", "classroom_minutes", 60, 0, 79),
    },
    Story {
        id: "tops-up-in-grace",
        product: "lcic",
        story: "falls into arrears, is alerted, tops up within the 24 h grace: nothing suspended",
        expected: "good",
        account: "Tops Up In Grace,grace@example.com,+8613800000001,zh-CN,Asia/Shanghai,2.00,0,",
        resources: &[("tig-class", "lcic,pay_per_use,,,,")],
        usage: ("tig-class", "classroom_minutes", 200, 0, 79),
    },
    Story {
        id: "suspended-restored",
        product: "lcic",
        story: "ignores the alert: suspended after grace, tops up on day 10, restored at once",
        expected: "good",
        account: "Suspended Restored,restored@example.com,+8613800000002,en,Asia/Shanghai,1.00,0,",
        resources: &[("sr-class", "lcic,pay_per_use,,,,")],
        usage: ("sr-class", "classroom_minutes", 200, 0, 4),
    },
    Story {
        id: "released-lcic",
        product: "lcic",
        story: "never pays: suspended after grace, warned 7 days and 1 day ahead, released after 60 days",
        expected: "suspended",
        account: "Released Lcic,gone@example.com,,en,Asia/Shanghai,1.00,0,",
        resources: &[("rl-class", "lcic,pay_per_use,,,,")],
        usage: ("rl-class", "classroom_minutes", 200, 0, 2),
    },
    Story {
        id: "released-sa",
        product: "sa",
        story: "never pays: 15 days grace from arrears, pay-per-use frozen, released 15 days later",
        expected: "suspended",
        account: "Released Sa,sa-gone@example.com,,en,Asia/Shanghai,1.00,0,",
        resources: &[("rs-ppu", "sa,pay_per_use,,,,")],
        usage: ("rs-ppu", "assets_scanned", 200, 0, 2),
    },
    Story {
        id: "package-runs-out",
        product: "lcic",
        story: "a 1000-minute package with pay-as-you-go off runs out (quota_exhausted); pay-as-you-go on day 20 restores it",
        expected: "good",
        account: "Package Runs Out,package@example.com,,en,Asia/Shanghai,300.00,0,",
        resources: &[(
            "pro-pkg",
            "lcic,package,1000,2026-06-01T00:00:00+08:00,false,",
        )],
        usage: ("pro-pkg", "classroom_minutes", 150, 0, 79),
    },
    Story {
        id: "compliance-locked",
        product: "sa",
        story: "paid up, but locked for compliance on day 5: suspended, and never released for it",
        expected: "compliance_locked",
        account: "Compliance Locked,locked@example.com,,en,Asia/Shanghai,200.00,0,",
        resources: &[("cl-ppu", "sa,pay_per_use,,,,")],
        usage: ("cl-ppu", "assets_scanned", 10, 0, 4),
    },
    Story {
        id: "low-balance",
        product: "sa",
        story: "cash runs below its 20.00 threshold: a low-balance alert; a top-up on day 15 re-arms it, and it fires again on day 74",
        expected: "good",
        account: "Low Balance,low@example.com,+8613800000003,en,Asia/Shanghai,30.00,0,20.00",
        resources: &[("lb-ppu", "sa,pay_per_use,,,,")],
        usage: ("lb-ppu", "assets_scanned", 75, 0, 79),
    },
];

/// What operators and customers do during the demo, at (day, hour local).
enum Act {
    Topup(&'static str, &'static str),
    ComplianceLock,
    EnablePayg(&'static str),
}

const ACTS: &[(i64, u32, &str, Act)] = &[
    (
        1,
        12,
        "tops-up-in-grace",
        Act::Topup("300.00", "demo-grace"),
    ),
    (
        10,
        9,
        "suspended-restored",
        Act::Topup("50.00", "demo-restore"),
    ),
    (5, 9, "compliance-locked", Act::ComplianceLock),
    (20, 9, "package-runs-out", Act::EnablePayg("pro-pkg")),
    (15, 9, "low-balance", Act::Topup("100.00", "demo-low")),
];

/// The demo's schedule: the shipped one's slotted jobs, but with enforcement hourly instead
/// of every five minutes (80 days of five-minute slots would take longer than the minute the
/// demo has). Knobs are not applied: the demo runs with its own configuration.
pub fn demo_schedule() -> Schedule {
    let shipped = Schedule::load(None).expect("the shipped schedule is valid (unit-tested)");
    let enforce = JobName::of::<EnforceSuspensions>();
    let jobs = shipped
        .jobs
        .into_iter()
        .filter(|j| j.cron().is_some())
        .map(|j| {
            if j.job.name() != enforce {
                return j;
            }
            let text = format!(
                "cron = \"10 * * * *\"\ntime_zone = {:?}\n",
                j.time_zone.name()
            );
            JobSchedule::parse(j.job, &text, "demo schedule").expect("the demo schedule is valid")
        })
        .collect();
    Schedule { jobs }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DemoError + '_ {
    move |e| DemoError::Io(path.to_path_buf(), e)
}

/// Writes the scenario's CSV files into `dir`.
fn write_inputs(dir: &Path, start: DateTime<Utc>) -> Result<[PathBuf; 3], DemoError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let paths = [
        dir.join("accounts.csv"),
        dir.join("resources.csv"),
        dir.join("usage.csv"),
    ];
    let mut accounts = String::from(
        "id,name,email,phone,locale,timezone,cash_balance,credit_quota,low_balance_threshold\n",
    );
    let mut resources = String::from(
        "id,account_id,product,billing_mode,package_quota,package_expires_at,payg_enabled,term_ends_at\n",
    );
    let mut usage =
        String::from("event_id,account_id,resource_id,meter,quantity,started_at,ended_at\n");
    for s in STORIES {
        accounts.push_str(&format!("{},{}\n", s.id, s.account));
        for (rid, rest) in s.resources {
            let (product, tail) = rest.split_once(',').unwrap_or((rest, ""));
            resources.push_str(&format!("{rid},{},{product},{tail}\n", s.id));
        }
        let (rid, meter, qty, first, last) = s.usage;
        for d in first..=last {
            let begin = start + Duration::days(d) + Duration::hours(9);
            let end = begin + Duration::minutes(qty.min(600) as i64);
            usage.push_str(&format!(
                "{}-{d},{},{rid},{meter},{qty},{},{}\n",
                s.id,
                s.id,
                begin.to_rfc3339(),
                end.to_rfc3339()
            ));
        }
    }
    for (p, text) in paths.iter().zip([accounts, resources, usage]) {
        std::fs::write(p, text).map_err(io(p))?;
    }
    Ok(paths)
}

/// A fresh database `name` next to the configured (or embedded) one.
async fn fresh_database(config: &Config, name: &str) -> Result<Db, DemoError> {
    // The demo drops the database it is given: only ever one of its own.
    if !name.starts_with("arrears_demo")
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(DemoError::Step(format!(
            "--database {name:?}: the demo's database is dropped and recreated, so its name must start with \
             arrears_demo and use lower-case letters, digits and _"
        )));
    }
    // The server of the configured database, or the embedded cluster (started on first use);
    // the demo opens neither's own database.
    let url = match &config.database.url {
        Some(url) => url.clone(),
        None => {
            let dir = config.embedded.state_dir.clone();
            tokio::task::spawn_blocking(move || crate::db::embedded::ensure_started(&dir))
                .await
                .map_err(|e| DemoError::Step(e.to_string()))?
                .map_err(DbError::from)?
                .url
        }
    };
    let demo_url = db::recreate_database(&url, name).await?;
    let admin = db::raw_connect(&db::with_database(&url, "postgres")?).await?;
    // A scratch database: commits need not wait for the disk (a crash loses the demo, never
    // corrupts it), which is most of the demo's time otherwise.
    // Raw SQL: ALTER DATABASE ... SET is DDL, which diesel's query builder does not say.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET synchronous_commit = off"
        ))
        .await?;
    let db = Db::open_url(&demo_url, 4, MigrationMode::Apply).await?;
    catalog::apply_to_new(&db, config).await?;
    Ok(db)
}

struct Progress {
    on: bool,
    total: usize,
}

impl Progress {
    fn clear(&self) {
        if self.on {
            eprint!("\r\x1b[K");
        }
    }

    fn show(&self, done: usize, day: i64) {
        if !self.on {
            return;
        }
        let width = 40;
        let filled = done * width / self.total.max(1);
        eprint!(
            "\r[{}{}] day {day:>2}/80  {done}/{} slots",
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.total
        );
        let _ = std::io::stderr().flush();
    }
}

pub async fn run(config: &Config, opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    let start: DateTime<Utc> = DateTime::parse_from_rfc3339(START)
        .expect("literal instant")
        .with_timezone(&Utc);
    let end = start + Duration::days(DAYS);
    std::fs::create_dir_all(&opts.out_dir).map_err(io(&opts.out_dir))?;
    let out_dir = std::fs::canonicalize(&opts.out_dir).map_err(io(&opts.out_dir))?;
    let notices_dir = out_dir.join("notices");
    if notices_dir.exists() {
        std::fs::remove_dir_all(&notices_dir).map_err(io(&notices_dir))?;
    }
    let cfg = demo_config(config, &notices_dir);
    let db = fresh_database(&cfg, &opts.database).await?;
    load_inputs(&db, &cfg, &out_dir.join("input"), start, end).await?;
    let channels = deliver_notifications::Channels::from_config(&cfg).map_err(DemoError::Step)?;

    let slots = demo_schedule().slots_between(start - Duration::seconds(1), end);
    let tz = cfg.billing.time_zone;
    let mut acts = scheduled_acts(start, tz).into_iter().peekable();
    let client = db.raw_client().await?;
    let mut timeline = Timeline {
        start,
        tz,
        print: opts.print,
        progress: Progress {
            on: opts.print && std::io::stderr().is_terminal(),
            total: slots.len(),
        },
        seen_event: 0,
        seen_notice: Default::default(),
        entries: Vec::new(),
    };
    for (i, (slot, job)) in slots.iter().enumerate() {
        while let Some((at, who, act)) = acts.next_if(|(at, _, _)| at <= slot) {
            let what = perform(&db, &cfg, act, who, at).await?;
            // Raw SQL: a read on the demo's raw client, which diesel does not drive.
            let state: String = client
                .query_one("SELECT state FROM accounts WHERE id = $1", &[&who])
                .await?
                .get(0);
            timeline.emit(vec![TimelineEntry {
                day: (at - start).num_days(),
                at,
                account: who.to_string(),
                event: what,
                state,
            }]);
            timeline.catch_up(&client, false).await?;
        }
        // The demo runs with its own configuration, without the schedule's knobs.
        let ctx = JobCtx {
            channels: Some(&channels),
            ..JobCtx::new(&db, &cfg)
        };
        job.run_scheduled(ctx, *slot, None).await.into_result()?;
        let delivered = deliver_due(&db, &cfg, &channels, &client, *slot).await?;
        timeline.catch_up(&client, delivered).await?;
        if i % 25 == 0 {
            timeline.progress.show(i + 1, (*slot - start).num_days());
        }
    }
    timeline.progress.clear();

    let accounts = final_accounts(&client, cfg.billing.minor_unit_digits).await?;
    // Raw SQL: a count on the demo's raw client, which diesel does not drive.
    let notices_sent: i64 = client
        .query_one("SELECT count(*) FROM notices WHERE status = 'sent'", &[])
        .await?
        .get(0);
    let tl = out_dir.join("timeline.txt");
    std::fs::write(&tl, timeline.text()).map_err(io(&tl))?;
    Ok(DemoReport {
        database_url: crate::db::redact_url(&db.url),
        out_dir,
        start,
        end,
        slots_run: slots.len(),
        notices_sent,
        all_match: accounts.iter().all(|a| a.matches),
        timeline: timeline.entries,
        accounts,
    })
}

/// The demo's configuration: `config`, travelling in time, with every notice into
/// `notices_dir` (emails as .eml, SMS into one log, no webhooks) counted as accepted.
fn demo_config(config: &Config, notices_dir: &Path) -> Config {
    let mut cfg = config.clone();
    // The demo's scratch database travels 80 days ahead of any clock.
    cfg.lifecycle.allow_future = true;
    // Its notices go to .eml files and sms.log: the story needs them to count as warnings.
    cfg.notifications.dev_channels_count_as_accepted = true;
    cfg.email.smtp_url = None;
    cfg.email.file_dir = Some(notices_dir.to_path_buf());
    cfg.sms.provider = crate::config::SmsProviderKind::Log;
    cfg.sms.log_file = Some(notices_dir.join("sms.log"));
    cfg.webhooks.products.clear();
    cfg.billing.time_zone = "Asia/Shanghai".parse().expect("a known zone");
    cfg
}

/// Writes the scenario's CSV files into `dir` and imports them, as a new user would.
async fn load_inputs(
    db: &Db,
    cfg: &Config,
    dir: &Path,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<(), DemoError> {
    let step = |e: import::ImportError| DemoError::Step(e.to_string());
    let inputs = write_inputs(dir, start)?;
    import::import_file(
        db,
        cfg,
        import::ImportKind::Accounts,
        &inputs[0],
        start,
        false,
    )
    .await
    .map_err(step)?;
    import::import_file(
        db,
        cfg,
        import::ImportKind::Resources,
        &inputs[1],
        start,
        false,
    )
    .await
    .map_err(step)?;
    import::import_file(db, cfg, import::ImportKind::Usage, &inputs[2], end, false)
        .await
        .map_err(step)?;
    Ok(())
}

/// The scenario's acts at their instants (day and local hour in `tz`), in time order.
fn scheduled_acts(
    start: DateTime<Utc>,
    tz: chrono_tz::Tz,
) -> Vec<(DateTime<Utc>, &'static str, &'static Act)> {
    let mut acts: Vec<(DateTime<Utc>, &str, &Act)> = ACTS
        .iter()
        .map(|(day, hour, who, act)| {
            let local = (start + Duration::days(*day))
                .with_timezone(&tz)
                .date_naive();
            let at = local
                .and_hms_opt(*hour, 0, 0)
                .and_then(|t| t.and_local_timezone(tz).single())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(start);
            (at, *who, act)
        })
        .collect();
    acts.sort_by_key(|(t, _, _)| *t);
    acts
}

/// Does what a customer or an operator does in the story; says what happened.
async fn perform(
    db: &Db,
    cfg: &Config,
    act: &Act,
    who: &str,
    at: DateTime<Utc>,
) -> Result<String, DemoError> {
    let step = |e: &dyn std::fmt::Display| DemoError::Step(e.to_string());
    Ok(match act {
        Act::Topup(amount, reference) => {
            let minor = crate::domain::money::parse_amount(amount, cfg.billing.minor_unit_digits)
                .map_err(|e| step(&e))?;
            let r = crate::ledger::topup(db, cfg, who, minor, reference, at, "demo:topup")
                .await
                .map_err(|e| step(&e))?;
            format!(
                "tops up {amount} (cash now {}){}",
                r.cash_balance,
                if r.restored.is_empty() {
                    String::new()
                } else {
                    format!(", restores {}", r.restored.join(", "))
                }
            )
        }
        Act::ComplianceLock => {
            let lock = OperatorAction::ComplianceLock(true);
            lifecycle::operator_action(db, cfg, who, lock, at, "demo:compliance-lock")
                .await
                .map_err(|e| step(&e))?;
            "operator: compliance lock".to_string()
        }
        Act::EnablePayg(resource) => {
            let payg = OperatorAction::EnablePayg {
                resource: resource.to_string(),
            };
            lifecycle::operator_action(db, cfg, who, payg, at, "demo:enable-payg")
                .await
                .map_err(|e| step(&e))?;
            format!("operator: pay-as-you-go on for {resource}")
        }
    })
}

/// Delivers what a slot queued, at the slot's instant: accepted notices are facts (R2's
/// grace clock, R9's warnings). Returns whether anything was due.
async fn deliver_due(
    db: &Db,
    cfg: &Config,
    channels: &deliver_notifications::Channels,
    client: &tokio_postgres::Client,
    slot: DateTime<Utc>,
) -> Result<bool, DemoError> {
    // Raw SQL: a typed one-round-trip probe on the demo's raw client, which diesel does not drive.
    let pending: bool = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM notices WHERE queued AND status <> 'sending' AND next_attempt_at <= $1)",
            &[(&slot, Type::TIMESTAMPTZ)],
        )
        .await?
        .get(0);
    if pending {
        let opts = deliver_notifications::Options {
            as_of: slot,
            dry_run: false,
            max_batches: 10,
        };
        deliver_notifications::run(db, cfg, channels, &opts).await?;
    }
    Ok(pending)
}

/// Where each story's account ended, against the state it declares.
async fn final_accounts(
    client: &tokio_postgres::Client,
    digits: u32,
) -> Result<Vec<AccountOutcome>, DemoError> {
    let mut accounts = Vec::new();
    for s in STORIES {
        // Raw SQL: reads on the demo's raw client, which diesel does not drive.
        let row = client
            .query_one(
                "SELECT state, cash_balance FROM accounts WHERE id = $1",
                &[&s.id],
            )
            .await?;
        let (state, cash): (String, i64) = (row.get(0), row.get(1));
        let resources = client
            .query(
                "SELECT id, state, coalesce(state_reason, '') FROM resources WHERE account_id = $1 ORDER BY id",
                &[&s.id],
            )
            .await?
            .iter()
            .map(|r| {
                let (id, st, why): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                if why.is_empty() {
                    format!("{id}={st}")
                } else {
                    format!("{id}={st}({why})")
                }
            })
            .collect();
        accounts.push(AccountOutcome {
            account: s.id.to_string(),
            product: s.product,
            story: s.story,
            expected_state: s.expected,
            matches: state == s.expected,
            final_state: state,
            resources,
            cash_balance: format_scaled(cash, digits),
        });
    }
    Ok(accounts)
}

/// The story as it happens: printed (when asked) and kept for the report and timeline.txt.
struct Timeline {
    start: DateTime<Utc>,
    tz: chrono_tz::Tz,
    print: bool,
    progress: Progress,
    /// The last lifecycle event and the notices already on the timeline.
    seen_event: i64,
    seen_notice: std::collections::HashSet<i64>,
    entries: Vec<TimelineEntry>,
}

impl Timeline {
    fn emit(&mut self, entries: Vec<TimelineEntry>) {
        for e in entries {
            if self.print {
                self.progress.clear();
                println!(
                    "day {:>2}  {}  {:<19} {:<18} {}",
                    e.day,
                    e.at.with_timezone(&self.tz).format("%m-%d %H:%M"),
                    e.account,
                    e.state,
                    e.event
                );
            }
            self.entries.push(e);
        }
    }

    /// Adds what changed since the last call (notices only after a delivery).
    async fn catch_up(
        &mut self,
        client: &tokio_postgres::Client,
        delivered: bool,
    ) -> Result<(), DemoError> {
        let new = changes(
            client,
            self.start,
            &mut self.seen_event,
            &mut self.seen_notice,
            delivered,
        )
        .await?;
        self.emit(new);
        Ok(())
    }

    /// timeline.txt: the whole timeline with full dates.
    fn text(&self) -> String {
        let mut text = String::new();
        for e in &self.entries {
            text.push_str(&format!(
                "day {:>2}  {}  {:<19} {:<18} {}\n",
                e.day,
                e.at.with_timezone(&self.tz).format("%Y-%m-%d %H:%M"),
                e.account,
                e.state,
                e.event
            ));
        }
        text
    }
}

/// Lifecycle events and accepted notices since the last call, as timeline entries.
async fn changes(
    client: &tokio_postgres::Client,
    start: DateTime<Utc>,
    seen_event: &mut i64,
    seen_notice: &mut std::collections::HashSet<i64>,
    delivered: bool,
) -> Result<Vec<TimelineEntry>, DemoError> {
    let mut out = Vec::new();
    // Raw SQL: a typed one-round-trip read on the demo's raw client, which diesel does not drive.
    for r in client
        .query_typed(
            "SELECT id, account_id, resource_id, from_state, to_state, reason, occurred_at
             FROM lifecycle_events WHERE id > $1 ORDER BY id",
            &[(seen_event, Type::INT8)],
        )
        .await?
    {
        *seen_event = r.get(0);
        let resource: Option<String> = r.get(2);
        let (from, to, reason): (String, String, String) = (r.get(3), r.get(4), r.get(5));
        let at: DateTime<Utc> = r.get(6);
        out.push(TimelineEntry {
            day: (at - start).num_days(),
            at,
            account: r.get(1),
            event: match resource {
                Some(res) => format!("{res}: {from} -> {to} ({reason})"),
                None => format!("{from} -> {to} ({reason})"),
            },
            state: to,
        });
    }
    if !delivered {
        return Ok(out);
    }
    // Raw SQL: a read on the demo's raw client, which diesel does not drive.
    for r in client
        .query(
            "SELECT n.id, n.account_id, n.kind, n.channel, n.accepted_at, a.state
             FROM notices n JOIN accounts a ON a.id = n.account_id
             WHERE n.status = 'sent' AND n.channel <> 'webhook' AND n.id <> ALL($1) ORDER BY n.accepted_at, n.id",
            &[&seen_notice.iter().copied().collect::<Vec<i64>>()],
        )
        .await?
    {
        seen_notice.insert(r.get(0));
        let at: DateTime<Utc> = r.get::<_, Option<DateTime<Utc>>>(4).unwrap_or(start);
        let (kind, channel): (String, String) = (r.get(2), r.get(3));
        out.push(TimelineEntry {
            day: (at - start).num_days(),
            at,
            account: r.get(1),
            event: format!("notice {kind} sent by {channel}"),
            state: r.get(5),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_urls_carry_no_password() {
        assert_eq!(
            crate::db::redact_url("postgres://arrears:s3cret@db:5432/arrears_demo"),
            "postgres://arrears:***@db:5432/arrears_demo"
        );
        assert_eq!(
            crate::db::redact_url("postgres://arrears@127.0.0.1:5432/arrears_demo"),
            "postgres://arrears@127.0.0.1:5432/arrears_demo"
        );
        assert_eq!(
            crate::db::split_password("postgres://u:p%40ss@h:5432/d"),
            (
                "postgres://u@h:5432/d".to_string(),
                Some("p@ss".to_string())
            )
        );
        assert_eq!(
            crate::db::split_password("postgres://u@h/d"),
            ("postgres://u@h/d".to_string(), None)
        );
    }

    #[test]
    fn every_story_declares_a_known_final_state_and_a_priced_meter() {
        let config = Config::from_toml(crate::config::EXAMPLE_CONFIG, "test", &[]).unwrap();
        for s in STORIES {
            assert!(
                crate::domain::lifecycle::AccountState::parse(s.expected).is_some(),
                "{}",
                s.id
            );
            let product = &config.products[s.product];
            assert!(
                product.price(s.usage.1).is_some(),
                "{}: {}",
                s.id,
                s.usage.1
            );
        }
    }
}
