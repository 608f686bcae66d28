//! One task per QUIC connection: the handshake, the control stream, and the upload and download
//! streams the trainer opens. Round decisions are the hub's; this module moves and checks bytes.

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use tributary_shared::codec;
use tributary_shared::frame::{encode_frame, FrameDecoder, FrameError};
use tributary_shared::identity::{verify_hello, verify_submission};
use tributary_shared::wire::{
    ClientMessage, DownloadRequest, DownloadResponse, RejectReason, ServerMessage, UploadHeader,
    PROTOCOL_VERSION,
};
use tributary_shared::{BlobHash, ExperimentId, TaskId, TrainerId};

use crate::engine::{HeaderDecision, Refusal, UploadTicket};
use crate::metrics::Metrics;
use crate::net::hub::{Command, Download};
use crate::net::tls::TransportLimits;
use crate::net::upload_queue::UploadQueue;
use crate::store::blobs::BlobStore;
use crate::store::INLINE_BLOB_MAX;

/// Longest a download may take.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(600);
/// Slowest transfer a large download (a base model) is allowed, in bytes per second: its
/// deadline grows with its length past [`DOWNLOAD_DEADLINE`].
const MIN_DOWNLOAD_RATE: u64 = 128 * 1024;

/// How long a download of `len` bytes may take.
fn download_deadline(len: u64) -> Duration {
    DOWNLOAD_DEADLINE.max(Duration::from_secs(len / MIN_DOWNLOAD_RATE))
}

/// How long receiving a body of `len` bytes may take, however slowly its bytes trickle in:
/// at worst 64 KiB/s after 30 s.
pub(crate) fn body_allowance(len: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs(len / (64 * 1024))
}

/// Limits a connection task enforces.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Largest frame the coordinator sends.
    pub max_frame: usize,
    /// Largest frame a trainer may send (hello, control messages, upload and download headers).
    pub max_client_frame: usize,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Longest silence inside an upload or download before it is dropped.
    pub stream_idle_timeout: Duration,
    /// Control messages queued for one trainer at most; a trainer that lets its queue fill (it
    /// does not read its control stream) is disconnected.
    pub outbox_capacity: usize,
    /// Control messages a trainer may send per second, sustained; bursts of twice as many are
    /// allowed. A trainer over it is disconnected.
    pub control_messages_per_second: u32,
    /// Downloads one trainer may have in progress at once (an honest one has one or two: its
    /// task's adapter and an evaluation's); a stream beyond it is reset at once.
    pub downloads_per_connection: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_frame: tributary_shared::frame::DEFAULT_MAX_FRAME,
            max_client_frame: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(30),
            outbox_capacity: 256,
            control_messages_per_second: 50,
            downloads_per_connection: 4,
        }
    }
}

/// What every connection task shares.
#[derive(Debug)]
pub struct ConnectionContext {
    /// The hub's inbox.
    pub commands: mpsc::Sender<Command>,
    /// Where uploads are written and downloads read.
    pub blobs: BlobStore,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub limits: ConnectionLimits,
    /// QUIC limits, lifted from the handshake's to the full ones after the hello.
    pub transport: TransportLimits,
    /// Bounds uploads being received at once, across all connections, and queues the rest.
    pub uploads: Arc<UploadQueue>,
    /// Bounds downloads served from files at once (each holds a file open).
    pub file_downloads: Arc<tokio::sync::Semaphore>,
    /// The experiment served.
    pub experiment: ExperimentId,
    /// SHA-256 of our certificate, which hello signatures must name.
    pub server_certificate: [u8; 32],
}

/// The control-stream queue of one trainer. Bounded: a trainer that does not read its control
/// stream fills it and is disconnected (counted as `outbox_full`), so it cannot make the
/// coordinator hold its messages.
#[derive(Debug, Clone)]
pub struct Outbox {
    sender: mpsc::Sender<ServerMessage>,
    connection: quinn::Connection,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// Queues `message`; `false` when the trainer is gone or was just disconnected for not
    /// reading.
    pub fn send(&self, message: ServerMessage) -> bool {
        match self.sender.try_send(message) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.metrics.count_limit("outbox_full");
                self.connection
                    .close(quinn::VarInt::from_u32(4), b"control stream not read");
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Closes the trainer's connection.
    pub fn close(&self, reason: &[u8]) {
        self.connection.close(quinn::VarInt::from_u32(1), reason);
    }
}

/// Counts a connection as in its handshake until dropped.
pub struct HandshakeGuard(Arc<Metrics>);

impl HandshakeGuard {
    /// Counts one more connection in its handshake.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Metrics::add(&metrics.handshakes_in_flight, 1);
        Self(metrics)
    }
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0
            .handshakes_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("handshake timed out")]
    Timeout,
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("stream ended")]
    Ended,
    #[error("refused: {0:?}")]
    Refused(RejectReason),
    #[error("over a limit: {0}")]
    Limit(&'static str),
}

