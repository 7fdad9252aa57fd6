//! SMS behind one interface with three adapters: a Twilio-compatible one (form POST, basic
//! auth), Tencent Cloud SMS (SendSms, TC3-HMAC-SHA256 request signing, pre-approved template
//! id + parameters), and a log adapter (numbers masked) for local use.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::config::{Config, SmsProviderKind, TencentConfig, TwilioConfig};
use crate::contact::mask_contact;
use crate::notify::webhook::classify_http;
use crate::notify::{NoticeKind, SendError};

pub enum SmsSender {
    Log(PathBuf),
    Twilio(TwilioConfig, reqwest::Client),
    Tencent(TencentConfig, reqwest::Client),
}

impl SmsSender {
    pub fn from_config(config: &Config, client: reqwest::Client) -> SmsSender {
        match config.sms.provider {
            SmsProviderKind::Log => {
                SmsSender::Log(
                    config.sms.log_file.clone().unwrap_or_else(|| {
                        config.embedded.state_dir.join("outbox").join("sms.log")
                    }),
                )
            }
            SmsProviderKind::Twilio => SmsSender::Twilio(
                config.sms.twilio.clone().expect("validated at load"),
                client,
            ),
            SmsProviderKind::Tencent => SmsSender::Tencent(
                config.sms.tencent.clone().expect("validated at load"),
                client,
            ),
        }
    }

    /// True for the `log` adapter: a line in a file reaches no customer.
    pub fn reaches_nobody(&self) -> bool {
        matches!(self, SmsSender::Log(_))
    }

    /// Sends `text` (or, for Tencent, the kind's template with `params`) to `to`; returns the
    /// provider's message id. `key` is the notice's own id, the same on every attempt: Tencent
    /// gets it as `SessionContext` (echoed in its delivery receipts, so a copy sent again after
    /// a crash can be told apart); Twilio's Messages API has no idempotency key to give it; the
    /// log adapter writes it on the line.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        to: &str,
        kind: NoticeKind,
        text: &str,
        params: &[String],
        key: &str,
        now: DateTime<Utc>,
        timeout: Duration,
    ) -> Result<String, SendError> {
        match self {
            SmsSender::Log(path) => {
                use tokio::io::AsyncWriteExt;
                if let Some(dir) = path.parent() {
                    tokio::fs::create_dir_all(dir)
                        .await
                        .map_err(|e| SendError::Temporary(format!("sms log: {e}")))?;
                }
                let mut f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| {
                        SendError::Temporary(format!("sms log {}: {e}", path.display()))
                    })?;
                let line = format!(
                    "{} to={} kind={} key={key} text={}\n",
                    now.to_rfc3339(),
                    mask_contact(to),
                    kind.as_str(),
                    text
                );
                f.write_all(line.as_bytes())
                    .await
                    .map_err(|e| SendError::Temporary(format!("sms log: {e}")))?;
                Ok(format!("log-{}", now.timestamp_micros()))
            }
            SmsSender::Twilio(cfg, client) => {
                let url = format!(
                    "{}/2010-04-01/Accounts/{}/Messages.json",
                    cfg.base_url.trim_end_matches('/'),
                    cfg.account_sid
                );
                let resp = client
                    .post(url)
                    .timeout(timeout)
                    .basic_auth(&cfg.account_sid, Some(&cfg.auth_token))
                    .form(&[("To", to), ("From", cfg.from.as_str()), ("Body", text)])
                    .send()
                    .await
                    .map_err(|e| SendError::Temporary(format!("twilio: {e}")))?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                classify_http(status, "twilio").map_err(|e| e.with_detail(body.get("message")))?;
                body.get("sid")
                    .and_then(|s| s.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| SendError::Temporary("twilio: no sid in the answer".into()))
            }
            SmsSender::Tencent(cfg, client) => {
                let template = cfg.templates.get(kind.as_str()).ok_or_else(|| {
                    SendError::Permanent(format!(
                        "sms.tencent.templates has no template for {}",
                        kind.as_str()
                    ))
                })?;
                let payload = serde_json::json!({
                    "PhoneNumberSet": [to],
                    "SmsSdkAppId": cfg.sdk_app_id,
                    "SignName": cfg.sign_name,
                    "TemplateId": template,
                    "TemplateParamSet": params,
                    "SessionContext": key,
                })
                .to_string();
                let host = reqwest::Url::parse(&cfg.endpoint)
                    .ok()
                    .and_then(|u| {
                        u.host_str().map(|h| match u.port() {
                            Some(p) => format!("{h}:{p}"),
                            None => h.to_string(),
                        })
                    })
                    .ok_or_else(|| {
                        SendError::Permanent(format!(
                            "sms.tencent.endpoint {:?} is not a URL",
                            cfg.endpoint
                        ))
                    })?;
                let ts = now.timestamp();
                let auth =
                    tc3_authorization(&cfg.secret_id, &cfg.secret_key, "sms", &host, ts, &payload);
                let resp = client
                    .post(&cfg.endpoint)
                    .timeout(timeout)
                    .header("Authorization", auth)
                    .header("Content-Type", "application/json; charset=utf-8")
                    .header("Host", &host)
                    .header("X-TC-Action", "SendSms")
                    .header("X-TC-Timestamp", ts.to_string())
                    .header("X-TC-Version", "2021-01-11")
                    .header("X-TC-Region", &cfg.region)
                    .body(payload)
                    .send()
                    .await
                    .map_err(|e| SendError::Temporary(format!("tencent sms: {e}")))?;
                classify_http(resp.status(), "tencent sms")?;
                let body: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| SendError::Temporary(format!("tencent sms: {e}")))?;
                let r = &body["Response"];
                if let Some(err) = r.get("Error") {
                    let code = err["Code"].as_str().unwrap_or("?");
                    let msg = format!(
                        "tencent sms: {code}: {}",
                        err["Message"].as_str().unwrap_or("")
                    );
                    return Err(
                        if code.starts_with("InternalError") || code.contains("LimitExceeded") {
                            SendError::Temporary(msg)
                        } else {
                            SendError::Permanent(msg)
                        },
                    );
                }
                let st = &r["SendStatusSet"][0];
                match st["Code"].as_str() {
                    Some("Ok") => Ok(st["SerialNo"].as_str().unwrap_or_default().to_string()),
                    Some(code) => {
                        let msg = format!(
                            "tencent sms: {code}: {}",
                            st["Message"].as_str().unwrap_or("")
                        );
                        Err(if code.contains("LimitExceeded") {
                            SendError::Temporary(msg)
                        } else {
                            SendError::Permanent(msg)
                        })
                    }
                    None => Err(SendError::Temporary(
                        "tencent sms: no send status in the answer".into(),
                    )),
                }
            }
        }
    }
}

