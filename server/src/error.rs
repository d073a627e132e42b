//! The one error type of the HTTP layer and the one place it becomes a response: a status
//! code and OpenAI's body `{"error": {"message", "type", "param", "code"}}`, which the
//! official clients turn into their typed exceptions.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::engine::EngineError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A request parameter is malformed or out of range; `param` names it.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("Invalid or missing API key. Send it as `Authorization: Bearer <key>`.")]
    Unauthorized,
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("Unknown route: {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("Method not allowed on this route")]
    MethodNotAllowed,
    #[error("Request body is too large (the server's limit is set with --max-body-bytes)")]
    PayloadTooLarge,
    #[error("The server is overloaded; retry after {retry_after_secs} s")]
    Overloaded { retry_after_secs: u64 },
    #[error("The model is still loading; retry shortly")]
    NotReady,
    #[error("The server is shutting down; retry on another replica or later")]
    ShuttingDown,
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into(),
        }
    }

    /// A bad value for `param`.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(Some(param.to_string()), message)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code` fields.
    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::InvalidRequest { .. } => ("invalid_request_error", None),
            ApiError::Unauthorized => ("authentication_error", Some("invalid_api_key")),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::RouteNotFound { .. } => ("invalid_request_error", Some("not_found")),
            ApiError::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
            ApiError::PayloadTooLarge => ("invalid_request_error", Some("request_too_large")),
            ApiError::Overloaded { .. } => ("rate_limit_error", Some("rate_limit_exceeded")),
            ApiError::NotReady => ("service_unavailable_error", Some("model_loading")),
            ApiError::ShuttingDown => ("service_unavailable_error", Some("shutting_down")),
            ApiError::Internal(_) => ("server_error", Some("internal_error")),
        }
    }

    /// The JSON body (also sent as an SSE chunk when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind_and_code();
        let param = match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) => Some("model".to_string()),
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "internal error");
        }
        let mut resp = (self.status(), Json(self.body())).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Overloaded { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::NotReady => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded(_) => ApiError::Overloaded {
                retry_after_secs: 1,
            },
            EngineError::Invalid(m) => ApiError::invalid(None, m),
            EngineError::Stopped => ApiError::Internal(e.to_string()),
            EngineError::Model(m) => ApiError::Internal(m),
            EngineError::ShuttingDown => ApiError::ShuttingDown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_openai_shape() {
        let all = [
            ApiError::param("temperature", "must be >= 0"),
            ApiError::Unauthorized,
            ApiError::ModelNotFound("x".into()),
            ApiError::RouteNotFound {
                method: "GET".into(),
                path: "/x".into(),
            },
            ApiError::MethodNotAllowed,
            ApiError::PayloadTooLarge,
            ApiError::Overloaded {
                retry_after_secs: 1,
            },
            ApiError::NotReady,
            ApiError::Internal("boom".into()),
        ];
        let codes: Vec<u16> = all.iter().map(|e| e.status().as_u16()).collect();
        assert_eq!(codes, [400, 401, 404, 404, 405, 413, 429, 503, 500]);
        for e in &all {
            let b = e.body();
            let err = &b["error"];
            assert!(err["message"].is_string() && err["type"].is_string(), "{b}");
            assert!(
                err.get("param").is_some() && err.get("code").is_some(),
                "{b}"
            );
        }
        assert_eq!(all[0].body()["error"]["param"], "temperature");
    }
}