/// Runs one connection to its end. `handshake` is released once the hello is checked.
pub async fn run(
    context: Arc<ConnectionContext>,
    incoming: quinn::Incoming,
    connection_id: u64,
    handshake: HandshakeGuard,
) {
    let remote = incoming.remote_address();
    let connecting = tokio::time::timeout(context.limits.handshake_timeout, incoming).await;
    let connection = match connecting {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "connection failed during tls");
            return;
        }
        Err(_) => {
            context.metrics.count_limit("handshake_timeout");
            tracing::debug!(%remote, "tls handshake timed out");
            return;
        }
    };
    let result = serve_connection(&context, connection.clone(), connection_id, handshake).await;
    match result {
        Ok(()) | Err(ConnectionError::Connection(_)) => {
            tracing::debug!(%remote, "connection closed")
        }
        Err(error) => {
            tracing::info!(%remote, %error, "connection ended");
            connection.close(quinn::VarInt::from_u32(2), error.to_string().as_bytes());
        }
    }
}

async fn serve_connection(
    context: &Arc<ConnectionContext>,
    connection: quinn::Connection,
    connection_id: u64,
    handshake: HandshakeGuard,
) -> Result<(), ConnectionError> {
    let limits = &context.limits;
    // The coordinator opens the control stream: its first write (the challenge) is what makes
    // the stream visible to the trainer.
    let (mut send, mut recv) = connection.open_bi().await?;
    let handshake_until = tokio::time::Instant::now() + limits.handshake_timeout;
    let nonce: [u8; 32] = rand::random();
    write_message(
        &mut send,
        &ServerMessage::Challenge {
            protocol_version: PROTOCOL_VERSION,
            nonce,
        },
        limits.max_frame,
    )
    .await?;
    let mut decoder = FrameDecoder::new(limits.max_client_frame);
    let hello = tokio::time::timeout_at(
        handshake_until,
        read_message::<ClientMessage>(&mut recv, &mut decoder),
    )
    .await
    .map_err(|_| {
        context.metrics.count_limit("handshake_timeout");
        ConnectionError::Timeout
    })??
    .ok_or(ConnectionError::Ended)?;
    let address = crate::service::address_key(connection.remote_address().ip());
    let admitted = match check_hello(&context.server_certificate, &nonce, hello) {
        // Uploads-only connections are for a cluster's standby nodes (`net::relay`).
        Ok(hello) if hello.uploads_only => Err(Refusal::new(
            RejectReason::WrongNode,
            "this node leads: upload on the control connection",
        )),
        Ok(hello) => admit(context, hello.trainer, hello.token, address)
            .await
            .map(|()| (hello.trainer, hello.agent)),
        Err(refusal) => Err(refusal),
    };
    let (trainer, agent) = match admitted {
        Ok(found) => found,
        Err(refusal) => {
            Metrics::add(&context.metrics.handshakes_refused, 1);
            tracing::warn!(reason = %refusal.reason, detail = %refusal.detail, "handshake refused");
            let reason = refusal.reason;
            send_refusal(&mut send, refusal, limits.max_frame).await?;
            return Err(ConnectionError::Refused(reason));
        }
    };
    Metrics::add(&context.metrics.handshakes, 1);
    drop(handshake);
    context.transport.open_after_handshake(&connection);
    let span = tracing::info_span!("trainer", trainer = %trainer);
    span.in_scope(|| tracing::info!(agent = ?agent, "trainer joined"));

    let (sender, mut outbox_rx) = mpsc::channel(limits.outbox_capacity.max(8));
    let outbox = Outbox {
        sender,
        connection: connection.clone(),
        metrics: context.metrics.clone(),
    };
    outbox.send(ServerMessage::Welcome {
        trainer,
        experiment: context.experiment.clone(),
    });
    let _ = context
        .commands
        .send(Command::Joined {
            trainer,
            agent,
            connection_id,
            outbox: outbox.clone(),
        })
        .await;
    let max_frame = limits.max_frame;
    let writer = tokio::spawn(async move {
        while let Some(message) = outbox_rx.recv().await {
            if write_message(&mut send, &message, max_frame).await.is_err() {
                break;
            }
        }
    });

    let mut rate = TokenBucket::new(limits.control_messages_per_second);
    let downloads = Arc::new(tokio::sync::Semaphore::new(
        limits.downloads_per_connection.max(1),
    ));
    let result = loop {
        tokio::select! {
            message = read_message::<ClientMessage>(&mut recv, &mut decoder) => match message {
                Ok(Some(message)) => {
                    if !rate.take(tokio::time::Instant::now()) {
                        context.metrics.count_limit("control_rate");
                        break Err(ConnectionError::Limit("control messages too fast"));
                    }
                    let _ = context.commands.send(Command::Client { trainer, message }).await;
                }
                Ok(None) => break Ok(()),
                Err(error) => {
                    if matches!(error, ConnectionError::Frame(_)) {
                        report_violation(context, Some(trainer), RejectReason::Malformed, error.to_string()).await;
                    }
                    break Err(error);
                }
            },
            stream = connection.accept_uni() => match stream {
                Ok(stream) => {
                    let upload = receive_upload(context.clone(), trainer, stream, outbox.clone());
                    tokio::spawn(upload.instrument(span.clone()));
                }
                Err(error) => break Err(error.into()),
            },
            stream = connection.accept_bi() => match stream {
                Ok((mut send, recv)) => {
                    let Ok(slot) = downloads.clone().try_acquire_owned() else {
                        context.metrics.count_limit("downloads_per_connection");
                        let _ = send.reset(quinn::VarInt::from_u32(4));
                        continue;
                    };
                    let download = serve_download(context.clone(), trainer, send, recv);
                    tokio::spawn(
                        async move {
                            download.await;
                            drop(slot);
                        }
                        .instrument(span.clone()),
                    );
                }
                Err(error) => break Err(error.into()),
            },
        }
    };
    let _ = context
        .commands
        .send(Command::Left {
            trainer,
            connection_id,
            address,
        })
        .await;
    writer.abort();
    result
}

