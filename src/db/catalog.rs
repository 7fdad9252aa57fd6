//! The price list in the database: versioned data, written only by `arrears prices apply`
//! (also run by `migrate` and at service start). Every other command reads it.
//!
//! Each (product, meter) has a history of versions, each in effect from its `effective_from`
//! until the next one; the billing job rates a bill day at the versions in effect at the start
//! of that day (SQL function `prices_at`). A price seen for the first time is in effect since
//! always (so the first `migrate` prices all history); a change or a retired meter takes
//! effect from the instant given (`--effective-from`, default now).

use chrono::{DateTime, TimeZone, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::config::Config;
use crate::db::schema::prices;
use crate::domain::money::{format_scaled, PRICE_DIGITS};

/// The `effective_from` of a price in effect since always.
pub fn since_always() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0)
        .single()
        .expect("0001-01-01 is a valid instant")
}

/// One difference between the configured price list and the database's latest versions.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PriceChange {
    pub product: String,
    pub meter: String,
    /// `added` (first version: in effect since always), `changed`, or `retired`.
    pub change: &'static str,
    /// The unit price in the database before (per `unit`), when there was one.
    pub from: Option<String>,
    /// The configured unit price, unless retired.
    pub to: Option<String>,
    pub unit: String,
    /// When the new version takes effect; `null` for since always.
    pub effective_from: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PricesReport {
    pub dry_run: bool,
    /// True when the database already had the configured price list.
    pub up_to_date: bool,
    pub changes: Vec<PriceChange>,
}

#[derive(Debug, thiserror::Error)]
pub enum PricesError {
    #[error(
        "{product}/{meter} already has a price version effective from {latest}: a new version \
         must take effect after it (give --effective-from later than {latest})"
    )]
    NotAfterLatest {
        product: String,
        meter: String,
        latest: DateTime<Utc>,
    },
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
}

/// One version of a price, as read and as written.
#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = prices)]
struct Version {
    product: String,
    meter: String,
    unit: String,
    unit_price_nanos: i64,
    is_package_meter: bool,
    effective_from: DateTime<Utc>,
    retired: bool,
}

/// The latest version of each (product, meter), whatever its effective instant.
async fn latest(conn: &mut AsyncPgConnection) -> QueryResult<Vec<Version>> {
    prices::table
        .distinct_on((prices::product, prices::meter))
        .order((
            prices::product,
            prices::meter,
            prices::effective_from.desc(),
        ))
        .select(Version::as_select())
        .load(conn)
        .await
}

/// What applying the configured price list from `effective_from` would write.
fn plan(
    config: &Config,
    latest: &[Version],
    effective_from: DateTime<Utc>,
) -> Result<Vec<Version>, PricesError> {
    let mut out = Vec::new();
    let find = |product: &str, meter: &str| {
        latest
            .iter()
            .find(|v| v.product == product && v.meter == meter)
    };
    let not_after = |v: &Version| {
        if effective_from <= v.effective_from {
            Err(PricesError::NotAfterLatest {
                product: v.product.clone(),
                meter: v.meter.clone(),
                latest: v.effective_from,
            })
        } else {
            Ok(())
        }
    };
    for p in config.products.values() {
        for pr in &p.prices {
            let package = p.package_meter.as_deref() == Some(pr.meter.as_str());
            let new = |from| Version {
                product: p.id.clone(),
                meter: pr.meter.clone(),
                unit: pr.unit.clone(),
                unit_price_nanos: pr.unit_price_nanos,
                is_package_meter: package,
                effective_from: from,
                retired: false,
            };
            match find(&p.id, &pr.meter) {
                None => out.push(new(since_always())),
                Some(v)
                    if v.retired
                        || v.unit != pr.unit
                        || v.unit_price_nanos != pr.unit_price_nanos
                        || v.is_package_meter != package =>
                {
                    not_after(v)?;
                    out.push(new(effective_from));
                }
                Some(_) => {}
            }
        }
    }
    for v in latest.iter().filter(|v| !v.retired) {
        let configured = config
            .products
            .get(&v.product)
            .is_some_and(|p| p.prices.iter().any(|pr| pr.meter == v.meter));
        if !configured {
            not_after(v)?;
            out.push(Version {
                product: v.product.clone(),
                meter: v.meter.clone(),
                unit: v.unit.clone(),
                unit_price_nanos: v.unit_price_nanos,
                is_package_meter: v.is_package_meter,
                effective_from,
                retired: true,
            });
        }
    }
    Ok(out)
}

