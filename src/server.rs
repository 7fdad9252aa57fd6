//! HTTP endpoints of `arrears serve`: `/healthz`, `/readyz`, `/metrics` (Prometheus text),
//! and under bearer-token auth `/v1/accounts/{id}`, `/v1/accounts/{id}/gate` and
//! `POST /v1/accounts/{id}/topups`. Errors are JSON `{"error", "field"}` naming what was wrong.

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
use crate::domain::money::parse_amount;
use crate::ledger::{self, LedgerError};
use crate::shared::Shared;

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
            // Raw, not diesel: ready means the raw pool the jobs' set-based SQL runs on answers.
            let c = db.raw_client().await?;
            // Raw SQL: a ping on that raw pool's client, which diesel does not drive.
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
    let gauges = match sh.db() {
        Some(db) => tokio::time::timeout(
            Duration::from_secs(5),
            crate::metrics::db_gauges(&sh.config, &sh.schedule, sh.clock.now(), db),
        )
        .await
        .ok()
        .and_then(Result::ok),
        None => None,
    };
    match crate::metrics::encode(&sh.metrics, gauges.as_ref()) {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        // Writing into a String fails only if a metric's own encoding does.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
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
    let amount = parse_amount(&parsed.amount, digits)
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
        LedgerError::EmptyReference | LedgerError::LongReference => {
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
        // coupons' errors; a top-up never gives them
        LedgerError::AlreadyExpired(..) | LedgerError::CouponReferenceReused { .. } => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "body", e.to_string())
        }
        LedgerError::Db(_) => ApiError::unavailable(),
    })?;
    let status = if report.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(report)).into_response())
}
