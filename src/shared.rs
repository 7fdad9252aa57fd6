//! The state `arrears serve` shares between its loops (src/service.rs) and its HTTP handlers
//! (src/server.rs): configuration, schedule, clock, metrics, the database once it is open,
//! the watchdog's heartbeat and the stop signal. Both depend on this; neither on the other.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use chrono::Utc;

use crate::config::Config;
use crate::db::Db;
use crate::jobs::JobCtx;
use crate::metrics::Metrics;
use crate::notify::Channels;
use crate::scheduler::{Clock, JobSchedule, Schedule};

/// What the loops and the HTTP handlers share.
pub struct Shared {
    pub config: Config,
    pub schedule: Schedule,
    pub clock: Clock,
    pub metrics: Metrics,
    /// The notification channels, built once at start (a bad setting stops the start).
    channels: Channels,
    db: OnceLock<Db>,
    /// Unix seconds of the last completed loop pass (the watchdog's proof of life).
    heartbeat: AtomicI64,
    /// True once the service is asked to stop; sleeping loops wake on it.
    stop_tx: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    pub fn new(config: Config, schedule: Schedule, clock: Clock, channels: Channels) -> Shared {
        let (stop_tx, _) = tokio::sync::watch::channel(false);
        Shared {
            config,
            schedule,
            clock,
            metrics: Metrics::default(),
            channels,
            db: OnceLock::new(),
            heartbeat: AtomicI64::new(Utc::now().timestamp()),
            stop_tx,
        }
    }

    /// What a run of `js` works with: its knobs, the channels built at start.
    pub fn ctx<'a>(&'a self, db: &'a Db, js: &'a JobSchedule) -> JobCtx<'a> {
        JobCtx {
            db,
            config: &self.config,
            channels: Some(&self.channels),
            knobs: Some(&js.knobs),
        }
    }

    /// The database, once the service could open it.
    pub fn db(&self) -> Option<&Db> {
        self.db.get()
    }

    /// Hands the opened database to the handlers (only the first call sets it).
    pub fn set_db(&self, db: Db) {
        let _ = self.db.set(db);
    }

    pub fn stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    /// A receiver that sees the stop request (for the HTTP server's graceful shutdown).
    pub fn stop_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    pub fn request_stop(&self) {
        self.stop_tx.send_replace(true);
        if let Some(db) = self.db.get() {
            db.request_stop();
        }
    }

    /// A loop completed a pass.
    pub fn beat(&self) {
        self.heartbeat
            .store(Utc::now().timestamp(), Ordering::SeqCst);
    }

    /// Seconds since a loop last completed a pass.
    pub fn since_beat(&self) -> i64 {
        Utc::now().timestamp() - self.heartbeat.load(Ordering::SeqCst)
    }

    /// Sleeps for `d`, or less when the service is asked to stop.
    pub async fn pause(&self, d: Duration) {
        let mut rx = self.stop_tx.subscribe();
        if *rx.borrow() {
            return;
        }
        let _ = tokio::time::timeout(d, rx.changed()).await;
    }
}
