//! The JSON body extractor. axum's own `Json` answers malformed bodies in plain text with
//! its own status codes; this one reads the bytes under the body limit (413 beyond it) and
//! turns every failure into an OpenAI error, naming the parameter when there is one.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// A request's top-level JSON object, from which parameters are taken one by one so that
/// each error can name its parameter (`serde(flatten)` would lose the paths).
#[derive(Debug, Default)]
pub struct Params(Map<String, Value>);

impl Params {
    pub fn from_value(v: Value) -> Result<Self, ApiError> {
        match v {
            Value::Object(m) => Ok(Self(m)),
            other => Err(ApiError::invalid(
                None,
                format!(
                    "the request body must be a JSON object, not {}",
                    json_kind(&other)
                ),
            )),
        }
    }

    /// Takes `name`, parsed as `T`; absent and `null` are both `None`.
    pub fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, ApiError> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_path_to_error::deserialize(v).map(Some).map_err(|e| {
                let path = e.path().to_string();
                let param = if path == "." || path.is_empty() {
                    name.to_string()
                } else if path.starts_with('[') {
                    format!("{name}{path}")
                } else {
                    format!("{name}.{path}")
                };
                ApiError::invalid(
                    Some(param.clone()),
                    format!("invalid `{param}`: {}", e.inner()),
                )
            }),
        }
    }

    /// Takes `name` as raw JSON.
    pub fn take_value(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::invalid(
                    None,
                    format!("could not read the request body: {}", r.body_text()),
                )
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
        })?;
        Self::from_value(value)
    }
}
