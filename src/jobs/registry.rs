//! The `Job` trait every job implements, and what the one registration list (`jobs!` in
//! jobs/mod.rs) gives the CLI, the schedule, the service, `simulate` and `demo`: each job's
//! name, its shipped schedule, its own knobs, its typed options and report, and how a run of
//! it ended (`Outcome`). Modelled on crates.io's `BackgroundJob` + `register_job_type` and
//! omicron's `BackgroundTask` + one `TaskDefinition` list with per-task config.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Config;
use crate::db::Db;
use crate::jobs::{JobError, JOBS};
use crate::notify::Channels;

/// A job's one name: its file in `src/jobs/` and `jobs/`, `arrears run NAME`, the `job` log
/// field and metric label, and `job_runs.job`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct JobName(&'static str);

impl JobName {
    pub const fn of<J: Job>() -> JobName {
        JobName(J::NAME)
    }

    /// The registered job called `name`.
    pub fn parse(name: &str) -> Option<JobName> {
        find(name).map(|j| j.name())
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The registered job called `name`.
pub fn find(name: &str) -> Option<&'static dyn DynJob> {
    JOBS.iter().copied().find(|j| j.name().as_str() == name)
}

/// Every registered name, in registration order (for `arrears run`'s possible values and
/// messages).
pub fn names() -> impl Iterator<Item = &'static str> {
    JOBS.iter().map(|j| j.name().as_str())
}

/// How a job is scheduled, which its schedule file must agree with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// In the slots of its `cron` expression; its file's `catch_up` says what happens to
    /// missed slots.
    InSlots,
    /// In every slot of its `cron` expression: missed slots are each caught up, oldest first
    /// (its file must say `catch_up = "every"`), for the reason given.
    InEverySlot { why: &'static str },
    /// Continuously, every `every_seconds` on every instance: it claims its work items one
    /// by one, so it has no slots.
    Continuously,
}

/// When `arrears simulate` runs a job (the simulation's own cadence, not the schedule's: an
/// hour is its finest step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Simulated {
    pub at: SimulatedAt,
    /// Jobs due at one instant run in this order, lowest first: a job runs after the jobs
    /// whose output it reads (bills, then alerts, their delivery, suspension, release).
    pub order: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimulatedAt {
    /// At the start of every billing day (`billing.time_zone`).
    BillingDayStart,
    /// At every whole UTC hour.
    EveryHour,
}

/// A job's knobs: the `[knobs]` table of its `jobs/NAME.toml`, given to `Job::options` and
/// written over the configuration of its runs (`apply`) where a knob overrides a setting.
/// Derive `Deserialize` with `#[serde(deny_unknown_fields)]`, so that a knob the job does not
/// have is an error naming the file and key, never silently ignored.
pub trait Knobs: DeserializeOwned + Default + fmt::Debug + Send + Sync + 'static {
    /// What serde cannot check (a size of 0): the knob and why.
    fn check(&self) -> Result<(), (&'static str, String)> {
        Ok(())
    }
    /// Writes the knobs that override a setting over `config`.
    fn apply(&self, config: &mut Config) {
        let _ = config;
    }
}

/// The knobs of a job that has none: its `[knobs]` table, if any, must be empty.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoKnobs {}

impl Knobs for NoKnobs {}

/// `Knobs::check` for a size: absent, or at least 1.
pub fn at_least_one(knob: &'static str, v: Option<usize>) -> Result<(), (&'static str, String)> {
    match v {
        Some(0) => Err((knob, "sizes must be at least 1".into())),
        _ => Ok(()),
    }
}

/// The knobs of the lifecycle jobs (send_alerts, enforce_suspensions, release_resources).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleKnobs {
    /// Due accounts per transaction (overrides `lifecycle.batch_size`).
    pub batch_size: Option<usize>,
    /// The most due accounts one run decides on (`lifecycle.enforce_max_accounts`).
    pub max_accounts: Option<usize>,
}

impl Knobs for LifecycleKnobs {
    fn check(&self) -> Result<(), (&'static str, String)> {
        at_least_one("batch_size", self.batch_size)?;
        at_least_one("max_accounts", self.max_accounts)
    }

