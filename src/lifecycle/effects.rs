//! What lifecycle decisions write, collected in memory while a batch is decided and written
//! with one set-based statement per table (and per kind of change), in an order that keeps
//! every foreign key satisfied: new episodes, new suspensions, ended suspensions, resources,
//! episodes, accounts, then the audit trail, the control-plane orders and the outbox.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Int4, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db::schema::{
    arrears_episodes, control_plane_orders, lifecycle_events, notices, resource_suspensions,
};

/// Rows per multi-row INSERT (PostgreSQL takes at most 65,535 parameters a statement).
const CHUNK: usize = 1000;

#[derive(Debug, Clone)]
pub struct NewEpisode {
    pub account_id: String,
    pub no: i32,
    pub opened_at: DateTime<Utc>,
    pub opened_by: String,
}

/// A change to an existing episode: its suspension instant, or its end.
#[derive(Debug, Clone)]
pub struct EpisodeUpdate {
    pub account_id: String,
    pub no: i32,
    pub suspended_at: Option<DateTime<Utc>>,
    pub closed: Option<(DateTime<Utc>, &'static str, String)>,
}

#[derive(Debug, Clone)]
pub struct NewSuspension {
    pub account_id: String,
    pub no: i32,
    pub resource_id: String,
    pub reason: &'static str,
    pub episode: Option<i32>,
    pub started_at: DateTime<Utc>,
    pub release_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct SuspensionEnd {
    pub account_id: String,
    pub no: i32,
    pub at: DateTime<Utc>,
    pub how: &'static str,
}

/// A suspension's release instant moved (the policy changed): `arrears policies apply`.
#[derive(Debug, Clone)]
pub struct SuspensionDeadline {
    pub account_id: String,
    pub no: i32,
    pub release_at: Option<DateTime<Utc>>,
}

/// The new state of a resource.
#[derive(Debug, Clone)]
pub struct ResourceUpdate {
    pub account_id: String,
    pub id: String,
    pub state: &'static str,
    pub reason: Option<&'static str>,
    pub suspended_at: Option<DateTime<Utc>>,
    pub suspension: Option<i32>,
    pub released_at: Option<DateTime<Utc>>,
    pub at: DateTime<Utc>,
}

/// The new lifecycle columns of an account, written for every account a batch decided on.
#[derive(Debug, Clone)]
pub struct AccountUpdate {
    pub id: String,
    pub state: &'static str,
    pub arrears_since: Option<DateTime<Utc>>,
    pub episode: Option<i32>,
    pub episodes: i32,
    pub suspensions: i32,
    pub armed: bool,
    pub alerts_due_at: Option<DateTime<Utc>>,
    pub enforce_due_at: Option<DateTime<Utc>>,
    pub release_due_at: Option<DateTime<Utc>>,
    /// Something other than the due instants changed (`updated_at` moves).
    pub changed: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub account_id: String,
    /// The episode open when it happened.
    pub episode: Option<i32>,
    pub resource_id: Option<String>,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub cause: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewOrder {
    pub account_id: String,
    pub resource_id: String,
    pub product: String,
    pub kind: &'static str,
    pub reason: Option<&'static str>,
    pub cause: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewNotice {
    pub account_id: String,
    pub kind: &'static str,
    pub channel: &'static str,
    pub dedupe_key: String,
    pub payload: serde_json::Value,
    pub episode: Option<i32>,
    pub suspension: Option<i32>,
    pub at: DateTime<Utc>,
}

/// Everything a batch of decisions writes.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    pub episodes_new: Vec<NewEpisode>,
    pub episodes_upd: Vec<EpisodeUpdate>,
    pub suspensions_new: Vec<NewSuspension>,
    pub suspensions_end: Vec<SuspensionEnd>,
    pub deadlines: Vec<SuspensionDeadline>,
    pub resources: Vec<ResourceUpdate>,
    pub accounts: Vec<AccountUpdate>,
    pub events: Vec<NewEvent>,
    pub orders: Vec<NewOrder>,
    pub notices: Vec<NewNotice>,
}

impl Effects {
    /// Writes everything in the caller's transaction, parents before the rows that refer to
    /// them. Returns how many notices were new.
    pub async fn write(&self, conn: &mut AsyncPgConnection) -> QueryResult<usize> {
        self.insert_episodes_and_suspensions(conn).await?;
        self.update_suspensions(conn).await?;
        self.update_resources(conn).await?;
        self.update_episodes(conn).await?;
        self.update_accounts(conn).await?;
        self.insert_events_and_orders(conn).await?;
        self.insert_notices(conn).await
    }

