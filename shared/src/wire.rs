//! Wire messages of protocol version 1 (ALPN `tributary/1`).
//!
//! A trainer keeps one QUIC connection to the coordinator. Streams:
//!
//! | stream | opened by | content |
//! |---|---|---|
//! | control (bidirectional, the first one) | coordinator | frames of [`ClientMessage`] up, [`ServerMessage`] down |
//! | upload (unidirectional) | trainer | one [`UploadHeader`] frame, then exactly `byte_len` raw delta bytes |
//! | download (bidirectional) | trainer | one [`DownloadRequest`] frame up; one [`DownloadResponse`] frame down, then the raw blob |
//!
//! The handshake: the coordinator sends [`ServerMessage::Challenge`] with a fresh nonce; the
//! trainer answers [`ClientMessage::Hello`] with its public key and a signature over the nonce
//! (see [`crate::identity`]); the coordinator answers [`ServerMessage::Welcome`] or
//! [`ServerMessage::Refused`].

use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::ids::{
    BlobHash, CertificateHash, ExperimentId, ExperimentUid, RoundId, TaskId, TrainerId,
};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 4;
/// The TLS ALPN token for this protocol version.
pub const ALPN: &[u8] = b"tributary/1";

/// Messages from the coordinator on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// First message: prove your identity by signing `nonce`.
    Challenge {
        /// The coordinator's protocol version.
        protocol_version: u16,
        /// Fresh random bytes, signed by the trainer in its `Hello`.
        nonce: [u8; 32],
    },
    /// The handshake succeeded.
    Welcome {
        /// The identity the coordinator recognised.
        trainer: TrainerId,
        /// The experiment this coordinator runs.
        experiment: ExperimentId,
    },
    /// The handshake failed; the connection closes next.
    Refused {
        /// Why.
        reason: RejectReason,
        /// Human-readable detail.
        detail: String,
    },
    /// Work for this trainer.
    Task(Box<TaskSpec>),
    /// The task was withdrawn (the round closed without it, or the trainer was replaced).
    TaskCancelled {
        /// Which task.
        task: TaskId,
        /// Why.
        detail: String,
    },
    /// An upload's header was admitted; its body is being received and checked (like HTTP's
    /// `100 Continue`, but the trainer need not wait for it).
    UploadStarted {
        /// Which task.
        task: TaskId,
        /// The delta's hash.
        hash: BlobHash,
    },
    /// The upload was verified and durably stored; it will count in its round.
    SubmissionAccepted {
        /// Which task.
        task: TaskId,
        /// The delta's hash.
        hash: BlobHash,
    },
    /// The upload was refused.
    SubmissionRejected {
        /// Which task (0 when unknown).
        task: TaskId,
        /// The claimed hash, if the header was readable.
        hash: Option<BlobHash>,
        /// Why.
        reason: RejectReason,
        /// Human-readable detail.
        detail: String,
    },
    /// A round closed; informs trainers of progress.
    RoundClosed {
        /// The round.
        round: RoundId,
        /// The new adapter's hash.
        adapter: BlobHash,
    },
    /// The experiment has run all its rounds; no more tasks will come.
    ExperimentFinished {
        /// The final adapter's hash.
        adapter: BlobHash,
    },
    /// The operator's pause button: compute at most this fraction of wall time, in millionths
    /// (0 pauses, [`FULL_DUTY_PPM`] is no limit). Sent on every change and after each welcome.
    Throttle {
        /// Allowed duty cycle, in millionths.
        duty_ppm: u32,
    },
    /// Score an adapter on held-out data and answer [`ClientMessage::EvalResult`] (or
    /// [`ClientMessage::TaskDeclined`]). Nothing is uploaded.
    Evaluate(Box<EvalSpec>),
    /// The coordinator is too busy to receive this upload now (back-pressure, not a refusal):
    /// the task stays open, and the trainer sends the same upload again after `retry_after_ms`.
    UploadDeferred {
        /// Which task.
        task: TaskId,
        /// The delta's hash.
        hash: BlobHash,
        /// Wait at least this long before sending it again, in milliseconds.
        retry_after_ms: u32,
    },
    /// A standby node checked the upload (signature, hash, decoding, layout) and stored it
    /// durably for the leader, which decides on it and answers on the trainer's control
    /// connection ([`ServerMessage::SubmissionAccepted`] or a rejection).
    UploadStaged {
        /// Which task.
        task: TaskId,
        /// The delta's hash.
        hash: BlobHash,
    },
}

