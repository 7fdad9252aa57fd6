//! Money movements outside billing: top-ups and coupon grants. Every change to a cash
//! balance is a ledger entry written in the same transaction, so the balance always equals
//! the ledger's sum.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::{accounts, coupons, ledger_entries, payment_references};
use crate::db::{Db, DbError};
use crate::domain::money::format_scaled;
use crate::domain::settle::CouponKind;
use crate::lifecycle::{self, LifecycleError};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    #[error("amount: must be greater than zero")]
    NotPositive,
    #[error("reference: must not be empty")]
    EmptyReference,
    #[error("amount: the balance would overflow")]
    TooLarge,
    #[error("reference {reference:?} was already used for a top-up of {existing} to account {account}; refusing a different amount")]
    ReferenceReused {
        account: String,
        reference: String,
        existing: String,
    },
    #[error("reference {reference:?} already credited account {owner}: one payment credits one account; refusing to credit {account}")]
    ReferenceOfAnotherAccount {
        account: String,
        reference: String,
        owner: String,
    },
    #[error("reference {reference:?} was already used for another coupon grant ({existing}); refusing {asked}")]
    CouponReferenceReused {
        reference: String,
        existing: String,
        asked: String,
    },
    #[error("reference: at most 200 characters")]
    LongReference,
    #[error("expires_at: {0} is not after the grant instant {1}")]
    AlreadyExpired(DateTime<Utc>, DateTime<Utc>),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<LifecycleError> for LedgerError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::UnknownAccount(a) => LedgerError::UnknownAccount(a),
            LifecycleError::Db(d) => LedgerError::Db(d),
            other => LedgerError::Db(DbError::Connect(other.to_string())),
        }
    }
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
    /// Resources restored by this top-up (R5).
    pub restored: Vec<String>,
}

/// Applies a top-up once per (account, reference).
pub async fn topup(
    db: &Db,
    config: &Config,
    account_id: &str,
    amount: i64,
    reference: &str,
    as_of: DateTime<Utc>,
    cause: &str,
) -> Result<TopupReport, LedgerError> {
    let digits = config.billing.minor_unit_digits;
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
        let (balance, state): (i64, String) = accounts::table
            .find(&account)
            .select((accounts::cash_balance, accounts::state))
            .for_update()
            .first(conn)
            .await
            .optional()?
            .ok_or_else(|| LedgerError::UnknownAccount(account.clone()))?;
        // The reference is claimed first, for the whole deployment: a concurrent top-up with
        // the same reference waits here for this one to commit, then finds it taken.
        let claimed = diesel::insert_into(payment_references::table)
            .values((
                payment_references::reference.eq(&reference),
                payment_references::account_id.eq(&account),
                payment_references::amount.eq(amount),
                payment_references::applied_at.eq(as_of),
            ))
            .on_conflict_do_nothing()
            .execute(conn)
            .await?;
        if claimed == 0 {
            let (owner, prev): (String, i64) = payment_references::table
                .find(&reference)
                .select((payment_references::account_id, payment_references::amount))
                .first(conn)
                .await?;
            if owner != account {
                return Err(LedgerError::ReferenceOfAnotherAccount {
                    account,
                    reference,
                    owner,
                });
            }
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
                restored: vec![],
            });
        }
        let entry: i64 = diesel::insert_into(ledger_entries::table)
            .values((
                ledger_entries::account_id.eq(&account),
                ledger_entries::kind.eq("topup"),
                ledger_entries::amount.eq(amount),
                ledger_entries::reference.eq(&reference),
                ledger_entries::effective_at.eq(as_of),
            ))
            .returning(ledger_entries::id)
            .get_result(conn)
            .await?;
        diesel::update(payment_references::table.find(&reference))
            .set(payment_references::ledger_entry_id.eq(entry))
            .execute(conn)
            .await?;
        let new_balance = balance.checked_add(amount).ok_or(LedgerError::TooLarge)?;
        diesel::update(accounts::table.find(&account))
            .set((
                accounts::cash_balance.eq(new_balance),
                accounts::updated_at.eq(as_of),
            ))
            .execute(conn)
            .await?;
        // R5: re-evaluate in this transaction, under the lock taken above, so that a paid-up
        // account is restored at once and no concurrent job can suspend it meanwhile.
        let loaded = lifecycle::load(conn, &account, true)
            .await
            .map_err(LedgerError::from)?
            .ok_or_else(|| LedgerError::UnknownAccount(account.clone()))?;
        let applied = lifecycle::reconcile(conn, config, &loaded, as_of, &cause)
            .await
            .map_err(LedgerError::from)?;
        let new_state = applied.account_to.clone().unwrap_or(state);
        Ok(TopupReport {
            account_id: account,
            reference,
            amount: format_scaled(amount, digits),
            replayed: false,
            cash_balance: format_scaled(new_balance, digits),
            state: new_state,
            arrears_cleared: applied.account_to.as_deref() == Some("good"),
            restored: applied
                .restored
                .into_iter()
                .map(|m| m.resource_id)
                .collect(),
        })
    })
    .await
}

