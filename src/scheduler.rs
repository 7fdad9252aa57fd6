//! The schedule: one TOML file per job in `jobs/` (cron expression, time zone, enabled,
//! catch-up policy, knobs), the slots it yields, and which slots are due. This is the only
//! module that decides when a job runs; the service asks it, with the clock as an input.
//!
//! Cron expressions are evaluated here rather than by tokio-cron-scheduler: that crate keeps
//! its own in-memory timers (no catch-up, no coordination between instances, overlapping runs
//! of one job, jobs with a time zone an hour off after a DST change), so the service would
//! have to second-guess every tick it fires. A slot's identity is instead computed from the
//! expression and the job's time zone, and its claim lives in PostgreSQL (`jobs::claim_slot`).
//!
//! DST, as Vixie cron: a time of day that a spring-forward skips runs once, at the first
//! instant after the gap; a time of day that an autumn change repeats runs once, at its first
//! occurrence. Expressions with `*` in the hour field (hourly jobs) run at every real instant
//! that matches: none in the skipped hour, both in the repeated one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::jobs::{DynJob, JobKnobs, JobName, Runs, JOBS};

/// Days a schedule search looks ahead before it concludes an expression never matches
/// (`0 0 30 2 *`).
const SEARCH_DAYS: i64 = 366 * 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ScheduleError {
    pub origin: String,
    pub message: String,
}

// ------------------------------------------------------------------------------------------
// Cron expressions

/// A five-field cron expression: minute hour day-of-month month day-of-week.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Day of month or day of week starts with `*`: both must match (Vixie cron); when
    /// neither does, either may.
    days_any: bool,
    weekdays_any: bool,
    /// `*` (or `*/n`) in the minute or hour field: a wildcard job, which follows real time
    /// across DST changes (see the module comment).
    hourly: bool,
}

const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn field_value(s: &str, name: &str, min: u32, max: u32, names: &[&str]) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u32 + min);
    }
    let v: u32 = s
        .parse()
        .map_err(|_| format!("{name}: {s:?} is not a number"))?;
    if v < min || v > max {
        return Err(format!("{name}: {v} is outside {min}-{max}"));
    }
    Ok(v)
}

/// Parses one field into a bit set; `true` with it when the field is a plain `*`-based one.
fn parse_field(
    text: &str,
    name: &str,
    min: u32,
    max: u32,
    names: &[&str],
) -> Result<(u64, bool), String> {
    let mut bits = 0u64;
    let mut star = false;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("{name}: step {s:?} is not a number"))?;
                if step == 0 || step > max {
                    return Err(format!("{name}: step must be between 1 and {max}"));
                }
                (r, step)
            }
            None => (item, 1),
        };
        let (lo, hi) = if range == "*" {
            star = true;
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (
                field_value(a, name, min, max, names)?,
                field_value(b, name, min, max, names)?,
            );
            if a > b {
                return Err(format!("{name}: range {range:?} runs backwards"));
            }
            (a, b)
        } else {
            let a = field_value(range, name, min, max, names)?;
            (a, if item.contains('/') { max } else { a })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, star))
}

