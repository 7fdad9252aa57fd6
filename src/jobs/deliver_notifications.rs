//! `deliver_notifications`: claims due notices from the outbox (FOR UPDATE SKIP LOCKED, with a
//! lease, so several workers share the work and a crashed worker's notices are taken over),
//! renders them in the account's locale, sends them with a timeout around every network call,
//! and records the outcome: sent (with the provider's message id), retrying with exponential
//! backoff and jitter on a temporary failure, dead on a permanent one. Delivery is at least
//! once; a notice is never created twice (the outbox's dedupe key).
//!
//! A channel accepting the first overdue alert starts the lcic grace clock (R2), and a
//! channel accepting a release warning is what allows the release (R9): both facts are
//! written here, in the transaction that marks the notice sent.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::contact::mask_contact;
use crate::db::{Db, DbError};
use crate::domain::alerts::Topic;
use crate::jobs::{JobError, JobName};
use crate::notify::email::build_message;
use crate::notify::sms::template_params;
use crate::notify::{webhook, NoticeKind, SendError};

#[derive(Debug, Clone)]
pub struct Options {
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    /// Stop after this many batches (bounded runs); the next run goes on.
    pub max_batches: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliverReport {
    pub job: &'static str,
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    pub due: i64,
    pub claimed: usize,
    pub sent: usize,
    pub retrying: usize,
    pub dead: usize,
    /// Due notices whose cause was gone (paid, restored, moved): never sent.
    pub cancelled: usize,
    /// The first of them: notice id, kind and why.
    pub cancelled_reasons: Vec<String>,
    /// Sent through a channel that reaches nobody (not accepted unless the configuration says).
    pub sent_to_dev_channels: usize,
    /// The first failures: notice id and error (addresses never appear).
    pub failures: Vec<String>,
}

pub use crate::notify::Channels;

struct Claimed {
    account_id: String,
    id: i64,
    kind: String,
    channel: String,
    payload: serde_json::Value,
    attempts: i32,
}

pub async fn run(
    db: &Db,
    config: &Config,
    channels: &Channels,
    opts: &Options,
) -> Result<DeliverReport, JobError> {
    let mut report = DeliverReport {
        job: JobName::of::<DeliverNotifications>().as_str(),
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let client = db.raw_client().await?;
    // Raw SQL: a count on the run's raw client, which diesel does not drive.
    report.due = client
        .query_one(
            &format!(
                "SELECT count(*) FROM notices
                 WHERE queued AND next_attempt_at <= $1 AND {CLAIMABLE}"
            ),
            &[&opts.as_of],
        )
        .await?
        .get(0);
    if opts.dry_run {
        return Ok(report);
    }
    // Three stages at once, so that neither the database nor the mail server waits for the
    // other: the claimer takes a batch (cancelling what is no longer true, claiming the rest,
    // reading their contacts) while the previous batch is being sent, at most one batch
    // ahead; the senders run `concurrency` sends at once; the recorder writes each outcome as
    // soon as it is known, taking whatever finished while its last write was in flight, so a
    // crash re-sends at most the sends then in flight. The claimer and the recorder are tasks
    // of their own, each with its connection, so that neither waits for the senders' task
    // to be polled.
    let limit = config.notifications.batch_size.max(1);
    let (claimed_tx, mut claimed_rx) =
        tokio::sync::mpsc::channel::<(Claimed, Option<Contact>)>(limit);
    // Bounded: when recording is slower than sending, the senders wait, so that what has been
    // sent but not yet recorded (what a crash would send again) stays about `concurrency`.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(Claimed, Result<Sent, SendError>)>(
        config.notifications.concurrency.max(1),
    );
    let shared = std::sync::Arc::new(config.clone());
    // The recorder's connection first: once the claimer runs, every claim must be sent. It
    // holds the run's lock (CLAIMABLE) until the last outcome is recorded.
    let mut recorder = db.raw_client().await?;
    let mut key = claimer_key();
    // A key another live run holds (a chance in two billion) is not shared: another is drawn.
    // Raw SQL: session advisory locks are functions the query builder does not know.
    while !recorder
        .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&CLAIMER_CLASS, &key])
        .await?
        .get::<_, bool>(0)
    {
        key = claimer_key();
    }
    let claimer = {
        let (config, opts) = (shared.clone(), opts.clone());
        tokio::spawn(async move {
            let mut stats = ClaimStats::default();
            claim_batches(&client, &config, &opts, key, claimed_tx, &mut stats).await?;
            Ok::<ClaimStats, JobError>(stats)
        })
    };
    let recorder = {
        let (config, as_of) = (shared, opts.as_of);
        tokio::spawn(async move {
            let mut recorded = DeliverReport::default();
            // At most a batch per statement: a write's cost stays that of a batch, so a
            // slow write never snowballs into ever larger ones.
            let most = config.notifications.batch_size.max(1);
            // Parsed once per run, not per group (a group is about `concurrency` outcomes:
            // parsing and planning the statement for each cost as much as running it).
            let recording = async {
                let statements = RecorderStatements::prepare(&recorder).await?;
                while let Some(first) = done_rx.recv().await {
                    let mut outcomes = vec![first];
                    while outcomes.len() < most {
                        match done_rx.try_recv() {
                            Ok(more) => outcomes.push(more),
                            Err(_) => break,
                        }
                    }
                    record_outcomes(
                        &mut recorder,
                        &statements,
                        &config,
                        outcomes,
                        as_of,
                        &mut recorded,
                    )
                    .await?;
                }
                Ok::<(), JobError>(())
            }
            .await;
            // The connection goes back to the run, which lets the claims go once nothing of
            // the run sends or claims any more.
            (recorder, recording.map(|()| recorded))
        })
    };
    let incoming = futures_util::stream::poll_fn(|cx| claimed_rx.poll_recv(cx));
    let mut sends = incoming
        .map(|(n, contact)| async move {
            let outcome = deliver_one(config, channels, &n, contact.as_ref(), opts.as_of).await;
            (n, outcome)
        })
        .buffer_unordered(config.notifications.concurrency.max(1));
    while let Some(done) = sends.next().await {
        if done_tx.send(done).await.is_err() {
            // The recorder stopped on an error: stop here, and stop the claimer below.
            break;
        }
    }
    drop(sends);
    drop(done_tx);
    // Whatever the claimer still hands over is refused: it stops at its next hand-over
    // (notices it claimed and nobody sent are taken over by the next run once this run's
    // lock is free).
    claimed_rx.close();
    let joined = |e: tokio::task::JoinError| {
        JobError::Db(DbError::Pool(format!("a delivery task failed: {e}")))
    };
    // The recorder's error is the first cause (it stops the senders, whose end stops the
    // claimer); then the claimer's.
    let recorded = recorder.await.map_err(joined);
    let claims = claimer.await.map_err(joined);
    // No send is in flight and nothing is claimed any more: the run's claims may go. (A
    // recorder task that panicked took its connection with it: the pool's recycling, or the
    // server when the connection closes, releases the lock.)
    let recorded = match recorded {
        Ok((recorder, recorded)) => {
            // Raw SQL: session advisory locks are functions the query builder does not know.
            let _ = recorder
                .execute("SELECT pg_advisory_unlock($1, $2)", &[&CLAIMER_CLASS, &key])
                .await;
            Ok(recorded)
        }
        Err(e) => Err(e),
    };
    let recorded = recorded??;
    let claims = claims??;
    report.sent = recorded.sent;
    report.retrying = recorded.retrying;
    report.dead = recorded.dead;
    report.sent_to_dev_channels = recorded.sent_to_dev_channels;
    report.failures = recorded.failures;
    report.claimed = claims.claimed;
    report.cancelled = claims.cancelled;
    report.cancelled_reasons = claims.cancelled_reasons;
    tracing::info!(
        job = report.job,
        sent = report.sent,
        retrying = report.retrying,
        dead = report.dead,
        "deliver_notifications finished"
    );
    Ok(report)
}

