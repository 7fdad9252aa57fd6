//! HTTP endpoints of `arrears serve`: `/healthz`, `/readyz`, `/metrics` (Prometheus text),
//! and under bearer-token auth `/v1/accounts/{id}`, `/v1/accounts/{id}/gate` and
//! `POST /v1/accounts/{id}/topups`. Errors are JSON `{"error", "field"}` naming what was wrong.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::domain::lifecycle::{gate, Action};
use crate::domain::money::parse_non_negative;
use crate::ledger::{self, LedgerError};
use crate::service::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/accounts/{id}", get(account))
        .route("/v1/accounts/{id}/gate", get(gate_check))
        .route("/v1/accounts/{id}/topups", post(topup))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "path", "no such endpoint") })
        .with_state(shared)
}

/// A 4xx/5xx answer: what was wrong and with which field.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            field,
            message: message.into(),
        }
    }

    fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database",
            "the database is not available; retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.message, "field": self.field })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Checks the bearer token against every configured token in constant time.
fn authorize(sh: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization",
            "missing bearer token",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authorization",
                "expected `Authorization: Bearer <token>`",
            )
        })?;
    let mut ok = subtle::Choice::from(0);
    for t in &sh.config.service.api_tokens {
        ok |= t.as_bytes().ct_eq(token.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization",
            "invalid bearer token",
        ))
    }
}

fn db(sh: &Shared) -> Result<&crate::db::Db, ApiError> {
    sh.db().ok_or_else(ApiError::unavailable)
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "id",
            "an account id is 1 to 128 printable characters",
        ));
    }
    Ok(())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(sh): State<Arc<Shared>>) -> Response {
    let reason = if sh.stopping() {
        Some("stopping")
    } else if let Some(db) = sh.db() {
        let ping = tokio::time::timeout(Duration::from_secs(2), async {
            // A pooled client: one that times out mid-ping goes back and is reset on reuse.
            let c = db.raw_client().await?;
            c.execute("SELECT 1", &[]).await?;
            Ok::<(), crate::db::DbError>(())
        })
        .await;
        match ping {
            Ok(Ok(())) => None,
            _ => Some("database unreachable"),
        }
    } else {
        Some("database not connected yet")
    };
    match reason {
        None => (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        )
            .into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not_ready", "reason": why })),
        )
            .into_response(),
    }
}

