//! A protocol client: connect, authenticate, read control messages, download and upload blobs.
//! The trainer's `join` loop is built on it, and so are the tests' synthetic trainer and load
//! generator.

use std::net::SocketAddr;

use quinn::{RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tributary_shared::frame::{encode_frame, FrameDecoder, DEFAULT_MAX_FRAME};
use tributary_shared::identity::Identity;
use tributary_shared::wire::{
    ClientMessage, DownloadRequest, DownloadResponse, ServerMessage, UploadHeader, PROTOCOL_VERSION,
};
use tributary_shared::{BlobHash, CertificateHash, ExperimentId, TaskId, TrainerId};

use super::NetError;

/// An authenticated connection to a coordinator.
#[derive(Debug)]
pub struct Session {
    connection: quinn::Connection,
    control_send: SendStream,
    control_recv: RecvStream,
    decoder: FrameDecoder,
    /// Our identity as the coordinator recognised it.
    pub trainer: TrainerId,
    /// The experiment it runs.
    pub experiment: ExperimentId,
    /// SHA-256 of the coordinator's certificate, which submissions sign.
    pub coordinator: CertificateHash,
}

impl Session {
    /// Connects and completes the challenge handshake.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        identity: &Identity,
        enrollment_token: Option<String>,
    ) -> Result<Self, NetError> {
        Self::handshake(endpoint, addr, identity, enrollment_token, false).await
    }

    /// Connects for uploads only: to a standby node of a cluster, which checks and stages
    /// uploads for the leader and answers [`ServerMessage::UploadStaged`] on this session's
    /// control stream. The leader's answer still comes on the control session.
    pub async fn connect_for_uploads(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        identity: &Identity,
    ) -> Result<Self, NetError> {
        Self::handshake(endpoint, addr, identity, None, true).await
    }

    async fn handshake(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        identity: &Identity,
        enrollment_token: Option<String>,
        uploads_only: bool,
    ) -> Result<Self, NetError> {
        let connection = endpoint.connect(addr, "localhost")?.await?;
        // The coordinator opens the control stream and speaks first.
        let (mut control_send, mut control_recv) = connection.accept_bi().await?;
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let challenge: ServerMessage = read_frame(&mut control_recv, &mut decoder)
            .await?
            .ok_or_else(|| NetError::Protocol("no challenge".into()))?;
        let ServerMessage::Challenge {
            protocol_version,
            nonce,
        } = challenge
        else {
            return Err(NetError::Protocol(format!(
                "expected a challenge, got {challenge:?}"
            )));
        };
        if protocol_version != PROTOCOL_VERSION {
            return Err(NetError::Protocol(format!(
                "coordinator speaks protocol {protocol_version}, this trainer {PROTOCOL_VERSION}"
            )));
        }
        let server_certificate = peer_certificate_sha256(&connection)?;
        let hello = ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            trainer: identity.id(),
            signature: identity.sign_hello(&nonce, &server_certificate),
            enrollment_token,
            agent: format!("tributary-trainer/{}", env!("CARGO_PKG_VERSION")),
            uploads_only,
        };
        write_frame(&mut control_send, &hello).await?;
        let answer: ServerMessage = read_frame(&mut control_recv, &mut decoder)
            .await?
            .ok_or_else(|| NetError::Protocol("connection closed during the handshake".into()))?;
        match answer {
            ServerMessage::Welcome {
                trainer,
                experiment,
            } => Ok(Self {
                connection,
                control_send,
                control_recv,
                decoder,
                trainer,
                experiment,
                coordinator: CertificateHash(server_certificate),
            }),
            ServerMessage::Refused { reason, detail } => Err(NetError::Refused { reason, detail }),
            other => Err(NetError::Protocol(format!(
                "unexpected answer to hello: {other:?}"
            ))),
        }
    }

    /// The next control message; `None` when the coordinator closed the stream.
    pub async fn next_message(&mut self) -> Result<Option<ServerMessage>, NetError> {
        read_frame(&mut self.control_recv, &mut self.decoder).await
    }

    /// Sends a control message.
    pub async fn send(&mut self, message: &ClientMessage) -> Result<(), NetError> {
        write_frame(&mut self.control_send, message).await
    }

    /// Downloads a blob by hash and checks it.
    pub async fn download(&self, hash: BlobHash) -> Result<Vec<u8>, NetError> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        write_frame(&mut send, &DownloadRequest { hash }).await?;
        send.finish()?;
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let response: DownloadResponse = read_frame(&mut recv, &mut decoder)
            .await?
            .ok_or_else(|| NetError::Protocol("download stream closed".into()))?;
        let DownloadResponse::Found { len } = response else {
            return Err(NetError::Protocol(format!(
                "blob {hash} not found on the coordinator"
            )));
        };
        let mut bytes = decoder.take_rest();
        let rest = recv
            .read_to_end(
                usize::try_from(len)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(bytes.len()),
            )
            .await?;
        bytes.extend_from_slice(&rest);
        if bytes.len() as u64 != len {
            return Err(NetError::Protocol("download ended early".into()));
        }
        if BlobHash::of(&bytes) != hash {
            return Err(NetError::Protocol(format!(
                "downloaded bytes do not match {hash}"
            )));
        }
        Ok(bytes)
    }

    /// Uploads a signed header and a body on a new stream. `cut_after` stops after that many
    /// body bytes and leaves the stream open (a fault-injection hook: the caller then drops the
    /// connection).
    pub async fn upload(
        &self,
        header: &UploadHeader,
        body: &[u8],
        cut_after: Option<usize>,
    ) -> Result<(), NetError> {
        self.uploader().upload(header, body, cut_after).await
    }

    /// A handle that uploads on this connection from another task, while the session goes on
    /// reading control messages (an upload may wait in the coordinator's queue).
    pub fn uploader(&self) -> Uploader {
        Uploader {
            connection: self.connection.clone(),
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection.close(quinn::VarInt::from_u32(0), b"bye");
    }

    /// Ends the session after what was sent on the control stream has reached the coordinator
    /// (waiting at most `grace`): closing at once would discard it.
    pub async fn leave(&mut self, grace: std::time::Duration) {
        if self.control_send.finish().is_ok() {
            let _ = tokio::time::timeout(grace, self.control_send.stopped()).await;
        }
        self.close();
    }

    /// The underlying connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }
}

