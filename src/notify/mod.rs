//! Notifications (R8): the transactional outbox, templates, and the channels that deliver
//! it: email over SMTP (or .eml files), SMS through provider adapters, and signed webhooks to
//! the products' control planes.

pub mod email;
pub mod sms;
pub mod templates;
pub mod webhook;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::db::schema::{accounts, notices};
use crate::domain::money::format_scaled;

pub use crate::domain::calendar::format_instant;
pub use crate::domain::notice::NoticeKind;

/// What a customer notice needs to know about its account; no contact address (whether it
/// has one is read, never the address).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = accounts)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct Recipient {
    pub id: String,
    pub name: String,
    #[diesel(select_expression = accounts::email.is_not_null())]
    pub has_email: bool,
    #[diesel(select_expression = accounts::phone.is_not_null())]
    pub has_phone: bool,
    pub timezone: String,
    pub cash_balance: i64,
    pub credit_quota: i64,
}

pub async fn recipient(conn: &mut AsyncPgConnection, id: &str) -> QueryResult<Recipient> {
    accounts::table
        .find(id)
        .select(Recipient::as_select())
        .first(conn)
        .await
}

impl Recipient {
    /// The variables every customer template may use, plus `extra`.
    pub fn vars(&self, config: &Config, extra: serde_json::Value) -> serde_json::Value {
        let d = config.billing.minor_unit_digits;
        let cur = &config.billing.currency;
        let due = (-(self.cash_balance + self.credit_quota)).max(0);
        let mut v = serde_json::json!({
            "account_id": self.id,
            "account_name": self.name,
            "amount_due": format!("{} {cur}", format_scaled(due, d)),
            "cash_balance": format!("{} {cur}", format_scaled(self.cash_balance, d)),
        });
        if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
        }
        v
    }

    pub fn at(&self, t: DateTime<Utc>) -> String {
        format_instant(t, &self.timezone)
    }
}

/// Writes a notice into the outbox, once per (account, dedupe key). Returns whether it was
/// new. Call it in the transaction of the change that causes the notice.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    account_id: &str,
    kind: NoticeKind,
    channel: &str,
    period: &str,
    payload: &serde_json::Value,
    now: DateTime<Utc>,
) -> QueryResult<bool> {
    let key = format!("{}:{period}:{channel}", kind.as_str());
    let n = diesel::insert_into(notices::table)
        .values((
            notices::account_id.eq(account_id),
            notices::kind.eq(kind.as_str()),
            notices::channel.eq(channel),
            notices::dedupe_key.eq(&key),
            notices::payload.eq(payload),
            notices::next_attempt_at.eq(now),
            notices::created_at.eq(now),
        ))
        .on_conflict((notices::account_id, notices::dedupe_key))
        .do_nothing()
        .execute(conn)
        .await?;
    Ok(n > 0)
}

/// Writes a customer notice on every channel the account can be reached on.
pub async fn notify_customer(
    conn: &mut AsyncPgConnection,
    config: &Config,
    r: &Recipient,
    kind: NoticeKind,
    period: &str,
    extra: serde_json::Value,
    now: DateTime<Utc>,
) -> QueryResult<usize> {
    let vars = r.vars(config, extra);
    let mut n = 0;
    for (channel, reachable) in [("email", r.has_email), ("sms", r.has_phone)] {
        if reachable && enqueue(conn, &r.id, kind, channel, period, &vars, now).await? {
            n += 1;
        }
    }
    Ok(n)
}

/// A stable id for a webhook event, the same on every retry, so receivers can drop duplicates.
pub fn event_id(account_id: &str, dedupe: &str) -> String {
    let digest = Sha256::digest(format!("{account_id}\u{1f}{dedupe}").as_bytes());
    format!("evt_{}", &hex::encode(digest)[..24])
}

/// Writes a control-plane event for `product`'s endpoint, when one is configured.
#[allow(clippy::too_many_arguments)]
pub async fn notify_control_plane(
    conn: &mut AsyncPgConnection,
    config: &Config,
    account_id: &str,
    product: &str,
    kind: NoticeKind,
    period: &str,
    data: serde_json::Value,
    now: DateTime<Utc>,
) -> QueryResult<bool> {
    if !config.webhooks.products.contains_key(product) {
        return Ok(false);
    }
    let dedupe = format!("{}:{period}:webhook", kind.as_str());
    let body = serde_json::json!({
        "event_id": event_id(account_id, &dedupe),
        "type": kind.as_str(),
        "occurred_at": now,
        "account_id": account_id,
        "product": product,
        "data": data,
    });
    enqueue(conn, account_id, kind, "webhook", period, &body, now).await
}

/// How a delivery attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: SMTP 4xx, timeouts, HTTP 5xx and 429, connection failures.
    #[error("{0}")]
    Temporary(String),
    /// Final: SMTP 5xx, a bad address, a template error, HTTP 4xx.
    #[error("{0}")]
    Permanent(String),
}

impl SendError {
    pub fn with_detail(self, detail: Option<&serde_json::Value>) -> SendError {
        let Some(d) = detail.and_then(|d| d.as_str()) else {
            return self;
        };
        match self {
            SendError::Temporary(m) => SendError::Temporary(format!("{m}: {d}")),
            SendError::Permanent(m) => SendError::Permanent(format!("{m}: {d}")),
        }
    }
}

/// The channels, built once per process: what delivery sends through and `check` builds.
/// Here, not in the delivery job, so that the job registry (whose contexts carry them) and
/// the job do not import each other.
pub struct Channels {
    pub templates: templates::Templates,
    pub mailer: email::Mailer,
    pub sms: sms::SmsSender,
    pub http: reqwest::Client,
}

impl Channels {
    pub fn from_config(config: &Config) -> Result<Channels, String> {
        let templates = templates::Templates::load(config.notifications.templates_dir.as_deref())
            .map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(
                config.notifications.send_timeout.seconds() as u64,
            ))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Channels {
            templates,
            mailer: email::Mailer::from_config(config)?,
            sms: sms::SmsSender::from_config(config, http.clone()),
            http,
        })
    }
}
