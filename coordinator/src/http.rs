//! The optional HTTP listener: `/healthz`, Prometheus `/metrics`, `/status` as JSON, and the
//! operator's signed pause button, `POST /admin/throttle`, and the hub: `/hub/experiments`,
//! `/hub/ledger` (every round's ledger entry), `/hub/adapters/{hash}` (merged adapters to anyone;
//! individual deltas only where the experiment publishes them, or to an auditor token: see
//! [`crate::auditors`]) and `/hub/latest/{file}` (the latest merged adapter as a PEFT folder:
//! `adapter_model.safetensors`, `adapter_config.json`, `README.md` with lineage).
//!
//! Every limit is a value of [`HttpLimits`]: connections in total and per address (a /64 for
//! IPv6), a header-read timeout (slow-header peers are dropped), concurrent requests, a handler
//! timeout and a request-body cap as tower layers. Blobs are streamed from their files, hashed
//! on the way (a corrupt file ends the response with an error, never passes as whole), and the
//! PEFT folder is built once per ledger head.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};

use tokio::sync::{mpsc, oneshot, watch};
use tributary_shared::TrainerId;

use crate::net::hub::Command;
use crate::operator::ThrottleOrder;

use crate::metrics::Metrics;
use crate::net::address_quota::AddressQuota;
use crate::net::hub::Progress;
use crate::publish::PeftFolder;

/// Limits of the HTTP listener; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// Open connections at once.
    pub max_connections: usize,
    /// Open connections at once from one IPv4 address or IPv6 /64.
    pub connections_per_address: usize,
    /// Time a client has to send a request's headers; slower connections are closed.
    pub header_read_timeout: Duration,
    /// Requests handled at once; more wait their turn.
    pub concurrent_requests: usize,
    /// Time a handler has to produce its response (a 408 after it).
    pub request_timeout: Duration,
    /// Largest request body accepted (a 413 beyond).
    pub max_request_body: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            connections_per_address: 32,
            header_read_timeout: Duration::from_secs(10),
            concurrent_requests: 64,
            request_timeout: Duration::from_secs(60),
            max_request_body: 64 * 1024,
        }
    }
}

/// Which part a node plays, as far as its HTTP listener is concerned.
#[derive(Clone)]
pub enum Role {
    /// The node runs the experiment: `/status` is its hub's progress, and operator orders go
    /// to its hub.
    Leader {
        /// Round progress.
        progress: watch::Receiver<Progress>,
        /// The hub's command queue (for operator orders).
        commands: mpsc::Sender<Command>,
    },
    /// A standby node of a cluster: the hub pages and `/metrics` are served from the shared
    /// database and blobs, `/status` names the leader, and operator orders are refused with
    /// 503 (only the leader takes them, in its fenced batch).
    Standby,
}

/// What the HTTP handlers reach.
#[derive(Clone)]
pub struct HttpContext {
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Leader or standby.
    pub role: Role,
    /// The operator's public key.
    pub operator: TrainerId,
    /// The data directory (read-only access for the hub pages).
    pub data_dir: std::path::PathBuf,
    /// Limits.
    pub limits: HttpLimits,
    /// The blobs (a directory or object storage).
    pub blobs: crate::store::blobs::BlobStore,
    /// The issue time of the last operator order taken (orders not newer are replays).
    pub last_order_ms: u64,
}

/// A PEFT folder and the ledger head it was built at.
type CachedFolder = (Option<tributary_shared::BlobHash>, Arc<PeftFolder>);

#[derive(Clone)]
struct AppState {
    context: HttpContext,
    /// The PEFT folder of the latest adapter, with the ledger head it was built at.
    peft: Arc<tokio::sync::Mutex<Option<CachedFolder>>>,
    /// Issue time of the last order taken (replay protection). Held until the order is queued
    /// for the hub, so that concurrent orders reach it in the order they were taken.
    last_order_ms: Arc<tokio::sync::Mutex<u64>>,
    /// Read-only database sessions for the hub pages.
    reads: Arc<crate::store::read_pool::ReadPool>,
}

