//! Typed configuration: `arrears.toml` (or the compiled-in example) plus environment
//! overrides, validated at load. An error names the key and the problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::domain::money::{self, PRICE_DIGITS};
use crate::domain::policy::{Policy, PolicyDuration};

/// The example configuration shipped in the repository, used when no file is named.
pub const EXAMPLE_CONFIG: &str = include_str!("../arrears.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    billing: RawBilling,
    #[serde(default)]
    database: DatabaseConfig,
    #[serde(default)]
    embedded: EmbeddedConfig,
    #[serde(default)]
    lifecycle: LifecycleConfig,
    #[serde(default)]
    notifications: NotificationsConfig,
    #[serde(default)]
    email: EmailConfig,
    #[serde(default)]
    sms: SmsConfig,
    #[serde(default)]
    webhooks: WebhooksConfig,
    #[serde(default)]
    service: ServiceConfig,
    products: BTreeMap<String, RawProduct>,
}

/// `arrears serve`: the HTTP address, API tokens, the schedule folder, slot leases.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where the HTTP API listens (ARREARS_HTTP_ADDR).
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// Bearer tokens accepted by /v1 (ARREARS_API_TOKENS, comma-separated). None: /v1 answers
    /// 401 to everyone.
    #[serde(default)]
    pub api_tokens: Vec<String>,
    /// An operator folder whose `<job>.toml` files replace the compiled-in schedule
    /// (absolute path).
    pub jobs_dir: Option<PathBuf>,
    /// How long a claimed slot stays claimed without a renewal: a runner that died is taken
    /// over this long after its last renewal.
    #[serde(default = "default_slot_lease")]
    pub lease: PolicyDuration,
    /// How often the service looks for due slots and open batches.
    #[serde(default = "default_tick")]
    pub tick: PolicyDuration,
    /// `json` (default, one object per line on stdout), `text`, or `journald`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

fn default_http_addr() -> String {
    "127.0.0.1:8080".into()
}
fn default_slot_lease() -> PolicyDuration {
    PolicyDuration(60)
}
fn default_tick() -> PolicyDuration {
    PolicyDuration(1)
}
fn default_log_format() -> String {
    "json".into()
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            http_addr: default_http_addr(),
            api_tokens: Vec::new(),
            jobs_dir: None,
            lease: default_slot_lease(),
            tick: default_tick(),
            log_format: default_log_format(),
        }
    }
}

/// The outbox and its delivery (R8).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// An operator folder overriding the compiled-in templates (absolute path; same layout
    /// as templates/ in the repository). Files it lacks fall back to the defaults.
    pub templates_dir: Option<PathBuf>,
    /// "Your services will be suspended at ..." goes out this long before the deadline.
    #[serde(default = "default_imminent")]
    pub suspension_imminent_lead: PolicyDuration,
    /// A notice still failing after this many attempts is dead.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Notices claimed per delivery batch.
    #[serde(default = "default_notice_batch")]
    pub batch_size: usize,
    /// Exponential backoff with jitter: first retry after `retry_base`, doubling, at most `retry_max`.
    #[serde(default = "default_retry_base")]
    pub retry_base: PolicyDuration,
    #[serde(default = "default_retry_max")]
    pub retry_max: PolicyDuration,
    /// A claimed notice whose sender died is taken over after this long.
    #[serde(default = "default_lease")]
    pub lease: PolicyDuration,
    /// Every network call (SMTP, SMS, webhook) is cut off after this long.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: PolicyDuration,
    /// Notices sent at once by one worker.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Whether a notice sent only through a channel that reaches nobody (the `log` SMS
    /// adapter, the `.eml` file transport) counts as accepted by the customer — R9's "warned"
    /// and the lcic grace clock. False: such a notice is recorded as sent, never as accepted.
    /// The demo and the tests that need it set it.
    #[serde(default)]
    pub dev_channels_count_as_accepted: bool,
}

fn default_concurrency() -> usize {
    32
}