/// A duty cycle of 100 %, in millionths.
pub const FULL_DUTY_PPM: u32 = 1_000_000;

/// Messages from a trainer on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Answer to the challenge.
    Hello {
        /// The trainer's protocol version.
        protocol_version: u16,
        /// The trainer's public key.
        trainer: TrainerId,
        /// ed25519 signature over the challenge (see `identity::hello_message`).
        signature: Vec<u8>,
        /// Enrollment token, when the coordinator requires one.
        enrollment_token: Option<String>,
        /// Free-form agent string, e.g. `tributary-trainer/0.1 (wgpu, RTX 3060)`.
        agent: String,
        /// The connection carries uploads only (to a standby node of a cluster, which checks
        /// and stages them for the leader); the control session stays with the leader.
        uploads_only: bool,
    },
    /// The trainer starts working on the task.
    TaskAccepted {
        /// Which task.
        task: TaskId,
    },
    /// The trainer will not do the task.
    TaskDeclined {
        /// Which task.
        task: TaskId,
        /// Why.
        detail: String,
    },
    /// The trainer now computes at most this duty cycle (the fleet's, or its owner's lower one).
    ThrottleApplied {
        /// Duty cycle in effect, in millionths.
        duty_ppm: u32,
    },
    /// The outcome of an [`EvalSpec`].
    EvalResult {
        /// The evaluation task.
        task: TaskId,
        /// The adapter scored (must be the one the task named).
        adapter: BlobHash,
        /// Mean next-token cross-entropy over the scored tokens, in nats (for a loss check,
        /// with the delta added to the adapter).
        loss: f32,
        /// Tokens scored.
        tokens: u64,
        /// A loss check's loss of the adapter alone on the same tokens; `None` otherwise.
        baseline: Option<f32>,
    },
}

/// An evaluation task: score `adapter` on the held-out split of `data`, or, for a loss check
/// ([`EvalSpec::check`]), score `adapter` and `adapter` plus a delta on the training sequences
/// a task trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSpec {
    /// Unique task id (shared with training tasks).
    pub task: TaskId,
    /// The experiment.
    pub experiment: ExperimentId,
    /// The round that produced the adapter; `None` for the experiment's initial adapter.
    pub after_round: Option<RoundId>,
    /// The base model's name.
    pub base_model: String,
    /// The base model's hash, when the coordinator serves it.
    pub base_model_hash: Option<BlobHash>,
    /// The adapter to score, downloadable by hash.
    pub adapter: BlobHash,
    /// Its size in bytes.
    pub adapter_len: u64,
    /// Whose held-out text to score.
    pub data: DataAssignment,
    /// The experiment's plan: sequence length and the adapter's LoRA settings.
    pub plan: TrainingPlan,
    /// Most sequences to score.
    pub max_sequences: u32,
    /// Milliseconds from receipt until the result is due.
    pub deadline_ms: u64,
    /// Present for a loss check: the delta to add, and which training sequences to score.
    pub check: Option<LossCheckSpec>,
}

/// What a loss check scores: `data` (the task's assignment) is packed as for training, and
/// the sequences that `local_steps` batches of `batch_size` drawn with `seed` visit (at most
/// `max_sequences` of them, evenly spaced) are scored with the adapter alone and with the
/// adapter plus `delta`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossCheckSpec {
    /// The delta, downloadable by hash.
    pub delta: BlobHash,
    /// Its size in bytes.
    pub delta_len: u64,
    /// The task's seed, which chose its batches.
    pub seed: u64,
}