#[derive(Default)]
struct ClaimStats {
    claimed: usize,
    cancelled: usize,
    cancelled_reasons: Vec<String>,
}

/// The claimer: batch after batch (at most `max_batches`), in one statement each, cancels
/// the due notices whose cause is gone and claims the rest with a lease, then reads their
/// contacts (a send in flight holds no database connection) and hands them to the senders.
/// Stops when nothing is due or when the senders stop.
async fn claim_batches(
    client: &tokio_postgres::Client,
    config: &Config,
    opts: &Options,
    claimer: i32,
    out: tokio::sync::mpsc::Sender<(Claimed, Option<Contact>)>,
    stats: &mut ClaimStats,
) -> Result<(), JobError> {
    let started = std::time::Instant::now();
    let limit = config.notifications.batch_size.max(1) as i64;
    // Parsed once per run, not per batch.
    // Raw SQL: prepared once on the claimer's raw connection (CLAIM says why).
    let claim = client
        .prepare(&CLAIM.replace("<claimable>", CLAIMABLE))
        .await?;
    // The run takes the notices that exist when it begins (ids are handed out in order): an
    // unbounded one-off run ends even while the service keeps queueing notices due by its
    // instant.
    // Raw SQL: the identity's sequence, which schema.rs does not declare.
    let newest: i64 = client
        .query_one(
            "SELECT coalesce((SELECT last_value FROM pg_sequences
                              WHERE schemaname = current_schema()
                                AND sequencename = 'notices_id_seq'), 0)",
            &[],
        )
        .await?
        .get(0);
    let contacts_of = client
        .prepare("SELECT id, email, phone, locale FROM accounts WHERE id = ANY($1)")
        .await?;
    let mut refreshed: Option<std::time::Instant> = None;
    for _ in 0..opts.max_batches.max(1) {
        // The claim and the staleness check read notices, episodes and suspensions that the
        // lifecycle jobs and this run's recorder keep changing (db::stats): looked at when
        // the run starts and every half minute after (every 20 batches, it was a fifth of the
        // database's work in a fast run: the recorder changes them faster than that).
        if refreshed.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(30)) {
            crate::db::stats::refresh_stale_raw(client, crate::db::stats::DELIVERY).await;
            refreshed = Some(std::time::Instant::now());
        }
        // The lease runs from this claim (the run's instant plus the time the run has taken
        // so far), not from the run's start: a long run's later batches keep a whole lease.
        let lease_until = opts.as_of
            + chrono::Duration::from_std(started.elapsed()).unwrap_or_default()
            + config.notifications.lease.to_chrono();
        // One statement: the due notices whose cause is gone are cancelled, and the rest of
        // the batch is claimed, so that nothing claimed here was untrue at the claim.
        // Raw SQL: the prepared CLAIM (CTEs with FOR UPDATE SKIP LOCKED feeding two UPDATEs).
        let rows = client
            .query(&claim, &[&opts.as_of, &lease_until, &limit, &claimer, &newest])
            .await?;
        if rows.is_empty() {
            break;
        }
        let (rows, cancelled): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|r| r.get::<_, Option<String>>(6).is_none());
        for r in &cancelled {
            let (id, kind, reason): (i64, String, String) = (r.get(1), r.get(2), r.get(6));
            tracing::info!(
                job = "deliver_notifications",
                notice = id,
                kind,
                reason,
                "notice cancelled: its cause is gone"
            );
            if stats.cancelled_reasons.len() < 100 {
                stats
                    .cancelled_reasons
                    .push(format!("{id} {kind}: {reason}"));
            }
        }
        stats.cancelled += cancelled.len();
        if rows.is_empty() {
            continue;
        }
        stats.claimed += rows.len();
        let claimed: Vec<Claimed> = rows
            .into_iter()
            .map(|r| Claimed {
                account_id: r.get(0),
                id: r.get(1),
                kind: r.get(2),
                channel: r.get(3),
                payload: r.get(4),
                attempts: r.get(5),
            })
            .collect();
        let ids: Vec<&str> = claimed.iter().map(|n| n.account_id.as_str()).collect();
        // Raw SQL: the prepared contacts lookup, on the claimer's raw connection.
        let contacts: HashMap<String, Contact> = client
            .query(&contacts_of, &[&ids])
            .await?
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    Contact {
                        email: r.get(1),
                        phone: r.get(2),
                        locale: r.get(3),
                    },
                )
            })
            .collect();
        for n in claimed {
            let contact = contacts.get(&n.account_id).cloned();
            if out.send((n, contact)).await.is_err() {
                // The senders stopped (the recorder failed): its error is the one reported.
                return Ok(());
            }
        }
    }
    Ok(())
}