/// Database sessions the hub pages share.
const READ_SESSIONS: usize = 4;

/// Binds `addr` and serves until `shutdown` resolves; returns the bound address and the accept
/// loop's task, which ends (its listener closed) once `shutdown` resolved.
pub async fn spawn(
    addr: SocketAddr,
    context: HttpContext,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for http"))?;
    let bound = listener.local_addr()?;
    let limits = context.limits.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_page))
        .route("/status", get(status_page))
        .route("/admin/throttle", post(throttle))
        .route("/hub/experiments", get(hub_experiments))
        .route("/hub/ledger", get(hub_ledger))
        .route("/hub/evaluations", get(hub_evaluations))
        .route("/hub/contributors", get(hub_contributors))
        .route("/hub/adapters/{hash}", get(hub_blob))
        .route("/hub/latest/{file}", get(hub_latest))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            limits.max_request_body,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            limits.concurrent_requests.max(1),
        ))
        .with_state(AppState {
            last_order_ms: Arc::new(tokio::sync::Mutex::new(context.last_order_ms)),
            peft: Arc::default(),
            reads: Arc::new(crate::store::read_pool::ReadPool::new(
                crate::store::db::location_of(&context.data_dir)?,
                READ_SESSIONS,
            )),
            context: context.clone(),
        });
    let task = tokio::spawn(serve(listener, app, limits, context.metrics, shutdown));
    match context.role {
        Role::Leader { .. } => tracing::info!(addr = %bound, "http listening"),
        Role::Standby => tracing::info!(addr = %bound, "http listening (standby: hub pages only)"),
    }
    Ok((bound, task))
}

/// The accept loop: connection limits, then HTTP/1.1 with a header-read timeout per connection.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let quota = AddressQuota::new(limits.connections_per_address);
    let (stop, stopping) = watch::channel(false);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(%error, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.count_limit("http_connections");
            continue; // dropping the stream closes it
        };
        let Some(address) = quota.try_acquire(peer.ip()) else {
            metrics.count_limit("http_connections_per_address");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
            drop((slot, address));
        });
    }
    let _ = stop.send(true);
}

async fn metrics_page(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.context.metrics.render(),
    )
}

/// The leader whose lease the database holds, as `{"node", "address"}` (`null` when none).
async fn leader_of(state: &AppState) -> Result<serde_json::Value, (StatusCode, String)> {
    let lease = read_db(state, |db, _| Ok(db.lease(crate::store::leases::LEADER)?)).await?;
    Ok(match lease {
        Some(lease) if !lease.holder.is_empty() => {
            serde_json::json!({ "node": lease.holder, "address": lease.address })
        }
        _ => serde_json::Value::Null,
    })
}

/// The leader's round progress with `"role": "leader"`; on a standby node, `"role": "standby"`
/// and the leader the database names.
async fn status_page(State(state): State<AppState>) -> HubResponse {
    let status = match &state.context.role {
        Role::Leader { progress, .. } => {
            let mut status = serde_json::to_value(progress.borrow().clone())
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            if let Some(fields) = status.as_object_mut() {
                fields.insert("role".into(), "leader".into());
            }
            status
        }
        Role::Standby => {
            serde_json::json!({ "role": "standby", "leader": leader_of(&state).await? })
        }
    };
    Ok(Json(status).into_response())
}

