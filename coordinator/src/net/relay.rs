//! A standby node's share of a cluster's uploads: it takes uploads-only connections, checks each
//! upload as far as the shared database lets it, stores the delta in the shared blob store,
//! records it durably as staged ([`crate::store::staged`]) and answers
//! [`ServerMessage::UploadStaged`]. The leader reads staged uploads and decides on each as on
//! one it received itself, so acceptance, lateness and replays stay the round engine's
//! decisions, and the trainer hears `SubmissionAccepted` from the leader once it is durable.
//!
//! Control sessions are refused with [`RejectReason::WrongNode`], so a trainer moves on to the
//! leader. Every limit of the leader's connections applies here too: handshake time, frame
//! sizes, the upload queue, stream idle time and the body's deadline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::RecvStream;
use tokio::sync::mpsc;
use tributary_shared::frame::FrameDecoder;
use tributary_shared::identity::verify_submission;
use tributary_shared::wire::{RejectReason, ServerMessage, UploadHeader, PROTOCOL_VERSION};
use tributary_shared::{TaskId, TrainerId};

use crate::engine::{EngineConfig, Refusal, UploadTicket};
use crate::metrics::Metrics;
use crate::net::connection::{
    body_allowance, check_hello, read_message, receive_body, send_refusal, write_message,
    ConnectionLimits, HandshakeGuard,
};
use crate::net::tls::TransportLimits;
use crate::net::upload_queue::UploadQueue;
use crate::store::blobs::BlobStore;
use crate::store::db::{Db, DbError};
use crate::store::staged::{Claim, StagedUpload, TaskStanding};

/// What a standby node's relay shares across connections.
pub struct RelayContext {
    /// This node's id (recorded with each staged upload).
    pub node: String,
    /// The experiment as the leader runs it (its identity, layout and limits).
    pub config: EngineConfig,
    /// The shared database.
    pub db: Arc<Mutex<Db>>,
    /// The shared blob store.
    pub blobs: BlobStore,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Limits of each connection.
    pub limits: ConnectionLimits,
    /// QUIC limits, opened up after the hello.
    pub transport: TransportLimits,
    /// Bounds the bodies held at once.
    pub uploads: Arc<UploadQueue>,
    /// SHA-256 of the cluster's certificate, which hellos and submissions sign.
    pub server_certificate: [u8; 32],
    /// Refused uploads per trainer.
    pub strikes: Strikes,
}

/// Uploads this node refused per trainer for what they carried, over a window of
/// [`STRIKE_WINDOW`]: a trainer with [`MAX_STRIKES`] is refused at once, without a database
/// query or a body, until the window passes (it can still send to the leader, which decides
/// and records). Counted per trainer, not per connection, since a connection is cheap to make
/// again.
#[derive(Debug, Default)]
pub struct Strikes {
    by_trainer: Mutex<std::collections::HashMap<TrainerId, (u32, Instant)>>,
}

impl Strikes {
    /// Counts one refusal of `trainer` at `now`.
    pub fn strike(&self, trainer: TrainerId, now: Instant) {
        let mut by_trainer = self.by_trainer.lock().unwrap_or_else(|p| p.into_inner());
        if by_trainer.len() >= MAX_STRUCK_TRAINERS {
            by_trainer
                .retain(|_, (_, since)| now.saturating_duration_since(*since) < STRIKE_WINDOW);
        }
        let entry = by_trainer.entry(trainer).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= STRIKE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    /// Whether `trainer` has used up its refusals at `now`.
    pub fn struck_out(&self, trainer: TrainerId, now: Instant) -> bool {
        let by_trainer = self.by_trainer.lock().unwrap_or_else(|p| p.into_inner());
        by_trainer.get(&trainer).is_some_and(|(count, since)| {
            *count >= MAX_STRIKES && now.saturating_duration_since(*since) < STRIKE_WINDOW
        })
    }
}

impl std::fmt::Debug for RelayContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayContext")
            .field("node", &self.node)
            .field("experiment", &self.config.experiment)
            .finish_non_exhaustive()
    }
}