/// Answers a refused hello with [`ServerMessage::Refused`] and ends the control stream, giving
/// the message a moment to reach the peer before the caller's close overtakes it.
pub(crate) async fn send_refusal(
    send: &mut SendStream,
    refusal: Refusal,
    max_frame: usize,
) -> Result<(), ConnectionError> {
    let message = ServerMessage::Refused {
        reason: refusal.reason,
        detail: refusal.detail,
    };
    write_message(send, &message, max_frame).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Ok(())
}

/// Asks the hub whether the experiment's admission rules let `trainer` in from `address`.
async fn admit(
    context: &ConnectionContext,
    trainer: TrainerId,
    token: Option<String>,
    address: std::net::IpAddr,
) -> Result<(), Refusal> {
    let (reply, decision) = oneshot::channel();
    let asked = context
        .commands
        .send(Command::Admit {
            trainer,
            token,
            address,
            reply,
        })
        .await;
    match (asked, decision.await) {
        (Ok(()), Ok(decision)) => decision,
        _ => Err(Refusal::new(
            RejectReason::Internal,
            "the coordinator is stopping",
        )),
    }
}

/// A hello whose form and signature are checked.
#[derive(Debug)]
pub(crate) struct CheckedHello {
    /// The trainer's key, proven by the signature.
    pub trainer: TrainerId,
    /// Its agent string, cut to 200 characters.
    pub agent: String,
    /// The enrollment token it presented, cut to 256 characters.
    pub token: Option<String>,
    /// Whether the connection is for uploads only (see `net::relay`).
    pub uploads_only: bool,
}