/// Takes a signed throttle order and passes it to the hub, which tells every trainer.
async fn throttle(
    State(state): State<AppState>,
    Json(order): Json<ThrottleOrder>,
) -> (StatusCode, Json<serde_json::Value>) {
    let commands = match &state.context.role {
        Role::Leader { commands, .. } => commands.clone(),
        Role::Standby => {
            let leader = leader_of(&state).await.unwrap_or(serde_json::Value::Null);
            let body = serde_json::json!({
                "error": "this node stands by: send operator orders to the leader",
                "leader": leader,
            });
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
        }
    };
    let now = u64::try_from(crate::net::hub::now_ms()).unwrap_or(0);
    let (reply, told) = oneshot::channel();
    {
        let mut last = state.last_order_ms.lock().await;
        if let Err(error) = order.verify(&state.context.operator, now, *last) {
            tracing::warn!(%error, "throttle order refused");
            let body = serde_json::json!({ "error": error.to_string() });
            return (StatusCode::FORBIDDEN, Json(body));
        }
        *last = order.issued_ms;
        // The hub records the order in the database (where a node taking over the lead finds
        // it) and answers once that is durable.
        let command = Command::Throttle {
            duty_ppm: order.duty_ppm,
            issued_ms: order.issued_ms,
            reply,
        };
        if commands.send(command).await.is_err() {
            let body = serde_json::json!({ "error": "the coordinator is stopping" });
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
        }
    }
    match told.await {
        Ok(Ok(trainers)) => (
            StatusCode::OK,
            Json(serde_json::json!({ "duty_ppm": order.duty_ppm, "trainers": trainers })),
        ),
        Ok(Err(error)) => {
            tracing::warn!(%error, "throttle order not taken");
            (
                StatusCode::CONFLICT,
                Json(serde_json::json!({ "error": error })),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({ "error": "the order was not recorded (a storage failure or a shutdown); send a new one" }),
            ),
        ),
    }
}

type HubResponse = Result<axum::response::Response, (StatusCode, String)>;