#[derive(Clone)]
struct Contact {
    email: Option<String>,
    phone: Option<String>,
    locale: String,
}

/// What a channel said when it took a notice.
struct Sent {
    provider_id: String,
    /// The email's Message-ID: one per notice, the same on every attempt, so that a receiving
    /// system can drop a copy sent again after a crash.
    message_id: Option<String>,
    /// Taken by a channel that reaches nobody (the `.eml` file transport, the `log` SMS
    /// adapter).
    dev_channel: bool,
}

async fn deliver_one(
    config: &Config,
    ch: &Channels,
    n: &Claimed,
    contact: Option<&Contact>,
    now: DateTime<Utc>,
) -> Result<Sent, SendError> {
    let kind = NoticeKind::parse(&n.kind)
        .ok_or_else(|| SendError::Permanent(format!("unknown notice kind {:?}", n.kind)))?;
    let timeout = Duration::from_secs(config.notifications.send_timeout.seconds() as u64);
    if n.channel == "webhook" {
        let product = n.payload["product"].as_str().unwrap_or_default();
        let endpoint = config.webhooks.products.get(product).ok_or_else(|| {
            SendError::Permanent(format!(
                "no webhook endpoint configured for product {product:?}"
            ))
        })?;
        let secret = endpoint
            .secret
            .as_deref()
            .or(config.webhooks.secret.as_deref())
            .ok_or_else(|| {
                SendError::Permanent("no webhook secret configured (ARREARS_WEBHOOK_SECRET)".into())
            })?;
        let body =
            serde_json::to_vec(&n.payload).map_err(|e| SendError::Permanent(e.to_string()))?;
        let event_id = n.payload["event_id"].as_str().unwrap_or_default();
        let provider_id = webhook::post(
            &ch.http,
            &endpoint.url,
            secret,
            event_id,
            &body,
            now.timestamp(),
            timeout,
        )
        .await?;
        return Ok(Sent {
            provider_id,
            message_id: None,
            dev_channel: false,
        });
    }
    let contact = contact
        .ok_or_else(|| SendError::Permanent(format!("account {} not found", n.account_id)))?;
    let (email, phone, locale) = (
        contact.email.clone(),
        contact.phone.clone(),
        contact.locale.as_str(),
    );
    match n.channel.as_str() {
        "email" => {
            let to = email
                .ok_or_else(|| SendError::Permanent("the account has no email address".into()))?;
            let mail = ch
                .templates
                .email(kind, &locale, &n.payload)
                .map_err(|e| SendError::Permanent(e.to_string()))?;
            let from = config
                .email
                .from
                .as_deref()
                .unwrap_or("arrears <billing@localhost>");
            let domain = from
                .rsplit('@')
                .next()
                .unwrap_or("localhost")
                .trim_end_matches('>');
            let message_id = format!("<notice-{}@{domain}>", n.id);
            let msg = build_message(from, &to, &mail, &message_id)?;
            tracing::debug!(notice = n.id, to = %mask_contact(&to), "sending email");
            let provider_id = ch.mailer.send(msg, &message_id, timeout).await?;
            Ok(Sent {
                provider_id,
                message_id: Some(message_id),
                dev_channel: ch.mailer.reaches_nobody(),
            })
        }
        "sms" => {
            let to = phone
                .ok_or_else(|| SendError::Permanent("the account has no phone number".into()))?;
            let text = ch
                .templates
                .sms(kind, &locale, &n.payload)
                .map_err(|e| SendError::Permanent(e.to_string()))?;
            tracing::debug!(notice = n.id, to = %mask_contact(&to), "sending sms");
            let provider_id = ch
                .sms
                .send(
                    &to,
                    kind,
                    &text,
                    &template_params(kind, &n.payload),
                    &format!("notice-{}", n.id),
                    now,
                    timeout,
                )
                .await?;
            Ok(Sent {
                provider_id,
                message_id: None,
                dev_channel: ch.sms.reaches_nobody(),
            })
        }
        other => Err(SendError::Permanent(format!("unknown channel {other:?}"))),
    }
}