/// A standby session unused this long is closed rather than reused: between tasks of a real
/// length it would only hold a connection on the node.
const STANDBY_SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// One trainer's uploads-only sessions to a cluster's standby nodes, at most one per node,
/// kept open between uploads that follow closely (a QUIC and TLS handshake per upload costs a
/// standby more than a small delta's body). Uploads through it go one at a time.
#[derive(Debug, Clone)]
pub struct StandbySessions {
    endpoint: quinn::Endpoint,
    identity: Identity,
    open: std::sync::Arc<
        tokio::sync::Mutex<std::collections::HashMap<SocketAddr, (Session, tokio::time::Instant)>>,
    >,
}

impl StandbySessions {
    /// No session open yet; they will be opened from `endpoint`, authenticated as `identity`.
    pub fn new(endpoint: quinn::Endpoint, identity: Identity) -> Self {
        Self {
            endpoint,
            identity,
            open: Default::default(),
        }
    }

    /// The trainer these sessions authenticate as.
    pub fn trainer(&self) -> TrainerId {
        self.identity.id()
    }

    /// Sends `header` and `body` to the standby node at `node` and returns its answer:
    /// [`ServerMessage::UploadStaged`] (the leader decides and answers on the control session)
    /// or a rejection. Reuses the open session to `node` or opens one (waiting at most 10 s);
    /// waits at most 30 s for the answer after the body. A session that failed is closed.
    pub async fn upload(
        &self,
        node: SocketAddr,
        header: &UploadHeader,
        body: &[u8],
    ) -> Result<ServerMessage, NetError> {
        let mut open = self.open.lock().await;
        open.retain(|_, (session, used)| {
            let alive = used.elapsed() < STANDBY_SESSION_IDLE
                && session.connection.close_reason().is_none();
            if !alive {
                session.close();
            }
            alive
        });
        let no_answer = |what: &str| NetError::Protocol(format!("{node}: no answer {what}"));
        let mut session = match open.remove(&node) {
            Some((session, _)) => session,
            None => tokio::time::timeout(
                std::time::Duration::from_secs(10),
                Session::connect_for_uploads(&self.endpoint, node, &self.identity),
            )
            .await
            .map_err(|_| no_answer("to the connection"))??,
        };
        let answer = async {
            session.upload(header, body, None).await?;
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                loop {
                    match session.next_message().await? {
                        Some(message) if answers(&message, header) => return Ok(message),
                        // An answer to an earlier upload that was given up on.
                        Some(_) => {}
                        None => return Err(no_answer("before the session closed")),
                    }
                }
            })
            .await
            .map_err(|_| no_answer("to the upload"))?
        }
        .await;
        match answer {
            Ok(message) => {
                open.insert(node, (session, tokio::time::Instant::now()));
                Ok(message)
            }
            Err(error) => {
                session.close();
                Err(error)
            }
        }
    }
}

