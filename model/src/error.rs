//! One error type for the runtime library. Binaries wrap it in `anyhow`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch inside candle, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration value is missing, unknown or inconsistent. `field` names it
    /// the way the user wrote it (for example `liger.window` or `num_key_value_heads`).
    #[error("invalid config field `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// The model family is not one we know how to run.
    #[error("unsupported architecture `{found}` (supported: {supported})")]
    UnsupportedArchitecture { found: String, supported: String },

    /// A weight file is unreadable, truncated, or does not match the config.
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },

    /// A tensor is missing or has the wrong shape.
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },

    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A sequence state does not fit the model or is corrupt.
    #[error("sequence state: {0}")]
    State(String),

    /// The device asked for cannot be used (not compiled in, or no usable GPU).
    #[error("device {0}")]
    Device(String),

    /// A hub model cannot be downloaded (or found in the cache when the hub is unreachable).
    #[error("{0}")]
    Hub(String),

    /// A chat template does not compile, or refused a conversation (`raise_exception`).
    #[error("chat template: {0}")]
    Template(String),

    /// A caller passed arguments the runtime cannot honour (empty batch, too long a prompt, ...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn weights(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
