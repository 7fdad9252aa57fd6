//! Read-only views for the CLI and, later, the HTTP API: an account's status and its bills.

use chrono::{DateTime, NaiveDate, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use crate::contact::mask_contact;
use crate::db::schema::{
    accounts, arrears_episodes, bill_lines, bills, coupons, ledger_entries, resource_suspensions,
    resources,
};
use crate::db::{Db, DbError};
use crate::domain::money::{format_quantity, format_scaled, PRICE_DIGITS};

#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = resources)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct ResourceView {
    pub id: String,
    pub product: String,
    pub billing_mode: String,
    pub state: String,
    #[diesel(column_name = state_reason)]
    pub reason: Option<String>,
    #[diesel(select_expression = resources::package_quota)]
    #[diesel(deserialize_as = Option<i64>)]
    #[serde(serialize_with = "quantity_opt")]
    pub package_quota: Option<i64>,
    #[serde(serialize_with = "quantity")]
    pub package_used: i64,
    pub package_expires_at: Option<DateTime<Utc>>,
    pub payg_enabled: bool,
    pub term_ends_at: Option<DateTime<Utc>>,
    /// Since when the resource has been out of service without a break.
    pub suspended_at: Option<DateTime<Utc>>,
    pub released_at: Option<DateTime<Utc>>,
    /// The current suspension's number on the account (its clock and release instant are in
    /// `suspension_started_at` and `release_at`).
    pub suspension: Option<i32>,
    #[diesel(select_expression = resource_suspensions::started_at.nullable())]
    pub suspension_started_at: Option<DateTime<Utc>>,
    #[diesel(select_expression = resource_suspensions::release_at.nullable())]
    pub release_at: Option<DateTime<Utc>>,
}

fn quantity<S: serde::Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_quantity(*v))
}

fn quantity_opt<S: serde::Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&format_quantity(*v)),
        None => s.serialize_none(),
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = coupons)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct CouponRow {
    id: i64,
    kind: String,
    amount: i64,
    remaining: i64,
    expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CouponView {
    pub id: i64,
    pub kind: String,
    pub amount: String,
    pub remaining: String,
    pub expires_at: DateTime<Utc>,
}

/// An arrears episode as `account show` and `account history` print it.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = arrears_episodes)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct EpisodeView {
    pub no: i32,
    pub opened_at: DateTime<Utc>,
    pub opened_by: String,
    pub first_overdue_alert_at: Option<DateTime<Utc>>,
    pub suspended_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub close_reason: Option<String>,
}

/// When each lifecycle job next looks at the account (the due-work index).
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = accounts)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct NextDue {
    #[diesel(column_name = alerts_due_at)]
    pub send_alerts: Option<DateTime<Utc>>,
    #[diesel(column_name = enforce_due_at)]
    pub enforce_suspensions: Option<DateTime<Utc>>,
    #[diesel(column_name = release_due_at)]
    pub release_resources: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    pub id: String,
    pub name: String,
    /// Masked: the CLI's output may end up in logs.
    pub email: Option<String>,
    pub phone: Option<String>,
    pub locale: String,
    pub timezone: String,
    pub state: String,
    pub cash_balance: String,
    pub credit_quota: String,
    pub low_balance_threshold: Option<String>,
    /// Sum of the account's ledger entries: always equal to cash_balance.
    pub ledger_sum: String,
    pub compliance_locked: bool,
    pub legal_hold: bool,
    /// Since when the account owes money.
    pub arrears_since: Option<DateTime<Utc>>,
    /// When the account was suspended in its current (or, once everything was released, its
    /// last) arrears episode.
    pub suspended_at: Option<DateTime<Utc>>,
    /// The open arrears episode.
    pub episode: Option<EpisodeView>,
    /// The next instant each lifecycle job looks at the account (null: not until something
    /// changes).
    pub next_due: NextDue,
    pub resources: Vec<ResourceView>,
    pub coupons: Vec<CouponView>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = accounts)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct AccountRow {
    id: String,
    name: String,
    email: Option<String>,
    phone: Option<String>,
    locale: String,
    timezone: String,
    cash_balance: i64,
    credit_quota: i64,
    low_balance_threshold: Option<i64>,
    state: String,
    compliance_locked: bool,
    legal_hold: bool,
    arrears_since: Option<DateTime<Utc>>,
    episode: Option<i32>,
    #[diesel(embed)]
    next_due: NextDue,
}