/// Backoff before attempt `attempts + 1`: base x 2^(attempts-1), at most max, +/-20% jitter.
pub fn backoff(config: &Config, attempts: i32, seed: i64) -> chrono::Duration {
    let base = config.notifications.retry_base.seconds();
    let max = config.notifications.retry_max.seconds();
    let exp = base
        .saturating_mul(1i64 << (attempts.clamp(1, 30) - 1))
        .min(max);
    // Deterministic jitter from the notice id and attempt: spreads retries without a RNG.
    let h = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15u64 as i64) ^ i64::from(attempts))
        .rem_euclid(41)
        - 20;
    chrono::Duration::seconds((exp + exp * h / 100).max(1))
}

/// The class (first key) of the advisory lock a delivery run holds on its recorder's
/// connection while it lives; the second key is the run's `claimed_by` ("ar").
const CLAIMER_CLASS: i32 = 0x6172;

/// A notice no live run has claimed: not `sending`, or claimed by a run whose lock is free (it
/// died: taken over at once), or claimed before claims named their run and past its lease.
/// A live run's claim is never taken over, whatever the looking run's --as-of (its lease is
/// on the as-of clock of the run that made it, which a run at a later instant sees as
/// expired). The live runs are read once per statement (a hashed subplan over pg_locks, this
/// database's only: another database of the cluster has runs of its own).
const CLAIMABLE: &str = "(status <> 'sending'
   OR (claimed_by IS NULL AND lease_until <= $1)
   OR claimed_by::bigint NOT IN (
        SELECT l.objid::bigint FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.classid = 24946 AND l.objsubid = 2 AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())))";