/// Runs `call` on the shared database off the async threads.
async fn on_db<T: Send + 'static>(
    context: &RelayContext,
    call: impl FnOnce(&mut Db) -> Result<T, DbError> + Send + 'static,
) -> Result<T, Refusal> {
    let db = context.db.clone();
    tokio::task::spawn_blocking(move || {
        let mut db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        call(&mut db)
    })
    .await
    .map_err(|error| Refusal::new(RejectReason::Internal, error.to_string()))?
    .map_err(|error| Refusal::new(RejectReason::Internal, error.to_string()))
}

/// Serves one connection to a standby node to its end.
pub async fn run(context: Arc<RelayContext>, incoming: quinn::Incoming, handshake: HandshakeGuard) {
    let remote = incoming.remote_address();
    let connection = match tokio::time::timeout(context.limits.handshake_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "relay connection failed during tls");
            return;
        }
        Err(_) => {
            context.metrics.count_limit("handshake_timeout");
            return;
        }
    };
    if let Err(error) = serve(&context, &connection, handshake).await {
        tracing::debug!(%remote, %error, "relay connection ended");
        connection.close(quinn::VarInt::from_u32(2), error.as_bytes());
    }
}

async fn serve(
    context: &Arc<RelayContext>,
    connection: &quinn::Connection,
    handshake: HandshakeGuard,
) -> Result<(), String> {
    let limits = &context.limits;
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let nonce: [u8; 32] = rand::random();
    let challenge = ServerMessage::Challenge {
        protocol_version: PROTOCOL_VERSION,
        nonce,
    };
    write_message(&mut send, &challenge, limits.max_frame)
        .await
        .map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::new(limits.max_client_frame);
    let hello = tokio::time::timeout(
        limits.handshake_timeout,
        read_message(&mut recv, &mut decoder),
    )
    .await
    .map_err(|_| {
        context.metrics.count_limit("handshake_timeout");
        "handshake timed out".to_string()
    })?
    .map_err(|e| e.to_string())?
    .ok_or("stream ended")?;
    let checked = match check_hello(&context.server_certificate, &nonce, hello) {
        Ok(hello) if hello.uploads_only => Ok(hello),
        Ok(_) => Err(Refusal::new(
            RejectReason::WrongNode,
            "this node stands by: the control session belongs with the leader",
        )),
        Err(refusal) => Err(refusal),
    };
    let checked = checked.and_then(|hello| {
        if context.strikes.struck_out(hello.trainer, Instant::now()) {
            context.metrics.count_limit("relay_strikes");
            Err(struck_out())
        } else {
            Ok(hello)
        }
    });
    let hello = match checked {
        Ok(hello) => hello,
        Err(refusal) => {
            Metrics::add(&context.metrics.handshakes_refused, 1);
            let reason = refusal.reason;
            let _ = send_refusal(&mut send, refusal, limits.max_frame).await;
            return Err(format!("refused: {reason}"));
        }
    };
    let trainer = hello.trainer;
    Metrics::add(&context.metrics.handshakes, 1);
    drop(handshake);
    context.transport.open_after_handshake(connection);
    write_message(
        &mut send,
        &ServerMessage::Welcome {
            trainer,
            experiment: context.config.experiment.clone(),
        },
        limits.max_frame,
    )
    .await
    .map_err(|e| e.to_string())?;
    let (outbox, mut outbox_rx) = mpsc::channel::<ServerMessage>(limits.outbox_capacity.max(8));
    let max_frame = limits.max_frame;
    let writer = tokio::spawn(async move {
        while let Some(message) = outbox_rx.recv().await {
            if write_message(&mut send, &message, max_frame).await.is_err() {
                break;
            }
        }
    });
    // The trainer sends nothing on the control stream here; it ends the session by closing.
    let result = loop {
        tokio::select! {
            read = read_message::<tributary_shared::wire::ClientMessage>(&mut recv, &mut decoder) => {
                match read {
                    Ok(None) => break Ok(()),
                    Ok(Some(_)) => break Err("control messages go to the leader".to_string()),
                    Err(error) => break Err(error.to_string()),
                }
            }
            stream = connection.accept_uni() => match stream {
                Ok(stream) => {
                    tokio::spawn(stage_upload(context.clone(), trainer, stream, outbox.clone()));
                }
                Err(error) => break Err(error.to_string()),
            },
        }
    };
    writer.abort();
    result
}