fn default_imminent() -> PolicyDuration {
    PolicyDuration(6 * 3600)
}
fn default_attempts() -> u32 {
    10
}
fn default_notice_batch() -> usize {
    100
}
fn default_retry_base() -> PolicyDuration {
    PolicyDuration(60)
}
fn default_retry_max() -> PolicyDuration {
    PolicyDuration(3600)
}
fn default_lease() -> PolicyDuration {
    PolicyDuration(300)
}
fn default_send_timeout() -> PolicyDuration {
    PolicyDuration(10)
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            templates_dir: None,
            suspension_imminent_lead: default_imminent(),
            max_attempts: default_attempts(),
            batch_size: default_notice_batch(),
            retry_base: default_retry_base(),
            retry_max: default_retry_max(),
            lease: default_lease(),
            send_timeout: default_send_timeout(),
            concurrency: default_concurrency(),
            dev_channels_count_as_accepted: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtps://user:pass@host:465` (implicit TLS), `smtp://user:pass@host:587` (STARTTLS
    /// required), `smtp://host:25?tls=none` (plain). Unset: .eml files into the state
    /// directory's outbox folder.
    pub smtp_url: Option<String>,
    /// The sender, e.g. `Billing <billing@example.com>`.
    pub from: Option<String>,
    /// A PEM file of extra CA certificates to trust (a private relay).
    pub ca_file: Option<PathBuf>,
    /// Without an SMTP URL: the folder the .eml files go to (absolute; default: the state
    /// directory's outbox folder).
    pub file_dir: Option<PathBuf>,
    #[serde(default = "default_smtp_pool")]
    pub pool_size: u32,
}

fn default_smtp_pool() -> u32 {
    // 8 sessions and 32 sends at once: 0.25-0.27x smtp-source's rate against smtp-sink where
    // 4 and 16 gave 0.18-0.24x (BENCHMARKS.md); a relay allows far more from one client.
    8
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            smtp_url: None,
            from: None,
            ca_file: None,
            file_dir: None,
            pool_size: default_smtp_pool(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmsProviderKind {
    /// Writes each message (number masked) to a log file: for local use and the demo.
    #[default]
    Log,
    Twilio,
    Tencent,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    #[serde(default)]
    pub provider: SmsProviderKind,
    pub log_file: Option<PathBuf>,
    pub twilio: Option<TwilioConfig>,
    pub tencent: Option<TencentConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    pub account_sid: String,
    pub auth_token: String,
    pub from: String,
    #[serde(default = "default_twilio_base")]
    pub base_url: String,
}

fn default_twilio_base() -> String {
    "https://api.twilio.com".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TencentConfig {
    pub secret_id: String,
    pub secret_key: String,
    pub sdk_app_id: String,
    pub sign_name: String,
    #[serde(default = "default_tencent_region")]
    pub region: String,
    #[serde(default = "default_tencent_endpoint")]
    pub endpoint: String,
    /// Pre-approved template id per notice kind (providers in that region require them).
    pub templates: BTreeMap<String, String>,
}

fn default_tencent_region() -> String {
    "ap-guangzhou".into()
}
fn default_tencent_endpoint() -> String {
    "https://sms.tencentcloudapi.com".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// The default HMAC key (ARREARS_WEBHOOK_SECRET); a product's own key wins.
    pub secret: Option<String>,
    /// Control-plane endpoint per product.
    #[serde(default)]
    pub products: BTreeMap<String, WebhookEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    pub url: String,
    pub secret: Option<String>,
}

/// Safety knobs of the lifecycle jobs (R9, R10).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// One release run releases at most this percentage of live resources...
    #[serde(default = "default_release_percent")]
    pub max_release_percent: u32,
    /// ...or this many, whichever is larger, unless --allow-mass-release.
    #[serde(default = "default_release_always")]
    pub release_always_allowed: u32,
    /// Destructive jobs refuse to run when the service and database clocks differ by more.
    #[serde(default = "default_skew")]
    pub max_clock_skew: PolicyDuration,
    /// A release warning must have been accepted at least this long before release (R9).
    #[serde(default = "default_warning_age")]
    pub warning_min_age: PolicyDuration,
    /// A flood guard: each lifecycle job (send_alerts, enforce_suspensions,
    /// release_resources) decides on at most this many due accounts per run; what it defers
    /// is reported and first in line on the next run. (Also read as `enforce_max_accounts`.)
    #[serde(default = "default_enforce_max", alias = "max_accounts_per_run")]
    pub enforce_max_accounts: usize,
    /// Due accounts decided on and written per transaction by the lifecycle jobs.
    #[serde(default = "default_lifecycle_batch")]
    pub batch_size: usize,
    /// Time travel allowed: `--allow-future`, or a scratch database of the demo, simulate and
    /// the benchmarks. Never read from the file.
    #[serde(skip)]
    pub allow_future: bool,
}

fn default_release_percent() -> u32 {
    5
}
fn default_release_always() -> u32 {
    10
}
fn default_skew() -> PolicyDuration {
    PolicyDuration(300)
}
fn default_warning_age() -> PolicyDuration {
    PolicyDuration(86_400)
}
fn default_enforce_max() -> usize {
    200_000
}
fn default_lifecycle_batch() -> usize {
    500
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            max_release_percent: default_release_percent(),
            release_always_allowed: default_release_always(),
            max_clock_skew: default_skew(),
            warning_min_age: default_warning_age(),
            enforce_max_accounts: default_enforce_max(),
            batch_size: default_lifecycle_batch(),
            allow_future: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    time_zone: String,
    currency: String,
    #[serde(default = "default_digits")]
    minor_unit_digits: u32,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default = "default_billing_workers")]
    workers: usize,
}

