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
use crate::db::Db;
use crate::domain::alerts::Topic;
use crate::jobs::{JobError, JobName};
use crate::notify::email::{build_message, Mailer};
use crate::notify::sms::{template_params, SmsSender};
use crate::notify::templates::Templates;
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

/// The channels, built once per process.
pub struct Channels {
    pub templates: Templates,
    pub mailer: Mailer,
    pub sms: SmsSender,
    pub http: reqwest::Client,
}

impl Channels {
    pub fn from_config(config: &Config) -> Result<Channels, String> {
        let templates = Templates::load(config.notifications.templates_dir.as_deref())
            .map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(
                config.notifications.send_timeout.seconds() as u64,
            ))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Channels {
            templates,
            mailer: Mailer::from_config(config)?,
            sms: SmsSender::from_config(config, http.clone()),
            http,
        })
    }
}

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
        job: JobName::DeliverNotifications.as_str(),
        as_of: opts.as_of,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut client = db.raw_client().await?;
    report.due = client
        .query_one(
            "SELECT count(*) FROM notices
             WHERE (status IN ('pending', 'retrying') AND next_attempt_at <= $1) OR (status = 'sending' AND lease_until <= $1)",
            &[&opts.as_of],
        )
        .await?
        .get(0);
    if opts.dry_run {
        return Ok(report);
    }
    let lease_until = opts.as_of + config.notifications.lease.to_chrono();
    let limit = config.notifications.batch_size as i64;
    for _ in 0..opts.max_batches.max(1) {
        // One transaction: the due notices whose cause is gone are cancelled, and the rest of
        // the batch is claimed, so that nothing claimed here was untrue at the claim.
        let tx = client.transaction().await?;
        let cancelled = tx.query(CANCEL_STALE, &[&opts.as_of, &limit]).await?;
        for r in &cancelled {
            let (id, kind, reason): (i64, String, String) = (r.get(1), r.get(2), r.get(3));
            tracing::info!(
                job = "deliver_notifications",
                notice = id,
                kind,
                reason,
                "notice cancelled: its cause is gone"
            );
            if report.cancelled_reasons.len() < 100 {
                report
                    .cancelled_reasons
                    .push(format!("{id} {kind}: {reason}"));
            }
        }
        report.cancelled += cancelled.len();
        let rows = tx
            .query(
                "UPDATE notices n SET status = 'sending', lease_until = $2, attempts = n.attempts + 1
                 FROM (SELECT account_id, id FROM notices
                       WHERE (status IN ('pending', 'retrying') AND next_attempt_at <= $1)
                          OR (status = 'sending' AND lease_until <= $1)
                       ORDER BY next_attempt_at, id LIMIT $3
                       FOR UPDATE SKIP LOCKED) due
                 WHERE n.account_id = due.account_id AND n.id = due.id
                 RETURNING n.account_id, n.id, n.kind, n.channel, n.payload, n.attempts",
                &[&opts.as_of, &lease_until, &limit],
            )
            .await?;
        tx.commit().await?;
        if rows.is_empty() {
            if cancelled.is_empty() {
                break;
            }
            continue;
        }
        report.claimed += rows.len();
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
        // Contacts for the whole batch up front: a send in flight holds no database
        // connection.
        let ids: Vec<&str> = claimed.iter().map(|n| n.account_id.as_str()).collect();
        let contacts: HashMap<String, Contact> = client
            .query(
                "SELECT id, email, phone, locale FROM accounts WHERE id = ANY($1)",
                &[&ids],
            )
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
        // Send concurrently (the SMTP pool and the HTTP client are shared), and record each
        // outcome as soon as it is known: the recorder takes whatever has finished while its
        // last write was in flight, so a crash re-sends at most the sends then in flight.
        let contacts = &contacts;
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let sending = async move {
            let mut sends = futures_util::stream::iter(claimed)
                .map(|n| async move {
                    let outcome = deliver_one(
                        config,
                        channels,
                        &n,
                        contacts.get(&n.account_id),
                        opts.as_of,
                    )
                    .await;
                    (n, outcome)
                })
                .buffer_unordered(config.notifications.concurrency.max(1));
            while let Some(done) = sends.next().await {
                if done_tx.send(done).is_err() {
                    break;
                }
            }
        };
        let recording = async {
            while let Some(first) = done_rx.recv().await {
                let mut outcomes = vec![first];
                while let Ok(more) = done_rx.try_recv() {
                    outcomes.push(more);
                }
                record_outcomes(&mut client, config, outcomes, opts.as_of, &mut report).await?;
            }
            Ok::<(), JobError>(())
        };
        let ((), recorded) = tokio::join!(sending, recording);
        recorded?;
    }
    tracing::info!(
        job = report.job,
        sent = report.sent,
        retrying = report.retrying,
        dead = report.dead,
        "deliver_notifications finished"
    );
    Ok(report)
}

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