impl Cron {
    pub fn parse(text: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{text:?}: expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            ));
        }
        let (minutes, _) = parse_field(fields[0], "minute", 0, 59, &[])?;
        let (hours, _) = parse_field(fields[1], "hour", 0, 23, &[])?;
        let (days, _) = parse_field(fields[2], "day-of-month", 1, 31, &[])?;
        let (months, _) = parse_field(fields[3], "month", 1, 12, MONTHS)?;
        // 7 is Sunday as well as 0.
        let (mut weekdays, _) = parse_field(fields[4], "day-of-week", 0, 7, WEEKDAYS)?;
        let hourly = fields[0].starts_with('*') || fields[1].starts_with('*');
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        Ok(Cron {
            text: fields.join(" "),
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays as u8,
            days_any: fields[2].starts_with('*'),
            weekdays_any: fields[4].starts_with('*'),
            hourly,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn matches_day(&self, d: NaiveDate) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().num_days_from_sunday()) != 0;
        if self.days_any || self.weekdays_any {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The instants of one local day, in order, with the DST rules of the module comment.
    fn day_instants(&self, tz: Tz, d: NaiveDate) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        if !self.matches_day(d) {
            return out;
        }
        for h in 0..24u32 {
            if self.hours & (1 << h) == 0 {
                continue;
            }
            for m in 0..60u32 {
                if self.minutes & (1 << m) == 0 {
                    continue;
                }
                let Some(local) = d.and_hms_opt(h, m, 0) else {
                    continue;
                };
                match tz.from_local_datetime(&local) {
                    LocalResult::Single(t) => out.push(t.with_timezone(&Utc)),
                    LocalResult::Ambiguous(first, second) => {
                        out.push(first.with_timezone(&Utc));
                        if self.hourly {
                            out.push(second.with_timezone(&Utc));
                        }
                    }
                    LocalResult::None => {
                        if !self.hourly {
                            if let Some(t) = first_after_gap(tz, local) {
                                out.push(t);
                            }
                        }
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Every instant in `(after, until]`, oldest first, at most `limit` of them.
    pub fn between(
        &self,
        tz: Tz,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        if until <= after {
            return out;
        }
        let first = after.with_timezone(&tz).date_naive() - Duration::days(1);
        let last = until.with_timezone(&tz).date_naive() + Duration::days(1);
        let mut d = first;
        while d <= last && out.len() < limit {
            for t in self.day_instants(tz, d) {
                if t > after && t <= until && out.len() < limit {
                    out.push(t);
                }
            }
            d += Duration::days(1);
        }
        out
    }

    /// The first instant after `after`, if the expression ever matches.
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut d = after.with_timezone(&tz).date_naive() - Duration::days(1);
        let end = d + Duration::days(SEARCH_DAYS);
        while d <= end {
            if let Some(t) = self.day_instants(tz, d).into_iter().find(|t| *t > after) {
                return Some(t);
            }
            d += Duration::days(1);
        }
        None
    }

    /// The latest instant at or before `at`.
    pub fn latest_at_or_before(&self, tz: Tz, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut d = at.with_timezone(&tz).date_naive() + Duration::days(1);
        let end = d - Duration::days(SEARCH_DAYS);
        while d >= end {
            if let Some(t) = self
                .day_instants(tz, d)
                .into_iter()
                .rev()
                .find(|t| *t <= at)
            {
                return Some(t);
            }
            d -= Duration::days(1);
        }
        None
    }
}

/// The first real instant after a local time that a spring-forward skipped.
fn first_after_gap(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    (1..=24 * 60).find_map(|k| {
        tz.from_local_datetime(&(local + Duration::minutes(k)))
            .earliest()
            .map(|t| t.with_timezone(&Utc))
    })
}

// ------------------------------------------------------------------------------------------
// The clock

/// The service's clock: the wall clock, or a simulated one that starts at an instant and runs
/// `speed` times faster (how tests and demos drive the real service through days of slots).
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    Wall,
    Simulated {
        start: DateTime<Utc>,
        started: std::time::Instant,
        speed: u32,
    },
}

impl Clock {
    pub fn simulated(start: DateTime<Utc>, speed: u32) -> Clock {
        Clock::Simulated {
            start,
            started: std::time::Instant::now(),
            speed: speed.max(1),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match *self {
            Clock::Wall => Utc::now(),
            Clock::Simulated {
                start,
                started,
                speed,
            } => {
                let real = started.elapsed();
                let ms = real.as_millis().saturating_mul(speed as u128);
                start + Duration::milliseconds(ms.min(i64::MAX as u128) as i64)
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Schedule files

/// What happens to slots missed while no instance ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Run every missed slot, oldest first (daily billing: each missed day gets its bill).
    Every,
    /// Collapse missed slots into the latest one (level-triggered jobs).
    Latest,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    cron: Option<String>,
    every_seconds: Option<u64>,
    time_zone: String,
    #[serde(default = "yes")]
    enabled: bool,
    catch_up: Option<CatchUp>,
    max_catch_up: Option<usize>,
    /// The job's own knobs, read by the job (`Job::Knobs`).
    knobs: Option<toml::Value>,
}

fn yes() -> bool {
    true
}

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cadence {
    /// Slots from a cron expression in a time zone; each slot runs once.
    Cron { cron: Cron, catch_up: CatchUp },
    /// A continuous dispatcher that polls this often; it has no slots (its work items are
    /// claimed one by one).
    Every(std::time::Duration),
}

#[derive(Debug, Clone)]
pub struct JobSchedule {
    pub job: &'static dyn DynJob,
    pub cadence: Cadence,
    pub time_zone: Tz,
    pub enabled: bool,
    /// The most slots one catch-up runs; beyond it the oldest are skipped, loudly.
    pub max_catch_up: usize,
    /// Its knobs, given to its runs (`JobCtx::knobs`).
    pub knobs: JobKnobs,
    /// Where it came from, for messages.
    pub origin: String,
}

/// Every job's schedule, in the order the service looks at them.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub jobs: Vec<JobSchedule>,
}

impl JobSchedule {
    /// Reads `job`'s schedule file `text` (from `origin`): the cadence its kind of job allows
    /// (`Job::RUNS`), and its own knobs (`Job::Knobs`: a key it does not know is an error).
    pub fn parse(
        job: &'static dyn DynJob,
        text: &str,
        origin: &str,
    ) -> Result<JobSchedule, ScheduleError> {
        let err = |message: String| ScheduleError {
            origin: origin.to_string(),
            message,
        };
        let raw: RawJob =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
                let key = e.path().to_string();
                err(if key == "." || key.is_empty() {
                    e.inner().message().to_string()
                } else {
                    format!("key `{key}`: {}", e.inner().message())
                })
            })?;
        let time_zone: Tz = raw.time_zone.parse().map_err(|_| {
            err(format!(
                "key `time_zone`: unknown time zone {:?}",
                raw.time_zone
            ))
        })?;
        let cadence = cadence(job, raw.cron, raw.every_seconds, raw.catch_up).map_err(err)?;
        let max_catch_up = raw.max_catch_up.unwrap_or(100);
        if max_catch_up == 0 {
            return Err(err("key `max_catch_up`: must be at least 1".into()));
        }
        let knobs = job.knobs(raw.knobs).map_err(err)?;
        Ok(JobSchedule {
            job,
            cadence,
            time_zone,
            enabled: raw.enabled,
            max_catch_up,
            knobs,
            origin: origin.to_string(),
        })
    }

    pub fn cron(&self) -> Option<&Cron> {
        match &self.cadence {
            Cadence::Cron { cron, .. } => Some(cron),
            Cadence::Every(_) => None,
        }
    }

    /// The next `count` slots after `from` (none for a continuous job).
    pub fn next_slots(&self, from: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let Some(cron) = self.cron() else {
            return Vec::new();
        };
        std::iter::successors(cron.next_after(self.time_zone, from), |t| {
            cron.next_after(self.time_zone, *t)
        })
        .take(count)
        .collect()
    }

    /// The slot a run at `at` belongs to: the latest scheduled instant at or before it.
    pub fn slot_at(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron()?.latest_at_or_before(self.time_zone, at)
    }

    /// The slots due at `now` when the last slot the schedule handed out was `last` (none:
    /// a first start runs only the latest slot). Missed slots beyond `max_catch_up` are
    /// dropped, oldest first; `Latest` collapses what is left into one.
    pub fn due(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Due {
        let Cadence::Cron { cron, catch_up } = &self.cadence else {
            return Due::default();
        };
        let Some(latest) = cron.latest_at_or_before(self.time_zone, now) else {
            return Due::default();
        };
        let Some(last) = last else {
            return Due {
                slots: vec![latest],
                missed: 0,
                dropped: 0,
            };
        };
        if latest <= last {
            return Due::default();
        }
        // Count first (cheaply bounded), then keep the newest max_catch_up.
        let bound = self.max_catch_up.saturating_mul(4).max(10_000);
        let mut all = cron.between(self.time_zone, last, now, bound);
        let total = all.len();
        let capped = total.saturating_sub(self.max_catch_up);
        all.drain(..capped);
        match catch_up {
            CatchUp::Every => Due {
                slots: all,
                missed: total.saturating_sub(1),
                dropped: capped,
            },
            CatchUp::Latest => Due {
                slots: vec![latest],
                missed: total - 1,
                dropped: 0,
            },
        }
    }
}

/// A schedule file's cadence keys, checked against how `job` runs.
fn cadence(
    job: &'static dyn DynJob,
    cron: Option<String>,
    every_seconds: Option<u64>,
    catch_up: Option<CatchUp>,
) -> Result<Cadence, String> {
    let name = job.name();
    let cadence = match (cron, every_seconds) {
        (Some(c), None) => Cadence::Cron {
            cron: Cron::parse(&c).map_err(|m| format!("key `cron`: {m}"))?,
            catch_up: catch_up.unwrap_or(CatchUp::Latest),
        },
        (None, Some(0)) => return Err("key `every_seconds`: must be at least 1".into()),
        (None, Some(s)) => {
            if job.runs() != Runs::Continuously {
                let continuous: Vec<&str> = JOBS
                    .iter()
                    .filter(|j| j.runs() == Runs::Continuously)
                    .map(|j| j.name().as_str())
                    .collect();
                return Err(format!(
                    "key `every_seconds`: only {} {} continuously; {name} needs `cron`",
                    continuous.join(" and "),
                    if continuous.len() == 1 { "runs" } else { "run" },
                ));
            }
            Cadence::Every(std::time::Duration::from_secs(s))
        }
        (Some(_), Some(_)) => return Err("give either `cron` or `every_seconds`, not both".into()),
        (None, None) => return Err("key `cron`: missing".into()),
    };
    match (job.runs(), &cadence) {
        (Runs::Continuously, Cadence::Cron { .. }) => Err(format!(
            "{name} is a continuous dispatcher: give `every_seconds`"
        )),
        (
            Runs::InEverySlot { why },
            Cadence::Cron {
                catch_up: CatchUp::Latest,
                ..
            },
        ) => Err(format!("key `catch_up`: {name} must be \"every\" ({why})")),
        _ => Ok(cadence),
    }
}

/// The `*.toml` files of a schedule folder, by job name, in name order.
fn schedule_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ScheduleError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ScheduleError {
        origin: dir.display().to_string(),
        message: format!("cannot read the schedule folder: {e}"),
    })?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .filter_map(|path| {
            let stem = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".toml"))?
                .to_string();
            Some((stem, path))
        })
        .collect())
}

