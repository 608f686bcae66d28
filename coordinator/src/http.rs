//! The optional HTTP listener: `/healthz`, Prometheus `/metrics`, and `/status` as JSON.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::net::hub::Progress;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    progress: watch::Receiver<Progress>,
}

/// Binds `addr` and serves until `shutdown` resolves; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    progress: watch::Receiver<Progress>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for http"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_page))
        .route("/status", get(status_page))
        .with_state(AppState { metrics, progress });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "http listener failed");
        }
    });
    tracing::info!(addr = %bound, "http listening");
    Ok(bound)
}

async fn metrics_page(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn status_page(State(state): State<AppState>) -> Json<Progress> {
    Json(state.progress.borrow().clone())
}