/// Whether an account with this id exists (read commands refuse an unknown one).
pub async fn account_exists(db: &Db, id: &str) -> Result<bool, DbError> {
    let mut conn = db.conn().await?;
    Ok(
        diesel::select(diesel::dsl::exists(accounts::table.find(id)))
            .get_result(&mut conn)
            .await?,
    )
}

pub async fn account(db: &Db, digits: u32, id: &str) -> Result<Option<AccountView>, DbError> {
    let mut conn = db.conn().await?;
    let row: Option<AccountRow> = accounts::table
        .find(id)
        .select(AccountRow::as_select())
        .first(&mut conn)
        .await
        .optional()?;
    let Some(a) = row else { return Ok(None) };
    // sum(bigint) is numeric in PostgreSQL; the cast back is exact for any real balance. A
    // raw fragment: diesel's sum() of BigInt is Numeric, which this crate maps to no type.
    let ledger_sum: i64 = ledger_entries::table
        .filter(ledger_entries::account_id.eq(id))
        .select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "coalesce(sum(amount), 0)::bigint",
        ))
        .first(&mut conn)
        .await?;
    let res: Vec<ResourceView> = resources::table
        .left_join(
            resource_suspensions::table.on(resource_suspensions::account_id
                .eq(resources::account_id)
                .and(resources::suspension.eq(resource_suspensions::no.nullable()))),
        )
        .filter(resources::account_id.eq(id))
        .order(resources::id)
        .select(ResourceView::as_select())
        .load(&mut conn)
        .await?;
    let cps: Vec<CouponRow> = coupons::table
        .filter(coupons::account_id.eq(id))
        .order(coupons::id)
        .select(CouponRow::as_select())
        .load(&mut conn)
        .await?;
    let last: Option<EpisodeView> = arrears_episodes::table
        .filter(arrears_episodes::account_id.eq(id))
        .order(arrears_episodes::no.desc())
        .select(EpisodeView::as_select())
        .first(&mut conn)
        .await
        .optional()?;
    let open = last.clone().filter(|e| Some(e.no) == a.episode);
    let suspended_at = match (&open, &last) {
        (Some(e), _) => e.suspended_at,
        (None, Some(e)) if a.state == "suspended" => e.suspended_at,
        _ => None,
    };
    Ok(Some(AccountView {
        id: a.id,
        name: a.name,
        email: a.email.as_deref().map(mask_contact),
        phone: a.phone.as_deref().map(mask_contact),
        locale: a.locale,
        timezone: a.timezone,
        state: a.state,
        cash_balance: format_scaled(a.cash_balance, digits),
        credit_quota: format_scaled(a.credit_quota, digits),
        low_balance_threshold: a.low_balance_threshold.map(|t| format_scaled(t, digits)),
        ledger_sum: format_scaled(ledger_sum, digits),
        compliance_locked: a.compliance_locked,
        legal_hold: a.legal_hold,
        arrears_since: a.arrears_since,
        suspended_at,
        episode: open,
        next_due: a.next_due,
        resources: res,
        coupons: cps
            .into_iter()
            .map(|c| CouponView {
                id: c.id,
                kind: c.kind,
                amount: format_scaled(c.amount, digits),
                remaining: format_scaled(c.remaining, digits),
                expires_at: c.expires_at,
            })
            .collect(),
    }))
}