/// Checks the hello's form and signature (over `nonce` and our certificate).
pub(crate) fn check_hello(
    server_certificate: &[u8; 32],
    nonce: &[u8; 32],
    hello: ClientMessage,
) -> Result<CheckedHello, Refusal> {
    let ClientMessage::Hello {
        protocol_version,
        trainer,
        signature,
        enrollment_token,
        agent,
        uploads_only,
    } = hello
    else {
        return Err(Refusal::new(
            RejectReason::Malformed,
            "the first message must be a hello",
        ));
    };
    if protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            RejectReason::ProtocolVersion,
            format!("protocol {protocol_version} is not supported; this coordinator speaks {PROTOCOL_VERSION}"),
        ));
    }
    verify_hello(&trainer, nonce, server_certificate, &signature)
        .map_err(|error| Refusal::new(RejectReason::BadSignature, error.to_string()))?;
    Ok(CheckedHello {
        trainer,
        agent: agent.chars().take(200).collect(),
        token: enrollment_token.map(|token| token.chars().take(256).collect()),
        uploads_only,
    })
}

async fn receive_upload(
    context: Arc<ConnectionContext>,
    trainer: TrainerId,
    mut stream: RecvStream,
    outbox: Outbox,
) {
    let reject_now = |stream: &mut RecvStream, refusal: Refusal, task: TaskId| {
        outbox.send(refusal.message(task, None));
        let _ = stream.stop(quinn::VarInt::from_u32(1));
        report_violation(&context, Some(trainer), refusal.reason, refusal.detail)
    };
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
            reject_now(
                &mut stream,
                Refusal::new(RejectReason::Malformed, format!("upload header: {error}")),
                TaskId(0),
            )
            .await;
            return;
        }
        Err(_) => {
            reject_now(
                &mut stream,
                Refusal::new(RejectReason::Interrupted, "no upload header in time"),
                TaskId(0),
            )
            .await;
            return;
        }
    };
    let (task, hash) = (upload.header.task, upload.header.hash);
    // The hub's checks are the cheap ones (is the task open, is it the sender's); the
    // signature is checked here, off the hub, once they passed.
    let signed = upload.clone();
    let (reply, decision) = oneshot::channel();
    let _ = context
        .commands
        .send(Command::Header {
            trainer,
            upload: Box::new(upload),
            reply,
        })
        .await;
    let ticket = match decision.await {
        Ok(HeaderDecision::Receive(ticket)) => ticket,
        Ok(HeaderDecision::Refused(refusal)) => {
            outbox.send(refusal.message(task, Some(hash)));
            let _ = stream.stop(quinn::VarInt::from_u32(1));
            return;
        }
        // The engine answers a repeat itself.
        Ok(HeaderDecision::Repeat) => {
            let _ = stream.stop(quinn::VarInt::from_u32(1));
            return;
        }
        Err(_) => return,
    };
    if let Err(error) = verify_submission(&signed) {
        let _ = stream.stop(quinn::VarInt::from_u32(1));
        let refusal = Refusal::new(RejectReason::BadSignature, error.to_string());
        let _ = context
            .commands
            .send(Command::UploadDone {
                ticket,
                result: Err(refusal),
            })
            .await;
        return;
    }
    // Bodies are held in memory while checked: bound how many are received at once, and
    // queue the rest (what QUIC buffers for a waiting stream is bounded by its window).
    let buffered = ticket
        .byte_len
        .min(u64::from(context.transport.stream_receive_window));
    let _slot = match context.uploads.admit(buffered).await {
        Ok(slot) => slot,
        Err(retry_after) => {
            let _ = stream.stop(quinn::VarInt::from_u32(1));
            let _ = context
                .commands
                .send(Command::UploadDeferred {
                    ticket,
                    retry_after,
                })
                .await;
            return;
        }
    };
    outbox.send(ServerMessage::UploadStarted { task, hash });
    let result = receive_body(
        &context.blobs,
        &context.metrics,
        context.limits.stream_idle_timeout,
        &ticket,
        &mut stream,
        decoder.take_rest(),
    )
    .await;
    if result.is_err() {
        let _ = stream.stop(quinn::VarInt::from_u32(1));
    }
    let _ = context
        .commands
        .send(Command::UploadDone { ticket, result })
        .await;
}