fn describe(latest: &[Version], writes: &[Version]) -> Vec<PriceChange> {
    // A unit price in nano-units of the currency, as the configuration writes it (trailing
    // zeros trimmed).
    let price = |nanos: i64| {
        let s = format_scaled(nanos, PRICE_DIGITS);
        let s = s.trim_end_matches('0');
        s.trim_end_matches('.').to_string()
    };
    writes
        .iter()
        .map(|w| {
            let before = latest
                .iter()
                .find(|v| v.product == w.product && v.meter == w.meter && !v.retired);
            PriceChange {
                product: w.product.clone(),
                meter: w.meter.clone(),
                change: if w.retired {
                    "retired"
                } else if before.is_none() && w.effective_from == since_always() {
                    "added"
                } else {
                    "changed"
                },
                from: before.map(|v| price(v.unit_price_nanos)),
                to: (!w.retired).then(|| price(w.unit_price_nanos)),
                unit: w.unit.clone(),
                effective_from: (w.effective_from != since_always()).then_some(w.effective_from),
            }
        })
        .collect()
}

/// Where the configured price list and the database's latest versions differ (what
/// `arrears prices apply` would write), for `check` and `/metrics`. Reads only.
pub async fn drift(
    conn: &mut AsyncPgConnection,
    config: &Config,
    now: DateTime<Utc>,
) -> Result<Vec<PriceChange>, PricesError> {
    let latest = latest(conn).await?;
    // `now` may precede a version already written; the differences are what matter here.
    let at = latest
        .iter()
        .map(|v| v.effective_from)
        .max()
        .map_or(now, |m| m.max(now) + chrono::Duration::microseconds(1));
    let writes = plan(config, &latest, at)?;
    Ok(describe(&latest, &writes))
}

/// Writes the versions that bring the database's price list to the configured one, in one
/// transaction that holds the table against concurrent appliers; a dry run writes nothing.
pub async fn apply(
    conn: &mut AsyncPgConnection,
    config: &Config,
    effective_from: DateTime<Utc>,
    dry_run: bool,
) -> Result<PricesReport, PricesError> {
    conn.transaction::<_, PricesError, _>(async move |conn| {
        // One applier at a time (the service starting while an operator runs migrate);
        // readers (billing) are not blocked. Raw SQL: diesel has no LOCK TABLE.
        diesel::sql_query("LOCK TABLE prices IN SHARE ROW EXCLUSIVE MODE")
            .execute(conn)
            .await?;
        let latest = latest(conn).await?;
        let writes = plan(config, &latest, effective_from)?;
        let changes = describe(&latest, &writes);
        if !dry_run && !writes.is_empty() {
            diesel::insert_into(prices::table)
                .values(&writes)
                .execute(conn)
                .await?;
        }
        if !dry_run {
            // Prices are nanos of the currency's unit, amounts counts of its minor unit: the
            // first price list pins both (Db::open refuses a configuration that disagrees).
            use crate::db::schema::money_settings as m;
            diesel::insert_into(m::table)
                .values((
                    m::currency.eq(&config.billing.currency),
                    m::minor_unit_digits.eq(config.billing.minor_unit_digits as i32),
                    m::pinned_at.eq(Utc::now()),
                ))
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
        }
        Ok(PricesReport {
            dry_run,
            up_to_date: changes.is_empty(),
            changes,
        })
    })
    .await
}

/// Applies the configured price list to a scratch database this program just created (the
/// benchmarks and the demo): everything is new there, so in effect since always.
pub async fn apply_to_new(db: &crate::db::Db, config: &Config) -> Result<(), crate::db::DbError> {
    apply(&mut *db.conn().await?, config, Utc::now(), false).await?;
    Ok(())
}
