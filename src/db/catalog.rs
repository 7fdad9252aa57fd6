//! The price list in the database, kept in step with the configured products.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::config::Config;
use crate::db::schema::prices;

/// Replaces the `prices` table with the configured price lists, in one transaction. Bill
/// lines copy the unit price they were rated at, so changing a price never rewrites history.
pub async fn sync_prices(conn: &mut AsyncPgConnection, config: &Config) -> QueryResult<usize> {
    let rows: Vec<_> = config
        .products
        .values()
        .flat_map(|p| {
            p.prices.iter().map(move |pr| {
                (
                    prices::product.eq(p.id.clone()),
                    prices::meter.eq(pr.meter.clone()),
                    prices::unit.eq(pr.unit.clone()),
                    prices::unit_price_nanos.eq(pr.unit_price_nanos),
                    prices::is_package_meter
                        .eq(p.package_meter.as_deref() == Some(pr.meter.as_str())),
                )
            })
        })
        .collect();
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        diesel::delete(prices::table).execute(conn).await?;
        diesel::insert_into(prices::table)
            .values(&rows)
            .execute(conn)
            .await
    })
    .await
}