/// Receives and checks an upload body: length, hash, decoding, layout, finiteness. A large body
/// is then made durable as a blob file; a small one is returned for the hub to store in the
/// database with its submission.
pub(crate) async fn receive_body(
    blobs: &BlobStore,
    metrics: &Metrics,
    idle_timeout: Duration,
    ticket: &UploadTicket,
    stream: &mut RecvStream,
    already: Vec<u8>,
) -> Result<Option<Vec<u8>>, Refusal> {
    let expected = ticket.byte_len;
    let mut hasher = blake3::Hasher::new();
    let mut body = Vec::with_capacity(expected.min(64 << 20) as usize);
    let mut take = |chunk: &[u8], body: &mut Vec<u8>| -> Result<(), Refusal> {
        if body.len() as u64 + chunk.len() as u64 > expected {
            return Err(Refusal::new(
                RejectReason::TooLarge,
                format!("more than the {expected} bytes the header announced"),
            ));
        }
        hasher.update(chunk);
        body.extend_from_slice(chunk);
        Ok(())
    };
    // Bytes that came with the header's frame count as received too.
    Metrics::add(&metrics.bytes_in, already.len() as u64);
    take(&already, &mut body)?;
    let allowed = body_allowance(expected);
    let receive_until = tokio::time::Instant::now() + allowed;
    loop {
        let idle_until = tokio::time::Instant::now() + idle_timeout;
        let chunk = tokio::time::timeout_at(
            idle_until.min(receive_until),
            stream.read_chunk(64 * 1024, true),
        )
        .await;
        match chunk {
            Ok(Ok(Some(chunk))) => {
                Metrics::add(&metrics.bytes_in, chunk.bytes.len() as u64);
                take(&chunk.bytes, &mut body)?;
            }
            Ok(Ok(None)) => break,
            Ok(Err(error)) => {
                return Err(Refusal::new(
                    RejectReason::Interrupted,
                    format!("upload stream failed after {} bytes: {error}", body.len()),
                ))
            }
            Err(_) => {
                return Err(Refusal::new(
                    RejectReason::Interrupted,
                    format!(
                        "upload stalled or too slow: {} bytes after {} s at most",
                        body.len(),
                        allowed.as_secs()
                    ),
                ))
            }
        }
    }
    if body.len() as u64 != expected {
        return Err(Refusal::new(
            RejectReason::LengthMismatch,
            format!(
                "received {} bytes, the header announced {expected}",
                body.len()
            ),
        ));
    }
    let actual = BlobHash::from(hasher.finalize());
    if actual != ticket.hash {
        return Err(Refusal::new(
            RejectReason::HashMismatch,
            format!(
                "bytes hash to {}, the header claims {}",
                actual.short(),
                ticket.hash.short()
            ),
        ));
    }
    let layout = ticket.layout.clone();
    let ticket_limit = ticket.max_abs_value;
    let blobs = blobs.clone();
    tokio::task::spawn_blocking(move || {
        // Bound the decoded size (a tiny top-k payload can describe a huge tensor) loosely
        // enough that a wrong shape is reported as one, not as a decoding failure.
        let max_elements = layout.element_count().saturating_mul(2).max(1 << 16);
        let delta = codec::decode(&body, max_elements)
            .map_err(|error| Refusal::new(RejectReason::Malformed, error.to_string()))?;
        delta
            .check_layout(&layout)
            .map_err(|error| Refusal::new(RejectReason::WrongShape, error.to_string()))?;
        delta
            .check_finite()
            .map_err(|error| Refusal::new(RejectReason::NonFinite, error.to_string()))?;
        let limit = ticket_limit;
        for tensor in delta.tensors() {
            if let Some(index) = tensor.values().iter().position(|v| v.abs() > limit) {
                return Err(Refusal::new(
                    RejectReason::NonFinite,
                    format!(
                        "tensor {:?} value {} at {index} exceeds the limit {limit}",
                        tensor.name(),
                        tensor.values()[index]
                    ),
                ));
            }
        }
        if body.len() <= INLINE_BLOB_MAX {
            return Ok(Some(body));
        }
        blobs
            .put_hashed(actual, &body)
            .map_err(|error| Refusal::new(RejectReason::Internal, error.to_string()))?;
        Ok(None)
    })
    .await
    .unwrap_or_else(|error| Err(Refusal::new(RejectReason::Internal, error.to_string())))
}