/// Receives, checks and stages one upload; answers on `outbox`.
async fn stage_upload(
    context: Arc<RelayContext>,
    trainer: TrainerId,
    mut stream: RecvStream,
    outbox: mpsc::Sender<ServerMessage>,
) {
    let mut decoder = FrameDecoder::new(context.limits.max_client_frame);
    let header = tokio::time::timeout(
        context.limits.handshake_timeout,
        read_message::<UploadHeader>(&mut stream, &mut decoder),
    )
    .await;
    let upload = match header {
        Ok(Ok(Some(upload))) => upload,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            let refusal = Refusal::new(RejectReason::Malformed, format!("upload header: {error}"));
            let message = refuse_here(&context, trainer, &mut stream, refusal, TaskId(0), None);
            let _ = outbox.try_send(message);
            return;
        }
        Err(_) => {
            let _ = stream.stop(quinn::VarInt::from_u32(1));
            return;
        }
    };
    let (task, hash) = (upload.header.task, upload.header.hash);
    if context.strikes.struck_out(trainer, Instant::now()) {
        context.metrics.count_limit("relay_strikes");
        let message = refuse_here(
            &context,
            trainer,
            &mut stream,
            struck_out(),
            task,
            Some(hash),
        );
        let _ = outbox.try_send(message);
        return;
    }
    // The signature first: it costs no database query.
    let signed = verify_submission(&upload)
        .map_err(|error| Refusal::new(RejectReason::BadSignature, error.to_string()));
    let checked = match signed {
        Ok(()) => check_header(&context, trainer, &upload).await,
        Err(refusal) => Err(refusal),
    };
    let message = match checked {
        // Refused before the upload is known to be signed by this trainer for its own open
        // task: answered here, counted, never staged (a stranger must not hold another
        // trainer's task). The trainer may send it to the leader, which decides and records.
        Err(refusal) => refuse_here(&context, trainer, &mut stream, refusal, task, Some(hash)),
        Ok(ticket) => match claim_and_check_body(&context, &ticket, &mut stream, decoder).await {
            // Refused before taking the body (the task's claim is another node's, or decided),
            // or our own failure (busy, storage) while taking it: answered here, not staged.
            Err(refusal) => refuse_here(&context, trainer, &mut stream, refusal, task, Some(hash)),
            // The body's outcome, passed or refused, is staged for the leader to decide.
            Ok(checked) => {
                let (body, refusal) = match checked {
                    Ok(body) => (body, None),
                    Err(refusal) => {
                        let _ = stream.stop(quinn::VarInt::from_u32(1));
                        (None, Some((refusal.reason, refusal.detail)))
                    }
                };
                let staged = StagedUpload {
                    upload: upload.clone(),
                    body,
                    refusal,
                    node: context.node.clone(),
                };
                let now = u64::try_from(crate::net::hub::now_ms()).unwrap_or(0);
                match on_db(&context, move |db| db.stage_upload(&staged, now)).await {
                    Ok(true) => {
                        Metrics::add(&context.metrics.uploads_staged, 1);
                        tracing::debug!(%trainer, %task, hash = %hash.short(), "upload staged for the leader");
                        ServerMessage::UploadStaged { task, hash }
                    }
                    Ok(false) => {
                        let refusal = Refusal::new(
                            RejectReason::Replay,
                            format!("an upload for task {task} is staged already"),
                        );
                        refuse_here(&context, trainer, &mut stream, refusal, task, Some(hash))
                    }
                    // The claim stays until it expires; the trainer sends to the leader meanwhile.
                    Err(refusal) => {
                        refuse_here(&context, trainer, &mut stream, refusal, task, Some(hash))
                    }
                }
            }
        },
    };
    let _ = outbox.try_send(message);
}