/// What `JobSchedule::due` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// The slots to run, oldest first.
    pub slots: Vec<DateTime<Utc>>,
    /// Slots since the last one that were not on time (collapsed or caught up).
    pub missed: usize,
    /// Missed slots skipped by the catch-up cap.
    pub dropped: usize,
}

impl Schedule {
    /// The schedule every registered job ships with (`Job::SCHEDULE`, compiled in), with
    /// each file of `dir` (when given) replacing its job's. Unknown files in `dir` are an
    /// error: a typo must not silently disable a job.
    pub fn load(dir: Option<&Path>) -> Result<Schedule, ScheduleError> {
        // name -> (text, origin)
        let mut texts: BTreeMap<&'static str, (String, String)> = JOBS
            .iter()
            .map(|job| {
                let name = job.name().as_str();
                (
                    name,
                    (
                        job.schedule_text().to_string(),
                        format!("built-in jobs/{name}.toml"),
                    ),
                )
            })
            .collect();
        if let Some(dir) = dir {
            for (stem, path) in schedule_files(dir)? {
                let origin = path.display().to_string();
                let Some(entry) = texts.get_mut(stem.as_str()) else {
                    let jobs: Vec<&str> = crate::jobs::registry::names().collect();
                    return Err(ScheduleError {
                        origin,
                        message: format!("no job is named {stem:?} (jobs: {})", jobs.join(", ")),
                    });
                };
                entry.0 = std::fs::read_to_string(&path).map_err(|e| ScheduleError {
                    origin: origin.clone(),
                    message: format!("cannot read: {e}"),
                })?;
                entry.1 = origin;
            }
        }
        let mut jobs = Vec::new();
        for job in JOBS {
            let (text, origin) = &texts[job.name().as_str()];
            jobs.push(JobSchedule::parse(*job, text, origin)?);
        }
        Ok(Schedule { jobs })
    }