/// A key for this run's claims (`claimed_by`, the second key of its lock): 31 bits of a hash
/// of the instance and a per-process counter (a key a live run holds is not taken: `run`
/// draws another).
fn claimer_key() -> i32 {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{}/{n}", crate::jobs::instance_id()).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ((h >> 33) as i32).max(1)
}

/// Takes the oldest due notices (at most $3), in the order of the notices_due index, locked
/// so that no other worker takes them meanwhile, and in one statement
/// - cancels, with the reason (column 7), those whose cause no longer holds: an overdue
///   alert, reminder or suspension-imminent whose arrears episode is over; a release warning
///   whose suspension ended (restored, released, changed reason) or whose release instant
///   moved; a balance-low alert whose funds are back at or above the threshold;
/// - claims the rest with a lease until $2 (suspended, restored and released notices, and
///   webhooks, always go); a claimed notice is taken over when its lease runs out.
///
/// The claim changes no indexed column (`queued` stays true, next_attempt_at is left alone),
/// so that the new version stays on its page with no new index entry (migration
/// 2026-12-06-000003); the notices in flight, at most a batch and the sends under way, are
/// skipped on their rows. Each fact is looked up only for the kinds it decides. The due
/// notices are scanned and locked once for both (two statements scanned and locked them
/// twice: 497 ms against 418-521 ms for one, per 20,000 notices, within the machine's spread).
/// Raw SQL: CTEs with FOR UPDATE SKIP LOCKED feeding two UPDATE ... FROM, which the query
/// builder cannot say.
const CLAIM: &str = "
WITH due AS (
  SELECT account_id, id FROM notices
  WHERE queued AND next_attempt_at <= $1 AND <claimable> AND id <= $5
  ORDER BY next_attempt_at, id LIMIT $3
  FOR UPDATE SKIP LOCKED
), why AS (
  SELECT n.account_id, n.id,
    CASE
      WHEN n.kind IN ('overdue', 'overdue_reminder', 'suspension_imminent') THEN
        CASE WHEN NOT EXISTS (
               SELECT 1 FROM arrears_episodes e
               WHERE e.account_id = n.account_id AND e.no = n.episode AND e.closed_at IS NULL)
             THEN 'the arrears episode it was about is over' END
      WHEN n.kind = 'release_warning' THEN (
        SELECT CASE WHEN s.no IS NULL
                      THEN 'the resource is no longer suspended for the reason the warning was about'
                    WHEN s.release_at IS DISTINCT FROM (
                           SELECT (t->>'release_at')::timestamptz
                           FROM jsonb_array_elements(n.payload->'_about') t
                           WHERE t->>'topic' = 'warning' LIMIT 1)
                      THEN 'the release instant it announced has moved' END
        FROM (SELECT 1) one
        LEFT JOIN resource_suspensions s
          ON s.account_id = n.account_id AND s.no = n.suspension AND s.ended_at IS NULL)
      WHEN n.kind = 'balance_low' THEN (
        SELECT CASE WHEN a.low_balance_threshold IS NULL
                      OR a.cash_balance + a.credit_quota + coalesce((
                           SELECT sum(c.remaining) FROM coupons c
                           WHERE c.account_id = n.account_id AND c.remaining > 0 AND c.expires_at > $1), 0)
                         >= a.low_balance_threshold
                    THEN 'funds are no longer below the threshold' END
        FROM accounts a WHERE a.id = n.account_id)
    END AS reason
  FROM due
  JOIN notices n ON n.account_id = due.account_id AND n.id = due.id
), cancelled AS (
  UPDATE notices n SET status = 'cancelled', cancel_reason = why.reason, lease_until = NULL
  FROM why
  WHERE n.account_id = why.account_id AND n.id = why.id AND why.reason IS NOT NULL
  RETURNING n.account_id, n.id, n.kind, n.channel, n.payload, n.attempts, n.cancel_reason
), claimed AS (
  UPDATE notices n SET status = 'sending', lease_until = $2, attempts = n.attempts + 1, claimed_by = $4
  FROM why
  WHERE n.account_id = why.account_id AND n.id = why.id AND why.reason IS NULL
  RETURNING n.account_id, n.id, n.kind, n.channel, n.payload, n.attempts, NULL::text
)
SELECT * FROM cancelled UNION ALL SELECT * FROM claimed";

