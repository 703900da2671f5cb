//! The HTTP surface (axum): `GET /health` (liveness; `?probe=readiness` for readiness),
//! `GET /metrics`, each chat adapter's inbound routes (Mattermost's `POST /callback`,
//! [`crate::chat::mattermost::callback`]) and, when it is on, the web console (`/` and
//! `/console/…`, [`crate::console::web`]) with `/health` and `/metrics`.
//!
//! Every route, including unknown paths, passes the per-client rate limiter first
//! ([`ratelimit`]); over the limit answers 429 with `Retry-After` (whole seconds). Handlers only
//! read memory or the database: no SSH, git or firewall work happens inside a request.

pub mod ratelimit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::chat::ClickHandlers;
use crate::health::{ComponentHealth, ComponentStatus, HealthRegistry};
use crate::leader::Role;
use crate::store::Store;
use crate::telemetry::{names, Metrics};
use ratelimit::ClientRateLimiter;

/// How long `/health` waits for the database before calling it down.
pub const DATABASE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest request body accepted (callbacks are small).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Every route the bot serves, as `(method, path)`; Teams' messaging endpoint only when Teams
/// is configured ([`router_with`]). The README's and the runbook's lists are checked against it
/// (`tests/docs.rs`), and `tests/http.rs` checks that each one is routed.
pub const ENDPOINTS: [(&str, &str); 4] = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/callback"),
    ("POST", crate::chat::teams::MESSAGES_PATH),
];

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Storage.
    pub store: Store,
    /// Component health reported by the rest of the bot.
    pub health: HealthRegistry,
    /// The per-client rate limiter.
    pub limiter: Arc<ClientRateLimiter>,
    /// The metrics renderer.
    pub metrics: &'static Metrics,
    /// Whether this instance is the active one.
    pub role: tokio::sync::watch::Receiver<Role>,
    /// Who answers card clicks, once this instance is active and connected to chat.
    pub clicks: ClickHandlers,
    /// The web console (`/`), when it is on (`SM_CONSOLE_AUTH`).
    pub console: Option<crate::console::Console>,
}

/// Builds the router for one port: operations (`/health`, `/metrics`) and chat servers'
/// requests (`/callback`) together. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so the rate limiter sees the peer.
pub fn router(state: AppState) -> Router {
    router_with(state, None)
}

/// [`router`] plus a chat platform's own inbound routes (Teams' `POST /api/messages`), under
/// the same rate limiting and metrics.
pub fn router_with(state: AppState, platform: Option<Router>) -> Router {
    let chat = chat_routes(&state).merge(platform.unwrap_or_default());
    layered(operations_routes(&state).merge(chat), &state)
}

/// The operations port alone (`/health`, `/metrics`), when chat servers' requests have a port
/// of their own (`SM_CALLBACK_LISTEN_ADDR`).
pub fn operations_router(state: AppState) -> Router {
    layered(operations_routes(&state), &state)
}

/// Chat servers' requests alone (`POST /callback`), for `SM_CALLBACK_LISTEN_ADDR`: a port a
/// NetworkPolicy can open to the chat server only.
pub fn chat_router(state: AppState) -> Router {
    chat_router_with(state, None)
}

/// [`chat_router`] plus a chat platform's own inbound routes (Teams' `POST /api/messages`).
pub fn chat_router_with(state: AppState, platform: Option<Router>) -> Router {
    layered(
        chat_routes(&state).merge(platform.unwrap_or_default()),
        &state,
    )
}

fn operations_routes(state: &AppState) -> Router {
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .with_state(state.clone());
    match &state.console {
        Some(console) => routes.merge(console.routes()),
        None => routes,
    }
}

fn chat_routes(state: &AppState) -> Router {
    crate::chat::mattermost::callback::routes(state.clicks.clone())
}

/// The layers every port shares: unknown paths 404, the rate limiter, request metrics, the
/// body limit.
fn layered(routes: Router, state: &AppState) -> Router {
    routes
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit))
        .layer(middleware::from_fn(record_metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// The `/health` body.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    /// `ok` (everything up), `degraded` (database up, something else down), `unavailable`
    /// (database down: the bot cannot work; HTTP 503), `standby` (readiness probe on an
    /// instance that is not the active one; HTTP 503) or `suspended` (readiness probe on an
    /// instance that lost its lock connection; HTTP 503).
    pub status: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// `active`; `standby` while another instance holds the instance lock; `suspended` while
    /// this one lost its lock connection and tries to take the lock back.
    pub role: Role,
    /// Each component by name; `database` is always present.
    pub components: std::collections::BTreeMap<String, ComponentHealth>,
}

/// Query of `/health`: `?probe=readiness` asks whether this instance should receive traffic.
#[derive(Debug, Default, Deserialize)]
pub struct HealthQuery {
    /// `readiness`, or absent for liveness.
    pub probe: Option<String>,
}

/// `GET /health`. Liveness (no query): 200 while the database answers, 503 when it does not.
/// Readiness (`?probe=readiness`): additionally 503 on a standby instance, which is alive but
/// must not receive traffic (see [`crate::leader`]).
async fn health(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<HealthQuery>,
) -> Response {
    let started = Instant::now();
    let ping = tokio::time::timeout(DATABASE_PING_TIMEOUT, state.store.ping()).await;
    let backend = format!("{:?}", state.store.backend()).to_lowercase();
    let database = match ping {
        Ok(Ok(())) => ComponentHealth {
            status: ComponentStatus::Up,
            detail: Some(format!(
                "{backend}, answered in {} ms",
                started.elapsed().as_millis()
            )),
            checked_at: Some(crate::store::now_ms()),
        },
        Ok(Err(e)) => ComponentHealth {
            status: ComponentStatus::Down,
            detail: Some(format!("{backend}: {e}")),
            checked_at: Some(crate::store::now_ms()),
        },
        Err(_) => ComponentHealth {
            status: ComponentStatus::Down,
            detail: Some(format!(
                "{backend}: no answer within {DATABASE_PING_TIMEOUT:?}"
            )),
            checked_at: Some(crate::store::now_ms()),
        },
    };
    let db_up = database.status == ComponentStatus::Up;
    state
        .health
        .report("database", database.status, database.detail.clone());
    let mut components = state.health.snapshot();
    components.insert("database".to_owned(), database);
    let all_up = components.values().all(|c| c.status == ComponentStatus::Up);
    let role = *state.role.borrow();
    let readiness = query.probe.as_deref() == Some("readiness");
    let (code, status) = match (db_up, all_up) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, _) if readiness && role == Role::Suspended => {
            (StatusCode::SERVICE_UNAVAILABLE, "suspended")
        }
        (true, _) if readiness && role != Role::Active => {
            (StatusCode::SERVICE_UNAVAILABLE, "standby")
        }
        (true, false) => (StatusCode::OK, "degraded"),
        (true, true) => (StatusCode::OK, "ok"),
    };
    let report = HealthReport {
        status,
        version: env!("CARGO_PKG_VERSION"),
        role,
        components,
    };
    (code, Json(report)).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "no such route")
}

fn error_response(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

async fn rate_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        // Served without peer addresses (a wiring mistake): everyone shares one bucket,
        // which fails safe.
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let client = state.limiter.client_ip(peer, request.headers());
    match state.limiter.check(client) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            metrics::counter!(names::HTTP_RATE_LIMITED_TOTAL).increment(1);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let secs = secs.max(1);
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({ "error": "rate limited", "retry_after_secs": secs })),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
    }
}

async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(names::HTTP_REQUESTS_TOTAL, "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(names::HTTP_REQUEST_DURATION_SECONDS, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
