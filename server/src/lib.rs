//! `liger-server`: an OpenAI-compatible inference server for Liger models (and the plain
//! Transformers they come from) with continuous batching over constant-size sequence states.
//!
//! Layering, bottom up:
//! - [`text`]: tokenizer, chat template, incremental detokenization, stop strings;
//! - [`engine`]: the engine boundary ([`engine::Engine`]) and the real engine, an OS thread
//!   that owns the model and batches every running sequence into one forward pass a step;
//! - [`api`]: axum routes, request validation, responses and SSE streams;
//! - [`mod@error`]: the one HTTP error type; [`metrics`]: Prometheus counters;
//! - [`settings`]: flags, environment and TOML file; [`loader`]: folder or hub, device,
//!   model and tokenizer; [`serve`]: binds, loads in the background, serves.

pub mod api;
pub mod engine;
pub mod error;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod settings;
pub mod text;

use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tracing::{error, info};

use crate::api::{ApiConfig, AppState};
use crate::metrics::Metrics;
use crate::settings::Settings;

/// Serves on `listener` until Ctrl-C / SIGTERM. The listener is bound (and `/health`
/// answers 503) before the model loads; a load failure ends the server with that error.
pub async fn serve(settings: Settings, listener: TcpListener) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let state = AppState::new(
        ApiConfig {
            served_model_name: settings.served_model_name.clone(),
            api_key: settings.api_key.clone(),
            max_body_bytes: settings.max_body_bytes,
        },
        metrics.clone(),
    );
    let app = api::router(state.clone());
    let addr = listener.local_addr().context("listener address")?;
    info!(%addr, model = %settings.model, "listening; loading the model");
    // On the signal, axum stops accepting and waits for the connections in flight; after
    // the grace period the engine fails what is left, so those connections end too.
    let (stopping, mut stop_seen) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        // Streamed tokens are small writes a step apart: without TCP_NODELAY, Nagle's
        // algorithm holds one back until the client acknowledges the one before.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                let _ = stopping.send(true);
            })
            .await
    });
    let grace = settings.shutdown_grace;
    let draining = state.clone();
    tokio::spawn(async move {
        if stop_seen.wait_for(|&s| s).await.is_ok() {
            tokio::time::sleep(grace).await;
            draining.shut_down_engine();
        }
    });
    match loader::load(&settings, metrics).await {
        Ok(ready) => {
            info!(
                served_model_name = %settings.served_model_name,
                max_model_len = ready.limits.max_model_len,
                "model loaded; ready"
            );
            state.set_ready(ready);
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "loading the model failed");
            server.abort();
            return Err(e);
        }
    }
    server.await.context("server task")?.context("server")?;
    info!("server stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutting down");
}