/// A refusal this node answers itself: counted and logged, not recorded. The leader never sees
/// this upload, so there is no decision to record: a trainer that wants its delta counted sends
/// it to the leader, whose decision is recorded in the ledger. A refusal that is not this
/// node's own failure is a strike against the trainer ([`Strikes`]).
fn refuse_here(
    context: &RelayContext,
    trainer: TrainerId,
    stream: &mut RecvStream,
    refusal: Refusal,
    task: TaskId,
    hash: Option<tributary_shared::BlobHash>,
) -> ServerMessage {
    let _ = stream.stop(quinn::VarInt::from_u32(1));
    context.metrics.count_rejection(refusal.reason);
    tracing::info!(%trainer, %task, reason = %refusal.reason, detail = %refusal.detail, "upload not staged");
    if !refusal.is_coordinator_fault() {
        context.strikes.strike(trainer, Instant::now());
    }
    refusal.message(task, hash)
}

/// The refusal of a trainer out of strikes: busy, as far as it is concerned, so an honest one
/// sends to the leader.
fn struck_out() -> Refusal {
    Refusal::new(
        RejectReason::RateLimited,
        "too many uploads refused here; send to the leader or try again later",
    )
}

/// Claims the task's upload ([`Db::claim_upload`]) and takes the body ([`check_body`]). `Ok`
/// is the body's outcome, passed or refused, to be staged. `Err` is answered here and not
/// staged: a claim not taken (busy while another node receives one, a replay once decided),
/// or our own failure to take the body, which gives the claim up.
async fn claim_and_check_body(
    context: &RelayContext,
    ticket: &UploadTicket,
    stream: &mut RecvStream,
    decoder: FrameDecoder,
) -> Result<Result<Option<Vec<u8>>, Refusal>, Refusal> {
    let now = u64::try_from(crate::net::hub::now_ms()).unwrap_or(0);
    let lifetime = context.uploads.max_wait() + body_allowance(ticket.byte_len) + CLAIM_MARGIN;
    let expires = now.saturating_add(u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX));
    let (experiment, node) = (context.config.experiment.clone(), context.node.clone());
    let (task, round, hash) = (ticket.task, ticket.round, ticket.hash);
    let claim = on_db(context, move |db| {
        db.claim_upload(&experiment, task, round, hash, &node, now, expires)
    })
    .await?;
    match claim {
        Claim::Taken => {}
        Claim::Receiving => {
            return Err(Refusal::new(
                RejectReason::RateLimited,
                format!("an upload for task {task} is being received; try again later"),
            ))
        }
        Claim::Decided => {
            return Err(Refusal::new(
                RejectReason::Replay,
                format!("an upload for task {task} was decided already"),
            ))
        }
    }
    match check_body(context, ticket, stream, decoder).await {
        Err(refusal) if refusal.is_coordinator_fault() => {
            release_claim(context, task, hash, expires).await;
            Err(refusal)
        }
        checked => Ok(checked),
    }
}

/// Gives up this node's claim on `task` (the one that expires at `expires`; logged when the
/// database refuses: the claim then expires by itself).
async fn release_claim(
    context: &RelayContext,
    task: TaskId,
    hash: tributary_shared::BlobHash,
    expires: u64,
) {
    let (experiment, node) = (context.config.experiment.clone(), context.node.clone());
    let released = on_db(context, move |db| {
        db.release_claim(&experiment, task, hash, &node, expires)
    })
    .await;
    if let Err(refusal) = released {
        tracing::warn!(%task, detail = %refusal.detail, "cannot give up a claim; it will expire");
    }
}

/// The body (length, hash, decoding, layout, finiteness, values); a body that passes is
/// stored in the blob store, or returned when small enough for the database.
async fn check_body(
    context: &RelayContext,
    ticket: &UploadTicket,
    stream: &mut RecvStream,
    mut decoder: FrameDecoder,
) -> Result<Option<Vec<u8>>, Refusal> {
    let buffered = ticket
        .byte_len
        .min(u64::from(context.transport.stream_receive_window));
    let _slot = context
        .uploads
        .admit(buffered)
        .await
        .map_err(|retry_after| {
            Refusal::new(
                RejectReason::RateLimited,
                format!("busy; try again in {} ms", retry_after.as_millis()),
            )
        })?;
    receive_body(
        &context.blobs,
        &context.metrics,
        context.limits.stream_idle_timeout,
        ticket,
        stream,
        decoder.take_rest(),
    )
    .await
}

