//! The optional HTTP listener: `/healthz`, Prometheus `/metrics`, `/status` as JSON, and the
//! operator's signed pause button, `POST /admin/throttle`, and the hub: `/hub/experiments`,
//! `/hub/ledger` (every round's ledger entry), `/hub/adapters/{hash}` (any adapter or delta blob,
//! by hash) and `/hub/latest/{file}` (the latest merged adapter as a PEFT folder:
//! `adapter_model.safetensors`, `adapter_config.json`, `README.md` with lineage).

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
    /// The data directory (read-only access for the hub pages).
    pub data_dir: std::path::PathBuf,
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
        .route("/hub/experiments", get(hub_experiments))
        .route("/hub/ledger", get(hub_ledger))
        .route("/hub/evaluations", get(hub_evaluations))
        .route("/hub/adapters/{hash}", get(hub_blob))
        .route("/hub/latest/{file}", get(hub_latest))
        .with_state(AppState {
            last_order_ms: Arc::new(Mutex::new(crate::operator::load_last_order(
                &context.data_dir,
            ))),
            context,
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
        if let Err(error) = crate::operator::store_last_order(&state.context.data_dir, *last) {
            tracing::error!(%error, "cannot record the last operator order");
            let body = serde_json::json!({ "error": "cannot record the order durably" });
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(body));
        }
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

type HubResponse = Result<axum::response::Response, (StatusCode, String)>;

/// Runs a blocking read of the data directory off the async threads.
async fn read_data<T: Send + 'static>(
    state: &AppState,
    read: impl FnOnce(&std::path::Path) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, (StatusCode, String)> {
    let dir = state.context.data_dir.clone();
    tokio::task::spawn_blocking(move || read(&dir))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| (StatusCode::NOT_FOUND, format!("{e:#}")))
}

async fn hub_experiments(State(state): State<AppState>) -> HubResponse {
    let list = read_data(&state, |dir| {
        let db = crate::store::db::Db::open_read_only(&dir.join("tributary.db"))?;
        Ok(db
            .experiments()?
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id.0,
                    "finished": e.finished,
                    "initial_adapter": e.initial_adapter,
                    "config": serde_json::from_str::<serde_json::Value>(&e.config_json).ok(),
                })
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(list).into_response())
}

/// A JSON object without its `experiment` key.
type Row = serde_json::Map<String, serde_json::Value>;

/// Reads one experiment's rows from the database.
type RowReader =
    fn(&crate::store::db::Db, &tributary_shared::ExperimentId) -> anyhow::Result<Vec<Row>>;

/// Every experiment's rows, each tagged with its experiment's id, as a JSON list.
async fn rows_per_experiment(state: &AppState, rows: RowReader) -> HubResponse {
    let list = read_data(state, move |dir| {
        let db = crate::store::db::Db::open_read_only(&dir.join("tributary.db"))?;
        let mut out = Vec::new();
        for experiment in db.experiments()? {
            for mut row in rows(&db, &experiment.id)? {
                row.insert("experiment".into(), experiment.id.0.clone().into());
                out.push(serde_json::Value::Object(row));
            }
        }
        Ok(out)
    })
    .await?;
    Ok(Json(list).into_response())
}

async fn hub_ledger(State(state): State<AppState>) -> HubResponse {
    rows_per_experiment(&state, |db, id| {
        let mut rows = Vec::new();
        for (hash, entry) in db.ledger(id)? {
            let mut row = serde_json::Map::new();
            row.insert("hash".into(), serde_json::to_value(hash)?);
            row.insert("entry".into(), serde_json::to_value(entry)?);
            rows.push(row);
        }
        Ok(rows)
    })
    .await
}

async fn hub_evaluations(State(state): State<AppState>) -> HubResponse {
    rows_per_experiment(&state, |db, id| {
        let mut rows = Vec::new();
        for evaluation in db.evaluations(id)? {
            let mut row = serde_json::Map::new();
            row.insert("evaluation".into(), serde_json::to_value(evaluation)?);
            rows.push(row);
        }
        Ok(rows)
    })
    .await
}

async fn hub_blob(
    State(state): State<AppState>,
    axum::extract::Path(hash): axum::extract::Path<String>,
) -> HubResponse {
    let hash: tributary_shared::BlobHash = hash
        .parse()
        .map_err(|_| (StatusCode::BAD_REQUEST, "not a blake3 hash".to_string()))?;
    let bytes = read_data(&state, move |dir| {
        use crate::store::BlobSource as _;
        Ok(crate::store::StoredBlobs::open(dir)?.get(&hash)?)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn hub_latest(
    State(state): State<AppState>,
    axum::extract::Path(file): axum::extract::Path<String>,
) -> HubResponse {
    let folder = read_data(&state, |dir| crate::publish::build(dir, None)).await?;
    let Some((name, bytes)) = folder.files.into_iter().find(|(name, _)| *name == file) else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no file {file:?} in the PEFT folder"),
        ));
    };
    let kind = match name {
        "adapter_config.json" => "application/json",
        "README.md" => "text/markdown; charset=utf-8",
        _ => "application/octet-stream",
    };
    let adapter = folder.published.adapter.to_hex();
    Ok((
        [
            (header::CONTENT_TYPE, kind.to_string()),
            (
                header::HeaderName::from_static("x-tributary-adapter"),
                adapter,
            ),
        ],
        bytes,
    )
        .into_response())
}