    pub fn get(&self, job: JobName) -> Option<&JobSchedule> {
        self.jobs.iter().find(|j| j.job.name() == job)
    }

    /// Every slot of every enabled cron job in `(after, until]`, in the order a single
    /// instance that never fell behind would run them (time, then the order of `jobs`).
    pub fn slots_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Vec<(DateTime<Utc>, &'static dyn DynJob)> {
        let mut out = Vec::new();
        for (i, j) in self.jobs.iter().enumerate().filter(|(_, j)| j.enabled) {
            if let Some(cron) = j.cron() {
                for t in cron.between(j.time_zone, after, until, usize::MAX) {
                    out.push((t, i, j.job));
                }
            }
        }
        out.sort_by_key(|(t, i, _)| (*t, *i));
        out.into_iter().map(|(t, _, j)| (t, j)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str) -> &'static dyn DynJob {
        crate::jobs::registry::find(name).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn daily(expr: &str, zone: &str) -> JobSchedule {
        JobSchedule::parse(
            job("generate_bills"),
            &format!("cron = {expr:?}\ntime_zone = {zone:?}\ncatch_up = \"every\"\n"),
            "test",
        )
        .unwrap()
    }

    /// Local dates of every instant in a window, in the job's zone.
    fn local(tz: Tz, ts: &[DateTime<Utc>]) -> Vec<String> {
        ts.iter()
            .map(|t| t.with_timezone(&tz).format("%m-%d %H:%M %Z").to_string())
            .collect()
    }

    #[test]
    fn dst_table_daily_jobs_run_once_per_local_day() {
        // (zone, cron, window start, window end (UTC), expected local instants)
        let cases: &[(&str, &str, &str, &str, &[&str])] = &[
            // Europe/Berlin spring forward 2026-03-29 02:00 -> 03:00
            (
                "Europe/Berlin",
                "30 0 * * *",
                "2026-03-27T12:00:00Z",
                "2026-03-31T12:00:00Z",
                &[
                    "03-28 00:30 CET",
                    "03-29 00:30 CET",
                    "03-30 00:30 CEST",
                    "03-31 00:30 CEST",
                ],
            ),
            (
                "Europe/Berlin",
                "30 2 * * *",
                "2026-03-27T12:00:00Z",
                "2026-03-31T12:00:00Z",
                &[
                    "03-28 02:30 CET",
                    "03-29 03:00 CEST",
                    "03-30 02:30 CEST",
                    "03-31 02:30 CEST",
                ],
            ),
            // Europe/Berlin fall back 2026-10-25 03:00 -> 02:00
            (
                "Europe/Berlin",
                "30 0 * * *",
                "2026-10-23T12:00:00Z",
                "2026-10-27T12:00:00Z",
                &[
                    "10-24 00:30 CEST",
                    "10-25 00:30 CEST",
                    "10-26 00:30 CET",
                    "10-27 00:30 CET",
                ],
            ),
            (
                "Europe/Berlin",
                "30 2 * * *",
                "2026-10-23T12:00:00Z",
                "2026-10-27T12:00:00Z",
                &[
                    "10-24 02:30 CEST",
                    "10-25 02:30 CEST",
                    "10-26 02:30 CET",
                    "10-27 02:30 CET",
                ],
            ),
            // America/New_York spring forward 2026-03-08 02:00 -> 03:00
            (
                "America/New_York",
                "30 2 * * *",
                "2026-03-06T12:00:00Z",
                "2026-03-10T12:00:00Z",
                &[
                    "03-07 02:30 EST",
                    "03-08 03:00 EDT",
                    "03-09 02:30 EDT",
                    "03-10 02:30 EDT",
                ],
            ),
            (
                "America/New_York",
                "30 0 * * *",
                "2026-03-06T12:00:00Z",
                "2026-03-10T12:00:00Z",
                &[
                    "03-07 00:30 EST",
                    "03-08 00:30 EST",
                    "03-09 00:30 EDT",
                    "03-10 00:30 EDT",
                ],
            ),
            // America/New_York fall back 2026-11-01 02:00 -> 01:00
            (
                "America/New_York",
                "30 1 * * *",
                "2026-10-30T12:00:00Z",
                "2026-11-03T12:00:00Z",
                &[
                    "10-31 01:30 EDT",
                    "11-01 01:30 EDT",
                    "11-02 01:30 EST",
                    "11-03 01:30 EST",
                ],
            ),
            // Asia/Shanghai has no DST: the default billing zone.
            (
                "Asia/Shanghai",
                "30 0 * * *",
                "2026-03-27T12:00:00Z",
                "2026-03-30T12:00:00Z",
                &["03-28 00:30 CST", "03-29 00:30 CST", "03-30 00:30 CST"],
            ),
        ];
        for (zone, expr, from, to, want) in cases {
            let j = daily(expr, zone);
            let tz = j.time_zone;
            let got = j.cron().unwrap().between(tz, utc(from), utc(to), 100);
            assert_eq!(local(tz, &got), *want, "{zone} {expr}");
            // The same answer one step at a time (how `arrears schedule` lists slots).
            let mut at = utc(from);
            let mut stepped = Vec::new();
            while let Some(t) = j
                .cron()
                .unwrap()
                .next_after(tz, at)
                .filter(|t| *t <= utc(to))
            {
                stepped.push(t);
                at = t;
            }
            assert_eq!(stepped, got, "{zone} {expr} stepped");
        }
    }

    #[test]
    fn dst_table_hourly_jobs_follow_real_hours() {
        let cases: &[(&str, &str, &str, usize)] = &[
            // 23 real hours on the spring day, 25 on the autumn day: one slot per real hour.
            (
                "Europe/Berlin",
                "2026-03-28T23:00:00Z",
                "2026-03-29T22:00:00Z",
                23,
            ),
            (
                "Europe/Berlin",
                "2026-10-24T22:00:00Z",
                "2026-10-25T23:00:00Z",
                25,
            ),
            (
                "America/New_York",
                "2026-03-08T05:00:00Z",
                "2026-03-09T04:00:00Z",
                23,
            ),
            (
                "America/New_York",
                "2026-11-01T04:00:00Z",
                "2026-11-02T05:00:00Z",
                25,
            ),
        ];
        for (zone, from, to, n) in cases {
            let j = JobSchedule::parse(
                job("send_alerts"),
                &format!("cron = \"0 * * * *\"\ntime_zone = {zone:?}\n"),
                "test",
            )
            .unwrap();
            let got = j.cron().unwrap().between(
                j.time_zone,
                utc(from) - Duration::seconds(1),
                utc(to) - Duration::seconds(1),
                1000,
            );
            assert_eq!(got.len(), *n, "{zone} from {from}");
            for w in got.windows(2) {
                assert_eq!(w[1] - w[0], Duration::hours(1), "{zone}: one hour apart");
            }
        }
    }

    #[test]
    fn cron_fields_parse_and_bad_ones_are_named() {
        let c = Cron::parse("*/15 9-17 * JAN-MAR mon-fri").unwrap();
        let tz: Tz = "UTC".parse().unwrap();
        // Monday 2026-01-05
        let got = c.between(
            tz,
            utc("2026-01-05T08:59:00Z"),
            utc("2026-01-05T09:31:00Z"),
            10,
        );
        assert_eq!(
            got,
            vec![
                utc("2026-01-05T09:00:00Z"),
                utc("2026-01-05T09:15:00Z"),
                utc("2026-01-05T09:30:00Z")
            ]
        );
        // Saturday: nothing; April: nothing.
        assert!(c
            .between(
                tz,
                utc("2026-01-10T00:00:00Z"),
                utc("2026-01-11T00:00:00Z"),
                10
            )
            .is_empty());
        assert!(c
            .between(
                tz,
                utc("2026-04-06T00:00:00Z"),
                utc("2026-04-07T00:00:00Z"),
                10
            )
            .is_empty());
        // Sunday as 7.
        let sun = Cron::parse("0 0 * * 7").unwrap();
        assert_eq!(
            sun.next_after(tz, utc("2026-01-05T00:00:00Z")),
            Some(utc("2026-01-11T00:00:00Z"))
        );
        // Day of month and day of week both restricted: either matches (Vixie)...
        let either = Cron::parse("0 0 1 * MON").unwrap();
        assert_eq!(
            either.next_after(tz, utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-01-05T00:00:00Z"))
        );
        // ...but a field starting with `*` makes both necessary: odd days that are Mondays.
        let both = Cron::parse("0 0 */2 * MON").unwrap();
        assert_eq!(
            both.next_after(tz, utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-01-05T00:00:00Z"))
        );
        assert_eq!(
            both.next_after(tz, utc("2026-01-05T00:00:00Z")),
            Some(utc("2026-01-19T00:00:00Z"))
        );
        // A wildcard minute follows real time: `* 2 * * *` has no 02:xx on a spring-forward day.
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let gap = Cron::parse("* 2 * * *").unwrap();
        assert!(gap
            .between(
                berlin,
                utc("2026-03-28T23:00:00Z"),
                utc("2026-03-29T22:00:00Z"),
                100
            )
            .is_empty());
        for (bad, why) in [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute: 60 is outside 0-59"),
            ("0 24 * * *", "hour: 24 is outside 0-23"),
            ("0 0 0 * *", "day-of-month: 0 is outside 1-31"),
            ("0 0 * 13 *", "month: 13 is outside 1-12"),
            ("0 0 * * 8", "day-of-week: 8 is outside 0-7"),
            ("*/0 * * * *", "minute: step must be between 1 and 59"),
            (
                "1-59/4294967295 * * * *",
                "minute: step must be between 1 and 59",
            ),
            ("5-1 * * * *", "minute: range \"5-1\" runs backwards"),
            ("x * * * *", "minute: \"x\" is not a number"),
        ] {
            let e = Cron::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // Never matches: no instant, no endless loop.
        assert_eq!(
            Cron::parse("0 0 30 2 *")
                .unwrap()
                .next_after(tz, utc("2026-01-01T00:00:00Z")),
            None
        );
    }

    #[test]
    fn catch_up_every_runs_each_missed_day_and_latest_collapses() {
        let bills = daily("30 0 * * *", "Europe/Berlin");
        // First start: only the latest slot.
        let first = bills.due(None, utc("2026-06-10T12:00:00Z"));
        assert_eq!(first.slots, vec![utc("2026-06-09T22:30:00Z")]);
        // Up to date: nothing.
        assert!(bills
            .due(
                Some(utc("2026-06-09T22:30:00Z")),
                utc("2026-06-10T12:00:00Z")
            )
            .slots
            .is_empty());
        // Down for 26 hours over two slots: both days, oldest first.
        let due = bills.due(
            Some(utc("2026-06-08T22:30:00Z")),
            utc("2026-06-10T22:31:00Z"),
        );
        assert_eq!(
            due.slots,
            vec![utc("2026-06-09T22:30:00Z"), utc("2026-06-10T22:30:00Z")]
        );
        assert_eq!((due.missed, due.dropped), (1, 0));

        let alerts = JobSchedule::parse(
            job("send_alerts"),
            "cron = \"0 * * * *\"\ntime_zone = \"UTC\"\n",
            "test",
        )
        .unwrap();
        let due = alerts.due(
            Some(utc("2026-06-09T10:00:00Z")),
            utc("2026-06-10T12:30:00Z"),
        );
        assert_eq!(due.slots, vec![utc("2026-06-10T12:00:00Z")]);
        assert_eq!(due.missed, 25);
    }

    #[test]
    fn catch_up_is_capped() {
        let j = JobSchedule::parse(
            job("generate_bills"),
            "cron = \"30 0 * * *\"\ntime_zone = \"UTC\"\ncatch_up = \"every\"\nmax_catch_up = 3\n",
            "test",
        )
        .unwrap();
        // A clock jump of ten years: three slots, the newest, and the rest reported dropped.
        let due = j.due(
            Some(utc("2016-01-01T00:30:00Z")),
            utc("2026-01-10T12:00:00Z"),
        );
        assert_eq!(
            due.slots,
            vec![
                utc("2026-01-08T00:30:00Z"),
                utc("2026-01-09T00:30:00Z"),
                utc("2026-01-10T00:30:00Z")
            ]
        );
        assert!(due.dropped >= 3650 - 3, "{}", due.dropped);
    }

    #[test]
    fn schedule_files_are_validated_with_the_key_named() {
        for (job, text, why) in [
            (
                job("send_alerts"),
                "time_zone = \"UTC\"\n",
                "key `cron`: missing",
            ),
            (
                job("send_alerts"),
                "cron = \"0 * * *\"\ntime_zone = \"UTC\"\n",
                "key `cron`",
            ),
            (
                job("send_alerts"),
                "cron = \"0 * * * *\"\ntime_zone = \"Mars/Base\"\n",
                "key `time_zone`",
            ),
            (
                job("send_alerts"),
                "cron = \"0 * * * *\"\ntime_zone = \"UTC\"\ncolour = 1\n",
                "colour",
            ),
            (
                job("send_alerts"),
                "cron = \"0 * * * *\"\ntime_zone = \"UTC\"\nenabled = \"yes\"\n",
                "key `enabled`",
            ),
            (
                job("generate_bills"),
                "cron = \"0 0 * * *\"\ntime_zone = \"UTC\"\ncatch_up = \"latest\"\n",
                "must be \"every\"",
            ),
            (
                job("send_alerts"),
                "every_seconds = 5\ntime_zone = \"UTC\"\n",
                "only deliver_notifications",
            ),
            (
                job("deliver_notifications"),
                "cron = \"* * * * *\"\ntime_zone = \"UTC\"\n",
                "continuous",
            ),
            (
                job("send_alerts"),
                "cron = \"0 * * * *\"\ntime_zone = \"UTC\"\n[knobs]\nbatch_size = 0\n",
                "at least 1",
            ),
        ] {
            let e = JobSchedule::parse(job, text, "jobs/x.toml").unwrap_err();
            assert!(e.to_string().starts_with("jobs/x.toml: "), "{e}");
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn the_shipped_schedule_loads_and_an_unknown_file_is_refused() {
        let s = Schedule::load(None).unwrap();
        assert_eq!(s.jobs.len(), 5);
        let dir = std::env::temp_dir().join(format!("arrears-jobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("send_alerts.toml"),
            "cron = \"15 * * * *\"\ntime_zone = \"UTC\"\n",
        )
        .unwrap();
        let s = Schedule::load(Some(&dir)).unwrap();
        assert_eq!(
            s.get(JobName::parse("send_alerts").unwrap())
                .unwrap()
                .cron()
                .unwrap()
                .as_str(),
            "15 * * * *"
        );
        std::fs::write(
            dir.join("send_alert.toml"),
            "cron = \"15 * * * *\"\ntime_zone = \"UTC\"\n",
        )
        .unwrap();
        let e = Schedule::load(Some(&dir)).unwrap_err();
        assert!(e.message.contains("no job is named \"send_alert\""), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unknown_knob_is_refused_naming_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        // `concurrency` is deliver_notifications' knob, not send_alerts'.
        std::fs::write(
            dir.path().join("send_alerts.toml"),
            "cron = \"5 * * * *\"\ntime_zone = \"UTC\"\n[knobs]\nbatch_size = 10\nconcurrency = 4\n",
        )
        .unwrap();
        let e = Schedule::load(Some(dir.path())).unwrap_err().to_string();
        let file = dir.path().join("send_alerts.toml").display().to_string();
        assert!(e.starts_with(&format!("{file}: ")), "{e}");
        assert!(e.contains("knobs.concurrency"), "{e}");
        // Each job's own knobs are read into its own struct and applied to its runs.
        std::fs::write(
            dir.path().join("send_alerts.toml"),
            "cron = \"5 * * * *\"\ntime_zone = \"UTC\"\n[knobs]\nbatch_size = 10\n",
        )
        .unwrap();
        let s = Schedule::load(Some(dir.path())).unwrap();
        let alerts = s.get(JobName::parse("send_alerts").unwrap()).unwrap();
        let knobs = alerts
            .knobs
            .get::<crate::jobs::registry::LifecycleKnobs>()
            .unwrap();
        assert_eq!((knobs.batch_size, knobs.max_accounts), (Some(10), None));
        let config =
            crate::config::Config::from_toml(crate::config::EXAMPLE_CONFIG, "t", &[]).unwrap();
        assert_eq!(alerts.knobs.apply(&config).lifecycle.batch_size, 10);
    }

    #[test]
    fn every_registered_job_has_a_schedule_file_and_every_file_a_job() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
        let files: std::collections::BTreeSet<String> = schedule_files(&dir)
            .unwrap()
            .into_iter()
            .map(|(stem, _)| stem)
            .collect();
        let registered: std::collections::BTreeSet<String> =
            crate::jobs::registry::names().map(String::from).collect();
        assert_eq!(files, registered);
        // The compiled-in copy is the file itself, and each loads as its job's schedule.
        for job in JOBS {
            let name = job.name().as_str();
            let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
            assert_eq!(text, job.schedule_text(), "{name}");
            JobSchedule::parse(*job, &text, name).unwrap();
        }
    }
}