    fn apply(&self, config: &mut Config) {
        if let Some(n) = self.batch_size {
            config.lifecycle.batch_size = n;
        }
        if let Some(n) = self.max_accounts {
            config.lifecycle.enforce_max_accounts = n;
        }
    }
}

/// A job's knobs, parsed and checked, whatever the job (what `JobSchedule` keeps).
#[derive(Debug, Clone)]
pub struct JobKnobs(Arc<dyn AnyKnobs>);

trait AnyKnobs: fmt::Debug + Send + Sync {
    fn apply(&self, config: &mut Config);
    fn as_any(&self) -> &dyn Any;
}

impl<K: Knobs> AnyKnobs for K {
    fn apply(&self, config: &mut Config) {
        Knobs::apply(self, config)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl JobKnobs {
    /// The configuration a run of the job uses: `config` with these knobs written over it.
    pub fn apply(&self, config: &Config) -> Config {
        let mut c = config.clone();
        self.0.apply(&mut c);
        c
    }

    /// The typed knobs, when they are a `K`.
    pub fn get<K: Knobs>(&self) -> Option<&K> {
        self.0.as_any().downcast_ref()
    }
}

/// What a run is given, whoever starts it: `arrears run` from its flags, the service, the
/// demo and the simulation from the slot they run. Each job takes what applies to it into
/// its own `Options`.
#[derive(Debug, Clone)]
pub struct RunArgs {
    /// The instant the run acts at.
    pub as_of: DateTime<Utc>,
    /// The slot the run claims: the schedule's instant (the CLI: the latest at `as_of`), or
    /// the recorded slot of an open run being resumed.
    pub slot: DateTime<Utc>,
    /// `slot` is an open run's, resumed at a later `as_of` (billing then bills that slot's day).
    pub resuming: bool,
    /// Print the plan and change nothing.
    pub dry_run: bool,
    /// Run a slot that already finished.
    pub force: bool,
    /// generate_bills: the billing day (`--day`).
    pub day: Option<NaiveDate>,
    /// release_resources: release more than the safety fraction (`--allow-mass-release`).
    pub allow_mass_release: bool,
    /// A continuous job's bound on one pass, in batches; none: the job's own.
    pub max_batches: Option<usize>,
}

impl RunArgs {
    /// A scheduled run at `at` (not a dry run, not forced), in its own slot or resuming the
    /// open slot `resume`.
    pub fn scheduled(at: DateTime<Utc>, resume: Option<DateTime<Utc>>) -> RunArgs {
        RunArgs {
            as_of: at,
            slot: resume.unwrap_or(at),
            resuming: resume.is_some(),
            dry_run: false,
            force: false,
            day: None,
            allow_mass_release: false,
            max_batches: None,
        }
    }
}

/// What every run works with. The notification channels are built once by a caller that
/// runs many slots (the service, the simulation); a job that needs them builds its own
/// otherwise.
#[derive(Clone, Copy)]
pub struct JobCtx<'a> {
    pub db: &'a Db,
    /// The configuration, before the job's knobs (the registration writes them over it).
    pub config: &'a Config,
    pub channels: Option<&'a Channels>,
    /// The job's knobs from its schedule file; none: its defaults (the simulation, the demo).
    pub knobs: Option<&'a JobKnobs>,
}

impl<'a> JobCtx<'a> {
    pub fn new(db: &'a Db, config: &'a Config) -> JobCtx<'a> {
        JobCtx {
            db,
            config,
            channels: None,
            knobs: None,
        }
    }
}

/// Why a slotted run did nothing, as its report records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// The slot had already finished.
    AlreadyRan,
    /// Another live runner holds the slot: not done here.
    HeldElsewhere { owner: String, why: String },
}

impl Skipped {
    /// From a slotted report's `skipped` (why) and `held_by` (who holds the slot).
    pub fn from_report(skipped: &Option<String>, held_by: &Option<String>) -> Option<Skipped> {
        match (skipped, held_by) {
            (Some(why), Some(owner)) => Some(Skipped::HeldElsewhere {
                owner: owner.clone(),
                why: why.clone(),
            }),
            (Some(_), None) => Some(Skipped::AlreadyRan),
            (None, _) => None,
        }
    }
}

