//! Notice templates: `email/<kind>/<locale>/{subject.txt,body.txt,body.html}` and
//! `sms/<kind>/<locale>.txt`, compiled into the binary from templates/ and overridable file
//! by file from `notifications.templates_dir`. A missing variable is an error, never an empty
//! string; HTML bodies escape what they interpolate.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

use crate::contact::LOCALES;
use crate::notify::NoticeKind;

include!(concat!(env!("OUT_DIR"), "/templates.rs"));

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {name}: {message}")]
    Render { name: String, message: String },
    #[error("template {0} does not exist")]
    Missing(String),
    #[error("templates_dir {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A rendered email.
#[derive(Debug, Clone, Serialize)]
pub struct RenderedEmail {
    pub subject: String,
    pub text: String,
    pub html: String,
}

pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// The compiled-in templates, with every file found under `override_dir` replacing its
    /// default.
    pub fn load(override_dir: Option<&Path>) -> Result<Templates, TemplateError> {
        let mut sources: BTreeMap<String, String> = DEFAULT_TEMPLATES
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(dir) = override_dir {
            for name in DEFAULT_TEMPLATES.iter().map(|(k, _)| *k) {
                let p = dir.join(name);
                if p.exists() {
                    let text = std::fs::read_to_string(&p).map_err(|source| TemplateError::Io {
                        path: p.display().to_string(),
                        source,
                    })?;
                    sources.insert(name.to_string(), text);
                }
            }
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.set_keep_trailing_newline(true);
        for (name, src) in sources {
            env.add_template_owned(name.clone(), src)
                .map_err(|e| TemplateError::Render {
                    name,
                    message: e.to_string(),
                })?;
        }
        Ok(Templates { env })
    }

    fn render(&self, name: &str, vars: &minijinja::Value) -> Result<String, TemplateError> {
        let t = self
            .env
            .get_template(name)
            .map_err(|_| TemplateError::Missing(name.to_string()))?;
        t.render(vars).map_err(|e| TemplateError::Render {
            name: name.to_string(),
            message: format!("{e:#}"),
        })
    }

    pub fn email(
        &self,
        kind: NoticeKind,
        locale: &str,
        vars: &serde_json::Value,
    ) -> Result<RenderedEmail, TemplateError> {
        let base = format!("email/{}/{}", kind.template(), locale_or_default(locale));
        // Converted once for the three templates.
        let vars = minijinja::Value::from_serialize(vars);
        let vars = &vars;
        Ok(RenderedEmail {
            subject: self
                .render(&format!("{base}/subject.txt"), vars)?
                .trim()
                .to_string(),
            text: self.render(&format!("{base}/body.txt"), vars)?,
            html: self.render(&format!("{base}/body.html"), vars)?,
        })
    }

    pub fn sms(
        &self,
        kind: NoticeKind,
        locale: &str,
        vars: &serde_json::Value,
    ) -> Result<String, TemplateError> {
        Ok(self
            .render(
                &format!("sms/{}/{}.txt", kind.template(), locale_or_default(locale)),
                &minijinja::Value::from_serialize(vars),
            )?
            .trim()
            .to_string())
    }

    /// Renders every template of every kind in every locale with sample data; returns the
    /// number rendered or every error.
    pub fn check_all(&self) -> Result<usize, Vec<TemplateError>> {
        let vars = sample_vars();
        let mut errors = Vec::new();
        let mut n = 0;
        for kind in NoticeKind::ALL {
            if kind.is_webhook() {
                continue;
            }
            for locale in LOCALES {
                match self.email(*kind, locale, &vars) {
                    Ok(_) => n += 3,
                    Err(e) => errors.push(e),
                }
                match self.sms(*kind, locale, &vars) {
                    Ok(_) => n += 1,
                    Err(e) => errors.push(e),
                }
            }
        }
        if errors.is_empty() {
            Ok(n)
        } else {
            Err(errors)
        }
    }
}

fn locale_or_default(locale: &str) -> &str {
    if LOCALES.contains(&locale) {
        locale
    } else {
        "en"
    }
}

/// Every variable any template may use, with plausible values.
pub fn sample_vars() -> serde_json::Value {
    serde_json::json!({
        "account_id": "acme",
        "account_name": "Acme <Schools> & Co",
        "amount_due": "12.50 CNY",
        "cash_balance": "-12.50 CNY",
        "deadline": "2026-11-23 14:00 (Asia/Shanghai)",
        "suspended_at": "2026-11-23 14:00 (Asia/Shanghai)",
        "release_at": "2027-01-22 14:00 (Asia/Shanghai)",
        "released_at": "2027-01-22 14:00 (Asia/Shanghai)",
        "restored_at": "2026-11-24 09:00 (Asia/Shanghai)",
        "lead": "7d",
        "threshold": "20.00 CNY",
        "funds": "15.00 CNY",
        "resource_id": "acme-pkg",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_template_renders_in_every_locale() {
        let t = Templates::load(None).unwrap();
        let n = t.check_all().unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(n, 10 * 2 * 4);
    }

    #[test]
    fn html_escapes_customer_data_and_text_does_not() {
        let t = Templates::load(None).unwrap();
        let e = t.email(NoticeKind::Overdue, "en", &sample_vars()).unwrap();
        assert!(
            e.html.contains("Acme &lt;Schools&gt; &amp; Co"),
            "{}",
            e.html
        );
        assert!(e.text.contains("Acme <Schools> & Co"));
        assert!(e.text.contains("2026-11-23 14:00 (Asia/Shanghai)"));
        let zh = t
            .email(NoticeKind::Overdue, "zh-CN", &sample_vars())
            .unwrap();
        assert!(zh.subject.contains("欠费"));
    }

    #[test]
    fn a_missing_variable_is_an_error() {
        let t = Templates::load(None).unwrap();
        let mut vars = sample_vars();
        vars.as_object_mut().unwrap().remove("deadline");
        let err = t
            .email(NoticeKind::Overdue, "en", &vars)
            .unwrap_err()
            .to_string();
        assert!(err.contains("email/overdue/en"), "{err}");
    }

    #[test]
    fn an_override_folder_replaces_single_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sms/overdue");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("en.txt"), "PAY {{ amount_due }}").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        assert_eq!(
            t.sms(NoticeKind::Overdue, "en", &sample_vars()).unwrap(),
            "PAY 12.50 CNY"
        );
        assert!(t
            .sms(NoticeKind::Restored, "en", &sample_vars())
            .unwrap()
            .contains("restored"));
        std::fs::write(p.join("en.txt"), "PAY {{ amount_due ").unwrap();
        assert!(
            Templates::load(Some(dir.path())).is_err(),
            "a broken override is refused at load"
        );
    }
}
