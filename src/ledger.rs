//! Money movements outside billing: top-ups and coupon grants. Every change to a cash
//! balance is a ledger entry written in the same transaction, so the balance always equals
//! the ledger's sum.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::db::schema::{accounts, coupons, ledger_entries, lifecycle_events};
use crate::db::{Db, DbError};
use crate::domain::money::format_scaled;
use crate::domain::settle::{is_in_arrears, CouponKind};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    #[error("amount: must be greater than zero")]
    NotPositive,
    #[error("reference: must not be empty")]
    EmptyReference,
    #[error("reference {reference:?} was already used for a top-up of {existing} to account {account}; refusing a different amount")]
    ReferenceReused {
        account: String,
        reference: String,
        existing: String,
    },
    #[error("expires_at: {0} is not after the grant instant {1}")]
    AlreadyExpired(DateTime<Utc>, DateTime<Utc>),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for LedgerError {
    fn from(e: diesel::result::Error) -> Self {
        LedgerError::Db(DbError::Query(e))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TopupReport {
    pub account_id: String,
    pub reference: String,
    pub amount: String,
    /// True when this reference had already been applied: nothing changed.
    pub replayed: bool,
    pub cash_balance: String,
    pub state: String,
    /// Whether this top-up ended the account's arrears (cash + credit quota back to >= 0).
    pub arrears_cleared: bool,
}

/// Applies a top-up once per (account, reference).
pub async fn topup(
    db: &Db,
    digits: u32,
    account_id: &str,
    amount: i64,
    reference: &str,
    as_of: DateTime<Utc>,
    cause: &str,
) -> Result<TopupReport, LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::NotPositive);
    }
    if reference.trim().is_empty() {
        return Err(LedgerError::EmptyReference);
    }
    let mut pooled = db.conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    let (account, reference, cause) = (
        account_id.to_string(),
        reference.to_string(),
        cause.to_string(),
    );
    conn.transaction::<_, LedgerError, _>(async move |conn| {
        let (balance, credit, state, arrears_since): (i64, i64, String, Option<DateTime<Utc>>) =
            accounts::table
                .find(&account)
                .select((
                    accounts::cash_balance,
                    accounts::credit_quota,
                    accounts::state,
                    accounts::arrears_since,
                ))
                .for_update()
                .first(conn)
                .await
                .optional()?
                .ok_or_else(|| LedgerError::UnknownAccount(account.clone()))?;
        let existing: Option<i64> = ledger_entries::table
            .filter(ledger_entries::account_id.eq(&account))
            .filter(ledger_entries::kind.eq("topup"))
            .filter(ledger_entries::reference.eq(&reference))
            .select(ledger_entries::amount)
            .first(conn)
            .await
            .optional()?;
        if let Some(prev) = existing {
            if prev != amount {
                return Err(LedgerError::ReferenceReused {
                    account,
                    reference,
                    existing: format_scaled(prev, digits),
                });
            }
            return Ok(TopupReport {
                account_id: account,
                reference,
                amount: format_scaled(amount, digits),
                replayed: true,
                cash_balance: format_scaled(balance, digits),
                state,
                arrears_cleared: false,
            });
        }
        diesel::insert_into(ledger_entries::table)
            .values((
                ledger_entries::account_id.eq(&account),
                ledger_entries::kind.eq("topup"),
                ledger_entries::amount.eq(amount),
                ledger_entries::reference.eq(&reference),
                ledger_entries::effective_at.eq(as_of),
            ))
            .execute(conn)
            .await?;
        let new_balance = balance + amount;
        let cleared = !is_in_arrears(new_balance, credit) && state == "in_arrears";
        let new_state = if cleared {
            "good".to_string()
        } else {
            state.clone()
        };
        let arrears_since = if cleared { None } else { arrears_since };
        diesel::update(accounts::table.find(&account))
            .set((
                accounts::cash_balance.eq(new_balance),
                accounts::state.eq(&new_state),
                accounts::arrears_since.eq(arrears_since),
                accounts::updated_at.eq(as_of),
            ))
            .execute(conn)
            .await?;
        if cleared {
            record_event(
                conn,
                &account,
                None,
                &state,
                "good",
                "top-up brought cash + credit quota back to >= 0",
                &cause,
                as_of,
            )
            .await?;
        }
        Ok(TopupReport {
            account_id: account,
            reference,
            amount: format_scaled(amount, digits),
            replayed: false,
            cash_balance: format_scaled(new_balance, digits),
            state: new_state,
            arrears_cleared: cleared,
        })
    })
    .await
}

/// Appends one lifecycle event (the audit trail).
#[allow(clippy::too_many_arguments)]
pub async fn record_event(
    conn: &mut AsyncPgConnection,
    account_id: &str,
    resource_id: Option<&str>,
    from: &str,
    to: &str,
    reason: &str,
    cause: &str,
    at: DateTime<Utc>,
) -> QueryResult<()> {
    diesel::insert_into(lifecycle_events::table)
        .values((
            lifecycle_events::account_id.eq(account_id),
            lifecycle_events::resource_id.eq(resource_id),
            lifecycle_events::from_state.eq(from),
            lifecycle_events::to_state.eq(to),
            lifecycle_events::reason.eq(reason),
            lifecycle_events::cause.eq(cause),
            lifecycle_events::occurred_at.eq(at),
        ))
        .execute(conn)
        .await
        .map(|_| ())
}

#[derive(Debug, Clone, Serialize)]
pub struct CouponReport {
    pub account_id: String,
    pub coupon_id: i64,
    pub kind: CouponKind,
    pub amount: String,
    pub expires_at: DateTime<Utc>,
}

pub async fn grant_coupon(
    db: &Db,
    digits: u32,
    account_id: &str,
    amount: i64,
    kind: CouponKind,
    expires_at: DateTime<Utc>,
    as_of: DateTime<Utc>,
) -> Result<CouponReport, LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::NotPositive);
    }
    if expires_at <= as_of {
        return Err(LedgerError::AlreadyExpired(expires_at, as_of));
    }
    let mut conn = db.conn().await?;
    let exists: bool = diesel::select(diesel::dsl::exists(accounts::table.find(account_id)))
        .get_result(&mut conn)
        .await?;
    if !exists {
        return Err(LedgerError::UnknownAccount(account_id.to_string()));
    }
    let id: i64 = diesel::insert_into(coupons::table)
        .values((
            coupons::account_id.eq(account_id),
            coupons::kind.eq(kind.as_str()),
            coupons::amount.eq(amount),
            coupons::remaining.eq(amount),
            coupons::expires_at.eq(expires_at),
            coupons::granted_at.eq(as_of),
        ))
        .returning(coupons::id)
        .get_result(&mut conn)
        .await?;
    Ok(CouponReport {
        account_id: account_id.to_string(),
        coupon_id: id,
        kind,
        amount: format_scaled(amount, digits),
        expires_at,
    })
}