/// Everything a trainer needs to do one round's local work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Unique task id.
    pub task: TaskId,
    /// The experiment.
    pub experiment: ExperimentId,
    /// The experiment's random id, which the submission signs.
    pub experiment_uid: ExperimentUid,
    /// The round this task belongs to.
    pub round: RoundId,
    /// The base model's name (as in the experiment file).
    pub base_model: String,
    /// The base model's hash, when the coordinator serves it.
    pub base_model_hash: Option<BlobHash>,
    /// The current adapter, downloadable by hash.
    pub adapter: BlobHash,
    /// The adapter's size in bytes.
    pub adapter_len: u64,
    /// Which data to train on.
    pub data: DataAssignment,
    /// Local training settings.
    pub plan: TrainingPlan,
    /// Seed for the trainer's RNGs (data order, dropout).
    pub seed: u64,
    /// Milliseconds from receipt until the upload must have finished.
    pub deadline_ms: u64,
    /// Largest upload the coordinator accepts for this task.
    pub max_upload_bytes: u64,
}

/// The data a task trains on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataAssignment {
    /// Named clients (shards) of a public dataset, e.g. Shakespeare roles.
    Clients {
        /// Dataset name, e.g. `shakespeare`.
        dataset: String,
        /// Client ids within it.
        clients: Vec<String>,
    },
    /// The volunteer's own local data, which never leaves the machine.
    Local,
    /// Synthetic data generated from the task seed (tests and load generation).
    Synthetic {
        /// Examples to pretend to train on.
        samples: u64,
    },
}

/// Local training hyper-parameters carried in a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    /// Optimizer steps to run locally.
    pub local_steps: u32,
    /// Peak learning rate.
    pub learning_rate: f32,
    /// Sequences per step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub sequence_len: u32,
    /// How the delta is compressed.
    #[serde(with = "codec_repr")]
    pub codec: Codec,
    /// LoRA scale numerator (the update is `alpha / rank · A B`); 0 for non-LoRA adapters.
    pub lora_alpha: f32,
    /// Dropout on the LoRA branch's input.
    pub lora_dropout: f32,
    /// Keep `lora_A` frozen and train `lora_B` only (FFA-LoRA).
    pub freeze_a: bool,
}

/// The wire form of a [`Codec`]: externally tagged, because bincode cannot read the internally
/// tagged form that experiment files use.
mod codec_repr {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::codec::Codec;

    #[derive(Serialize, Deserialize)]
    enum Repr {
        F32,
        F16,
        Int8(u32),
        Int4(u32),
        TopK(f32),
    }

    pub fn serialize<S: Serializer>(codec: &Codec, serializer: S) -> Result<S::Ok, S::Error> {
        let repr = match *codec {
            Codec::F32 => Repr::F32,
            Codec::F16 => Repr::F16,
            Codec::Int8 { block } => Repr::Int8(block),
            Codec::Int4 { block } => Repr::Int4(block),
            Codec::TopK { fraction } => Repr::TopK(fraction),
        };
        repr.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Codec, D::Error> {
        let codec = match Repr::deserialize(deserializer)? {
            Repr::F32 => Codec::F32,
            Repr::F16 => Codec::F16,
            Repr::Int8(block) => Codec::Int8 { block },
            Repr::Int4(block) => Codec::Int4 { block },
            Repr::TopK(fraction) => Codec::TopK { fraction },
        };
        codec.validate().map_err(serde::de::Error::custom)?;
        Ok(codec)
    }
}

/// The signed description of an upload; the first frame on an upload stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubmissionHeader {
    /// The experiment.
    pub experiment: ExperimentId,
    /// The experiment's random id (from the task): the signature holds for this experiment
    /// only, not for another of the same name.
    pub experiment_uid: ExperimentUid,
    /// The coordinator's certificate hash, as the trainer saw it: the signature holds for this
    /// coordinator instance only.
    pub coordinator: CertificateHash,
    /// The round the delta was trained for.
    pub round: RoundId,
    /// The task it answers.
    pub task: TaskId,
    /// The uploader.
    pub trainer: TrainerId,
    /// blake3 of the encoded delta bytes.
    pub hash: BlobHash,
    /// Length of the encoded delta bytes.
    pub byte_len: u64,
    /// Examples trained on (the FedAvg weight).
    pub sample_count: u64,
    /// What local training reported.
    pub metrics: TrainMetrics,
}