fn default_digits() -> u32 {
    2
}
fn default_batch() -> usize {
    5000
}
fn default_billing_workers() -> usize {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: Option<String>,
    #[serde(default = "default_pool")]
    pub pool_size: usize,
}

fn default_pool() -> usize {
    4
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            pool_size: default_pool(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".arrears")
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            state_dir: default_state_dir(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProduct {
    name: String,
    package_meter: Option<String>,
    policy: Policy,
    prices: Vec<RawPrice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    meter: String,
    unit: String,
    unit_price: String,
}

/// Billing settings of the deployment.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    pub time_zone: Tz,
    pub currency: String,
    pub minor_unit_digits: u32,
    pub batch_size: usize,
    /// Connections one instance bills a run's batches on at once.
    pub workers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Price {
    pub meter: String,
    pub unit: String,
    /// Currency per unit, nano-units (1e-9).
    #[serde(skip)]
    pub unit_price_nanos: i64,
    /// The same price as written in the configuration, normalised ("0.015000000").
    pub unit_price: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub package_meter: Option<String>,
    pub policy: Policy,
    pub prices: Vec<Price>,
}

impl Product {
    pub fn price(&self, meter: &str) -> Option<&Price> {
        self.prices.iter().find(|p| p.meter == meter)
    }
}

/// The validated configuration. Built once at start and passed down; never global.
#[derive(Debug, Clone)]
pub struct Config {
    pub billing: BillingConfig,
    pub database: DatabaseConfig,
    pub embedded: EmbeddedConfig,
    pub lifecycle: LifecycleConfig,
    pub notifications: NotificationsConfig,
    pub email: EmailConfig,
    pub sms: SmsConfig,
    pub webhooks: WebhooksConfig,
    pub service: ServiceConfig,
    pub products: BTreeMap<String, Product>,
    /// Where it came from, for messages.
    pub origin: String,
}

/// Environment variables with fixed names (PRODUCT.md §6) and the key each sets.
const FIXED_ENV: &[(&str, &[&str])] = &[
    ("DATABASE_URL", &["database", "url"]),
    ("ARREARS_SMTP_URL", &["email", "smtp_url"]),
    ("ARREARS_EMAIL_FROM", &["email", "from"]),
    ("ARREARS_SMS_PROVIDER", &["sms", "provider"]),
    ("ARREARS_WEBHOOK_SECRET", &["webhooks", "secret"]),
    ("ARREARS_HTTP_ADDR", &["service", "http_addr"]),
    ("ARREARS_API_TOKENS", &["service", "api_tokens"]),
];
/// ARREARS_* variables that are not configuration keys.
const NON_KEY_ENV: &[&str] = &["ARREARS_CONFIG", "ARREARS_LOG"];

impl Config {
    /// Loads from `path` (or the compiled-in example when `None`) and applies overrides from
    /// the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (
                EXAMPLE_CONFIG.to_string(),
                "built-in example configuration".to_string(),
            ),
        };
        Self::from_toml(&text, &origin, env)
    }

    pub fn from_toml(
        text: &str,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.to_string(),
                    message: e.to_string(),
                })?;
        let overrides = apply_env_overrides(&mut table, env)?;
        // An override is typed when it reads as TOML ("5000", "true"); where the key wants a
        // string after all (an app id "1400000000"), it is retried as the string it was.
        let mut retried = 0;
        loop {
            match serde_path_to_error::deserialize::<_, RawConfig>(toml::Value::Table(
                table.clone(),
            )) {
                Ok(raw) => return validate(raw, origin),
                Err(e) => {
                    let key = e.path().to_string();
                    let retry = overrides.iter().find(|(p, _)| p.join(".") == key);
                    match retry {
                        Some((p, raw)) if retried < overrides.len() => {
                            set_path(&mut table, p, toml::Value::String(raw.clone()));
                            retried += 1;
                        }
                        _ => {
                            return Err(ConfigError::Invalid {
                                origin: origin.to_string(),
                                key,
                                message: e.inner().to_string(),
                            })
                        }
                    }
                }
            }
        }
    }

    pub fn product(&self, id: &str) -> Option<&Product> {
        self.products.get(id)
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let mut cur = table;
    for seg in &path[..path.len() - 1] {
        match cur.get_mut(seg).and_then(|v| v.as_table_mut()) {
            Some(t) => cur = t,
            None => return,
        }
    }
    cur.insert(path[path.len() - 1].clone(), value);
}