/// What a run that is done did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Did {
    /// It ran.
    Ran,
    /// It ran and found nothing to do (a continuous job's idle pass: neither logged nor
    /// counted).
    Idle,
    /// Its slot had already run: nothing was run.
    AlreadyRan,
}

/// How one run of a job ended.
#[derive(Debug)]
pub enum Outcome {
    /// Done: the job ran, or its slot had already run; its report.
    Done { report: serde_json::Value, did: Did },
    /// Another live runner holds the slot: nothing was done and the slot is not done yet
    /// (`arrears run` exits 75; the service tries again later).
    HeldElsewhere {
        report: serde_json::Value,
        owner: String,
        why: String,
    },
    /// Refused before it did anything: the input is wrong (a billing day not yet ended, days
    /// out of order, clocks too far apart).
    Refused(String),
    /// Failed, or stopped between batches (`JobError::Interrupted`, `LeaseLost`): the slot
    /// is resumed.
    Failed(JobError),
}

impl Outcome {
    /// The outcome label of the job-run metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Done {
                did: Did::Ran | Did::Idle,
                ..
            } => "succeeded",
            Outcome::Done {
                did: Did::AlreadyRan,
                ..
            } => "skipped",
            Outcome::HeldElsewhere { .. } => "busy",
            Outcome::Failed(JobError::Interrupted | JobError::LeaseLost) => "interrupted",
            Outcome::Refused(_) | Outcome::Failed(_) => "failed",
        }
    }

    /// The report when the job ran or was skipped, the error when it was refused or failed.
    pub fn into_result(self) -> Result<serde_json::Value, JobError> {
        match self {
            Outcome::Done { report, .. } | Outcome::HeldElsewhere { report, .. } => Ok(report),
            Outcome::Refused(why) => Err(JobError::Refused(why)),
            Outcome::Failed(e) => Err(e),
        }
    }
}

/// A job: one file in `src/jobs/`, registered by one line in `jobs!` (jobs/mod.rs).
pub trait Job: Send + Sync + 'static {
    /// Its snake_case name (the module's name: `jobs!` checks it).
    const NAME: &'static str;
    /// Its shipped schedule, `include_str!("../../jobs/NAME.toml")` (operators override it
    /// with a file of the same name in `service.jobs_dir`).
    const SCHEDULE: &'static str;
    const RUNS: Runs = Runs::InSlots;
    const SIMULATED: Simulated;
    /// Whether the service runs `help` on every tick (work of any instance's runs that every
    /// instance can take a share of).
    const HELPS: bool = false;

    type Options: Send + Sync;
    type Knobs: Knobs;
    type Report: Serialize + Send;

    /// Its options for one run (`config` has its knobs applied).
    fn options(args: &RunArgs, config: &Config, knobs: &Self::Knobs) -> Self::Options;

    /// Runs once (a slotted job claims `slot` unless it is a dry run); `ctx.config` has its
    /// knobs applied.
    fn run(
        ctx: JobCtx<'_>,
        opts: &Self::Options,
        slot: DateTime<Utc>,
    ) -> impl Future<Output = Result<Self::Report, JobError>> + Send;

    /// Whether the report says the run did nothing, and why.
    fn skipped(report: &Self::Report) -> Option<Skipped>;

    /// Whether the run found nothing to do (what a continuous job's idle pass reports).
    fn idle(report: &Self::Report) -> bool {
        let _ = report;
        false
    }

    /// See `HELPS`.
    fn help(ctx: JobCtx<'_>) -> impl Future<Output = Result<(), JobError>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A registered job, whatever its type: what the registration list holds.
pub trait DynJob: Send + Sync + 'static {
    fn name(&self) -> JobName;
    fn schedule_text(&self) -> &'static str;
    fn runs(&self) -> Runs;
    fn simulated(&self) -> Simulated;
    fn helps(&self) -> bool;
    /// Parses and checks its `[knobs]` table (absent: the defaults); the error names the key.
    fn knobs(&self, table: Option<toml::Value>) -> Result<JobKnobs, String>;
    fn run<'a>(&'a self, ctx: JobCtx<'a>, args: &'a RunArgs) -> BoxFuture<'a, Outcome>;
    fn help<'a>(&'a self, ctx: JobCtx<'a>) -> BoxFuture<'a, Result<(), JobError>>;
}

