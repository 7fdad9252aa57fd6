//! `arrears check`: the configuration, the channels' settings, the schedule (each job's own
//! knobs included) and every template in every locale, and, when a database is configured,
//! whether it bills the configured prices.

use std::process::ExitCode;

use anyhow::Result;
use arrears::config::{Config, SmsProviderKind};
use arrears::db;
use arrears::jobs::deliver_notifications::Channels;
use arrears::scheduler::Schedule;

use super::{bad_input, open, Env};

pub async fn run(env: &Env) -> Result<ExitCode> {
    let config = &env.config;
    let templates =
        arrears::notify::templates::Templates::load(config.notifications.templates_dir.as_deref())?;
    let rendered = match templates.check_all() {
        Ok(n) => n,
        Err(errors) => {
            for e in &errors {
                eprintln!("  {e}");
            }
            bad_input!("{} template(s) failed to render", errors.len());
        }
    };
    Channels::from_config(config).map_err(anyhow::Error::msg)?;
    let schedule = Schedule::load(config.service.jobs_dir.as_deref())?;
    println!(
        "configuration OK ({}): {} product(s); {} scheduled job(s) enabled; {rendered} templates rendered in {} locales; email via {}; sms via {:?}",
        config.origin,
        config.products.len(),
        schedule.jobs.iter().filter(|j| j.enabled).count(),
        arrears::contact::LOCALES.len(),
        if config.email.smtp_url.is_some() { "SMTP" } else { "the file transport" },
        config.sms.provider
    );
    warn_dev_channels(config);
    // The configured database, when there is one: does it bill what this file says?
    if config.database.url.is_some() {
        check_database(env).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// R9 needs a customer to have been warned: a channel that reaches nobody is no warning
/// unless the configuration says so (a demo, a test).
fn warn_dev_channels(config: &Config) {
    let dev: Vec<&str> = [
        (
            config.email.smtp_url.is_none(),
            "email goes to .eml files (no ARREARS_SMTP_URL)",
        ),
        (
            matches!(config.sms.provider, SmsProviderKind::Log),
            "SMS goes to a log file (ARREARS_SMS_PROVIDER=log)",
        ),
    ]
    .into_iter()
    .filter_map(|(on, what)| on.then_some(what))
    .collect();
    for what in &dev {
        if config.notifications.dev_channels_count_as_accepted {
            println!("warning: {what}, and notifications.dev_channels_count_as_accepted = true: such a notice counts as the customer warned (R9) though it reached nobody; never in production");
        } else {
            println!("warning: {what}: it reaches no customer, so it never counts as a warning (R9); a notice sent only that way lets no lcic grace start and no release happen");
        }
    }
}

/// The price list's drift and autovacuum, or why the database was not checked.
async fn check_database(env: &Env) -> Result<()> {
    let config = &env.config;
    let db = match open(config).await {
        Ok(db) => db,
        Err(e) => {
            println!("warning: database not checked: {e:#}");
            return Ok(());
        }
    };
    let mut conn = db.conn().await?;
    let drift = db::catalog::drift(&mut conn, config, env.as_of).await?;
    if drift.is_empty() {
        println!("price list: the database bills the configured prices");
    }
    if !db::stats::autovacuum_on(&mut conn).await? {
        println!("warning: the database runs with autovacuum = off: the jobs analyze the tables they read when their statistics go stale, but nothing reclaims dead rows, so tables and indexes grow with every update; turn it on or schedule VACUUM");
    }
    for c in &drift {
        println!(
            "warning: price list: {} {}/{} (database {}, configuration {}): run `arrears prices apply --dry-run` to preview",
            c.change, c.product, c.meter,
            c.from.as_deref().unwrap_or("-"), c.to.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