/// Local training figures reported with a submission.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Mean training loss over the local steps.
    pub train_loss: f32,
    /// Steps run.
    pub steps: u32,
    /// Tokens processed.
    pub tokens: u64,
    /// Wall time of local training, in milliseconds.
    pub train_ms: u64,
}

/// First frame of an upload stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadHeader {
    /// What is being uploaded.
    pub header: SubmissionHeader,
    /// ed25519 signature by `header.trainer` (see `identity::submission_message`).
    pub signature: Vec<u8>,
}

/// First frame of a download stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DownloadRequest {
    /// The blob wanted.
    pub hash: BlobHash,
}

/// The coordinator's answer on a download stream; `Found` is followed by `len` raw bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DownloadResponse {
    /// The blob follows.
    Found {
        /// Its length.
        len: u64,
    },
    /// No such blob (or not downloadable by this trainer).
    NotFound,
}

/// Why a connection, task or submission was refused. Stable names for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    /// The peer speaks another protocol version.
    ProtocolVersion,
    /// A bad or missing signature, or a key other than the connection's.
    BadSignature,
    /// The key is not enrolled (wrong or missing enrollment token).
    UnknownTrainer,
    /// The submission names a past or future round.
    Stale,
    /// The same delta (hash) or the same task was already submitted.
    Replay,
    /// The submission came after the round's deadline or after it closed.
    Late,
    /// The trainer has no open task matching the submission.
    NotSelected,
    /// The bytes' blake3 differs from the header's hash.
    HashMismatch,
    /// The stream carried another number of bytes than the header said.
    LengthMismatch,
    /// The upload is larger than allowed.
    TooLarge,
    /// The delta's tensor names or shapes differ from the adapter's.
    WrongShape,
    /// The delta holds NaN or infinite values.
    NonFinite,
    /// The bytes or frames do not parse.
    Malformed,
    /// The peer broke a limit (connections per address, concurrent uploads).
    RateLimited,
    /// The stream was reset or the connection lost mid-upload.
    Interrupted,
    /// The coordinator failed to store the submission (its fault, not the trainer's).
    Internal,
    /// This node of a cluster does not take this kind of connection: a standby node takes
    /// uploads only, and the leader takes uploads on the control connection.
    WrongNode,
}

impl RejectReason {
    /// True for the coordinator's own failures (busy, storage): the delta was not at fault, its
    /// task stays open, and the trainer sends it again.
    pub fn is_coordinator_fault(self) -> bool {
        matches!(self, Self::RateLimited | Self::Internal | Self::WrongNode)
    }

    /// Every reason, for metric labels.
    pub const ALL: [RejectReason; 17] = [
        Self::ProtocolVersion,
        Self::BadSignature,
        Self::UnknownTrainer,
        Self::Stale,
        Self::Replay,
        Self::Late,
        Self::NotSelected,
        Self::HashMismatch,
        Self::LengthMismatch,
        Self::TooLarge,
        Self::WrongShape,
        Self::NonFinite,
        Self::Malformed,
        Self::RateLimited,
        Self::Interrupted,
        Self::Internal,
        Self::WrongNode,
    ];