/// Records outcomes: the sent ones with one statement (the notices, and the facts their
/// acceptance establishes, R2 and R9, for the whole set, atomically); each failure with its
/// backoff or as dead. A crash before a statement commits leaves its notices claimed: they are
/// sent again when the lease runs out (at least once).
async fn record_outcomes(
    client: &mut tokio_postgres::Client,
    statements: &RecorderStatements,
    config: &Config,
    outcomes: Vec<(Claimed, Result<Sent, SendError>)>,
    now: DateTime<Utc>,
    report: &mut DeliverReport,
) -> Result<(), JobError> {
    let t0 = std::time::Instant::now();
    let mut sent = SentSet::default();
    for (n, outcome) in &outcomes {
        match outcome {
            Ok(s) => {
                // R9: a channel that reaches nobody warned nobody, unless configured so.
                let counts = !s.dev_channel || config.notifications.dev_channels_count_as_accepted;
                sent.add(n, s, counts);
                if s.dev_channel {
                    report.sent_to_dev_channels += 1;
                }
                report.sent += 1;
            }
            Err(e) => {
                let dead = matches!(e, SendError::Permanent(_))
                    || n.attempts >= config.notifications.max_attempts as i32;
                let status = if dead { "dead" } else { "retrying" };
                let next = now + backoff(config, n.attempts, n.id);
                // Raw SQL: the `failed` statement, prepared on the recorder's raw connection.
                client
                    .execute(
                        &statements.failed,
                        &[&n.account_id, &n.id, &status, &e.to_string(), &next, &n.attempts],
                    )
                    .await?;
                tracing::warn!(job = "deliver_notifications", notice = n.id, account_id = %n.account_id, error = %e, status, "delivery failed");
                if dead {
                    report.dead += 1;
                } else {
                    report.retrying += 1;
                }
                if report.failures.len() < 100 {
                    report.failures.push(format!("{}: {e}", n.id));
                }
            }
        }
    }
    sent.write(client, statements, now).await?;
    tracing::debug!(
        job = "deliver_notifications",
        outcomes = outcomes.len(),
        took = ?t0.elapsed(),
        "outcomes recorded"
    );
    Ok(())
}

/// Sent notices, as the columns of one statement, with the facts the accepted ones establish
/// (their `_about` topics): an episode's first accepted overdue alert, and release warnings.
#[derive(Default)]
struct SentSet {
    accounts: Vec<String>,
    ids: Vec<i64>,
    provider_ids: Vec<String>,
    attempts: Vec<i32>,
    message_ids: Vec<Option<String>>,
    devs: Vec<bool>,
    accepted: Vec<bool>,
    /// (account, episode) of accepted overdue alerts.
    overdue: (Vec<String>, Vec<i32>),
    /// (account, suspension, lead, release instant) of accepted release warnings.
    warnings: (Vec<String>, Vec<i32>, Vec<i32>, Vec<DateTime<Utc>>),
}

impl SentSet {
    fn add(&mut self, n: &Claimed, sent: &Sent, accepted: bool) {
        self.accounts.push(n.account_id.clone());
        self.ids.push(n.id);
        self.provider_ids.push(sent.provider_id.clone());
        self.attempts.push(n.attempts);
        self.message_ids.push(sent.message_id.clone());
        self.devs.push(sent.dev_channel);
        self.accepted.push(accepted);
        if !accepted {
            return;
        }
        let topics: Vec<Topic> =
            serde_json::from_value(n.payload["_about"].clone()).unwrap_or_default();
        for t in topics {
            match t {
                Topic::Overdue { episode } => {
                    self.overdue.0.push(n.account_id.clone());
                    self.overdue.1.push(episode);
                }
                Topic::Warning {
                    suspension,
                    lead_seconds,
                    release_at,
                } => {
                    let Ok(lead) = i32::try_from(lead_seconds) else {
                        continue;
                    };
                    let w = &mut self.warnings;
                    w.0.push(n.account_id.clone());
                    w.1.push(suspension);
                    w.2.push(lead);
                    w.3.push(release_at);
                }
                Topic::Reminder { .. } | Topic::Imminent { .. } => {}
            }
        }
    }