/// Every arrears episode of an account, oldest first.
pub async fn episodes(db: &Db, account_id: &str) -> Result<Vec<EpisodeView>, DbError> {
    let mut conn = db.conn().await?;
    Ok(arrears_episodes::table
        .filter(arrears_episodes::account_id.eq(account_id))
        .order(arrears_episodes::no)
        .select(EpisodeView::as_select())
        .load(&mut conn)
        .await?)
}

#[derive(Debug, Clone, Serialize)]
pub struct BillLineView {
    pub resource_id: String,
    pub meter: String,
    pub records: i32,
    pub quantity: String,
    pub included_quantity: String,
    pub billed_quantity: String,
    pub unbilled_quantity: String,
    pub unit_price: String,
    pub amount: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CouponUseView {
    pub coupon_id: i64,
    pub amount: String,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = bills)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct BillRow {
    bill_day: NaiveDate,
    issued_at: DateTime<Utc>,
    total: i64,
    paid_cash_coupons: i64,
    paid_general_coupons: i64,
    paid_cash: i64,
    records: i32,
    late_records: i32,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = bill_lines)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct BillLineRow {
    bill_day: NaiveDate,
    resource_id: String,
    meter: String,
    records: i32,
    quantity: i64,
    included_quantity: i64,
    billed_quantity: i64,
    unbilled_quantity: i64,
    unit_price_nanos: i64,
    amount: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BillView {
    pub bill_day: NaiveDate,
    pub issued_at: DateTime<Utc>,
    pub total: String,
    pub paid_cash_coupons: String,
    pub paid_general_coupons: String,
    pub paid_cash: String,
    pub records: i32,
    pub late_records: i32,
    pub lines: Vec<BillLineView>,
    pub coupon_uses: Vec<CouponUseView>,
}

pub async fn bills(
    db: &Db,
    digits: u32,
    account_id: &str,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<Vec<BillView>, DbError> {
    let mut conn = db.conn().await?;
    let mut q = bills::table
        .filter(bills::account_id.eq(account_id))
        .into_boxed();
    if let Some(f) = from {
        q = q.filter(bills::bill_day.ge(f));
    }
    if let Some(t) = to {
        q = q.filter(bills::bill_day.le(t));
    }
    let rows: Vec<BillRow> = q
        .order(bills::bill_day)
        .select(BillRow::as_select())
        .load(&mut conn)
        .await?;
    let days: Vec<NaiveDate> = rows.iter().map(|r| r.bill_day).collect();
    let lines: Vec<BillLineRow> = bill_lines::table
        .filter(bill_lines::account_id.eq(account_id))
        .filter(bill_lines::bill_day.eq_any(&days))
        .order((
            bill_lines::bill_day,
            bill_lines::resource_id,
            bill_lines::meter,
        ))
        .select(BillLineRow::as_select())
        .load(&mut conn)
        .await?;
    let uses: Vec<(Option<NaiveDate>, Option<i64>, i64)> = ledger_entries::table
        .filter(ledger_entries::account_id.eq(account_id))
        .filter(ledger_entries::kind.eq("coupon_use"))
        .filter(ledger_entries::bill_day.eq_any(&days))
        .order(ledger_entries::id)
        .select((
            ledger_entries::bill_day,
            ledger_entries::coupon_id,
            ledger_entries::amount,
        ))
        .load(&mut conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| BillView {
            bill_day: r.bill_day,
            issued_at: r.issued_at,
            total: format_scaled(r.total, digits),
            paid_cash_coupons: format_scaled(r.paid_cash_coupons, digits),
            paid_general_coupons: format_scaled(r.paid_general_coupons, digits),
            paid_cash: format_scaled(r.paid_cash, digits),
            records: r.records,
            late_records: r.late_records,
            lines: lines
                .iter()
                .filter(|l| l.bill_day == r.bill_day)
                .map(|l| BillLineView {
                    resource_id: l.resource_id.clone(),
                    meter: l.meter.clone(),
                    records: l.records,
                    quantity: format_quantity(l.quantity),
                    included_quantity: format_quantity(l.included_quantity),
                    billed_quantity: format_quantity(l.billed_quantity),
                    unbilled_quantity: format_quantity(l.unbilled_quantity),
                    unit_price: format_scaled(l.unit_price_nanos, PRICE_DIGITS),
                    amount: format_scaled(l.amount, digits),
                })
                .collect(),
            coupon_uses: uses
                .iter()
                .filter(|u| u.0 == Some(r.bill_day))
                .map(|u| CouponUseView {
                    coupon_id: u.1.unwrap_or_default(),
                    amount: format_scaled(u.2, digits),
                })
                .collect(),
        })
        .collect())
}

/// One entry of the audit trail.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = crate::db::schema::lifecycle_events)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct EventView {
    pub occurred_at: DateTime<Utc>,
    /// The arrears episode open when it happened.
    pub episode: Option<i32>,
    pub resource_id: Option<String>,
    #[diesel(column_name = from_state)]
    pub from: String,
    #[diesel(column_name = to_state)]
    pub to: String,
    pub reason: String,
    pub cause: String,
}

/// The audit trail of an account, oldest first.
pub async fn history(db: &Db, account_id: &str) -> Result<Vec<EventView>, DbError> {
    use crate::db::schema::lifecycle_events as e;
    let mut conn = db.conn().await?;
    Ok(e::table
        .filter(e::account_id.eq(account_id))
        .order(e::id)
        .select(EventView::as_select())
        .load(&mut conn)
        .await?)
}

/// A resource's suspension: one reason, one retention clock, one release instant.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = resource_suspensions)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct SuspensionView {
    pub no: i32,
    pub resource_id: String,
    pub reason: String,
    pub episode: Option<i32>,
    pub started_at: DateTime<Utc>,
    pub release_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub ended_how: Option<String>,
}

