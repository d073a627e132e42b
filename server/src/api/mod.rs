//! The HTTP layer: OpenAI-compatible routes over an [`Engine`], plus `/health` and
//! `/metrics`.
//!
//! The router exists before the model is loaded (so `/health` can answer 503 while it
//! loads); [`AppState::set_ready`] plugs the engine in. Every failure, from routing and
//! body limits to engine overload, goes out through [`ApiError`] in OpenAI's error format.

mod body;
mod chat;
mod completions;
mod format;
mod inputs;
mod output;
pub mod params;
mod prepare;
mod stream;
mod tools;

use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

pub use params::Limits;

use crate::engine::Engine;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::text::grammar::Grammars;
use crate::text::Codec;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The only value the `model` field may take.
    pub served_model_name: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
}

/// What serving needs once the model is loaded. Cheap to clone.
#[derive(Clone)]
pub struct Ready {
    pub engine: Arc<dyn Engine>,
    pub codec: Arc<Codec>,
    /// Compiles structured-output constraints for this model's vocabulary.
    pub grammars: Arc<Grammars>,
    pub limits: Limits,
}

pub struct AppState {
    pub config: ApiConfig,
    pub metrics: Arc<Metrics>,
    ready: OnceLock<Ready>,
    created: u64,
}

impl AppState {
    pub fn new(config: ApiConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            config,
            metrics,
            ready: OnceLock::new(),
            created: prepare::unix_now(),
        })
    }

    /// Makes the model available; later calls are ignored.
    pub fn set_ready(&self, ready: Ready) {
        let _ = self.ready.set(ready);
    }

    /// Fails everything the engine holds and will be given ([`Engine::shut_down`]); nothing
    /// to do while the model is still loading.
    pub fn shut_down_engine(&self) {
        if let Some(r) = self.ready.get() {
            r.engine.shut_down();
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get().is_some()
    }

    fn ready(&self) -> Result<Ready, ApiError> {
        self.ready.get().cloned().ok_or(ApiError::NotReady)
    }
}

/// All routes, with auth, request metrics, the body limit and OpenAI-style 404/405.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Checks the bearer key on `/v1/*` (health and metrics stay open for probes).
async fn authenticate(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.config.api_key {
        if req.uri().path().starts_with("/v1") && !bearer_matches(req.headers(), key) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare without an early exit so timing does not leak the key's prefix.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn count_requests(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    app.metrics
        .record_request(&endpoint, resp.status().as_u16());
    resp
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    if app.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}

fn model_card(app: &AppState) -> serde_json::Value {
    json!({
        "id": app.config.served_model_name,
        "object": "model",
        "created": app.created,
        "owned_by": "liger",
        "max_model_len": app.ready.get().map(|r| r.limits.max_model_len),
    })
}

async fn list_models(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_card(&app)]}))
}

async fn get_model(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if model != app.config.served_model_name {
        return Err(ApiError::ModelNotFound(model));
    }
    Ok(Json(model_card(&app)))
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}