/// Due notices whose cause no longer holds, cancelled with the reason (at most `$2`, the
/// oldest first, locked so that no other worker claims them meanwhile): an overdue alert,
/// reminder or suspension-imminent whose arrears episode is over; a release warning whose
/// suspension ended (restored, released, changed reason) or whose release instant moved; a
/// balance-low alert whose funds are back at or above the threshold. Suspended, restored and
/// released notices, and webhooks, always go.
const CANCEL_STALE: &str = "
WITH due AS (
  SELECT account_id, id FROM notices
  WHERE ((status IN ('pending', 'retrying') AND next_attempt_at <= $1) OR (status = 'sending' AND lease_until <= $1))
    AND kind IN ('overdue', 'overdue_reminder', 'suspension_imminent', 'release_warning', 'balance_low')
  ORDER BY next_attempt_at, id LIMIT $2
  FOR UPDATE SKIP LOCKED
), why AS (
  SELECT n.account_id, n.id, n.kind,
    CASE
      WHEN n.kind IN ('overdue', 'overdue_reminder', 'suspension_imminent') THEN
        CASE WHEN e.no IS NULL THEN 'the arrears episode it was about is over' END
      WHEN n.kind = 'release_warning' THEN
        CASE WHEN s.no IS NULL
               THEN 'the resource is no longer suspended for the reason the warning was about'
             WHEN s.release_at IS DISTINCT FROM (
                    SELECT (t->>'release_at')::timestamptz FROM jsonb_array_elements(n.payload->'_about') t
                    WHERE t->>'topic' = 'warning' LIMIT 1)
               THEN 'the release instant it announced has moved' END
      WHEN n.kind = 'balance_low' THEN
        CASE WHEN a.low_balance_threshold IS NULL
               OR a.cash_balance + a.credit_quota + coalesce((
                    SELECT sum(c.remaining) FROM coupons c
                    WHERE c.account_id = n.account_id AND c.remaining > 0 AND c.expires_at > $1), 0)
                  >= a.low_balance_threshold
             THEN 'funds are no longer below the threshold' END
    END AS reason
  FROM due
  JOIN notices n ON n.account_id = due.account_id AND n.id = due.id
  JOIN accounts a ON a.id = n.account_id
  LEFT JOIN arrears_episodes e
    ON e.account_id = n.account_id AND e.no = n.episode AND e.closed_at IS NULL
  LEFT JOIN resource_suspensions s
    ON s.account_id = n.account_id AND s.no = n.suspension AND s.ended_at IS NULL
)
UPDATE notices n SET status = 'cancelled', cancel_reason = why.reason, lease_until = NULL
FROM why
WHERE n.account_id = why.account_id AND n.id = why.id AND why.reason IS NOT NULL
RETURNING n.account_id, n.id, n.kind, n.cancel_reason";

