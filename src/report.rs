//! Read-only operator reports: `arrears report aging`, the accounts in arrears by how long
//! they have been in arrears and by lifecycle state, with the amounts they owe.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::db::{Db, DbError};
use crate::domain::money::format_scaled;

/// The age buckets of the aging report, in whole days of `as_of - arrears_since`
/// (a day is 24 hours): inclusive lower and upper bounds, `None` = no upper bound.
pub const AGE_BUCKETS: &[(&str, i64, Option<i64>)] = &[
    ("0-1", 0, Some(1)),
    ("2-7", 2, Some(7)),
    ("8-30", 8, Some(30)),
    ("31-60", 31, Some(60)),
    ("over 60", 61, None),
];

/// The account states, in lifecycle order, so every state appears in the report.
pub const STATES: &[&str] = &["good", "in_arrears", "suspended", "compliance_locked"];

/// Which bucket (index into [`AGE_BUCKETS`]) an account `age_days` whole days in arrears
/// falls in; `None` for a negative age (its arrears began after `as_of`).
pub fn bucket_of(age_days: i64) -> Option<usize> {
    AGE_BUCKETS
        .iter()
        .position(|(_, lo, hi)| age_days >= *lo && hi.is_none_or(|hi| age_days <= hi))
}

/// An amount in one currency: an exact decimal string and the same in minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Amount {
    pub currency: String,
    pub amount: String,
    pub minor: i64,
}

impl Amount {
    fn new(config: &Config, minor: i64) -> Amount {
        Amount {
            currency: config.billing.currency.clone(),
            amount: format_scaled(minor, config.billing.minor_unit_digits),
            minor,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgeBucket {
    pub bucket: &'static str,
    /// Whole days in arrears, inclusive; `max_days` absent for the open-ended last bucket.
    pub min_days: i64,
    pub max_days: Option<i64>,
    pub accounts: i64,
    /// What the accounts owe, per currency (one per deployment in this version).
    pub owed: Vec<Amount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateRow {
    pub state: String,
    pub accounts: i64,
    pub owed: Vec<Amount>,
}

/// `arrears report aging`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgingReport {
    pub as_of: DateTime<Utc>,
    /// What an account owes: the part of cash balance + credit quota below zero, i.e. the
    /// top-up that would bring it back to good (R1, R5).
    pub owed_is: &'static str,
    /// Accounts with `arrears_since` set at or before `as_of`.
    pub accounts_in_arrears: i64,
    pub owed: Vec<Amount>,
    pub buckets: Vec<AgeBucket>,
    /// Accounts whose arrears began after `as_of` (a report for an earlier instant): in no
    /// bucket.
    pub arrears_after_as_of: i64,
    /// Every account by lifecycle state, with what those accounts owe.
    pub by_state: Vec<StateRow>,
}

/// Builds the aging report at `as_of`: two aggregate queries, folded into buckets here.
/// A total that does not fit: refused rather than shown capped.
fn overflow() -> DbError {
    DbError::Connect("the amounts owed add up beyond what a 64-bit total holds".into())
}

pub async fn aging(db: &Db, config: &Config, as_of: DateTime<Utc>) -> Result<AgingReport, DbError> {
    let client = db.raw_client().await?;
    // Raw SQL: diesel cannot group by an expression over an interval. Ages are whole days
    // of elapsed time, computed in numeric (extract(epoch) is numeric in PostgreSQL 14+).
    let by_age = client
        .query(
            "SELECT floor(extract(epoch FROM ($1::timestamptz - arrears_since)) / 86400)::bigint AS age_days,
                    count(*),
                    coalesce(sum(greatest(0::numeric, -(cash_balance::numeric + credit_quota))), 0)::bigint
             FROM accounts
             WHERE arrears_since IS NOT NULL
             GROUP BY 1",
            &[&as_of],
        )
        .await?;
    let mut buckets: Vec<AgeBucket> = AGE_BUCKETS
        .iter()
        .map(|(name, lo, hi)| AgeBucket {
            bucket: name,
            min_days: *lo,
            max_days: *hi,
            accounts: 0,
            owed: Vec::new(),
        })
        .collect();
    let mut owed_minor = vec![0i64; AGE_BUCKETS.len()];
    let mut after = 0;
    for row in &by_age {
        let (age, n, owed): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        match bucket_of(age) {
            Some(i) => {
                buckets[i].accounts += n;
                owed_minor[i] = owed_minor[i].checked_add(owed).ok_or_else(overflow)?;
            }
            None => after += n,
        }
    }
    for (b, minor) in buckets.iter_mut().zip(&owed_minor) {
        b.owed = vec![Amount::new(config, *minor)];
    }
    // Raw SQL: the owed sum is over a numeric expression cast back to bigint; diesel's sum()
    // would be Numeric, which this crate maps to no Rust type.
    let by_state_rows = client
        .query(
            "SELECT state, count(*),
                    coalesce(sum(greatest(0::numeric, -(cash_balance::numeric + credit_quota))), 0)::bigint
             FROM accounts GROUP BY state",
            &[],
        )
        .await?;
    let by_state = STATES
        .iter()
        .map(|s| {
            let row = by_state_rows.iter().find(|r| r.get::<_, &str>(0) == *s);
            StateRow {
                state: s.to_string(),
                accounts: row.map_or(0, |r| r.get(1)),
                owed: vec![Amount::new(config, row.map_or(0, |r| r.get(2)))],
            }
        })
        .collect();
    let total = owed_minor
        .iter()
        .try_fold(0i64, |a, b| a.checked_add(*b))
        .ok_or_else(overflow)?;
    Ok(AgingReport {
        as_of,
        owed_is: "max(0, -(cash_balance + credit_quota))",
        accounts_in_arrears: buckets.iter().map(|b| b.accounts).sum(),
        owed: vec![Amount::new(config, total)],
        buckets,
        arrears_after_as_of: after,
        by_state,
    })
}

fn amounts(v: &[Amount]) -> String {
    v.iter()
        .map(|a| format!("{} {}", a.amount, a.currency))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as a table for a terminal.
pub fn aging_table(r: &AgingReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Accounts in arrears at {}", r.as_of.to_rfc3339());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>22}",
        "days in arrears", "accounts", "owed"
    );
    for b in &r.buckets {
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>22}",
            b.bucket,
            b.accounts,
            amounts(&b.owed)
        );
    }
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>22}",
        "total",
        r.accounts_in_arrears,
        amounts(&r.owed)
    );
    if r.arrears_after_as_of > 0 {
        let _ = writeln!(
            out,
            "({} account(s) entered arrears after this instant and are in no bucket)",
            r.arrears_after_as_of
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<18} {:>8} {:>22}", "state", "accounts", "owed");
    for s in &r.by_state {
        let _ = writeln!(
            out,
            "{:<18} {:>8} {:>22}",
            s.state,
            s.accounts,
            amounts(&s.owed)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_have_their_edges_where_the_labels_say() {
        let cases = [
            (-1, None),
            (0, Some("0-1")),
            (1, Some("0-1")),
            (2, Some("2-7")),
            (7, Some("2-7")),
            (8, Some("8-30")),
            (30, Some("8-30")),
            (31, Some("31-60")),
            (60, Some("31-60")),
            (61, Some("over 60")),
            (10_000, Some("over 60")),
        ];
        for (age, want) in cases {
            assert_eq!(bucket_of(age).map(|i| AGE_BUCKETS[i].0), want, "{age} days");
        }
    }
}
