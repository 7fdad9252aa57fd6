//! Notifications against real servers: an SMTP server (aiosmtpd, STARTTLS with a test CA and
//! AUTH) and local HTTP servers (wiremock) standing in for SMS providers and control planes.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use arrears::config::Config;
use arrears::jobs::{deliver_notifications, enforce_suspensions, release_resources, send_alerts};
use chrono::{DateTime, Duration, Utc};
use common::*;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// aiosmtpd on 127.0.0.1 with STARTTLS required (a certificate from a CA made for the test)
/// and AUTH (arrears / s3cret). Killed on drop.
struct Smtp {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

impl Smtp {
    fn start(dir: &Path, port: Option<u16>) -> Smtp {
        Smtp::start_with(dir, port, false)
    }

    /// `implicit_tls`: smtps (TLS from the first byte) instead of STARTTLS.
    fn start_with(dir: &Path, port: Option<u16>, implicit_tls: bool) -> Smtp {
        if !dir.join("ca.pem").exists() {
            test_ca(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(dir.join("cert.pem"))
            .arg(dir.join("key.pem"))
            .arg(dir.join("mail"))
            .arg(dir.join("mode"))
            .args(["arrears", "s3cret"]);
        if let Some(p) = port {
            cmd.arg(p.to_string());
        }
        if implicit_tls {
            cmd.env("SMTP_IMPLICIT_TLS", "1");
            // This server answers one command at a time: lettre's own exchange, not our
            // pipelined one, is what the smtps test sends through.
            cmd.env("SMTP_NO_PIPELINING", "1");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd (scripts/test.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("smtp_server.py did not start: {line:?}"));
        Smtp {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.join("mode"), mode).unwrap();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Messages whose MAIL, RCPT and DATA came in one write (the server counts them).
    fn pipelined(&self) -> usize {
        std::fs::read_to_string(self.dir.join("mail/pipelined"))
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0)
    }

    fn messages(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.join("mail"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "ARREARS_SMTP_URL".into(),
                format!("smtp://arrears:s3cret@127.0.0.1:{}", self.port),
            ),
            (
                "ARREARS_EMAIL__CA_FILE".into(),
                self.dir.join("ca.pem").display().to_string(),
            ),
            (
                "ARREARS_EMAIL_FROM".into(),
                "Cloud Billing <billing@cloud.example>".into(),
            ),
        ]
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_env(env: &[(String, String)]) -> Config {
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    config_with(&refs)
}

const T0: &str = "2026-11-23T02:00:00Z";

/// An account in arrears since T0 (negative opening balance), with email and phone.
async fn debtor(t: &TestDb, email: &str, locale: &str) {
    t.import_accounts(&[&format!(
        "a1,Acme <Schools>,{email},+8613800138000,{locale},Asia/Shanghai,-12.50,0,"
    )])
    .await;
    t.import_resources(&["a1-class,a1,lcic,pay_per_use,,,,"])
        .await;
    let r = enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: at(T0),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(r.accounts_changed, 1);
}

async fn alerts(t: &TestDb, as_of: DateTime<Utc>) -> send_alerts::AlertsReport {
    send_alerts::run(
        &t.db,
        &t.config,
        &send_alerts::Options {
            as_of,
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap()
}

async fn deliver(t: &TestDb, as_of: DateTime<Utc>) -> deliver_notifications::DeliverReport {
    let ch = deliver_notifications::Channels::from_config(&t.config).unwrap();
    deliver_notifications::run(
        &t.db,
        &t.config,
        &ch,
        &deliver_notifications::Options {
            as_of,
            dry_run: false,
            max_batches: 10,
        },
    )
    .await
    .unwrap()
}

async fn statuses(t: &TestDb, channel: &str) -> Vec<(String, String, i32)> {
    t.client()
        .await
        .query(
            "SELECT kind, status, attempts FROM notices WHERE channel = $1 ORDER BY id",
            &[&channel],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn email_over_implicit_tls_with_auth_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start_with(dir.path(), None, true);
    // The server's environment with an smtps:// URL and the given password.
    let smtps = |password: &str| -> Vec<(String, String)> {
        let mut env = smtp.env();
        for (k, v) in env.iter_mut() {
            if k == "ARREARS_SMTP_URL" {
                *v = format!("smtps://arrears:{password}@127.0.0.1:{}", smtp.port);
            }
        }
        env
    };
    let t = TestDb::with_config(config_env(&smtps("s3cret"))).await;
    debtor(&t, "ops@acme.example", "en").await;
    alerts(&t, at(T0)).await;
    let d = deliver(&t, at(T0)).await;
    assert_eq!((d.sent, d.retrying, d.dead), (2, 0, 0), "{:?}", d.failures);
    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].contains("To: ops@acme.example"), "{}", mails[0]);
    // This server does not announce PIPELINING: one command at a time.
    assert_eq!(smtp.pipelined(), 0);
    // A wrong password is refused by the server over the same TLS session: a permanent
    // failure named as SMTP's, never a silent success.
    let t2 = TestDb::with_config(config_env(&smtps("wrong"))).await;
    debtor(&t2, "ops@acme.example", "en").await;
    alerts(&t2, at(T0)).await;
    let d2 = deliver(&t2, at(T0)).await;
    assert_eq!(d2.sent, 1, "only the sms: {:?}", d2.failures);
    assert!(
        d2.failures.iter().any(|f| f.contains("SMTP")),
        "{:?}",
        d2.failures
    );
    assert_eq!(smtp.messages().len(), 1, "nothing more arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn overdue_email_over_starttls_with_auth_arrives_complete() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path(), None);
    let mut env = smtp.env();
    env.push((
        "ARREARS_EMBEDDED__STATE_DIR".into(),
        dir.path().join("state").display().to_string(),
    ));
    let t = TestDb::with_config(config_env(&env)).await;
    debtor(&t, "ops@acme.example", "en").await;
    let a = alerts(&t, at(T0)).await;
    assert_eq!(a.overdue, 2, "email and sms");
    // Re-running the slot, or a later slot, adds nothing: one notice per (account, kind, period).
    assert_eq!(alerts(&t, at(T0) + Duration::minutes(5)).await.overdue, 0);
    let d = deliver(&t, at(T0)).await;
    assert_eq!((d.sent, d.retrying, d.dead), (2, 0, 0), "{:?}", d.failures);
    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    // The server announces PIPELINING: MAIL, RCPT and DATA went in one write.
    assert_eq!(smtp.pipelined(), 1);
    let m = &mails[0];
    assert!(
        m.contains("From: \"Cloud Billing\" <billing@cloud.example>"),
        "{m}"
    );
    assert!(m.contains("To: ops@acme.example"), "{m}");
    assert!(
        m.contains("Subject: Your account a1 is overdue: 12.50 CNY to pay"),
        "{m}"
    );
    let message_id: String = t
        .client()
        .await
        .query_one(
            "SELECT provider_message_id FROM notices WHERE channel = 'email'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(m.contains(&format!("Message-ID: {message_id}")), "{m}");
    assert!(
        m.contains("multipart/alternative") && m.contains("text/plain") && m.contains("text/html"),
        "{m}"
    );
    // The deadline in the account's zone: T0 + 24 h = 2026-11-24 10:00 in Shanghai.
    assert!(m.contains("2026-11-24 10:00 (Asia/Shanghai)"), "{m}");
    assert!(
        m.contains("Acme &lt;Schools&gt;"),
        "customer data is escaped in HTML: {m}"
    );
    // R2: the accepted alert starts the lcic grace clock.
    let first: Option<DateTime<Utc>> = t
        .client()
        .await
        .query_one("SELECT first_overdue_alert_at FROM arrears_episodes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(first, Some(at(T0)));
    // Nothing is sent twice.
    assert_eq!(deliver(&t, at(T0) + Duration::hours(1)).await.claimed, 0);
    assert_eq!(smtp.messages().len(), 1);
    let sms_log = std::fs::read_to_string(dir.path().join("state/outbox/sms.log")).unwrap();
    assert!(
        sms_log.contains("***00") && !sms_log.contains("13800138000"),
        "phone masked: {sms_log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_outage_then_421_ends_with_one_delivery_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut smtp = Smtp::start(dir.path(), None);
    let port = smtp.port;
    let mut env = smtp.env();
    env.push(("ARREARS_SMS_PROVIDER".into(), "log".into()));
    env.push((
        "ARREARS_SMS__LOG_FILE".into(),
        dir.path().join("sms.log").display().to_string(),
    ));
    let t = TestDb::with_config(config_env(&env)).await;
    debtor(&t, "ops@acme.example", "en").await;
    alerts(&t, at(T0)).await;
    smtp.stop();
    // Down for three hourly runs.
    for h in 0..3 {
        let d = deliver(&t, at(T0) + Duration::hours(h)).await;
        assert_eq!(
            (d.sent, d.retrying),
            (if h == 0 { 1 } else { 0 }, 1),
            "hour {h}: {:?}",
            d.failures
        );
    }
    // Up again, but answering 421 for three more hourly runs.
    let smtp = Smtp::start(dir.path(), Some(port));
    smtp.set_mode("421");
    for h in 3..6 {
        let d = deliver(&t, at(T0) + Duration::hours(h)).await;
        assert_eq!(d.retrying, 1, "hour {h}: {:?}", d.failures);
        assert!(d.failures[0].contains("421"), "{:?}", d.failures);
    }
    smtp.set_mode("ok");
    let d = deliver(&t, at(T0) + Duration::hours(6)).await;
    assert_eq!(d.sent, 1, "{:?}", d.failures);
    assert_eq!(deliver(&t, at(T0) + Duration::hours(7)).await.claimed, 0);
    assert_eq!(smtp.messages().len(), 1, "delivered exactly once");
    assert_eq!(
        statuses(&t, "email").await,
        vec![("overdue".into(), "sent".into(), 7)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_550_goes_dead_with_its_reason_and_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path(), None);
    let t = TestDb::with_config(config_env(&smtp.env())).await;
    debtor(&t, "bounce@acme.example", "en").await;
    alerts(&t, at(T0)).await;
    let d = deliver(&t, at(T0)).await;
    assert_eq!(d.dead, 1, "{:?}", d.failures);
    let dead = arrears::queries::notices(&t.db, Some("dead"), None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("550"),
        "{:?}",
        dead[0]
    );
    assert!(
        !dead[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("bounce@"),
        "no address in errors"
    );
    assert!(
        arrears::queries::retry_notice(&t.db, dead[0].id, at(T0) + Duration::hours(1))
            .await
            .unwrap()
    );
    assert_eq!(statuses(&t, "email").await[0].1, "pending");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_error_goes_dead_without_blocking_other_notices() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("templates/email/overdue/en");
    std::fs::create_dir_all(&tpl).unwrap();
    std::fs::write(tpl.join("subject.txt"), "Overdue {{ no_such_variable }}").unwrap();
    let t = TestDb::with_config(config_with(&[
        (
            "ARREARS_NOTIFICATIONS__TEMPLATES_DIR",
            dir.path().join("templates").to_str().unwrap(),
        ),
        (
            "ARREARS_EMBEDDED__STATE_DIR",
            dir.path().join("state").to_str().unwrap(),
        ),
    ]))
    .await;
    debtor(&t, "ops@acme.example", "en").await;
    alerts(&t, at(T0)).await;
    let d = deliver(&t, at(T0)).await;
    assert_eq!((d.sent, d.dead), (1, 1), "{:?}", d.failures);
    assert!(
        d.failures[0].contains("no_such_variable") || d.failures[0].contains("undefined"),
        "{:?}",
        d.failures
    );
    assert_eq!(statuses(&t, "sms").await[0].1, "sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_claim_and_send_is_delivered_once_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path(), None);
    let t = TestDb::with_config(config_env(&smtp.env())).await;
    debtor(&t, "ops@acme.example", "en").await;
    alerts(&t, at(T0)).await;
    // A worker claimed the email notice and died before sending: its lease runs out.
    t.client()
        .await
        .execute(
            "UPDATE notices SET status = 'sending', attempts = 1, lease_until = $1 WHERE channel = 'email'",
            &[&(at(T0) + Duration::minutes(5))],
        )
        .await
        .unwrap();
    let before_lease = deliver(&t, at(T0) + Duration::minutes(1)).await;
    assert_eq!(
        smtp.messages().len(),
        0,
        "not taken over while the lease holds: {before_lease:?}"
    );
    let d = deliver(&t, at(T0) + Duration::minutes(6)).await;
    assert_eq!(d.sent, 1, "{:?}", d.failures);
    assert_eq!(deliver(&t, at(T0) + Duration::minutes(30)).await.claimed, 0);
    assert_eq!(smtp.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_and_tencent_sms_adapters_send_what_the_providers_expect() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC123/Messages.json"))
        .and(header("authorization", "Basic QUMxMjM6dG9r")) // AC123:tok
        .respond_with(
            ResponseTemplate::new(201).set_body_json(serde_json::json!({ "sid": "SM42" })),
        )
        .mount(&server)
        .await;
    let t = TestDb::with_config(config_with(&[
        ("ARREARS_SMS_PROVIDER", "twilio"),
        ("ARREARS_SMS__TWILIO__ACCOUNT_SID", "AC123"),
        ("ARREARS_SMS__TWILIO__AUTH_TOKEN", "tok"),
        ("ARREARS_SMS__TWILIO__FROM", "+15550001111"),
        ("ARREARS_SMS__TWILIO__BASE_URL", &server.uri()),
    ]))
    .await;
    t.import_accounts(&["a1,Acme,,+8613800138000,en,Asia/Shanghai,-1.00,0,"])
        .await;
    enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: at(T0),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    alerts(&t, at(T0)).await;
    let d = deliver(&t, at(T0)).await;
    assert_eq!(d.sent, 1, "{:?}", d.failures);
    let reqs = server.received_requests().await.unwrap();
    let form = String::from_utf8(reqs[0].body.clone()).unwrap();
    assert!(
        form.contains("To=%2B8613800138000")
            && form.contains("From=%2B15550001111")
            && form.contains("Body="),
        "{form}"
    );
    let id: String = t
        .client()
        .await
        .query_one("SELECT provider_message_id FROM notices", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, "SM42");

    // Tencent Cloud SMS: SendSms, TC3-HMAC-SHA256, template id and parameters.
    let tencent = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("x-tc-action", "SendSms"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "Response": { "SendStatusSet": [{ "SerialNo": "2028:abc", "Code": "Ok", "Message": "send success" }], "RequestId": "r1" }
        })))
        .mount(&tencent)
        .await;
    let t = TestDb::with_config(config_with(&[
        ("ARREARS_SMS_PROVIDER", "tencent"),
        ("ARREARS_SMS__TENCENT__SECRET_ID", "AKIDtest"),
        ("ARREARS_SMS__TENCENT__SECRET_KEY", "secret-key"),
        ("ARREARS_SMS__TENCENT__SDK_APP_ID", "1400000000"),
        ("ARREARS_SMS__TENCENT__SIGN_NAME", "Cloud"),
        ("ARREARS_SMS__TENCENT__ENDPOINT", &tencent.uri()),
        ("ARREARS_SMS__TENCENT__TEMPLATES", "{ overdue = \"1001\" }"),
    ]))
    .await;
    t.import_accounts(&["a1,Acme,,+8613800138000,zh-CN,Asia/Shanghai,-1.00,0,"])
        .await;
    enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: at(T0),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    alerts(&t, at(T0)).await;
    let d = deliver(&t, at(T0)).await;
    assert_eq!(d.sent, 1, "{:?}", d.failures);
    let req = &tencent.received_requests().await.unwrap()[0];
    let body = String::from_utf8(req.body.clone()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["TemplateId"], "1001");
    assert_eq!(json["PhoneNumberSet"][0], "+8613800138000");
    assert_eq!(json["TemplateParamSet"][0], "a1");
    let ts: i64 = req
        .headers
        .get("x-tc-timestamp")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let host = req
        .headers
        .get("host")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let expected =
        arrears::notify::sms::tc3_authorization("AKIDtest", "secret-key", "sms", &host, ts, &body);
    assert_eq!(
        req.headers.get("authorization").unwrap().to_str().unwrap(),
        expected
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_webhooks_are_signed_and_carry_a_stable_event_id() {
    let server = MockServer::start().await;
    // The first delivery fails with a 503: the retry carries the same event id.
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let t = TestDb::with_config(config_with(&[
        ("ARREARS_WEBHOOK_SECRET", "whsec"),
        (
            "ARREARS_WEBHOOKS__PRODUCTS__LCIC__URL",
            &format!("{}/hooks", server.uri()),
        ),
    ]))
    .await;
    t.import_accounts(&["a1,Acme,,,en,UTC,-1.00,0,"]).await;
    t.import_resources(&["a1-class,a1,lcic,pay_per_use,,,,"])
        .await;
    arrears::lifecycle::record_overdue_alert(&t.db, "a1", at(T0))
        .await
        .ok();
    enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: at(T0),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    arrears::lifecycle::record_overdue_alert(&t.db, "a1", at(T0))
        .await
        .unwrap();
    enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: at(T0) + Duration::hours(25),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    let first = deliver(&t, at(T0) + Duration::hours(25)).await;
    assert!(first.retrying >= 1, "{first:?}");
    let second = deliver(&t, at(T0) + Duration::hours(26)).await;
    assert_eq!(second.dead, 0, "{second:?}");
    let reqs = server.received_requests().await.unwrap();
    let mut seen: Vec<(String, String)> = Vec::new();
    for r in &reqs {
        let ts: i64 = r
            .headers
            .get("x-arrears-timestamp")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let sig = r
            .headers
            .get("x-arrears-signature")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            arrears::notify::webhook::verify("whsec", ts, &r.body, sig, ts, 300),
            "signature verifies"
        );
        assert!(!arrears::notify::webhook::verify(
            "wrong", ts, &r.body, sig, ts, 300
        ));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body["event_id"].as_str(),
            r.headers.get("x-arrears-event-id").unwrap().to_str().ok()
        );
        seen.push((
            body["type"].as_str().unwrap().to_string(),
            body["event_id"].as_str().unwrap().to_string(),
        ));
    }
    assert!(
        seen.iter().any(|(k, _)| k == "resource.suspended"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|(k, _)| k == "account.state_changed"),
        "{seen:?}"
    );
    // The retried event reached the receiver twice with one id: it can drop the duplicate.
    let first_id = &seen[0].1;
    assert_eq!(
        seen.iter().filter(|(_, id)| id == first_id).count(),
        2,
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_lcic_timeline_notifies_in_order_once_each_in_the_customers_locale() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestDb::with_config(config_with(&[(
        "ARREARS_EMBEDDED__STATE_DIR",
        dir.path().to_str().unwrap(),
    )]))
    .await;
    t.import_accounts(&["z1,Zhang,z@example.cn,,zh-CN,Asia/Shanghai,1.00,0,"])
        .await;
    t.import_resources(&["z1-class,z1,lcic,pay_per_use,,,,"])
        .await;
    t.import_usage(
        &["u1,z1,z1-class,classroom_minutes,200,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z"],
        "2026-11-22T16:30:00Z",
    )
    .await;
    t.bill("2026-11-22T16:30:00Z").await;
    // Every six hours (a coarser clock than production's, for speed): alerts, delivery,
    // enforcement, delivery, release, delivery.
    let start = at("2026-11-22T17:00:00Z");
    let enforce = |as_of| {
        let t = &t;
        async move {
            enforce_suspensions::run(
                &t.db,
                &t.config,
                &enforce_suspensions::Options {
                    as_of,
                    dry_run: false,
                    force: false,
                },
            )
            .await
            .unwrap()
        }
    };
    let mut h = start;
    let end = start + Duration::days(62);
    while h <= end {
        alerts(&t, h).await;
        deliver(&t, h).await;
        enforce(h).await;
        deliver(&t, h).await;
        let opts = release_resources::Options {
            as_of: h,
            service_now: Utc::now(),
            dry_run: false,
            force: false,
            allow_mass_release: false,
        };
        release_resources::run(&t.db, &t.config, &opts)
            .await
            .unwrap();
        deliver(&t, h).await;
        h += Duration::hours(6);
    }
    let kinds: Vec<String> = t
        .client()
        .await
        .query("SELECT kind FROM notices WHERE channel = 'email' AND status = 'sent' ORDER BY accepted_at, id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        kinds,
        vec![
            "overdue",
            "suspension_imminent",
            "suspended",
            "release_warning",
            "release_warning",
            "released"
        ],
        "in order, once each"
    );
    let emls: Vec<String> = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert_eq!(emls.len(), 6);
    assert!(
        emls.iter().all(|m| m.contains("Subject: =?utf-8?")),
        "Chinese subjects are encoded"
    );
    let state: String = t
        .client()
        .await
        .query_one("SELECT state FROM resources", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "released");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_product_hears_of_an_account_state_change() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let t = TestDb::with_config(config_with(&[
        ("ARREARS_WEBHOOK_SECRET", "whsec"),
        (
            "ARREARS_WEBHOOKS__PRODUCTS__LCIC__URL",
            &format!("{}/lcic", server.uri()),
        ),
        (
            "ARREARS_WEBHOOKS__PRODUCTS__SA__URL",
            &format!("{}/sa", server.uri()),
        ),
    ]))
    .await;
    t.import_accounts(&["a1,Acme,,,en,UTC,-1.00,0,"]).await;
    t.import_resources(&[
        "a1-class,a1,lcic,pay_per_use,,,,",
        "a1-sa,a1,sa,pay_per_use,,,,",
    ])
    .await;
    enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: at(T0),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    let d = deliver(&t, at(T0)).await;
    assert_eq!(d.sent, 2, "{:?}", d.failures);
    let mut paths: Vec<String> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.url.path().to_string())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        vec!["/lcic".to_string(), "/sa".to_string()],
        "one account.state_changed per product"
    );
}

/// Debtors a1..aN in arrears since T0 (negative opening balances), email only.
async fn debtors(t: &TestDb, n: usize) {
    let accounts: Vec<String> = (1..=n)
        .map(|i| format!("d{i:03},Debtor {i},d{i}@example.com,,en,UTC,-5.00,0,"))
        .collect();
    let resources: Vec<String> = (1..=n)
        .map(|i| format!("d{i:03}-r,d{i:03},sa,pay_per_use,,,,"))
        .collect();
    t.import_accounts(&refs(&accounts)).await;
    t.import_resources(&refs(&resources)).await;
    let r = enforce_suspensions::run(
        &t.db,
        &t.config,
        &enforce_suspensions::Options {
            as_of: at(T0),
            dry_run: false,
            force: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(r.accounts_changed, n);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_whose_cause_is_gone_is_cancelled_not_sent() {
    let t = TestDb::with_config(config_with(&[("ARREARS_BILLING__TIME_ZONE", "UTC")])).await;
    // Two debtors alerted at 04:05; one pays the whole debt at 04:06 and the other half.
    debtors(&t, 2).await;
    let queued = alerts(&t, at("2026-11-23T04:05:00Z")).await;
    assert_eq!(queued.overdue, 2, "{queued:?}");
    arrears::ledger::topup(
        &t.db,
        &t.config,
        "d001",
        500,
        "pay-1",
        at("2026-11-23T04:06:00Z"),
        "test",
    )
    .await
    .unwrap();
    arrears::ledger::topup(
        &t.db,
        &t.config,
        "d002",
        200,
        "pay-2",
        at("2026-11-23T04:06:00Z"),
        "test",
    )
    .await
    .unwrap();
    let r = deliver(&t, at("2026-11-23T04:07:00Z")).await;
    assert_eq!((r.cancelled, r.sent), (1, 1), "{r:?}");
    let rows = t
        .client()
        .await
        .query(
            "SELECT account_id, status, cancel_reason, accepted_at IS NOT NULL FROM notices ORDER BY account_id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, Option<String>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "d001".into(),
                "cancelled".into(),
                Some("the arrears episode it was about is over".into()),
                false
            ),
            ("d002".into(), "sent".into(), None, true),
        ]
    );
    // A cancelled notice is no evidence of a warning: the paid episode has no accepted alert.
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM arrears_episodes WHERE account_id = 'd001' AND first_overdue_alert_at IS NOT NULL").await,
        0
    );
    // Never sent later either, and listed by status.
    let again = deliver(&t, at("2026-11-25T00:00:00Z")).await;
    assert_eq!((again.claimed, again.cancelled), (0, 0), "{again:?}");
    let listed = arrears::queries::notices(&t.db, Some("cancelled"), None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].account_id, "d001");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_channel_that_reaches_nobody_is_sent_but_never_accepted_unless_configured() {
    // The .eml file transport and the log SMS adapter, with the default configuration.
    let mut config = config_with(&[("ARREARS_BILLING__TIME_ZONE", "UTC")]);
    config.notifications.dev_channels_count_as_accepted = false;
    let t = TestDb::with_config(config).await;
    debtors(&t, 1).await;
    alerts(&t, at("2026-11-23T04:05:00Z")).await;
    let r = deliver(&t, at("2026-11-23T04:07:00Z")).await;
    assert_eq!((r.sent, r.sent_to_dev_channels), (1, 1), "{r:?}");
    let (status, accepted, dev): (String, bool, bool) = {
        let row = t
            .client()
            .await
            .query_one(
                "SELECT status, accepted_at IS NOT NULL, dev_channel FROM notices",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!((status.as_str(), accepted, dev), ("sent", false, true));
    // R9: the lcic/sa grace clock has no accepted alert to start from.
    assert_eq!(
        t.scalar_i64(
            "SELECT count(*) FROM arrears_episodes WHERE first_overdue_alert_at IS NOT NULL"
        )
        .await,
        0
    );
}

/// The shipped schedule in `dir/jobs`, with deliver_notifications sending `concurrency` at a
/// time.
fn delivery_jobs(dir: &Path, concurrency: usize) -> std::path::PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    for e in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let text = if p.file_name().unwrap() == "deliver_notifications.toml" {
            assert!(text.contains("concurrency = 32"), "{text}");
            text.replace("concurrency = 32", &format!("concurrency = {concurrency}"))
        } else {
            text
        };
        std::fs::write(jobs.join(p.file_name().unwrap()), text).unwrap();
    }
    jobs
}

/// `arrears run deliver_notifications --as-of AS_OF` on `t` with the schedule `jobs`.
fn delivery_run(t: &TestDb, jobs: &Path, env: &[(String, String)], as_of: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arrears"));
    cmd.args(["run", "deliver_notifications", "--as-of", as_of])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ARREARS_CONFIG")
        .env("DATABASE_URL", &t.url)
        .env("ARREARS_SERVICE__JOBS_DIR", jobs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A real SMTP server answering each message after `ms` milliseconds, its settings, a test
/// database whose outbox holds the overdue alerts of `n` debtors (queued at 04:05 on
/// 2026-11-23), and the shipped schedule sending `concurrency` at a time.
async fn slow_outbox(
    dir: &Path,
    ms: u32,
    n: usize,
    concurrency: usize,
) -> (Smtp, Vec<(String, String)>, TestDb, std::path::PathBuf) {
    let smtp = Smtp::start(dir, None);
    smtp.set_mode(&format!("slow {ms}"));
    let env = smtp.env();
    let t = TestDb::with_config(config_env(&env)).await;
    debtors(&t, n).await;
    assert_eq!(alerts(&t, at("2026-11-23T04:05:00Z")).await.overdue, n);
    let jobs = delivery_jobs(dir, concurrency);
    (smtp, env, t, jobs)
}

/// Message-ID -> copies received.
fn copies_per_message(smtp: &Smtp) -> std::collections::BTreeMap<String, usize> {
    let mut per_id: std::collections::BTreeMap<String, usize> = Default::default();
    for m in smtp.messages() {
        let id = m
            .lines()
            .find_map(|l| {
                l.strip_prefix("Message-ID: ")
                    .or_else(|| l.strip_prefix("Message-Id: "))
            })
            .expect("a Message-ID")
            .trim()
            .to_string();
        *per_id.entry(id).or_default() += 1;
    }
    per_id
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_at_instants_an_hour_apart_never_take_each_others_live_claims() {
    let dir = tempfile::tempdir().unwrap();
    // 40 notices, 4 at a time, 300 ms each: the first run sends for 3 s.
    let n = 40;
    let (smtp, env, t, jobs) = slow_outbox(dir.path(), 300, n, 4).await;
    // The first run's claims carry a lease of 5 minutes on its own clock, 04:07; the second
    // run's clock is an hour later, where that lease has long run out.
    let first = delivery_run(&t, &jobs, &env, "2026-11-23T04:07:00Z")
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if !smtp.messages().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = delivery_run(&t, &jobs, &env, "2026-11-23T05:07:00Z")
        .output()
        .unwrap();
    let mut first = first;
    assert!(
        first.try_wait().unwrap().is_none(),
        "the second run ran while the first still held its claims"
    );
    let first = first.wait_with_output().unwrap();
    for out in [&first, &second] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let per_id = copies_per_message(&smtp);
    assert_eq!(per_id.len(), n, "{per_id:?}");
    assert!(
        per_id.values().all(|c| *c == 1),
        "each notice once: {per_id:?}"
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM notices WHERE status = 'sent'")
            .await,
        n as i64
    );
    // A run that died leaves its claims to the next run at once, at its own instant.
    t.client()
        .await
        .execute(
            "UPDATE notices SET status = 'sending', claimed_by = 7, lease_until = '2026-11-23T06:00:00Z',
                                next_attempt_at = '2026-11-23T04:00:00Z'
             WHERE id = (SELECT min(id) FROM notices WHERE channel = 'email')",
            &[],
        )
        .await
        .unwrap();
    let again = delivery_run(&t, &jobs, &env, "2026-11-23T04:08:00Z")
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        smtp.messages().len(),
        n + 1,
        "the dead run's claim is sent again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_against_a_slow_server_resends_at_most_the_sends_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped schedule, with deliver_notifications sending 4 at a time.
    let (n, concurrency) = (40, 4);
    let (smtp, env, t, jobs) = slow_outbox(dir.path(), 150, n, concurrency).await;
    let run = |as_of: &str| delivery_run(&t, &jobs, &env, as_of);
    let mut first = run("2026-11-23T04:07:00Z").spawn().unwrap();
    // Killed with some messages delivered and most not.
    for _ in 0..400 {
        if smtp.messages().len() >= 20 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = smtp.messages().len();
    assert!(
        (20..n).contains(&at_kill),
        "killed mid-batch: {at_kill} of {n}"
    );
    let recorded_sent = t
        .scalar_i64("SELECT count(*) FROM notices WHERE status = 'sent'")
        .await as usize;
    // Each outcome was recorded as it came: unrecorded are only the sends in flight and those
    // that finished while the recorder's last write was in flight (recording the batch at its
    // end, as before, left all of them unrecorded).
    assert!(
        at_kill - recorded_sent <= 2 * concurrency,
        "{at_kill} delivered, {recorded_sent} recorded"
    );
    // Resume once the claims' lease has run out.
    smtp.set_mode("ok");
    let out = run("2026-11-23T04:20:00Z").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        t.scalar_i64("SELECT count(*) FROM notices WHERE status = 'sent'")
            .await,
        n as i64
    );
    // Every notice arrived; copies only of the in-flight ones, under the same Message-ID.
    let per_id = copies_per_message(&smtp);
    assert_eq!(per_id.len(), n, "{per_id:?}");
    let copies: usize = per_id.values().map(|c| c - 1).sum();
    assert!(copies <= 2 * concurrency, "{copies} copies: {per_id:?}");
    let stored = t
        .scalar_i64("SELECT count(DISTINCT message_id) FROM notices WHERE message_id LIKE '<notice-%@cloud.example>'")
        .await;
    assert_eq!(stored, n as i64);
}