/// Whether `message`, on an uploads-only session, answers the upload of `header`.
fn answers(message: &ServerMessage, header: &UploadHeader) -> bool {
    let ours = |task: TaskId, hash: Option<BlobHash>| {
        task == header.header.task && hash.is_none_or(|hash| hash == header.header.hash)
    };
    match message {
        ServerMessage::UploadStaged { task, hash }
        | ServerMessage::UploadDeferred { task, hash, .. } => ours(*task, Some(*hash)),
        // An unreadable header is answered with task 0 and no hash.
        ServerMessage::SubmissionRejected { task, hash, .. } => {
            ours(*task, *hash) || (task.0 == 0 && hash.is_none())
        }
        _ => false,
    }
}

/// Uploads on a session's connection; see [`Session::uploader`].
#[derive(Debug, Clone)]
pub struct Uploader {
    connection: quinn::Connection,
}

impl Uploader {
    /// [`Session::upload`].
    pub async fn upload(
        &self,
        header: &UploadHeader,
        body: &[u8],
        cut_after: Option<usize>,
    ) -> Result<(), NetError> {
        let mut send = self.connection.open_uni().await?;
        let mut frame = Vec::new();
        encode_frame(header, DEFAULT_MAX_FRAME, &mut frame)?;
        send.write_all(&frame).await?;
        match cut_after {
            Some(cut) => {
                send.write_all(&body[..cut.min(body.len())]).await?;
                // Keep the stream alive until the connection is dropped.
                std::mem::forget(send);
            }
            None => {
                send.write_all(body).await?;
                send.finish()?;
                // Wait until the peer has read everything (or stopped the stream).
                let _ = send.stopped().await;
            }
        }
        Ok(())
    }
}

/// SHA-256 of the certificate the coordinator presented on `connection`.
pub fn peer_certificate_sha256(connection: &quinn::Connection) -> Result<[u8; 32], NetError> {
    use sha2::Digest as _;
    let identity = connection
        .peer_identity()
        .ok_or_else(|| NetError::Tls("the coordinator presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| NetError::Tls("unexpected peer identity type".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| NetError::Tls("empty certificate chain".into()))?;
    Ok(sha2::Sha256::digest(leaf.as_ref()).into())
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, message: &T) -> Result<(), NetError> {
    let mut frame = Vec::new();
    encode_frame(message, DEFAULT_MAX_FRAME, &mut frame)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<T>, NetError> {
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

/// A client endpoint on an ephemeral loopback port trusting `trust`.
pub fn client_endpoint(trust: &super::tls::ServerTrust) -> Result<quinn::Endpoint, NetError> {
    client_endpoint_at(std::net::IpAddr::from([127, 0, 0, 1]), trust)
}

/// A client endpoint on an ephemeral port of `local` trusting `trust` (load tests spread
/// trainers over the loopback range, as separate machines would have separate addresses).
pub fn client_endpoint_at(
    local: std::net::IpAddr,
    trust: &super::tls::ServerTrust,
) -> Result<quinn::Endpoint, NetError> {
    let mut endpoint = quinn::Endpoint::client(std::net::SocketAddr::new(local, 0))?;
    endpoint.set_default_client_config(super::tls::client_config(trust)?);
    Ok(endpoint)
}