    /// New episodes and suspensions.
    async fn insert_episodes_and_suspensions(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> QueryResult<()> {
        for chunk in self.episodes_new.chunks(CHUNK) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|e| {
                    (
                        arrears_episodes::account_id.eq(&e.account_id),
                        arrears_episodes::no.eq(e.no),
                        arrears_episodes::opened_at.eq(e.opened_at),
                        arrears_episodes::opened_by.eq(&e.opened_by),
                    )
                })
                .collect();
            diesel::insert_into(arrears_episodes::table)
                .values(&rows)
                .execute(conn)
                .await?;
        }
        for chunk in self.suspensions_new.chunks(CHUNK) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|s| {
                    (
                        resource_suspensions::account_id.eq(&s.account_id),
                        resource_suspensions::no.eq(s.no),
                        resource_suspensions::resource_id.eq(&s.resource_id),
                        resource_suspensions::reason.eq(s.reason),
                        resource_suspensions::episode.eq(s.episode),
                        resource_suspensions::started_at.eq(s.started_at),
                        resource_suspensions::release_at.eq(s.release_at),
                    )
                })
                .collect();
            diesel::insert_into(resource_suspensions::table)
                .values(&rows)
                .execute(conn)
                .await?;
        }
        Ok(())
    }

    /// Ended suspensions and moved release instants.
    async fn update_suspensions(&self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        if !self.suspensions_end.is_empty() {
            let v = &self.suspensions_end;
            // Raw SQL: an UPDATE ... FROM unnest(...) of many rows is one statement; the query
            // builder would need one statement per row.
            diesel::sql_query(
                "UPDATE resource_suspensions s SET ended_at = u.at, ended_how = u.how
                 FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::text[]) AS u(account_id, no, at, how)
                 WHERE s.account_id = u.account_id AND s.no = u.no AND s.ended_at IS NULL",
            )
            .bind::<Array<Text>, _>(v.iter().map(|e| e.account_id.as_str()).collect::<Vec<_>>())
            .bind::<Array<Int4>, _>(v.iter().map(|e| e.no).collect::<Vec<_>>())
            .bind::<Array<Timestamptz>, _>(v.iter().map(|e| e.at).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(v.iter().map(|e| e.how).collect::<Vec<_>>())
            .execute(conn)
            .await?;
        }
        if !self.deadlines.is_empty() {
            let v = &self.deadlines;
            // Raw SQL: one UPDATE ... FROM unnest(...) for the whole batch.
            diesel::sql_query(
                "UPDATE resource_suspensions s SET release_at = u.release_at
                 FROM unnest($1::text[], $2::int[], $3::timestamptz[]) AS u(account_id, no, release_at)
                 WHERE s.account_id = u.account_id AND s.no = u.no",
            )
            .bind::<Array<Text>, _>(v.iter().map(|e| e.account_id.as_str()).collect::<Vec<_>>())
            .bind::<Array<Int4>, _>(v.iter().map(|e| e.no).collect::<Vec<_>>())
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.release_at).collect::<Vec<_>>(),
            )
            .execute(conn)
            .await?;
        }
        Ok(())
    }

    /// Resource states.
    async fn update_resources(&self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        if !self.resources.is_empty() {
            let v = &self.resources;
            // Raw SQL: one UPDATE ... FROM unnest(...) for the whole batch.
            diesel::sql_query(
                "UPDATE resources r SET state = u.state, state_reason = u.reason, suspended_at = u.suspended_at,
                        suspension = u.suspension, released_at = coalesce(u.released_at, r.released_at),
                        updated_at = u.at
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::int[],
                             $7::timestamptz[], $8::timestamptz[])
                      AS u(account_id, id, state, reason, suspended_at, suspension, released_at, at)
                 WHERE r.account_id = u.account_id AND r.id = u.id",
            )
            .bind::<Array<Text>, _>(v.iter().map(|e| e.account_id.as_str()).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(v.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(v.iter().map(|e| e.state).collect::<Vec<_>>())
            .bind::<Array<Nullable<Text>>, _>(v.iter().map(|e| e.reason).collect::<Vec<_>>())
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.suspended_at).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Int4>>, _>(v.iter().map(|e| e.suspension).collect::<Vec<_>>())
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.released_at).collect::<Vec<_>>(),
            )
            .bind::<Array<Timestamptz>, _>(v.iter().map(|e| e.at).collect::<Vec<_>>())
            .execute(conn)
            .await?;
        }
        Ok(())
    }

    /// Episodes suspended or closed.
    async fn update_episodes(&self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        if !self.episodes_upd.is_empty() {
            let v = &self.episodes_upd;
            // Raw SQL: one UPDATE ... FROM unnest(...) for the whole batch.
            diesel::sql_query(
                "UPDATE arrears_episodes e SET suspended_at = coalesce(e.suspended_at, u.suspended_at),
                        closed_at = coalesce(e.closed_at, u.closed_at),
                        close_reason = coalesce(e.close_reason, u.close_reason),
                        closed_by = coalesce(e.closed_by, u.closed_by)
                 FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[])
                      AS u(account_id, no, suspended_at, closed_at, close_reason, closed_by)
                 WHERE e.account_id = u.account_id AND e.no = u.no",
            )
            .bind::<Array<Text>, _>(v.iter().map(|e| e.account_id.as_str()).collect::<Vec<_>>())
            .bind::<Array<Int4>, _>(v.iter().map(|e| e.no).collect::<Vec<_>>())
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.suspended_at).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.closed.as_ref().map(|c| c.0)).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Text>>, _>(
                v.iter().map(|e| e.closed.as_ref().map(|c| c.1)).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Text>>, _>(
                v.iter()
                    .map(|e| e.closed.as_ref().map(|c| c.2.as_str()))
                    .collect::<Vec<_>>(),
            )
            .execute(conn)
            .await?;
        }
        Ok(())
    }

    /// Account states and their due-work index.
    async fn update_accounts(&self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        if !self.accounts.is_empty() {
            let v = &self.accounts;
            // Raw SQL: one UPDATE ... FROM unnest(...) for the whole batch.
            diesel::sql_query(
                "UPDATE accounts a SET state = u.state, arrears_since = u.arrears_since, episode = u.episode,
                        episodes = u.episodes, suspensions = u.suspensions, balance_alert_armed = u.armed,
                        alerts_due_at = u.alerts_due, enforce_due_at = u.enforce_due, release_due_at = u.release_due,
                        updated_at = CASE WHEN u.changed THEN u.at ELSE a.updated_at END
                 FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int[], $5::int[], $6::int[],
                             $7::bool[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::bool[],
                             $12::timestamptz[])
                      AS u(id, state, arrears_since, episode, episodes, suspensions, armed, alerts_due,
                           enforce_due, release_due, changed, at)
                 WHERE a.id = u.id",
            )
            .bind::<Array<Text>, _>(v.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(v.iter().map(|e| e.state).collect::<Vec<_>>())
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.arrears_since).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Int4>>, _>(v.iter().map(|e| e.episode).collect::<Vec<_>>())
            .bind::<Array<Int4>, _>(v.iter().map(|e| e.episodes).collect::<Vec<_>>())
            .bind::<Array<Int4>, _>(v.iter().map(|e| e.suspensions).collect::<Vec<_>>())
            .bind::<Array<Bool>, _>(v.iter().map(|e| e.armed).collect::<Vec<_>>())
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.alerts_due_at).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.enforce_due_at).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Timestamptz>>, _>(
                v.iter().map(|e| e.release_due_at).collect::<Vec<_>>(),
            )
            .bind::<Array<Bool>, _>(v.iter().map(|e| e.changed).collect::<Vec<_>>())
            .bind::<Array<Timestamptz>, _>(v.iter().map(|e| e.at).collect::<Vec<_>>())
            .execute(conn)
            .await?;
        }
        Ok(())
    }

    /// The audit trail and the control-plane orders.
    async fn insert_events_and_orders(&self, conn: &mut AsyncPgConnection) -> QueryResult<()> {
        for chunk in self.events.chunks(CHUNK) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|e| {
                    (
                        lifecycle_events::account_id.eq(&e.account_id),
                        lifecycle_events::resource_id.eq(e.resource_id.as_deref()),
                        lifecycle_events::from_state.eq(&e.from),
                        lifecycle_events::to_state.eq(&e.to),
                        lifecycle_events::reason.eq(&e.reason),
                        lifecycle_events::cause.eq(&e.cause),
                        lifecycle_events::occurred_at.eq(e.at),
                        lifecycle_events::episode.eq(e.episode),
                    )
                })
                .collect();
            diesel::insert_into(lifecycle_events::table)
                .values(&rows)
                .execute(conn)
                .await?;
        }
        for chunk in self.orders.chunks(CHUNK) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|o| {
                    (
                        control_plane_orders::account_id.eq(&o.account_id),
                        control_plane_orders::resource_id.eq(&o.resource_id),
                        control_plane_orders::product.eq(&o.product),
                        control_plane_orders::kind.eq(o.kind),
                        control_plane_orders::reason.eq(o.reason),
                        control_plane_orders::cause.eq(&o.cause),
                        control_plane_orders::created_at.eq(o.at),
                    )
                })
                .collect();
            diesel::insert_into(control_plane_orders::table)
                .values(&rows)
                .execute(conn)
                .await?;
        }
        Ok(())
    }

    /// New notices (a notice already in the outbox is not written twice); returns how many.
    async fn insert_notices(&self, conn: &mut AsyncPgConnection) -> QueryResult<usize> {
        let mut new_notices = 0;
        for chunk in self.notices.chunks(CHUNK) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|n| {
                    (
                        notices::account_id.eq(&n.account_id),
                        notices::kind.eq(n.kind),
                        notices::channel.eq(n.channel),
                        notices::dedupe_key.eq(&n.dedupe_key),
                        notices::payload.eq(&n.payload),
                        notices::next_attempt_at.eq(n.at),
                        notices::created_at.eq(n.at),
                        notices::episode.eq(n.episode),
                        notices::suspension.eq(n.suspension),
                    )
                })
                .collect();
            new_notices += diesel::insert_into(notices::table)
                .values(&rows)
                .on_conflict((notices::account_id, notices::dedupe_key))
                .do_nothing()
                .execute(conn)
                .await?;
        }
        Ok(new_notices)
    }

    pub fn is_empty(&self) -> bool {
        self.episodes_new.is_empty()
            && self.episodes_upd.is_empty()
            && self.suspensions_new.is_empty()
            && self.suspensions_end.is_empty()
            && self.deadlines.is_empty()
            && self.resources.is_empty()
            && self.accounts.is_empty()
            && self.events.is_empty()
            && self.orders.is_empty()
            && self.notices.is_empty()
    }
}