async fn metrics(State(sh): State<Arc<Shared>>) -> Response {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP arrears_job_runs_total Slot runs of this instance by job and outcome.\n# TYPE arrears_job_runs_total counter"
    );
    let runs = sh.metrics.runs();
    for ((job, outcome), (n, _)) in &runs {
        let _ = writeln!(
            out,
            "arrears_job_runs_total{{job=\"{job}\",outcome=\"{outcome}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP arrears_job_run_seconds Time spent in slot runs by job and outcome.\n# TYPE arrears_job_run_seconds summary"
    );
    for ((job, outcome), (n, secs)) in &runs {
        let _ = writeln!(
            out,
            "arrears_job_run_seconds_sum{{job=\"{job}\",outcome=\"{outcome}\"}} {secs:.6}\narrears_job_run_seconds_count{{job=\"{job}\",outcome=\"{outcome}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP arrears_catch_up_dropped_slots_total Missed slots skipped by the catch-up cap.\n# TYPE arrears_catch_up_dropped_slots_total counter"
    );
    for (job, n) in sh.metrics.dropped_slots() {
        let _ = writeln!(
            out,
            "arrears_catch_up_dropped_slots_total{{job=\"{job}\"}} {n}"
        );
    }
    let gauges = match sh.db() {
        Some(db) => {
            tokio::time::timeout(Duration::from_secs(5), crate::service::db_gauges(&sh, db))
                .await
                .ok()
                .and_then(Result::ok)
        }
        None => None,
    };
    let _ = writeln!(
        out,
        "# HELP arrears_database_up Whether the database answered this scrape.\n# TYPE arrears_database_up gauge\narrears_database_up {}",
        u8::from(gauges.is_some())
    );
    if let Some(g) = gauges {
        let _ = writeln!(out, "# HELP arrears_slots_behind Scheduled slots due or unfinished, by job.\n# TYPE arrears_slots_behind gauge");
        for (job, n) in &g.slots_behind {
            let _ = writeln!(out, "arrears_slots_behind{{job=\"{job}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP arrears_outbox_notices Notices in the outbox by status.\n# TYPE arrears_outbox_notices gauge");
        for (status, n) in &g.outbox {
            let _ = writeln!(out, "arrears_outbox_notices{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP arrears_accounts Accounts by lifecycle state.\n# TYPE arrears_accounts gauge"
        );
        for (state, n) in &g.accounts {
            let _ = writeln!(out, "arrears_accounts{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP arrears_price_list_differences Prices where the configuration and the database's price list differ (run arrears prices apply).\n# TYPE arrears_price_list_differences gauge\narrears_price_list_differences {}", g.price_differences);
        let _ = writeln!(out, "# HELP arrears_billing_batches_pending Billing batches waiting for an instance.\n# TYPE arrears_billing_batches_pending gauge\narrears_billing_batches_pending {}", g.open_batches);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn account(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&sh, &headers)?;
    valid_id(&id)?;
    let db = db(&sh)?;
    let view = crate::queries::account(db, sh.config.billing.minor_unit_digits, &id)
        .await
        .map_err(|_| ApiError::unavailable())?;
    match view {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "id",
            "no such account",
        )),
    }
}

#[derive(Deserialize)]
struct GateQuery {
    action: Option<String>,
    resource: Option<String>,
}

async fn gate_check(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<GateQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&sh, &headers)?;
    valid_id(&id)?;
    let Some(action) = q.action else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "action",
            "missing: one of create_resource, purchase, upgrade, renew, operate, access_data",
        ));
    };
    let action: Action = <Action as clap::ValueEnum>::from_str(&action, false)
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "action",
                format!("{action:?} is not one of create_resource, purchase, upgrade, renew, operate, access_data"),
            )
        })?;
    let db = db(&sh)?;
    let mut conn = db.conn().await.map_err(|_| ApiError::unavailable())?;
    let loaded = crate::lifecycle::load(&mut conn, &id, false)
        .await
        .map_err(|_| ApiError::unavailable())?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "id", "no such account"))?;
    let policies = loaded.with_policies(&sh.config);
    let target = match &q.resource {
        None => None,
        Some(rid) => match policies.iter().find(|(r, _)| &r.id == rid) {
            Some((r, p)) => Some((r, *p)),
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "resource",
                    "no such resource on this account",
                ))
            }
        },
    };
    let decision = gate(&loaded.account, target, action);
    Ok(Json(serde_json::json!({
        "account_id": id,
        "resource_id": q.resource,
        "action": action,
        "allowed": decision.allowed,
        "code": decision.code,
        "reason": decision.reason,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopupBody {
    /// Decimal string in the account currency ("100.00"): never a JSON number (no floats).
    amount: String,
    reference: String,
}

async fn topup(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&sh, &headers)?;
    valid_id(&id)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type",
            "send application/json",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let parsed: TopupBody = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field: &'static str = match path.as_str() {
            _ if e.inner().is_syntax() || e.inner().is_eof() => "body",
            "amount" => "amount",
            "reference" => "reference",
            _ => "body",
        };
        ApiError::new(StatusCode::BAD_REQUEST, field, e.inner().to_string())
    })?;
    let digits = sh.config.billing.minor_unit_digits;
    let amount = parse_non_negative(&parsed.amount, digits)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "amount", e.to_string()))?;
    if parsed.reference.len() > 200 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "reference",
            "at most 200 characters",
        ));
    }
    let db = db(&sh)?;
    let report = ledger::topup(
        db,
        &sh.config,
        &id,
        amount,
        &parsed.reference,
        sh.clock.now(),
        "http:topup",
    )
    .await
    .map_err(|e| match e {
        LedgerError::UnknownAccount(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "id", "no such account")
        }
        LedgerError::NotPositive | LedgerError::TooLarge => {
            ApiError::new(StatusCode::BAD_REQUEST, "amount", e.to_string())
        }
        LedgerError::EmptyReference => {
            ApiError::new(StatusCode::BAD_REQUEST, "reference", e.to_string())
        }
        LedgerError::ReferenceReused { .. } => ApiError::new(
            StatusCode::CONFLICT,
            "reference",
            "this reference was already used for a different amount",
        ),
        LedgerError::ReferenceOfAnotherAccount { ref owner, .. } => ApiError::new(
            StatusCode::CONFLICT,
            "reference",
            format!(
                "this reference already credited account {owner}: one payment credits one account"
            ),
        ),
        LedgerError::AlreadyExpired(..) | LedgerError::Db(_) => ApiError::unavailable(),
    })?;
    let status = if report.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(report)).into_response())
}