/// Records outcomes in one transaction: the sent ones with one statement, with the facts an
/// accepted one establishes (R2, R9); failures with their backoff or as dead. A crash before
/// this commit leaves these notices claimed: they are sent again when the lease runs out (at
/// least once).
async fn record_outcomes(
    client: &mut tokio_postgres::Client,
    config: &Config,
    outcomes: Vec<(Claimed, Result<Sent, SendError>)>,
    now: DateTime<Utc>,
    report: &mut DeliverReport,
) -> Result<(), JobError> {
    let tx = client.transaction().await?;
    let (mut accounts, mut ids, mut provider_ids, mut attempts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut message_ids, mut devs, mut accepted) = (Vec::new(), Vec::new(), Vec::new());
    for (n, outcome) in &outcomes {
        match outcome {
            Ok(sent) => {
                // R9: a channel that reaches nobody warned nobody, unless configured so.
                let counts =
                    !sent.dev_channel || config.notifications.dev_channels_count_as_accepted;
                accounts.push(n.account_id.as_str());
                ids.push(n.id);
                provider_ids.push(sent.provider_id.as_str());
                attempts.push(n.attempts);
                message_ids.push(sent.message_id.as_deref());
                devs.push(sent.dev_channel);
                accepted.push(counts);
                if counts {
                    accepted_facts(&tx, n, now).await?;
                }
                if sent.dev_channel {
                    report.sent_to_dev_channels += 1;
                }
                report.sent += 1;
            }
            Err(e) => {
                let dead = matches!(e, SendError::Permanent(_))
                    || n.attempts >= config.notifications.max_attempts as i32;
                let status = if dead { "dead" } else { "retrying" };
                let next = now + backoff(config, n.attempts, n.id);
                // Only while this claim is still ours: a worker whose lease ran out must not
                // overwrite what the worker that took the notice over recorded.
                tx.execute(
                    "UPDATE notices SET status = $3, last_error = $4, lease_until = NULL, next_attempt_at = $5
                     WHERE account_id = $1 AND id = $2 AND status = 'sending' AND attempts = $6",
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
    if !ids.is_empty() {
        tx.execute(
            "UPDATE notices n SET status = 'sent', provider_message_id = u.pid, message_id = u.mid,
                    dev_channel = u.dev, accepted_at = CASE WHEN u.accepted THEN $4::timestamptz END,
                    lease_until = NULL, last_error = NULL
             FROM unnest($1::text[], $2::bigint[], $3::text[], $5::int[], $6::text[], $7::bool[], $8::bool[])
                  AS u(account_id, id, pid, attempts, mid, dev, accepted)
             WHERE n.account_id = u.account_id AND n.id = u.id AND n.status = 'sending' AND n.attempts = u.attempts",
            &[&accounts, &ids, &provider_ids, &now, &attempts, &message_ids, &devs, &accepted],
        )
        .await?;
    }
    tx.commit().await?;
    tracing::debug!(
        job = "deliver_notifications",
        outcomes = outcomes.len(),
        "outcomes recorded"
    );
    Ok(())
}

/// R2 and R9: the facts that an accepted notice establishes, for the episode and suspension
/// it was about (its `_about` topics): the episode's first accepted overdue alert (only while
/// that episode is open, and only the first acceptance counts), and a release warning for a
/// suspension with the release instant it announced. The account is marked due for the jobs
/// whose decisions the fact moves.
async fn accepted_facts(
    tx: &tokio_postgres::Transaction<'_>,
    n: &Claimed,
    now: DateTime<Utc>,
) -> Result<(), JobError> {
    let topics: Vec<Topic> =
        serde_json::from_value(n.payload["_about"].clone()).unwrap_or_default();
    let (mut grace, mut release) = (false, false);
    for t in topics {
        match t {
            Topic::Overdue { episode } => {
                let set = tx
                    .execute(
                        "UPDATE arrears_episodes e SET first_overdue_alert_at = $3
                         FROM accounts a
                         WHERE e.account_id = $1 AND e.no = $2 AND e.first_overdue_alert_at IS NULL
                           AND e.closed_at IS NULL AND a.id = e.account_id AND a.episode = e.no",
                        &[&n.account_id, &episode, &now],
                    )
                    .await?;
                grace |= set > 0;
            }
            Topic::Warning {
                suspension,
                lead_seconds,
                release_at,
            } => {
                let Ok(lead) = i32::try_from(lead_seconds) else {
                    continue;
                };
                tx.execute(
                    "INSERT INTO release_warnings (account_id, suspension, lead_seconds, release_at, accepted_at)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&n.account_id, &suspension, &lead, &release_at, &now],
                )
                .await?;
                release = true;
            }
            Topic::Reminder { .. } | Topic::Imminent { .. } => {}
        }
    }
    if grace || release {
        // The lcic grace clock started (enforcement and reminders move), or a release can now
        // be due.
        tx.execute(
            "UPDATE accounts SET
               enforce_due_at = CASE WHEN $3 THEN least(coalesce(enforce_due_at, 'infinity'), $2) ELSE enforce_due_at END,
               alerts_due_at = CASE WHEN $3 THEN least(coalesce(alerts_due_at, 'infinity'), $2) ELSE alerts_due_at END,
               release_due_at = CASE WHEN $4 THEN least(coalesce(release_due_at, 'infinity'), $2) ELSE release_due_at END
             WHERE id = $1",
            &[&n.account_id, &now, &grace, &release],
        )
        .await?;
    }
    Ok(())
}

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