/// Every resource suspension of an account, oldest first.
pub async fn suspensions(db: &Db, account_id: &str) -> Result<Vec<SuspensionView>, DbError> {
    let mut conn = db.conn().await?;
    Ok(resource_suspensions::table
        .filter(resource_suspensions::account_id.eq(account_id))
        .order(resource_suspensions::no)
        .select(SuspensionView::as_select())
        .load(&mut conn)
        .await?)
}

#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = crate::db::schema::notices)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct NoticeView {
    pub id: i64,
    pub account_id: String,
    pub kind: String,
    pub channel: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub provider_message_id: Option<String>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The outbox, newest first.
pub async fn notices(
    db: &Db,
    status: Option<&str>,
    account: Option<&str>,
    limit: i64,
) -> Result<Vec<NoticeView>, DbError> {
    use crate::db::schema::notices as n;
    let mut conn = db.conn().await?;
    let mut q = n::table.into_boxed();
    if let Some(s) = status {
        q = q.filter(n::status.eq(s.to_string()));
    }
    if let Some(a) = account {
        q = q.filter(n::account_id.eq(a.to_string()));
    }
    Ok(q.order(n::id.desc())
        .limit(limit)
        .select(NoticeView::as_select())
        .load(&mut conn)
        .await?)
}

/// Queues a dead or retrying notice again; returns whether there was one.
pub async fn retry_notice(db: &Db, id: i64, at: DateTime<Utc>) -> Result<bool, DbError> {
    use crate::db::schema::notices as n;
    let mut conn = db.conn().await?;
    let updated = diesel::update(
        n::table
            .filter(n::id.eq(id))
            .filter(n::status.eq_any(["dead", "retrying"])),
    )
    .set((
        n::status.eq("pending"),
        n::next_attempt_at.eq(at),
        n::attempts.eq(0),
    ))
    .execute(&mut conn)
    .await?;
    Ok(updated > 0)
}
