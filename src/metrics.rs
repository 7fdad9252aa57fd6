//! The service's Prometheus metrics: run counters and a histogram of job durations kept by
//! this instance, gauges read from the database at each scrape, and their exposition in the
//! Prometheus text format (0.0.4) with prometheus-client. The service records runs here and
//! the HTTP server encodes them; neither imports the other for it.

use chrono::{DateTime, Utc};
use diesel::dsl::count_star;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::db::schema::{accounts, job_batches, notices};
use crate::db::{Db, DbError};
use crate::jobs::JobName;
use crate::scheduler::Schedule;

/// The `Content-Type` of the exposition (what Prometheus asks for by default).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds in seconds of the job-duration buckets: an idle lifecycle slot takes a few
/// milliseconds, a day's billing of a million accounts several minutes.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    job: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// This instance's job runs (counters and durations by job and outcome) and the missed slots
/// its catch-up cap dropped. Families are shared handles: a scrape encodes the live values.
pub struct Metrics {
    runs: Family<RunLabels, Counter>,
    durations: Family<RunLabels, Histogram, fn() -> Histogram>,
    dropped: Family<JobLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            runs: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            dropped: Family::default(),
        }
    }
}

impl Metrics {
    /// One slot run of `job` that ended with `outcome` after `secs` seconds.
    pub fn record(&self, job: JobName, outcome: &'static str, secs: f64) {
        let labels = RunLabels {
            job: job.as_str(),
            outcome,
        };
        self.runs.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(secs);
    }

    /// `n` missed slots of `job` skipped by the catch-up cap.
    pub fn dropped(&self, job: JobName, n: usize) {
        self.dropped
            .get_or_create(&JobLabel { job: job.as_str() })
            .inc_by(n as u64);
    }
}

/// Everything `/metrics` reads from the database: shared by every instance.
#[derive(Debug, Default)]
pub struct DbGauges {
    pub outbox: Vec<(String, i64)>,
    pub accounts: Vec<(String, i64)>,
    pub slots_behind: Vec<(&'static str, i64)>,
    pub open_batches: i64,
    /// Prices where the configuration and the database's price list differ.
    pub price_differences: usize,
}

/// One job's last handed-out slot and its open slots (see `db_gauges`).
#[derive(QueryableByName)]
struct SlotsRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    last: Option<DateTime<Utc>>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    open: i64,
}

/// Reads the gauges at `now` (the service's clock) for the enabled jobs of `schedule`.
pub async fn db_gauges(
    config: &Config,
    schedule: &Schedule,
    now: DateTime<Utc>,
    db: &Db,
) -> Result<DbGauges, DbError> {
    // A pooled connection: a scrape that times out mid-query drops it back to the pool,
    // whose recycling check waits for the query to end before lending it again.
    let mut conn = db.conn().await?;
    let outbox = notices::table
        .group_by(notices::status)
        .select((notices::status, count_star()))
        .order_by(notices::status)
        .load::<(String, i64)>(&mut conn)
        .await?;
    let accounts = accounts::table
        .group_by(accounts::state)
        .select((accounts::state, count_star()))
        .order_by(accounts::state)
        .load::<(String, i64)>(&mut conn)
        .await?;
    let mut slots_behind = Vec::new();
    for js in schedule.jobs.iter().filter(|j| j.enabled) {
        let Some(cron) = js.cron() else { continue };
        // Raw SQL: a CTE with coalesce over '-infinity' (the open slots after the latest
        // success, as the job loop counts them) has no form in diesel's query builder.
        let row: SlotsRow = diesel::sql_query(
            "WITH done AS (SELECT max(slot) AS latest FROM job_runs WHERE job = $1 AND status = 'succeeded')
             SELECT (SELECT max(as_of) FROM job_runs WHERE job = $1 AND as_of <= $2) AS last,
                    (SELECT count(*) FROM job_runs, done WHERE job = $1 AND status <> 'succeeded'
                       AND slot > coalesce(done.latest, '-infinity')) AS open",
        )
        .bind::<diesel::sql_types::Text, _>(js.job.name().as_str())
        .bind::<diesel::sql_types::Timestamptz, _>(now)
        .get_result(&mut conn)
        .await?;
        // Slots due and not yet started, plus started ones not finished.
        let due = match row.last {
            Some(last) => cron.between(js.time_zone, last, now, 100_000).len() as i64,
            None => 1,
        };
        slots_behind.push((js.job.name().as_str(), due + row.open));
    }
    let open_batches = job_batches::table
        .filter(job_batches::status.eq("pending"))
        .count()
        .get_result::<i64>(&mut conn)
        .await?;
    let price_differences = match crate::db::catalog::drift(&mut conn, config, now).await {
        Ok(d) => d.len(),
        Err(crate::db::catalog::PricesError::Query(e)) => return Err(e.into()),
        Err(_) => 0,
    };
    Ok(DbGauges {
        outbox,
        accounts,
        slots_behind,
        open_batches,
        price_differences,
    })
}

