//! The optional HTTP listener: `/healthz`, Prometheus `/metrics`, `/status` as JSON, and the
//! operator's signed pause button, `POST /admin/throttle`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot, watch};
use tributary_shared::TrainerId;

use crate::net::hub::Command;
use crate::operator::ThrottleOrder;

use crate::metrics::Metrics;
use crate::net::hub::Progress;

/// What the HTTP handlers reach.
#[derive(Clone)]
pub struct HttpContext {
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Round progress.
    pub progress: watch::Receiver<Progress>,
    /// The hub's command queue (for operator orders).
    pub commands: mpsc::Sender<Command>,
    /// The operator's public key.
    pub operator: TrainerId,
}

#[derive(Clone)]
struct AppState {
    context: HttpContext,
    /// Issue time of the last order taken (replay protection).
    last_order_ms: Arc<Mutex<u64>>,
}

/// Binds `addr` and serves until `shutdown` resolves; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    context: HttpContext,
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
        .route("/admin/throttle", post(throttle))
        .with_state(AppState {
            context,
            last_order_ms: Arc::new(Mutex::new(0)),
        });
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
        state.context.metrics.render(),
    )
}

async fn status_page(State(state): State<AppState>) -> Json<Progress> {
    Json(state.context.progress.borrow().clone())
}

/// Takes a signed throttle order and passes it to the hub, which tells every trainer.
async fn throttle(
    State(state): State<AppState>,
    Json(order): Json<ThrottleOrder>,
) -> (StatusCode, Json<serde_json::Value>) {
    let now = u64::try_from(crate::net::hub::now_ms()).unwrap_or(0);
    {
        let mut last = state.last_order_ms.lock().expect("never poisoned");
        if let Err(error) = order.verify(&state.context.operator, now, *last) {
            tracing::warn!(%error, "throttle order refused");
            let body = serde_json::json!({ "error": error.to_string() });
            return (StatusCode::FORBIDDEN, Json(body));
        }
        *last = order.issued_ms;
    }
    let (reply, told) = oneshot::channel();
    let command = Command::Throttle {
        duty_ppm: order.duty_ppm,
        reply,
    };
    if state.context.commands.send(command).await.is_err() {
        let body = serde_json::json!({ "error": "the coordinator is stopping" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    match told.await {
        Ok(trainers) => (
            StatusCode::OK,
            Json(serde_json::json!({ "duty_ppm": order.duty_ppm, "trainers": trainers })),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": "the coordinator is stopping" })),
        ),
    }
}
