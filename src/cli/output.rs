//! Everything the command line prints: JSON documents, the text tables a terminal gets, and
//! a job run's report with its exit status. Commands gather; this module renders.

use std::process::ExitCode;

use anyhow::Result;
use arrears::config::Config;
use arrears::db::catalog::PricesReport;
use arrears::demo::DemoReport;
use arrears::jobs::Outcome;
use arrears::queries::{AccountView, BillView, EpisodeView, EventView, NoticeView, SuspensionView};
use chrono::{DateTime, Utc};

/// JSON when asked for or when stdout is not a terminal (a pipe, a file, a script).
pub fn wants_json(json: bool) -> bool {
    use std::io::IsTerminal;
    json || !std::io::stdout().is_terminal()
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A job run's report, and its exit status: 75 when another live runner holds the slot (the
/// run did nothing and the slot is not done; try again once that runner is gone). A refused
/// or failed run is the command's error.
pub fn print_outcome(outcome: Outcome) -> Result<ExitCode> {
    match outcome {
        Outcome::Done { report, .. } => {
            print_json(&report)?;
            Ok(ExitCode::SUCCESS)
        }
        Outcome::HeldElsewhere { report, why, .. } => {
            print_json(&report)?;
            eprintln!("not done: {why}");
            Ok(ExitCode::from(crate::EXIT_SLOT_HELD))
        }
        Outcome::Refused(why) => Err(arrears::jobs::JobError::Refused(why).into()),
        Outcome::Failed(e) => Err(e.into()),
    }
}

pub fn print_price_changes(report: &PricesReport) {
    if report.up_to_date {
        println!("the price list is up to date");
        return;
    }
    for c in &report.changes {
        let when = c
            .effective_from
            .map(|t| format!("from {t}"))
            .unwrap_or_else(|| "since always".into());
        println!(
            "{:<8} {}/{}: {} -> {} per {} {when}",
            c.change,
            c.product,
            c.meter,
            c.from.as_deref().unwrap_or("-"),
            c.to.as_deref().unwrap_or("-"),
            c.unit
        );
    }
    if report.dry_run {
        println!("(dry run: nothing written)");
    }
}

fn or_dash(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

pub fn print_episodes(episodes: &[EpisodeView]) {
    for e in episodes {
        println!(
            "episode {}: opened {} ({}); overdue alert accepted {}; suspended {}; {}",
            e.no,
            e.opened_at,
            e.opened_by,
            or_dash(e.first_overdue_alert_at),
            or_dash(e.suspended_at),
            match (&e.closed_at, &e.close_reason) {
                (Some(t), Some(r)) => format!("closed {t} ({r})"),
                _ => "open".into(),
            }
        );
    }
}

/// `account history`: the episodes, then every state change.
pub fn print_history(id: &str, episodes: &[EpisodeView], events: &[EventView]) {
    print_episodes(episodes);
    if events.is_empty() {
        println!("no lifecycle events for {id}");
    }
    for e in events {
        println!(
            "{}  {:<4} {:<16} {} -> {}  {}  [{}]",
            e.occurred_at.format("%Y-%m-%d %H:%M:%S"),
            e.episode.map(|n| format!("e{n}")).unwrap_or_default(),
            e.resource_id.as_deref().unwrap_or("(account)"),
            e.from,
            e.to,
            e.reason,
            e.cause
        );
    }
}

/// `account episodes`: the episodes, then the suspensions.
pub fn print_suspensions(episodes: &[EpisodeView], suspensions: &[SuspensionView]) {
    print_episodes(episodes);
    for s in suspensions {
        println!(
            "  s{:<4} {:<16} {:<16} {} from {}  release {}  {}",
            s.no,
            s.resource_id,
            s.reason,
            s.episode
                .map(|n| format!("e{n}"))
                .unwrap_or_else(|| "-".into()),
            s.started_at,
            s.release_at
                .map(|t| t.to_string())
                .unwrap_or_else(|| "never".into()),
            match (&s.ended_at, &s.ended_how) {
                (Some(t), Some(how)) => format!("ended {t} ({how})"),
                _ => "current".into(),
            }
        );
    }
}

/// `account show`.
pub fn print_account(view: &AccountView, currency: &str) {
    println!(
        "{} ({})  state {}  cash {} {}  credit quota {}",
        view.id, view.name, view.state, view.cash_balance, currency, view.credit_quota
    );
    if let Some(t) = view.arrears_since {
        println!("  in arrears since {t}");
    }
    if let Some(e) = &view.episode {
        println!(
            "  episode {} opened {}; overdue alert accepted {}; suspended {}",
            e.no,
            e.opened_at,
            or_dash(e.first_overdue_alert_at),
            or_dash(e.suspended_at),
        );
    }
    println!(
        "  next due: send_alerts {}, enforce_suspensions {}, release_resources {}",
        or_dash(view.next_due.send_alerts),
        or_dash(view.next_due.enforce_suspensions),
        or_dash(view.next_due.release_resources)
    );
    for r in &view.resources {
        println!(
            "  {:<16} {:<6} {:<12} {}{}{}",
            r.id,
            r.product,
            r.billing_mode,
            r.state,
            r.reason
                .as_deref()
                .map(|x| format!(" ({x})"))
                .unwrap_or_default(),
            r.release_at
                .map(|t| format!("  released at {t} unless paid"))
                .unwrap_or_default()
        );
    }
}

/// `bills`: each day's bill and its lines.
pub fn print_bills(account: &str, bills: &[BillView], currency: &str) {
    if bills.is_empty() {
        println!("no bills for {account}");
    }
    for b in bills {
        println!(
            "{}  total {} {}  (cash coupons {}, general coupons {}, cash {}){}",
            b.bill_day,
            b.total,
            currency,
            b.paid_cash_coupons,
            b.paid_general_coupons,
            b.paid_cash,
            if b.late_records > 0 {
                format!("  incl. {} late record(s)", b.late_records)
            } else {
                String::new()
            }
        );
        for l in &b.lines {
            let mut notes = Vec::new();
            if l.included_quantity != "0" {
                notes.push(format!("{} from package quota", l.included_quantity));
            }
            if l.unbilled_quantity != "0" {
                notes.push(format!(
                    "{} over quota not billed: pay-as-you-go off",
                    l.unbilled_quantity
                ));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("  ({})", notes.join("; "))
            };
            println!(
                "    {:<16} {:<20} {:>12} x {:>12} = {:>10}{notes}",
                l.resource_id, l.meter, l.billed_quantity, l.unit_price, l.amount
            );
        }
    }
}

/// `notices list`.
pub fn print_notices(list: &[NoticeView]) {
    for n in list {
        println!(
            "{:>6} {:<12} {:<22} {:<8} {:<8} attempts {} {}{}",
            n.id,
            n.account_id,
            n.kind,
            n.channel,
            n.status,
            n.attempts,
            n.provider_message_id.as_deref().unwrap_or(""),
            n.last_error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
}

/// `products`.
pub fn print_products(config: &Config) {
    for p in config.products.values() {
        println!("{} — {}", p.id, p.name);
        println!(
            "  grace {} from {:?}, retention {}, suspends {:?}",
            p.policy.grace, p.policy.grace_starts, p.policy.retention, p.policy.suspend_scope
        );
        for pr in &p.prices {
            println!(
                "  {:<20} {} {} per {}",
                pr.meter, pr.unit_price, config.billing.currency, pr.unit
            );
        }
    }
}

/// `schedule`: each job's row (as `schedule --json` gives them) and its next slots.
pub fn print_schedule(rows: &[serde_json::Value]) {
    for r in rows {
        println!(
            "{} ({}, {}) from {}",
            r["job"].as_str().unwrap_or(""),
            r["cron"].as_str().unwrap_or(""),
            r["time_zone"].as_str().unwrap_or(""),
            r["source"].as_str().unwrap_or("")
        );
        for s in r["slots"].as_array().into_iter().flatten() {
            println!(
                "  {}  ({})",
                s["utc"].as_str().unwrap_or(""),
                s["local"].as_str().unwrap_or("")
            );
        }
    }
}

/// Rows of a CSV import that failed (nothing was imported).
pub fn print_bad_rows<E: std::fmt::Display>(file: &std::path::Path, count: usize, errors: &[E]) {
    eprintln!("{}: {count} bad line(s), nothing imported", file.display());
    for e in errors {
        eprintln!("  {e}");
    }
    if count > errors.len() {
        eprintln!("  ... and {} more", count - errors.len());
    }
}

/// The demo's header, before its timeline.
pub fn print_demo_header() {
    let days = arrears::demo::DAYS;
    println!(
        "arrears demo: {} accounts, lcic and sa, {days} simulated days from {} (Asia/Shanghai)\n",
        arrears::demo::accounts(),
        arrears::demo::START
    );
    println!("day     local time   account             state              event");
}

/// The demo's summary after its timeline: final states, and where to look next.
pub fn print_demo_summary(report: &DemoReport, seconds: f64) {
    println!(
        "\n{} slots run in {seconds:.1}s; {} notices sent.\n",
        report.slots_run, report.notices_sent
    );
    println!(
        "{:<20} {:<5} {:<18} {:<18} {:>9}  resources",
        "account", "prod", "final state", "declared", "cash"
    );
    for a in &report.accounts {
        println!(
            "{:<20} {:<5} {:<18} {:<18} {:>9}  {}  {}",
            a.account,
            a.product,
            a.final_state,
            a.expected_state,
            a.cash_balance,
            a.resources.join(" "),
            if a.matches { "ok" } else { "MISMATCH" }
        );
    }
    let mut by_state = std::collections::BTreeMap::<&str, usize>::new();
    for a in &report.accounts {
        *by_state.entry(a.final_state.as_str()).or_default() += 1;
    }
    let by_state: Vec<String> = by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!("\nAccounts by final state: {}", by_state.join(", "));
    let dir = report.out_dir.display();
    let me = std::env::args().next().unwrap_or_else(|| "arrears".into());
    println!("\nWhere to look next:");
    println!(
        "  {dir}/notices/          every email as .eml (open it in a mail client) and sms.log"
    );
    println!("  {dir}/timeline.txt      this timeline; {dir}/input/ the CSV files loaded");
    println!("  export DATABASE_URL={}", report.database_url);
    println!("  {me} account history suspended-restored");
    println!("  {me} bills released-lcic");
    println!("  {me} notices list");
    println!("  {me} report aging --as-of {}", report.end.to_rfc3339());
}
