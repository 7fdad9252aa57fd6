//! Signed webhooks to the products' control planes: JSON with an event id, signed with
//! HMAC-SHA256 over `timestamp + "." + body`, so a receiver can verify the sender and drop
//! duplicates by event id.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::notify::SendError;

pub const HEADER_SIGNATURE: &str = "X-Arrears-Signature";
pub const HEADER_TIMESTAMP: &str = "X-Arrears-Timestamp";
pub const HEADER_EVENT_ID: &str = "X-Arrears-Event-Id";

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a receiver does: recompute and compare in constant time, and refuse stale requests.
pub fn verify(
    secret: &str,
    timestamp: i64,
    body: &[u8],
    signature: &str,
    now: i64,
    tolerance_secs: i64,
) -> bool {
    if (now - timestamp).abs() > tolerance_secs {
        return false;
    }
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(bytes) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

pub async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    event_id: &str,
    body: &[u8],
    timestamp: i64,
    timeout: Duration,
) -> Result<String, SendError> {
    let req = client
        .post(url)
        .timeout(timeout)
        .header("Content-Type", "application/json")
        .header(HEADER_EVENT_ID, event_id)
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(HEADER_SIGNATURE, sign(secret, timestamp, body))
        .body(body.to_vec());
    let resp = req
        .send()
        .await
        .map_err(|e| SendError::Temporary(format!("webhook: {e}")))?;
    classify_http(resp.status(), "webhook")?;
    Ok(event_id.to_string())
}

/// 2xx ok; 408, 429 and 5xx are worth retrying; any other answer is final.
pub fn classify_http(status: reqwest::StatusCode, what: &str) -> Result<(), SendError> {
    if status.is_success() {
        Ok(())
    } else if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Err(SendError::Temporary(format!("{what}: HTTP {status}")))
    } else {
        Err(SendError::Permanent(format!("{what}: HTTP {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trip_and_tampering() {
        let body = br#"{"event_id":"evt_1"}"#;
        let sig = sign("k3y", 1_700_000_000, body);
        assert!(sig.starts_with("sha256="));
        assert!(verify("k3y", 1_700_000_000, body, &sig, 1_700_000_010, 300));
        assert!(!verify(
            "other",
            1_700_000_000,
            body,
            &sig,
            1_700_000_010,
            300
        ));
        assert!(!verify(
            "k3y",
            1_700_000_000,
            br#"{"event_id":"evt_2"}"#,
            &sig,
            1_700_000_010,
            300
        ));
        assert!(
            !verify("k3y", 1_700_000_000, body, &sig, 1_700_001_000, 300),
            "stale"
        );
    }
}
