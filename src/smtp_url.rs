//! The SMTP URL (`ARREARS_SMTP_URL`, `email.smtp_url`): what the configuration checks and
//! the mailer connects with. A module of its own, so that the configuration does not depend
//! on the mailer (which depends on the configuration).

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