/// The header checks a standby can make: the signer is the connection's trainer, the
/// experiment and coordinator are this cluster's, the limits hold, and the database has the
/// task issued to this trainer in this open round with nothing recorded or staged for it.
async fn check_header(
    context: &Arc<RelayContext>,
    trainer: TrainerId,
    upload: &UploadHeader,
) -> Result<UploadTicket, Refusal> {
    let header = &upload.header;
    let config = &context.config;
    if header.trainer != trainer {
        return Err(Refusal::new(
            RejectReason::UnknownTrainer,
            format!(
                "submission names key {} but the connection authenticated as {trainer}",
                header.trainer
            ),
        ));
    }
    if header.experiment != config.experiment
        || header.experiment_uid != config.experiment_uid
        || header.coordinator != config.coordinator
    {
        return Err(Refusal::new(
            RejectReason::Stale,
            "signed for an experiment or coordinator not running here",
        ));
    }
    if header.byte_len > config.max_upload_bytes {
        return Err(Refusal::new(
            RejectReason::TooLarge,
            format!(
                "{} bytes exceeds the limit of {}",
                header.byte_len, config.max_upload_bytes
            ),
        ));
    }
    if header.sample_count == 0 || header.sample_count > config.max_sample_count {
        return Err(Refusal::new(
            RejectReason::Malformed,
            format!(
                "sample_count {} is not between 1 and {}",
                header.sample_count, config.max_sample_count
            ),
        ));
    }
    if !header.metrics.train_loss.is_finite() {
        return Err(Refusal::new(
            RejectReason::Malformed,
            "train_loss must be a finite number",
        ));
    }
    let (experiment, task, round) = (config.experiment.clone(), header.task, header.round);
    let standing = on_db(context, move |db| {
        db.task_standing(&experiment, task, &trainer, round)
    })
    .await?;
    let refusal = |reason, detail: String| Err(Refusal::new(reason, detail));
    match standing {
        TaskStanding::Open => {}
        TaskStanding::Unknown => {
            return refusal(
                RejectReason::NotSelected,
                format!("task {task} was not issued"),
            )
        }
        TaskStanding::Others => {
            return refusal(
                RejectReason::NotSelected,
                format!("task {task} belongs to another trainer"),
            )
        }
        TaskStanding::OtherRound(issued) => {
            return refusal(
                RejectReason::Stale,
                format!("task {task} belongs to round {issued}, not {round}"),
            )
        }
        TaskStanding::RoundClosed => {
            return refusal(RejectReason::Late, format!("round {round} is closed"))
        }
        TaskStanding::Taken => {
            return refusal(
                RejectReason::Replay,
                format!("task {task} already has a submission"),
            )
        }
    }
    Ok(UploadTicket {
        trainer,
        round,
        task,
        hash: header.hash,
        byte_len: header.byte_len,
        layout: config.layout.clone(),
        max_abs_value: config.max_abs_value,
    })
}

/// Refused uploads (not for this node's own failures) after which a trainer's uploads are
/// refused here at once for the rest of [`STRIKE_WINDOW`]. An honest trainer sends one upload
/// per task; a repeat after a lost answer may be refused here once.
pub const MAX_STRIKES: u32 = 8;

/// How long a trainer's strikes count.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(600);

/// Trainers with strikes above which the expired ones are forgotten.
const MAX_STRUCK_TRAINERS: usize = 65_536;

/// How long a claim outlives the wait for a slot in the upload queue plus the longest its body
/// may take to arrive: decoding, the blob store's and the database's writes, and the nodes'
/// clocks disagreeing (the claim's expiry is the claimant's clock, read by others).
const CLAIM_MARGIN: Duration = Duration::from_secs(60);

/// How long the leader waits between reads of the staged uploads.
pub const INGEST_EVERY: Duration = Duration::from_millis(100);