/// Runs a read on one of the shared database sessions (with the data directory at hand) off
/// the async threads.
async fn read_db<T: Send + 'static>(
    state: &AppState,
    read: impl FnOnce(&crate::store::db::Db, &std::path::Path) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, (StatusCode, String)> {
    let dir = state.context.data_dir.clone();
    state
        .reads
        .read(move |db| read(db, &dir))
        .await
        .map_err(|e: anyhow::Error| (StatusCode::NOT_FOUND, format!("{e:#}")))
}

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
    let list = read_db(&state, |db, _| {
        Ok(db
            .experiments()?
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id.0,
                    "finished": e.finished,
                    "initial_adapter": e.initial_adapter,
                    "first_secret_commitment": e.first_commitment,
                    "uid": e.uid,
                    "ledger_key": e.signer,
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
    let list = read_db(state, move |db, _| {
        let mut out = Vec::new();
        for experiment in db.experiments()? {
            for mut row in rows(db, &experiment.id)? {
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

async fn hub_contributors(State(state): State<AppState>) -> HubResponse {
    rows_per_experiment(&state, |db, id| {
        let ledger: Vec<_> = db.ledger(id)?.into_iter().map(|(_, entry)| entry).collect();
        let mut rows = Vec::new();
        for credit in crate::credits::credits(&ledger) {
            let mut row = serde_json::Map::new();
            row.insert("credit".into(), serde_json::to_value(credit)?);
            rows.push(row);
        }
        Ok(rows)
    })
    .await
}

async fn hub_blob(
    State(state): State<AppState>,
    axum::extract::Path(hash): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> HubResponse {
    let hash: tributary_shared::BlobHash = hash
        .parse()
        .map_err(|_| (StatusCode::BAD_REQUEST, "not a blake3 hash".to_string()))?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned);
    // Some(exists) when the blob may not be served to this request; absent blobs stay 404s.
    let blobs = state.context.blobs.clone();
    let refused = read_db(&state, move |db, dir| {
        if db.blob_visibility(&hash)? == crate::store::db::Visibility::Public
            || bearer.is_some_and(|token| crate::auditors::is_auditor(dir, &token))
        {
            return Ok(None);
        }
        let exists = blobs.stored_len(&hash)?.is_some() || db.has_inline(&hash)?;
        Ok(Some(exists))
    })
    .await?;
    match refused {
        None => {}
        Some(false) => return Err((StatusCode::NOT_FOUND, format!("no blob {hash}\n"))),
        Some(true) => {
            state.context.metrics.count_limit("private_blob");
            return Err((
                StatusCode::FORBIDDEN,
                "individual deltas are private in this experiment: an auditor token is needed \
                 (merged adapters are public)\n"
                    .into(),
            ));
        }
    }
    match state.context.blobs.reader(&hash).await {
        Ok((len, reader)) => {
            let body = axum::body::Body::from_stream(verified_stream(reader, hash, len));
            Ok((
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                body,
            )
                .into_response())
        }
        // Small deltas live in the database.
        Err(crate::store::blobs::BlobError::NotFound { .. }) => {
            let bytes = read_data(&state, move |dir| {
                use crate::store::BlobSource as _;
                Ok(crate::store::StoredBlobs::open(dir)?.get(&hash)?)
            })
            .await?;
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        Err(error) => Err((StatusCode::INTERNAL_SERVER_ERROR, error.to_string())),
    }
}

/// Chunks read from a blob file of `len` bytes, hashed on the way. The last chunk is held back
/// until the whole file is known to match its name, so a corrupt file ends the response with an
/// error before it is complete: a client never receives it as whole. The stream also ends at a
/// deadline that grows with the length, so a slow reader cannot hold the file open forever.
fn verified_stream(
    reader: crate::store::blobs::BlobReader,
    hash: tributary_shared::BlobHash,
    len: u64,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(600).max(Duration::from_secs(len / (128 * 1024)));
    struct Reading {
        reader: crate::store::blobs::BlobReader,
        hasher: blake3::Hasher,
        read: u64,
        held: Option<bytes::Bytes>,
        done: bool,
    }
    let state = Reading {
        reader,
        hasher: blake3::Hasher::new(),
        read: 0,
        held: None,
        done: false,
    };
    futures_util::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            if tokio::time::Instant::now() > deadline {
                state.done = true;
                let error = std::io::Error::new(std::io::ErrorKind::TimedOut, "download too slow");
                return Some((Err(error), state));
            }
            match state.reader.next_chunk().await {
                Ok(None) => {
                    state.done = true;
                    let actual = tributary_shared::BlobHash::from(state.hasher.finalize());
                    if actual != hash || state.read != len {
                        tracing::error!(%hash, "a blob file does not match its name");
                        let error = std::io::Error::other("the stored blob is corrupt");
                        return Some((Err(error), state));
                    }
                    let last = state.held.take()?;
                    return Some((Ok(last), state));
                }
                Ok(Some(chunk)) => {
                    state.hasher.update(&chunk);
                    state.read += chunk.len() as u64;
                    if let Some(previous) = state.held.replace(chunk) {
                        return Some((Ok(previous), state));
                    }
                }
                Err(error) => {
                    state.done = true;
                    return Some((Err(std::io::Error::other(error.to_string())), state));
                }
            }
        }
    })
}

async fn hub_latest(
    State(state): State<AppState>,
    axum::extract::Path(file): axum::extract::Path<String>,
) -> HubResponse {
    let folder = latest_folder(&state).await?;
    let Some((name, bytes)) = folder.files.iter().find(|(name, _)| *name == file).cloned() else {
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
    let bytes = bytes::Bytes::from(bytes);
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

/// The PEFT folder of the latest adapter, built once per ledger head (on a standby node, which
/// does not follow the head, at every request).
async fn latest_folder(state: &AppState) -> Result<Arc<PeftFolder>, (StatusCode, String)> {
    let Role::Leader { progress, .. } = &state.context.role else {
        return Ok(Arc::new(
            read_data(state, |dir| crate::publish::build(dir, None)).await?,
        ));
    };
    let head = progress.borrow().ledger_head;
    let mut cache = state.peft.lock().await;
    if let Some((built_at, folder)) = cache.as_ref() {
        if *built_at == head {
            return Ok(folder.clone());
        }
    }
    let folder = Arc::new(read_data(state, |dir| crate::publish::build(dir, None)).await?);
    *cache = Some((head, folder.clone()));
    Ok(folder)
}
