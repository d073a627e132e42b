//! Logging: readable text for people, one JSON object per line for log collectors
//! (`LIGER_LOG_FORMAT=json`); colour codes only when stderr is a terminal, so files and
//! container logs stay plain. `RUST_LOG` filters as usual (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The environment variable that picks the format.
pub const FORMAT_VAR: &str = "LIGER_LOG_FORMAT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// The format `LIGER_LOG_FORMAT` names (unset or empty: text).
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim) {
            None | Some("") | Some("text") => Ok(Self::Text),
            Some("json") => Ok(Self::Json),
            Some(other) => Err(format!(
                "{FORMAT_VAR}={other:?} is not a log format (use text or json)"
            )),
        }
    }
}

/// Installs the global subscriber, writing to stderr.
pub fn init() -> Result<(), String> {
    let value = std::env::var(FORMAT_VAR).ok();
    let format = LogFormat::parse(value.as_deref())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_bad_ones_are_named() {
        assert_eq!(LogFormat::parse(None), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("json")), Ok(LogFormat::Json));
        let e = LogFormat::parse(Some("xml")).unwrap_err();
        assert!(e.contains("LIGER_LOG_FORMAT") && e.contains("xml"), "{e}");
    }
}