impl fmt::Debug for dyn DynJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().as_str())
    }
}

impl dyn DynJob {
    /// Runs a scheduled slot: at `at`, in its own slot or resuming the open slot `resume`.
    pub async fn run_scheduled(
        &self,
        ctx: JobCtx<'_>,
        at: DateTime<Utc>,
        resume: Option<DateTime<Utc>>,
    ) -> Outcome {
        self.run(ctx, &RunArgs::scheduled(at, resume)).await
    }
}

/// The registration of job `J` (what a line of `jobs!` makes).
pub struct Registered<J>(PhantomData<fn() -> J>);

impl<J> Registered<J> {
    pub const NEW: Registered<J> = Registered(PhantomData);
}

impl<J: Job> DynJob for Registered<J> {
    fn name(&self) -> JobName {
        JobName::of::<J>()
    }

    fn schedule_text(&self) -> &'static str {
        J::SCHEDULE
    }

    fn runs(&self) -> Runs {
        J::RUNS
    }

    fn simulated(&self) -> Simulated {
        J::SIMULATED
    }

    fn helps(&self) -> bool {
        J::HELPS
    }

    fn knobs(&self, table: Option<toml::Value>) -> Result<JobKnobs, String> {
        let knobs: J::Knobs = match table {
            None => J::Knobs::default(),
            Some(t) => serde_path_to_error::deserialize(t).map_err(|e| {
                let path = e.path().to_string();
                let key = if path == "." {
                    "knobs".to_string()
                } else {
                    format!("knobs.{path}")
                };
                format!(
                    "key `{key}`: {} (knobs of {})",
                    e.inner().message(),
                    J::NAME
                )
            })?,
        };
        knobs
            .check()
            .map_err(|(knob, why)| format!("key `knobs.{knob}`: {why}"))?;
        Ok(JobKnobs(Arc::new(knobs)))
    }

    fn run<'a>(&'a self, ctx: JobCtx<'a>, args: &'a RunArgs) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let defaults = J::Knobs::default();
            let knobs = ctx.knobs.and_then(|k| k.get()).unwrap_or(&defaults);
            let config = with_knobs(ctx.config, knobs);
            let ctx = JobCtx {
                config: &config,
                ..ctx
            };
            let opts = J::options(args, &config, knobs);
            let report = match J::run(ctx, &opts, args.slot).await {
                Ok(r) => r,
                Err(JobError::Refused(why)) => return Outcome::Refused(why),
                Err(e) => return Outcome::Failed(e),
            };
            let (skipped, idle) = (J::skipped(&report), J::idle(&report));
            let report = match serde_json::to_value(&report) {
                Ok(v) => v,
                Err(e) => return Outcome::Failed(JobError::Report(e)),
            };
            match skipped {
                Some(Skipped::HeldElsewhere { owner, why }) => {
                    Outcome::HeldElsewhere { report, owner, why }
                }
                Some(Skipped::AlreadyRan) => Outcome::Done {
                    report,
                    did: Did::AlreadyRan,
                },
                None => Outcome::Done {
                    report,
                    did: if idle { Did::Idle } else { Did::Ran },
                },
            }
        })
    }

    fn help<'a>(&'a self, ctx: JobCtx<'a>) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let defaults = J::Knobs::default();
            let knobs = ctx.knobs.and_then(|k| k.get()).unwrap_or(&defaults);
            let config = with_knobs(ctx.config, knobs);
            J::help(JobCtx {
                config: &config,
                ..ctx
            })
            .await
        })
    }
}

/// `config` with `knobs` written over it.
fn with_knobs<K: Knobs>(config: &Config, knobs: &K) -> Config {
    let mut c = config.clone();
    knobs.apply(&mut c);
    c
}

/// Whether two names are the same, at compile time (`jobs!` checks each job's name against
/// its module's).
pub const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