    async fn write(
        self,
        client: &tokio_postgres::Client,
        statements: &RecorderStatements,
        now: DateTime<Utc>,
    ) -> Result<(), JobError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let (w_accounts, w_suspensions, w_leads, w_release_at) = &self.warnings;
        // One transaction, its four messages sent at once (tokio-postgres pipelines requests
        // issued together; the server runs them in order): one round trip a group instead of
        // four. A failed statement aborts the transaction and its COMMIT rolls back.
        // The accounts the facts touch are locked first, in id order, before their episodes:
        // the order of the lifecycle jobs (account, then episode), so that a recorder and a
        // job (or two recorders) never wait for each other in a circle.
        let facts = !self.overdue.0.is_empty() || !w_accounts.is_empty();
        // Raw SQL: BEGIN and COMMIT pipelined with the statements; diesel awaits its BEGIN first.
        let begin = client.batch_execute("BEGIN");
        let lock = async {
            if facts {
                client
                    .execute(&statements.lock_accounts, &[&self.overdue.0, w_accounts])
                    .await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 14] = [
                &self.accounts,
                &self.ids,
                &self.provider_ids,
                &now,
                &self.attempts,
                &self.message_ids,
                &self.devs,
                &self.accepted,
                &self.overdue.0,
                &self.overdue.1,
                w_accounts,
                w_suspensions,
                w_leads,
                w_release_at,
        ];
        let sent = client.execute(&statements.sent, &params);
        let commit = client.batch_execute("COMMIT");
        let (begun, locked, sent, committed) = tokio::join!(begin, lock, sent, commit);
        begun?;
        locked?;
        sent?;
        committed?;
        Ok(())
    }
}

/// The recorder's statements, prepared on its connection once per run.
struct RecorderStatements {
    lock_accounts: tokio_postgres::Statement,
    sent: tokio_postgres::Statement,
    failed: tokio_postgres::Statement,
}

impl RecorderStatements {
    async fn prepare(client: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        // Raw SQL: prepared once per run on the recorder's raw connection, not a diesel one.
        Ok(RecorderStatements {
            lock_accounts: client
                .prepare(
                    "SELECT 1 FROM accounts WHERE id = ANY($1::text[] || $2::text[]) ORDER BY id FOR UPDATE",
                )
                .await?,
            sent: client.prepare(RECORD_SENT).await?,
            // Only while this claim is still ours: a worker whose lease ran out must not
            // overwrite what the worker that took the notice over recorded.
            failed: client
                .prepare(
                    "UPDATE notices SET status = $3, last_error = $4, lease_until = NULL, next_attempt_at = $5
                     WHERE account_id = $1 AND id = $2 AND status = 'sending' AND attempts = $6",
                )
                .await?,
        })
    }
}

/// One statement (after the accounts' locks, in the same transaction): the sent notices (only while the claim is
/// still ours), then for the accepted ones
/// - R2: the episode's first accepted overdue alert, only while that episode is open and is
///   the account's current one, and only the first acceptance counts ($9, $10);
/// - R9: the release warnings accepted for a suspension with the release instant they
///   announced ($11 to $14);
/// - the accounts marked due for the jobs whose decisions the facts move (the grace clock
///   started: enforcement and reminders; a release can now be due), already locked in id
///   order by the statement before this one.
///
/// Every table is reached through its key with `= ANY(array)`, so that the plan stays an
/// index lookup per row whatever the statistics say: with the notices' statistics saying that
/// none is `sending` (as they do after a quiet night), the planner otherwise scanned all the
/// claimed notices once per outcome (9.7 s for 3,900 outcomes), and the accounts table whole.
/// The notices by their account and the group's id range: `account_id = ANY($1) AND id =
/// ANY($2)` descends the primary key once per (account, id) pair of the two arrays, k² descents
/// for k outcomes; the range keeps an account's older notices out of the scan. The
/// outcomes are materialized once: the planner, believing few notices `sending`, loops over
/// the notices and rescans the outcomes for each, and unnest'ing seven arrays per rescan was
/// 2.6 ms of a 4.5 ms statement for 45 outcomes (auto_explain).
///
/// Raw SQL: data-modifying CTEs over unnest'ed arrays, which the query builder cannot say.
const RECORD_SENT: &str = "
WITH u AS MATERIALIZED (
  SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $5::int[], $6::text[], $7::bool[], $8::bool[])
       AS u(account_id, id, pid, attempts, mid, dev, accepted)
), sent AS (
  UPDATE notices n SET status = 'sent', provider_message_id = u.pid, message_id = u.mid,
         dev_channel = u.dev, accepted_at = CASE WHEN u.accepted THEN $4::timestamptz END,
         lease_until = NULL, last_error = NULL
  FROM u
  WHERE n.account_id = ANY($1) AND n.id BETWEEN (SELECT min(id) FROM u) AND (SELECT max(id) FROM u)
    AND n.account_id = u.account_id AND n.id = u.id AND n.status = 'sending' AND n.attempts = u.attempts
  RETURNING n.id
), grace AS (
  UPDATE arrears_episodes e SET first_overdue_alert_at = $4
  FROM unnest($9::text[], $10::int[]) AS o(account_id, no), accounts a
  WHERE e.account_id = ANY($9) AND a.id = ANY($9)
    AND e.account_id = o.account_id AND e.no = o.no AND e.first_overdue_alert_at IS NULL
    AND e.closed_at IS NULL AND a.id = e.account_id AND a.episode = e.no
  RETURNING e.account_id
), warned AS (
  INSERT INTO release_warnings (account_id, suspension, lead_seconds, release_at, accepted_at)
  SELECT w.account_id, w.suspension, w.lead, w.release_at, $4
  FROM unnest($11::text[], $12::int[], $13::int[], $14::timestamptz[])
       AS w(account_id, suspension, lead, release_at)
  ON CONFLICT DO NOTHING
  RETURNING account_id
), due AS (
  SELECT id, id = ANY(ARRAY(SELECT account_id FROM grace)) AS grace, id = ANY($11::text[]) AS release
  FROM accounts
  WHERE id = ANY(ARRAY(SELECT account_id FROM grace) || $11::text[])
  ORDER BY id
  FOR UPDATE
)
UPDATE accounts a SET
  enforce_due_at = CASE WHEN due.grace THEN least(coalesce(a.enforce_due_at, 'infinity'), $4) ELSE a.enforce_due_at END,
  alerts_due_at = CASE WHEN due.grace THEN least(coalesce(a.alerts_due_at, 'infinity'), $4) ELSE a.alerts_due_at END,
  release_due_at = CASE WHEN due.release THEN least(coalesce(a.release_due_at, 'infinity'), $4) ELSE a.release_due_at END