/// Applies ARREARS_* overrides; returns each (key path, raw value) applied. Hand-written over
/// `toml`, not figment or config-rs: the spec's fixed names (DATABASE_URL, ARREARS_SMTP_URL,
/// the comma-separated ARREARS_API_TOKENS) need their own mapping anyway, and overrides land
/// in the file's own table, so one validation names the key wherever a value came from.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<(Vec<String>, String)>, ConfigError> {
    let mut applied = Vec::new();
    for (var, value) in env {
        let path: Vec<String> = if let Some((_, p)) = FIXED_ENV.iter().find(|(name, _)| name == var)
        {
            p.iter().map(|s| s.to_string()).collect()
        } else if let Some(rest) = var.strip_prefix("ARREARS_") {
            if NON_KEY_ENV.contains(&var.as_str()) {
                continue;
            }
            if !rest.contains("__") {
                // Single-level names (ARREARS_SMTP_URL, ...) belong to later channels; a key
                // always has a section.
                continue;
            }
            rest.split("__").map(|s| s.to_ascii_lowercase()).collect()
        } else {
            continue;
        };
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var: var.clone(),
                message: "empty key segment".into(),
            });
        }
        let parsed = if var == "ARREARS_API_TOKENS" {
            // A comma-separated list, never TOML: a token may contain anything but a comma.
            toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| toml::Value::String(t.to_string()))
                    .collect(),
            )
        } else {
            parse_env_value(value)
        };
        let mut cur = &mut *table;
        for seg in &path[..path.len() - 1] {
            let entry = cur
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                message: format!("`{seg}` is not a section"),
            })?;
        }
        cur.insert(path[path.len() - 1].clone(), parsed);
        applied.push((path, value.clone()));
    }
    Ok(applied)
}

/// An override value is TOML when it parses as TOML (`5000`, `true`, `["7d","1d"]`), else a
/// plain string.
fn parse_env_value(value: &str) -> toml::Value {
    // "+15550001111" and "0123" are phone numbers and codes, not numbers.
    let t = value.trim_start();
    if t.starts_with('+') || (t.starts_with('0') && t.len() > 1 && !t.starts_with("0.")) {
        return toml::Value::String(value.to_string());
    }
    let doc = format!("v = {value}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(value.to_string())),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        key: key.to_string(),
        message,
    };
    let time_zone: Tz = raw.billing.time_zone.parse().map_err(|_| {
        invalid(
            "billing.time_zone",
            format!("{:?} is not an IANA time zone", raw.billing.time_zone),
        )
    })?;
    check_billing_and_lifecycle(&raw).map_err(|(k, m)| invalid(&k, m))?;
    check_service_and_channels(&raw).map_err(|(k, m)| invalid(&k, m))?;
    if raw.products.is_empty() {
        return Err(invalid(
            "products",
            "at least one product is required".into(),
        ));
    }
    let mut products = BTreeMap::new();
    for (id, p) in raw.products {
        let product = validate_product(id.clone(), p).map_err(|(k, m)| invalid(&k, m))?;
        products.insert(id, product);
    }
    Ok(Config {
        billing: BillingConfig {
            time_zone,
            currency: raw.billing.currency,
            minor_unit_digits: raw.billing.minor_unit_digits,
            batch_size: raw.billing.batch_size,
            workers: raw.billing.workers,
        },
        database: raw.database,
        embedded: raw.embedded,
        lifecycle: raw.lifecycle,
        notifications: raw.notifications,
        email: raw.email,
        sms: raw.sms,
        webhooks: raw.webhooks,
        service: raw.service,
        products,
        origin: origin.to_string(),
    })
}

/// A setting that is wrong: its key and why.
type Invalid = (String, String);

