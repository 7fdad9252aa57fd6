//! Email: lettre's async SMTP transport (implicit TLS, STARTTLS or plain, AUTH, a pool,
//! multipart text + HTML, a Message-ID we choose and store), or .eml files for local use.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::Config;
use crate::notify::templates::RenderedEmail;
use crate::notify::SendError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// smtps://, port 465 by default
    Implicit,
    /// smtp://, STARTTLS required (port 587 by default)
    StartTls,
    /// smtp://...?tls=none, a local relay
    None,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// `%XX` escapes decoded (URL user info); anything else kept as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl SmtpSettings {
    /// Parses `ARREARS_SMTP_URL`; the error says what is wrong without echoing the password.
    pub fn parse(url: &str) -> Result<SmtpSettings, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .to_string();
        let mut tls = match u.scheme() {
            "smtps" => TlsMode::Implicit,
            "smtp" => TlsMode::StartTls,
            other => return Err(format!("scheme {other:?}: use smtps:// or smtp://")),
        };
        for (k, v) in u.query_pairs() {
            match (k.as_ref(), v.as_ref()) {
                ("tls", "none") if tls == TlsMode::StartTls => tls = TlsMode::None,
                ("tls", "required") if tls == TlsMode::StartTls => {}
                (k, v) => {
                    return Err(format!(
                        "unsupported parameter {k}={v} (only tls=none on smtp://)"
                    ))
                }
            }
        }
        let port = u.port().unwrap_or(match tls {
            TlsMode::Implicit => 465,
            TlsMode::StartTls => 587,
            TlsMode::None => 25,
        });
        let user = (!u.username().is_empty()).then(|| percent_decode(u.username()));
        let password = u.password().map(percent_decode);
        if user.is_some() && tls == TlsMode::None {
            return Err(
                "refusing to send a password without TLS (tls=none with credentials)".into(),
            );
        }
        Ok(SmtpSettings {
            host,
            port,
            tls,
            user,
            password,
        })
    }
}

pub enum Mailer {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    File(AsyncFileTransport<Tokio1Executor>, PathBuf),
}

impl Mailer {
    /// True for the file transport: an `.eml` file reaches no customer.
    pub fn reaches_nobody(&self) -> bool {
        matches!(self, Mailer::File(..))
    }

    pub fn from_config(config: &Config) -> Result<Mailer, String> {
        let Some(url) = &config.email.smtp_url else {
            let dir = config
                .email
                .file_dir
                .clone()
                .unwrap_or_else(|| config.embedded.state_dir.join("outbox"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            return Ok(Mailer::File(AsyncFileTransport::new(&dir), dir));
        };
        let s = SmtpSettings::parse(url)?;
        let params = || -> Result<TlsParameters, String> {
            let mut b = TlsParameters::builder(s.host.clone());
            if let Some(ca) = &config.email.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("email.ca_file {}: {e}", ca.display()))?;
                b = b.add_root_certificate(
                    Certificate::from_pem(&pem).map_err(|e| format!("email.ca_file: {e}"))?,
                );
            }
            b.build_rustls().map_err(|e| e.to_string())
        };
        let tls = match s.tls {
            TlsMode::Implicit => Tls::Wrapper(params()?),
            TlsMode::StartTls => Tls::Required(params()?),
            TlsMode::None => Tls::None,
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(s.host.clone())
            .port(s.port)
            .tls(tls)
            .timeout(Some(Duration::from_secs(
                config.notifications.send_timeout.seconds() as u64,
            )))
            .pool_config(PoolConfig::new().max_size(config.email.pool_size.max(1)));
        if let (Some(u), Some(p)) = (s.user, s.password) {
            b = b.credentials(Credentials::new(u, p));
        }
        Ok(Mailer::Smtp(b.build()))
    }

    /// Sends and returns the provider's id for the message (the Message-ID for SMTP, the
    /// file name for the file transport).
    pub async fn send(
        &self,
        message: Message,
        message_id: &str,
        timeout: Duration,
    ) -> Result<String, SendError> {
        match self {
            Mailer::Smtp(t) => match tokio::time::timeout(timeout, t.send(message)).await {
                Err(_) => Err(SendError::Temporary(format!(
                    "SMTP send timed out after {}s",
                    timeout.as_secs()
                ))),
                Ok(Ok(_response)) => Ok(message_id.to_string()),
                Ok(Err(e)) if e.is_permanent() => Err(SendError::Permanent(format!("SMTP: {e}"))),
                Ok(Err(e)) => Err(SendError::Temporary(format!("SMTP: {e}"))),
            },
            Mailer::File(t, dir) => match tokio::time::timeout(timeout, t.send(message)).await {
                Err(_) => Err(SendError::Temporary(
                    "writing the .eml file timed out".into(),
                )),
                Ok(Ok(id)) => Ok(dir.join(format!("{id}.eml")).display().to_string()),
                Ok(Err(e)) => Err(SendError::Temporary(format!("file transport: {e}"))),
            },
        }
    }
}

/// A multipart text + HTML message with our own Message-ID.
pub fn build_message(
    from: &str,
    to: &str,
    mail: &RenderedEmail,
    message_id: &str,
) -> Result<Message, SendError> {
    let from: Mailbox = from
        .parse()
        .map_err(|e| SendError::Permanent(format!("email.from: {e}")))?;
    let to: Mailbox = to
        .parse()
        .map_err(|_| SendError::Permanent("the account's email address is not valid".into()))?;
    Message::builder()
        .from(from)
        .to(to)
        .subject(mail.subject.clone())
        .message_id(Some(message_id.to_string()))
        .multipart(
            MultiPart::alternative()
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_PLAIN)
                        .body(mail.text.clone()),
                )
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(mail.html.clone()),
                ),
        )
        .map_err(|e| SendError::Permanent(format!("building the message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_as_the_spec_names_them() {
        let s = SmtpSettings::parse("smtps://user:p%40ss@mail.example.com:465").unwrap();
        assert_eq!(
            (s.tls, s.port, s.user.as_deref(), s.password.as_deref()),
            (TlsMode::Implicit, 465, Some("user"), Some("p@ss"))
        );
        let s = SmtpSettings::parse("smtp://user:pass@mail.example.com:587").unwrap();
        assert_eq!((s.tls, s.port), (TlsMode::StartTls, 587));
        let s = SmtpSettings::parse("smtp://relay:25?tls=none").unwrap();
        assert_eq!((s.tls, s.port, s.user), (TlsMode::None, 25, None));
        assert!(SmtpSettings::parse("http://x").is_err());
        assert!(SmtpSettings::parse("smtp://u:p@relay:25?tls=none").is_err());
        let err = SmtpSettings::parse("smtp://u:secret@relay?tls=maybe").unwrap_err();
        assert!(!err.contains("secret"));
    }
}