#[derive(Debug, Clone, Serialize)]
pub struct CouponReport {
    pub account_id: String,
    pub coupon_id: i64,
    pub kind: CouponKind,
    pub amount: String,
    pub expires_at: DateTime<Utc>,
    /// The operator's reference of the grant, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The reference's grant existed already: nothing was granted again.
    pub replayed: bool,
}

/// Grants a coupon; with a `reference`, once: the same reference, account, kind, amount and
/// expiry again replays the first grant (`replayed`), anything else under it is refused.
#[allow(clippy::too_many_arguments)]
pub async fn grant_coupon(
    db: &Db,
    digits: u32,
    account_id: &str,
    amount: i64,
    kind: CouponKind,
    expires_at: DateTime<Utc>,
    as_of: DateTime<Utc>,
    reference: Option<&str>,
) -> Result<CouponReport, LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::NotPositive);
    }
    // Stored in microseconds: a retry compares what was stored.
    let expires_at = chrono::SubsecRound::trunc_subsecs(expires_at, 6);
    match reference {
        Some(r) if r.trim().is_empty() => return Err(LedgerError::EmptyReference),
        Some(r) if r.chars().count() > 200 => return Err(LedgerError::LongReference),
        _ => {}
    }
    let mut conn = db.conn().await?;
    let exists: bool = diesel::select(diesel::dsl::exists(accounts::table.find(account_id)))
        .get_result(&mut conn)
        .await?;
    if !exists {
        return Err(LedgerError::UnknownAccount(account_id.to_string()));
    }
    let report = |coupon_id: i64, replayed: bool| CouponReport {
        account_id: account_id.to_string(),
        coupon_id,
        kind,
        amount: format_scaled(amount, digits),
        expires_at,
        reference: reference.map(str::to_string),
        replayed,
    };
    if let Some(r) = reference {
        // A replay is answered before the expiry check: the first grant was valid when made.
        let earlier = granted_under(&mut conn, r).await?;
        if let Some(e) = earlier {
            return replay(e, (account_id, kind, amount, expires_at), r, digits)
                .map(|id| report(id, true));
        }
    }
    if expires_at <= as_of {
        return Err(LedgerError::AlreadyExpired(expires_at, as_of));
    }
    let granted = conn
        .transaction::<_, LedgerError, _>(async move |conn| {
            {
                let id: Option<i64> = diesel::insert_into(coupons::table)
                    .values((
                        coupons::account_id.eq(account_id),
                        coupons::kind.eq(kind.as_str()),
                        coupons::amount.eq(amount),
                        coupons::remaining.eq(amount),
                        coupons::expires_at.eq(expires_at),
                        coupons::granted_at.eq(as_of),
                        coupons::reference.eq(reference),
                    ))
                    .on_conflict(coupons::reference)
                    .do_nothing()
                    .returning(coupons::id)
                    .get_result(conn)
                    .await
                    .optional()?;
                if id.is_some() {
                    // R7: the funds rose; the balance alert may re-arm.
                    lifecycle::mark_due(
                        conn,
                        &[account_id.to_string()],
                        &[lifecycle::DueJob::SendAlerts],
                        as_of,
                    )
                    .await?;
                }
                Ok(id)
            }
        })
        .await?;
    match (granted, reference) {
        (Some(id), _) => Ok(report(id, false)),
        // Another grant of the same reference committed first.
        (None, Some(r)) => {
            let e = granted_under(&mut conn, r)
                .await?
                .ok_or(LedgerError::Db(DbError::Query(
                    diesel::result::Error::NotFound,
                )))?;
            replay(e, (account_id, kind, amount, expires_at), r, digits).map(|id| report(id, true))
        }
        (None, None) => Err(LedgerError::Db(DbError::Query(
            diesel::result::Error::NotFound,
        ))),
    }
}

/// The grant made under `reference`: account, coupon id, kind, amount, expiry.
async fn granted_under(
    conn: &mut crate::db::Conn,
    reference: &str,
) -> Result<Option<(String, i64, String, i64, DateTime<Utc>)>, LedgerError> {
    Ok(coupons::table
        .filter(coupons::reference.eq(reference))
        .select((
            coupons::account_id,
            coupons::id,
            coupons::kind,
            coupons::amount,
            coupons::expires_at,
        ))
        .first(conn)
        .await
        .optional()?)
}

/// The earlier grant's coupon id if it is the one asked for again, else the refusal.
fn replay(
    (account, id, kind, amount, expires_at): (String, i64, String, i64, DateTime<Utc>),
    asked: (&str, CouponKind, i64, DateTime<Utc>),
    reference: &str,
    digits: u32,
) -> Result<i64, LedgerError> {
    if account == asked.0 && kind == asked.1.as_str() && amount == asked.2 && expires_at == asked.3
    {
        return Ok(id);
    }
    let say = |account: &str, kind: &str, amount: i64, expires_at: DateTime<Utc>| {
        format!(
            "a {kind} coupon of {} for account {account} expiring at {}",
            format_scaled(amount, digits),
            expires_at.to_rfc3339()
        )
    };
    Err(LedgerError::CouponReferenceReused {
        reference: reference.to_string(),
        existing: say(&account, &kind, amount, expires_at),
        asked: say(asked.0, asked.1.as_str(), asked.2, asked.3),
    })
}