fn invalid(key: &str, message: String) -> Invalid {
    (key.to_string(), message)
}

/// The billing and lifecycle settings serde cannot check.
fn check_billing_and_lifecycle(raw: &RawConfig) -> Result<(), Invalid> {
    if raw.billing.currency.len() != 3
        || !raw.billing.currency.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(invalid(
            "billing.currency",
            format!("{:?} is not an ISO 4217 code", raw.billing.currency),
        ));
    }
    if raw.billing.minor_unit_digits > 4 {
        return Err(invalid(
            "billing.minor_unit_digits",
            "must be between 0 and 4".into(),
        ));
    }
    if raw.billing.batch_size == 0 {
        return Err(invalid(
            "billing.batch_size",
            "must be greater than 0".into(),
        ));
    }
    if !(1..=16).contains(&raw.billing.workers) {
        return Err(invalid(
            "billing.workers",
            "must be between 1 and 16".into(),
        ));
    }
    if raw.lifecycle.max_release_percent > 100 {
        return Err(invalid(
            "lifecycle.max_release_percent",
            "must be between 0 and 100".into(),
        ));
    }
    if raw.lifecycle.enforce_max_accounts == 0 {
        return Err(invalid(
            "lifecycle.enforce_max_accounts",
            "must be greater than 0".into(),
        ));
    }
    if raw.lifecycle.batch_size == 0 || raw.lifecycle.batch_size > 10_000 {
        return Err(invalid(
            "lifecycle.batch_size",
            "must be between 1 and 10000".into(),
        ));
    }
    Ok(())
}

/// The service's and the channels' settings serde cannot check.
fn check_service_and_channels(raw: &RawConfig) -> Result<(), Invalid> {
    if raw
        .service
        .http_addr
        .parse::<std::net::SocketAddr>()
        .is_err()
    {
        return Err(invalid(
            "service.http_addr",
            format!(
                "{:?} is not an address like 127.0.0.1:8080",
                raw.service.http_addr
            ),
        ));
    }
    if raw.service.api_tokens.iter().any(|t| t.len() < 16) {
        return Err(invalid(
            "service.api_tokens",
            "every token must be at least 16 characters".into(),
        ));
    }
    if let Some(dir) = &raw.service.jobs_dir {
        if !dir.is_absolute() {
            return Err(invalid(
                "service.jobs_dir",
                "must be an absolute path (a relative one would depend on the working directory)"
                    .into(),
            ));
        }
    }
    if raw.service.lease.seconds() < 1 || raw.service.tick.seconds() < 1 {
        return Err(invalid(
            "service.lease",
            "lease and tick must be at least 1s".into(),
        ));
    }
    if !["json", "text", "journald"].contains(&raw.service.log_format.as_str()) {
        return Err(invalid(
            "service.log_format",
            format!(
                "{:?}: expected json, text or journald",
                raw.service.log_format
            ),
        ));
    }
    if raw
        .email
        .file_dir
        .as_ref()
        .is_some_and(|d| !d.is_absolute())
    {
        return Err(invalid(
            "email.file_dir",
            "must be an absolute path (a relative one would depend on the working directory)"
                .into(),
        ));
    }
    if let Some(dir) = &raw.notifications.templates_dir {
        if !dir.is_absolute() {
            return Err(invalid(
                "notifications.templates_dir",
                "must be an absolute path (a relative one would depend on the working directory)"
                    .into(),
            ));
        }
    }
    match raw.sms.provider {
        SmsProviderKind::Twilio if raw.sms.twilio.is_none() => {
            return Err(invalid(
                "sms.twilio",
                "the twilio provider needs account_sid, auth_token and from".into(),
            ))
        }
        SmsProviderKind::Tencent if raw.sms.tencent.is_none() => {
            return Err(invalid(
                "sms.tencent",
                "the tencent provider needs its credentials and templates".into(),
            ))
        }
        _ => {}
    }
    if let Some(url) = &raw.email.smtp_url {
        crate::smtp_url::SmtpSettings::parse(url).map_err(|e| invalid("email.smtp_url", e))?;
    }
    for product in raw.webhooks.products.keys() {
        if !raw.products.contains_key(product) {
            return Err(invalid(
                &format!("webhooks.products.{product}"),
                "no such product".into(),
            ));
        }
    }
    if raw.database.pool_size == 0 {
        return Err(invalid(
            "database.pool_size",
            "must be greater than 0".into(),
        ));
    }
    Ok(())
}