async fn serve_download(
    context: Arc<ConnectionContext>,
    trainer: TrainerId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    // A download ends, even towards a peer that stops reading.
    let started = tokio::time::Instant::now();
    let mut decoder = FrameDecoder::new(context.limits.max_client_frame);
    let request = tokio::time::timeout(
        context.limits.stream_idle_timeout,
        read_message::<DownloadRequest>(&mut recv, &mut decoder),
    )
    .await;
    let Ok(Ok(Some(request))) = request else {
        let _ = send.reset(quinn::VarInt::from_u32(1));
        return;
    };
    let (reply, answer) = oneshot::channel();
    let _ = context
        .commands
        .send(Command::Downloadable {
            hash: request.hash,
            trainer,
            reply,
        })
        .await;
    let max_frame = context.limits.max_frame;
    let len = match answer.await {
        Ok(Some(Download::Memory(bytes))) => {
            let deadline = started + download_deadline(bytes.len() as u64);
            let found = DownloadResponse::Found {
                len: bytes.len() as u64,
            };
            let sent = tokio::time::timeout_at(deadline, async {
                write_message(&mut send, &found, max_frame).await?;
                send.write_all(&bytes).await?;
                Ok::<_, ConnectionError>(())
            })
            .await;
            match sent {
                Ok(Ok(())) => {
                    Metrics::add(&context.metrics.bytes_out, bytes.len() as u64);
                    let _ = send.finish();
                }
                // Too slow: reset, so the peer cannot mistake a cut body for a whole one.
                Err(_) => {
                    let _ = send.reset(quinn::VarInt::from_u32(3));
                }
                Ok(Err(_)) => {}
            }
            return;
        }
        Ok(Some(Download::File(len))) => len,
        _ => {
            let _ = write_message(&mut send, &DownloadResponse::NotFound, max_frame).await;
            let _ = send.finish();
            return;
        }
    };
    // A file is held open for the whole download: bound how many are, and wait a little for a
    // slot before giving up (the trainer retries the download).
    let slot = tokio::time::timeout(
        context.limits.stream_idle_timeout,
        context.file_downloads.clone().acquire_owned(),
    )
    .await;
    let Ok(Ok(_slot)) = slot else {
        context.metrics.count_limit("file_downloads");
        let _ = send.reset(quinn::VarInt::from_u32(4));
        return;
    };
    let mut reader = match context.blobs.reader(&request.hash).await {
        Ok((_, reader)) => reader,
        Err(error) => {
            tracing::error!(%error, hash = %request.hash, "a known adapter's blob is missing");
            let _ = write_message(&mut send, &DownloadResponse::NotFound, max_frame).await;
            let _ = send.finish();
            return;
        }
    };
    let deadline = started + download_deadline(len);
    if write_message(&mut send, &DownloadResponse::Found { len }, max_frame)
        .await
        .is_err()
    {
        return;
    }
    let mut left = len;
    while left > 0 {
        match reader.next_chunk().await {
            Ok(None) => break,
            Ok(Some(mut chunk)) => {
                chunk.truncate(usize::try_from(left).unwrap_or(usize::MAX));
                let n = chunk.len() as u64;
                left -= n;
                match tokio::time::timeout_at(deadline, send.write_all(&chunk)).await {
                    Ok(Ok(())) => Metrics::add(&context.metrics.bytes_out, n),
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let _ = send.reset(quinn::VarInt::from_u32(3));
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot read a blob for download");
                let _ = send.reset(quinn::VarInt::from_u32(2));
                return;
            }
        }
    }
    let _ = send.finish();
}

async fn report_violation(
    context: &ConnectionContext,
    trainer: Option<TrainerId>,
    reason: RejectReason,
    detail: String,
) {
    let _ = context
        .commands
        .send(Command::Violation {
            trainer,
            refusal: Refusal::new(reason, detail),
        })
        .await;
}

/// Writes one frame.
pub(crate) async fn write_message<T: Serialize>(
    send: &mut SendStream,
    message: &T,
    max_frame: usize,
) -> Result<(), ConnectionError> {
    let mut frame = Vec::new();
    encode_frame(message, max_frame, &mut frame)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads the next frame; `None` at a clean end of stream. Cancel-safe: bytes already read stay
/// in `decoder`.
pub(crate) async fn read_message<T: DeserializeOwned>(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<T>, ConnectionError> {
    let mut buffer = [0u8; 8192];
    loop {
        if let Some(message) = decoder.next_message::<T>()? {
            return Ok(Some(message));
        }
        match recv.read(&mut buffer).await? {
            Some(n) => decoder.push(&buffer[..n]),
            None => {
                decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// A token bucket on virtual-friendly tokio time: `rate` tokens a second, holding at most twice
/// that.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: 2.0 * rate,
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self, now: tokio::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