    /// A stable snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ProtocolVersion => "protocol_version",
            Self::BadSignature => "bad_signature",
            Self::UnknownTrainer => "unknown_trainer",
            Self::Stale => "stale",
            Self::Replay => "replay",
            Self::Late => "late",
            Self::NotSelected => "not_selected",
            Self::HashMismatch => "hash_mismatch",
            Self::LengthMismatch => "length_mismatch",
            Self::TooLarge => "too_large",
            Self::WrongShape => "wrong_shape",
            Self::NonFinite => "non_finite",
            Self::Malformed => "malformed",
            Self::RateLimited => "rate_limited",
            Self::Interrupted => "interrupted",
            Self::Internal => "internal",
            Self::WrongNode => "wrong_node",
        }
    }

    /// Parses [`RejectReason::as_str`]'s spelling.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == name)
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{frame_bytes, FrameDecoder, DEFAULT_MAX_FRAME};
    use proptest::prelude::*;

    fn sample_task() -> TaskSpec {
        TaskSpec {
            task: TaskId(3),
            experiment_uid: ExperimentUid([1; 32]),
            experiment: ExperimentId("demo".into()),
            round: RoundId(1),
            base_model: "smollm2-135m".into(),
            base_model_hash: None,
            adapter: BlobHash::of(b"adapter"),
            adapter_len: 10,
            data: DataAssignment::Clients {
                dataset: "shakespeare".into(),
                clients: vec!["HAMLET".into()],
            },
            plan: TrainingPlan {
                local_steps: 10,
                learning_rate: 1e-3,
                batch_size: 4,
                sequence_len: 128,
                codec: Codec::default(),
                lora_alpha: 16.0,
                lora_dropout: 0.05,
                freeze_a: false,
            },
            seed: 9,
            deadline_ms: 60_000,
            max_upload_bytes: 1 << 20,
        }
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let messages = vec![
            ServerMessage::Challenge {
                protocol_version: PROTOCOL_VERSION,
                nonce: [7; 32],
            },
            ServerMessage::Task(Box::new(sample_task())),
            ServerMessage::Evaluate(Box::new(EvalSpec {
                task: TaskId(4),
                experiment: ExperimentId("demo".into()),
                after_round: Some(RoundId(0)),
                base_model: "smollm2-135m".into(),
                base_model_hash: None,
                adapter: BlobHash::of(b"adapter"),
                adapter_len: 10,
                data: sample_task().data,
                plan: sample_task().plan,
                max_sequences: 32,
                deadline_ms: 1_000,
                check: Some(LossCheckSpec {
                    delta: BlobHash::of(b"delta"),
                    delta_len: 12,
                    seed: 5,
                }),
            })),
            ServerMessage::SubmissionRejected {
                task: TaskId(3),
                hash: None,
                reason: RejectReason::NonFinite,
                detail: "nan".into(),
            },
            ServerMessage::UploadDeferred {
                task: TaskId(3),
                hash: BlobHash::of(b"delta"),
                retry_after_ms: 1_500,
            },
            ServerMessage::UploadStaged {
                task: TaskId(3),
                hash: BlobHash::of(b"delta"),
            },
        ];
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        for message in &messages {
            decoder.push(&frame_bytes(message, DEFAULT_MAX_FRAME).unwrap());
        }
        for message in messages {
            assert_eq!(
                decoder.next_message::<ServerMessage>().unwrap(),
                Some(message)
            );
        }
    }

    #[test]
    fn client_messages_round_trip_through_frames() {
        let messages = vec![
            ClientMessage::TaskAccepted { task: TaskId(1) },
            ClientMessage::EvalResult {
                task: TaskId(4),
                adapter: BlobHash::of(b"adapter"),
                loss: 3.25,
                tokens: 2048,
                baseline: Some(3.5),
            },
        ];
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        for message in &messages {
            decoder.push(&frame_bytes(message, DEFAULT_MAX_FRAME).unwrap());
        }
        for message in messages {
            assert_eq!(
                decoder.next_message::<ClientMessage>().unwrap(),
                Some(message)
            );
        }
    }

    #[test]
    fn reason_names_are_unique_and_parse() {
        for reason in RejectReason::ALL {
            assert_eq!(RejectReason::from_name(reason.as_str()), Some(reason));
        }
        let mut names: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), RejectReason::ALL.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        #[test]
        fn decoding_arbitrary_payloads_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::frame::from_payload::<ServerMessage>(&bytes);
            let _ = crate::frame::from_payload::<ClientMessage>(&bytes);
            let _ = crate::frame::from_payload::<UploadHeader>(&bytes);
        }

        #[test]
        fn flipped_bytes_of_a_valid_task_never_panic(index in 0usize..4096, value in any::<u8>()) {
            let mut payload = crate::frame::to_payload(&ServerMessage::Task(Box::new(sample_task()))).unwrap();
            let index = index % payload.len();
            payload[index] = value;
            let _ = crate::frame::from_payload::<ServerMessage>(&payload);
        }
    }
}