/// A metric whose HELP and TYPE lines are written even before its first sample, as the
/// exposition always did (prometheus-client leaves an empty family out altogether; a scrape
/// of a service that has run nothing yet still says which metrics it has).
#[derive(Debug)]
struct Described<M>(M);

impl<M: EncodeMetric> EncodeMetric for Described<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

fn gauge(value: i64) -> Gauge {
    let g = Gauge::default();
    g.set(value);
    g
}

/// The exposition of one scrape: this instance's runs, whether the database answered
/// (`gauges` is `None` when it did not), and the database's gauges when it did. Counters are
/// registered without `_total`: the encoder appends it, so the exposed names are
/// `arrears_job_runs_total` and `arrears_catch_up_dropped_slots_total`.
pub fn encode(metrics: &Metrics, gauges: Option<&DbGauges>) -> Result<String, std::fmt::Error> {
    // A registry per scrape: the database's gauges are a snapshot, and a label value gone
    // from the database (no notice left in a status) must not linger as a stale series.
    let mut r = Registry::default();
    r.register(
        "arrears_job_runs",
        "Slot runs of this instance by job and outcome",
        Described(metrics.runs.clone()),
    );
    r.register(
        "arrears_job_run_seconds",
        "Time spent in slot runs by job and outcome",
        Described(metrics.durations.clone()),
    );
    r.register(
        "arrears_catch_up_dropped_slots",
        "Missed slots skipped by the catch-up cap",
        Described(metrics.dropped.clone()),
    );
    r.register(
        "arrears_database_up",
        "Whether the database answered this scrape",
        gauge(i64::from(gauges.is_some())),
    );
    if let Some(g) = gauges {
        let slots_behind = Family::<JobLabel, Gauge>::default();
        for (job, n) in &g.slots_behind {
            slots_behind.get_or_create(&JobLabel { job }).set(*n);
        }
        r.register(
            "arrears_slots_behind",
            "Scheduled slots due or unfinished, by job",
            Described(slots_behind),
        );
        let outbox = Family::<StatusLabel, Gauge>::default();
        for (status, n) in &g.outbox {
            outbox
                .get_or_create(&StatusLabel {
                    status: status.clone(),
                })
                .set(*n);
        }
        r.register(
            "arrears_outbox_notices",
            "Notices in the outbox by status",
            Described(outbox),
        );
        let accounts = Family::<StateLabel, Gauge>::default();
        for (state, n) in &g.accounts {
            accounts
                .get_or_create(&StateLabel {
                    state: state.clone(),
                })
                .set(*n);
        }
        r.register(
            "arrears_accounts",
            "Accounts by lifecycle state",
            Described(accounts),
        );
        r.register(
            "arrears_price_list_differences",
            "Prices where the configuration and the database's price list differ (run arrears prices apply)",
            gauge(i64::try_from(g.price_differences).unwrap_or(i64::MAX)),
        );
        r.register(
            "arrears_billing_batches_pending",
            "Billing batches waiting for an instance",
            gauge(g.open_batches),
        );
    }
    let mut out = String::new();
    prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn exposition_keeps_the_names_and_types_dashboards_read() {
        let m = Metrics::default();
        m.record(
            JobName::parse("generate_bills").expect("registered"),
            "succeeded",
            0.3,
        );
        m.record(
            JobName::parse("generate_bills").expect("registered"),
            "succeeded",
            42.0,
        );
        m.record(
            JobName::parse("send_alerts").expect("registered"),
            "failed",
            0.002,
        );
        m.dropped(
            JobName::parse("enforce_suspensions").expect("registered"),
            3,
        );
        let gauges = DbGauges {
            outbox: vec![("sent".into(), 9), ("dead".into(), 1)],
            accounts: vec![("good".into(), 1), ("suspended".into(), 2)],
            slots_behind: vec![("generate_bills", 0)],
            open_batches: 4,
            price_differences: 2,
        };
        let text = encode(&m, Some(&gauges)).expect("encodes");
        let l = lines(&text);
        for want in [
            "# HELP arrears_job_runs_total Slot runs of this instance by job and outcome.",
            "# TYPE arrears_job_runs_total counter",
            "arrears_job_runs_total{job=\"generate_bills\",outcome=\"succeeded\"} 2",
            "arrears_job_runs_total{job=\"send_alerts\",outcome=\"failed\"} 1",
            "# TYPE arrears_job_run_seconds histogram",
            "arrears_job_run_seconds_bucket{job=\"generate_bills\",outcome=\"succeeded\",le=\"0.5\"} 1",
            "arrears_job_run_seconds_bucket{job=\"generate_bills\",outcome=\"succeeded\",le=\"60\"} 2",
            "arrears_job_run_seconds_bucket{job=\"generate_bills\",outcome=\"succeeded\",le=\"+Inf\"} 2",
            "arrears_job_run_seconds_sum{job=\"generate_bills\",outcome=\"succeeded\"} 42.3",
            "arrears_job_run_seconds_count{job=\"generate_bills\",outcome=\"succeeded\"} 2",
            "arrears_job_run_seconds_bucket{job=\"send_alerts\",outcome=\"failed\",le=\"0.005\"} 1",
            "# TYPE arrears_catch_up_dropped_slots_total counter",
            "arrears_catch_up_dropped_slots_total{job=\"enforce_suspensions\"} 3",
            "# TYPE arrears_database_up gauge",
            "arrears_database_up 1",
            "# TYPE arrears_slots_behind gauge",
            "arrears_slots_behind{job=\"generate_bills\"} 0",
            "arrears_outbox_notices{status=\"sent\"} 9",
            "arrears_outbox_notices{status=\"dead\"} 1",
            "arrears_accounts{state=\"suspended\"} 2",
            "# HELP arrears_price_list_differences Prices where the configuration and the database's price list differ (run arrears prices apply).",
            "arrears_price_list_differences 2",
            "arrears_billing_batches_pending 4",
        ] {
            assert!(l.contains(&want), "{want} in\n{text}");
        }
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn without_the_database_only_this_instance_and_database_up_0() {
        let m = Metrics::default();
        let text = encode(&m, None).expect("encodes");
        let l = lines(&text);
        assert!(l.contains(&"arrears_database_up 0"), "{text}");
        // Described before the first run, as before prometheus-client.
        for want in [
            "# TYPE arrears_job_runs_total counter",
            "# TYPE arrears_job_run_seconds histogram",
            "# TYPE arrears_catch_up_dropped_slots_total counter",
        ] {
            assert!(l.contains(&want), "{want} in\n{text}");
        }
        for absent in [
            "arrears_slots_behind",
            "arrears_accounts",
            "arrears_outbox_notices",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }
}