fn hmac256(key: &[u8], msg: &str) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// The `Authorization` header of Tencent Cloud API signature v3 (TC3-HMAC-SHA256) for a POST
/// of a JSON `payload` to `host`, signing the content-type and host headers.
pub fn tc3_authorization(
    secret_id: &str,
    secret_key: &str,
    service: &str,
    host: &str,
    timestamp: i64,
    payload: &str,
) -> String {
    let date = DateTime::<Utc>::from_timestamp(timestamp, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string();
    let canonical = format!(
        "POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:{host}\n\ncontent-type;host\n{}",
        hex::encode(Sha256::digest(payload.as_bytes()))
    );
    let scope = format!("{date}/{service}/tc3_request");
    let to_sign = format!(
        "TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac256(format!("TC3{secret_key}").as_bytes(), &date);
    let k_service = hmac256(&k_date, service);
    let k_signing = hmac256(&k_service, "tc3_request");
    let signature = hex::encode(hmac256(&k_signing, &to_sign));
    format!("TC3-HMAC-SHA256 Credential={secret_id}/{scope}, SignedHeaders=content-type;host, Signature={signature}")
}

/// The template parameters of a kind, in the order the pre-approved templates take them.
pub fn template_params(kind: NoticeKind, vars: &serde_json::Value) -> Vec<String> {
    let names: &[&str] = match kind {
        NoticeKind::Overdue | NoticeKind::OverdueReminder | NoticeKind::SuspensionImminent => {
            &["account_id", "amount_due", "deadline"]
        }
        NoticeKind::Suspended | NoticeKind::ReleaseWarning => {
            &["account_id", "amount_due", "release_at"]
        }
        NoticeKind::Released => &["account_id", "released_at"],
        NoticeKind::Restored => &["account_id", "restored_at"],
        NoticeKind::BalanceLow => &["account_id", "funds", "threshold"],
        NoticeKind::PackageExhausted | NoticeKind::PackageExpired => &["resource_id"],
        _ => &[],
    };
    names
        .iter()
        .map(|n| {
            vars.get(*n)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Tencent Cloud's API signing documentation (v3, DescribeInstances).
    #[test]
    fn tc3_matches_the_published_example() {
        let payload = r#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        let auth = tc3_authorization(
            "AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******",
            "Gu5t9xGARNpq86cd98joQYCN3*******",
            "cvm",
            "cvm.tencentcloudapi.com",
            1_551_113_065,
            payload,
        );
        assert_eq!(
            auth,
            "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******/2019-02-25/cvm/tc3_request, \
             SignedHeaders=content-type;host, Signature=2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c"
        );
    }
}