FROM due
WHERE a.id = due.id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped_with_jitter() {
        let c = Config::from_toml(crate::config::EXAMPLE_CONFIG, "t", &[]).unwrap();
        for id in 0..50 {
            let first = backoff(&c, 1, id).num_seconds();
            assert!((48..=72).contains(&first), "{first}");
            let later = backoff(&c, 20, id).num_seconds();
            assert!((2880..=4320).contains(&later), "{later}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// The job, as registered in `jobs!` (jobs/mod.rs)

use crate::jobs::registry::at_least_one;
use crate::jobs::{Job, JobCtx, Knobs, RunArgs, Runs, Simulated, SimulatedAt, Skipped};

/// The job (its registration is `deliver_notifications::DeliverNotifications` in `jobs!`).
pub struct DeliverNotifications;

/// deliver_notifications' knobs (`[knobs]` in jobs/deliver_notifications.toml).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryKnobs {
    /// Notices claimed per pass (`notifications.batch_size`).
    pub batch_size: Option<usize>,
    /// Notices sent at once (`notifications.concurrency`).
    pub concurrency: Option<usize>,
}

impl Knobs for DeliveryKnobs {
    fn check(&self) -> Result<(), (&'static str, String)> {
        at_least_one("batch_size", self.batch_size)?;
        at_least_one("concurrency", self.concurrency)
    }

    fn apply(&self, config: &mut Config) {
        if let Some(n) = self.batch_size {
            config.notifications.batch_size = n;
        }
        if let Some(n) = self.concurrency {
            config.notifications.concurrency = n;
        }
    }
}

impl Job for DeliverNotifications {
    const NAME: &'static str = "deliver_notifications";
    const SCHEDULE: &'static str = include_str!("../../jobs/deliver_notifications.toml");
    const RUNS: Runs = Runs::Continuously;
    /// Hourly in a simulation, right after the alerts it delivers.
    const SIMULATED: Simulated = Simulated {
        at: SimulatedAt::EveryHour,
        order: 2,
    };

    type Options = Options;
    type Knobs = DeliveryKnobs;
    type Report = DeliverReport;

    fn options(args: &RunArgs, _: &Config, _: &DeliveryKnobs) -> Options {
        Options {
            as_of: args.as_of,
            dry_run: args.dry_run,
            max_batches: args.max_batches.unwrap_or(100),
        }
    }

    /// With the caller's channels, or channels of its own (built before anything is read,
    /// so that a bad channel setting fails a dry run too).
    async fn run(
        ctx: JobCtx<'_>,
        opts: &Options,
        _slot: DateTime<Utc>,
    ) -> Result<DeliverReport, JobError> {
        match ctx.channels {
            Some(channels) => run(ctx.db, ctx.config, channels, opts).await,
            None => {
                let channels = Channels::from_config(ctx.config).map_err(JobError::Channels)?;
                run(ctx.db, ctx.config, &channels, opts).await
            }
        }
    }

    fn skipped(_: &DeliverReport) -> Option<Skipped> {
        None
    }

    fn idle(r: &DeliverReport) -> bool {
        r.claimed == 0
    }
}
