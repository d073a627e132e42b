//! The converter's error type.
//!
//! Every failure a user can cause (bad flag, missing file, corrupt weights, a config that
//! contradicts its weights, an existing output folder) gets its own variant with a message
//! that fits on one line and names the file, tensor or flag involved, so the CLI can print
//! `error: <message>` and nothing else.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Anything the runtime library reports: config validation, unsupported architectures,
    /// unreadable safetensors or GGUF files, tensor shape problems.
    #[error(transparent)]
    Model(#[from] liger_model::Error),

    /// A tensor operation failed while casting or serializing weights.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A command-line value is out of range or malformed; `flag` is spelled as the user typed it.
    #[error("invalid value for {flag}: {reason}")]
    Flag { flag: String, reason: String },

    /// SRC is neither an existing file or folder nor a hub id.
    #[error("{0}")]
    Source(String),

    /// A required file is absent from the source.
    #[error("{}: missing ({reason})", path.display())]
    Missing { path: PathBuf, reason: String },

    /// The weights do not fit the config (or the config the weights).
    #[error("config.json contradicts the weights: {0}")]
    Mismatch(String),

    /// The output folder exists and `--force` was not given.
    #[error("{} already exists (use --force to replace it)", .0.display())]
    OutputExists(PathBuf),

    /// Downloading from the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),

    /// A training or evaluation data file is unusable; the message names the file (and line).
    #[error("{0}")]
    Data(String),

    /// A recovery checkpoint cannot be used (missing, corrupt, or made with other settings).
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// Training diverged or otherwise cannot go on.
    #[error("training: {0}")]
    Training(String),

    /// Ctrl-C (or SIGTERM) arrived; the partial output was removed.
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn flag(flag: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Flag {
            flag: flag.into(),
            reason: reason.into(),
        }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn missing(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Missing {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