/// A product's id, policy and prices, checked; its prices parsed.
fn validate_product(id: String, p: RawProduct) -> Result<Product, Invalid> {
    let key = |k: &str| format!("products.{id}.{k}");
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            &format!("products.{id}"),
            "product ids use letters, digits, '_' and '-'".into(),
        ));
    }
    if let Err((k, why)) = p.policy.check() {
        return Err(invalid(&key(&format!("policy.{k}")), why.into()));
    }
    if p.prices.is_empty() {
        return Err(invalid(
            &key("prices"),
            "a product needs at least one price".into(),
        ));
    }
    let mut prices: Vec<Price> = Vec::new();
    for (i, pr) in p.prices.into_iter().enumerate() {
        let pk = key(&format!("prices[{i}]"));
        if pr.meter.is_empty() {
            return Err(invalid(&format!("{pk}.meter"), "must not be empty".into()));
        }
        if prices.iter().any(|q| q.meter == pr.meter) {
            return Err(invalid(
                &format!("{pk}.meter"),
                format!("meter {:?} is priced twice", pr.meter),
            ));
        }
        let nanos = money::parse_non_negative(&pr.unit_price, PRICE_DIGITS)
            .map_err(|e| invalid(&format!("{pk}.unit_price"), e.to_string()))?;
        prices.push(Price {
            meter: pr.meter,
            unit: pr.unit,
            unit_price_nanos: nanos,
            unit_price: money::format_scaled(nanos, PRICE_DIGITS),
        });
    }
    if let Some(m) = &p.package_meter {
        if !prices.iter().any(|q| &q.meter == m) {
            return Err(invalid(
                &key("package_meter"),
                format!("{m:?} has no price in this product"),
            ));
        }
    }
    Ok(Product {
        id,
        name: p.name,
        package_meter: p.package_meter,
        policy: p.policy,
        prices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn example_configuration_loads_with_both_products() {
        let c = Config::from_toml(EXAMPLE_CONFIG, "example", &[]).unwrap();
        assert_eq!(c.billing.time_zone, chrono_tz::Asia::Shanghai);
        assert_eq!(c.products["lcic"].policy.grace.seconds(), 86_400);
        assert_eq!(c.products["sa"].policy.retention.seconds(), 15 * 86_400);
        assert_eq!(
            c.products["lcic"]
                .price("classroom_minutes")
                .unwrap()
                .unit_price_nanos,
            15_000_000
        );
    }

    #[test]
    fn environment_overrides_any_key() {
        let c = Config::from_toml(
            EXAMPLE_CONFIG,
            "example",
            &env(&[
                ("ARREARS_BILLING__TIME_ZONE", "UTC"),
                ("ARREARS_PRODUCTS__LCIC__POLICY__GRACE", "72h"),
                ("ARREARS_BILLING__BATCH_SIZE", "10"),
                ("DATABASE_URL", "postgres://x@localhost/y"),
            ]),
        )
        .unwrap();
        assert_eq!(c.billing.time_zone, chrono_tz::UTC);
        assert_eq!(c.products["lcic"].policy.grace.seconds(), 72 * 3600);
        assert_eq!(c.billing.batch_size, 10);
        assert_eq!(c.database.url.as_deref(), Some("postgres://x@localhost/y"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "ARREARS_BILLING__TIME_ZONE",
                "Mars/Olympus",
                "billing.time_zone",
            ),
            (
                "ARREARS_PRODUCTS__SA__POLICY__GRACE",
                "0d",
                "products.sa.policy.grace",
            ),
            ("ARREARS_BILLING__BATCH_SIZE", "0", "billing.batch_size"),
            ("ARREARS_BILLING__NOPE", "1", "billing"),
            (
                "ARREARS_PRODUCTS__SA__POLICY__RETENTION",
                "1d",
                "products.sa.policy.release_warnings",
            ),
        ];
        for (var, value, key) in cases {
            let err =
                Config::from_toml(EXAMPLE_CONFIG, "example", &env(&[(var, value)])).unwrap_err();
            match &err {
                ConfigError::Invalid { key: k, .. } => {
                    assert!(k.starts_with(key), "{var}: key {k} in {err}")
                }
                other => panic!("{var}: unexpected {other}"),
            }
        }
        let bad_price =
            EXAMPLE_CONFIG.replacen("unit_price = \"0.0150\"", "unit_price = \"cheap\"", 1);
        let err = Config::from_toml(&bad_price, "f.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("products.lcic.prices[0].unit_price"), "{err}");
    }
}
