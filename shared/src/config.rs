//! Experiment configuration types: what a researcher writes in `experiments/*.toml`.
//!
//! These are plain serde types with defaults and validation; reading files and environment
//! variables (the `config` crate) is the coordinator's job. Unknown keys are rejected.

use serde::{Deserialize, Serialize};

use crate::aggregate::{AggregationConfig, ServerOptimizer};
use crate::codec::Codec;
use crate::delta::{Delta, Layout, NamedTensor};
use crate::wire::{DataAssignment, TrainingPlan};

/// A whole experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Name, rounds and seed.
    pub experiment: ExperimentSection,
    /// The base model.
    #[serde(default)]
    pub model: ModelSection,
    /// The adapter being trained.
    pub adapter: AdapterSpec,
    /// How trainers are picked and rounds closed.
    #[serde(default)]
    pub selection: SelectionSection,
    /// Local training settings sent with each task.
    #[serde(default)]
    pub training: TrainingSection,
    /// What data tasks train on.
    #[serde(default)]
    pub data: DataSection,
    /// Who may join.
    #[serde(default)]
    pub admission: AdmissionSection,
    /// How deltas are combined; unset, the default follows `admission.mode`
    /// ([`ExperimentConfig::aggregation`]).
    #[serde(default)]
    pub aggregation: Option<AggregationConfig>,
    /// How the combined delta moves the adapter.
    #[serde(default)]
    pub server_optimizer: ServerOptimizer,
    /// Per-experiment limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// How merged adapters are scored on held-out data.
    #[serde(default)]
    pub evaluation: EvaluationSection,
    /// How trainers' work is checked; unset, the default follows `admission.mode`
    /// ([`ExperimentConfig::verification`]).
    #[serde(default)]
    pub verification: Option<VerificationSection>,
}

/// `[experiment]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    /// Identifier: letters, digits, `-`, `_`, `.`; at most 64 characters.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Rounds to run.
    pub rounds: u64,
    /// Seed for the initial adapter (selection and task seeds come from a fresh secret per round).
    #[serde(default)]
    pub seed: u64,
    /// Serve every volunteer's individual delta to anyone from the hub (a fully transparent
    /// experiment). Off by default: merged adapters are public, deltas only to auditors.
    #[serde(default)]
    pub publish_deltas: bool,
}

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// The base model's name, e.g. `smollm2-135m-instruct-q4_1`.
    pub name: String,
    /// The base model's hub id (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`), written into
    /// published adapters so PEFT can load the base; defaults to `name`.
    pub hub_id: Option<String>,
    /// blake3 of the base model file (hex). Pins the model: trainers use a local file only
    /// when it has this hash, and a coordinator serving the file checks it.
    pub hash: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            name: "synthetic".into(),
            hub_id: None,
            hash: None,
        }
    }
}

impl ModelSection {
    /// The id published adapters name as their base model.
    pub fn hub_id(&self) -> &str {
        self.hub_id.as_deref().unwrap_or(&self.name)
    }
}

/// `[adapter]`: the trained tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdapterSpec {
    /// Made-up tensors holding `params` values in total (tests, load generation).
    Synthetic {
        /// Total values.
        params: u64,
        /// Number of tensors they are split into.
        #[serde(default = "default_synthetic_tensors")]
        tensors: u32,
    },
    /// LoRA on a Llama-family decoder, named as PEFT names it.
    Lora {
        /// Decoder layers.
        layers: u32,
        /// Model width.
        hidden_size: u32,
        /// Width of the k and v projections (heads × head size of the KV heads).
        kv_size: u32,
        /// Width of the q projection's output and the o projection's input (heads × head
        /// size); absent when it equals `hidden_size`, as in Llama, Qwen2 and SmolLM2. Qwen3 and
        /// some Mistral models have heads wider than `hidden_size / heads`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        q_size: Option<u32>,
        /// MLP width.
        intermediate_size: u32,
        /// LoRA rank.
        rank: u32,
        /// LoRA alpha (the scale is alpha / rank).
        alpha: f32,
        /// Target modules among `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`.
        targets: Vec<String>,
    },
}

fn default_synthetic_tensors() -> u32 {
    4
}

/// The LoRA target modules this crate knows, with their attention/MLP parent.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl AdapterSpec {
    /// Names and shapes of the adapter's tensors.
    pub fn layout(&self) -> Result<Layout, ConfigError> {
        match self {
            Self::Synthetic { params, tensors } => {
                let params = *params as usize;
                let count = (*tensors).max(1) as usize;
                let mut out = Vec::with_capacity(count);
                for index in 0..count {
                    let len = params / count + usize::from(index < params % count);
                    out.push((format!("synthetic.{index:04}.weight"), vec![len]));
                }
                Ok(Layout::new(out))
            }
            Self::Lora {
                layers,
                hidden_size,
                kv_size,
                q_size,
                intermediate_size,
                rank,
                targets,
                ..
            } => {
                let (hidden, kv, inter, rank) = (
                    *hidden_size as usize,
                    *kv_size as usize,
                    *intermediate_size as usize,
                    *rank as usize,
                );
                let q = q_size.map_or(hidden, |q| q as usize);
                let mut out = Vec::new();
                for layer in 0..*layers {
                    for target in targets {
                        let (parent, d_in, d_out) = match target.as_str() {
                            "q_proj" => ("self_attn", hidden, q),
                            "k_proj" | "v_proj" => ("self_attn", hidden, kv),
                            "o_proj" => ("self_attn", q, hidden),
                            "gate_proj" | "up_proj" => ("mlp", hidden, inter),
                            "down_proj" => ("mlp", inter, hidden),
                            other => {
                                return Err(ConfigError::invalid(
                                    "adapter.targets",
                                    format!("unknown module {other:?}; known: {LORA_TARGETS:?}"),
                                ))
                            }
                        };
                        let prefix =
                            format!("base_model.model.model.layers.{layer}.{parent}.{target}");
                        out.push((format!("{prefix}.lora_A.weight"), vec![rank, d_in]));
                        out.push((format!("{prefix}.lora_B.weight"), vec![d_out, rank]));
                    }
                }
                Ok(Layout::new(out))
            }
        }
    }

    /// The round-0 adapter, a pure function of the spec and `seed`.
    ///
    /// LoRA: `lora_A` uniform in ±1/sqrt(d_in) (Kaiming-uniform with a = sqrt(5), as PEFT does),
    /// `lora_B` zero, so the adapter starts as the identity. Synthetic: zeros.
    pub fn initial_adapter(&self, seed: u64) -> Result<Delta, ConfigError> {
        let layout = self.layout()?;
        let mut rng = SplitMix64(seed ^ 0x7472_6962_7574_6172);
        let mut tensors = Vec::with_capacity(layout.tensors.len());
        for (name, shape) in layout.tensors {
            let len: usize = shape.iter().product();
            let values = if name.ends_with(".lora_A.weight") {
                let bound = 1.0 / (shape[1] as f32).sqrt();
                (0..len)
                    .map(|_| (rng.next_unit() * 2.0 - 1.0) * bound)
                    .collect()
            } else {
                vec![0.0; len]
            };
            tensors.push(
                NamedTensor::new(name, shape, values)
                    .map_err(|error| ConfigError::invalid("adapter", error.to_string()))?,
            );
        }
        Delta::new(tensors).map_err(|error| ConfigError::invalid("adapter", error.to_string()))
    }
}

/// A small, stable PRNG (SplitMix64): its output is fixed forever, unlike library RNGs whose
/// streams may change between versions, so initial adapters are reproducible from the ledger.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniform in [0, 1).
    pub fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `[selection]`: picking trainers and closing rounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelectionSection {
    /// Accepted deltas that close a round at once.
    pub trainers_per_round: u32,
    /// Tasks handed out per round = ceil(trainers_per_round × over_selection).
    pub over_selection: f64,
    /// Fewest accepted deltas with which a round may close at its deadline.
    pub quorum: u32,
    /// Connected trainers needed before the first task of a round is sent.
    pub min_trainers: u32,
    /// Seconds from a round's first task to its deadline.
    pub round_timeout_secs: f64,
    /// Seconds to wait for `min_trainers` before starting with fewer (at least `quorum`).
    pub gather_timeout_secs: f64,
}

impl Default for SelectionSection {
    fn default() -> Self {
        Self {
            trainers_per_round: 3,
            over_selection: 1.0,
            quorum: 2,
            min_trainers: 3,
            round_timeout_secs: 600.0,
            gather_timeout_secs: 60.0,
        }
    }
}

impl SelectionSection {
    /// Tasks to hand out in a round.
    pub fn tasks_per_round(&self) -> u32 {
        (f64::from(self.trainers_per_round) * self.over_selection).ceil() as u32
    }
}

/// `[training]`: local hyper-parameters sent in each task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSection {
    /// Local optimizer steps per task.
    pub local_steps: u32,
    /// Peak local learning rate.
    pub learning_rate: f32,
    /// Sequences per step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub sequence_len: u32,
    /// Delta compression.
    pub codec: Codec,
    /// Dropout on the LoRA branch's input while training.
    pub lora_dropout: f32,
    /// Keep `lora_A` at its seeded initial value and train `lora_B` only (FFA-LoRA): averaging
    /// is then exact, and `lora_A` deltas are zero (they compress to almost nothing).
    pub freeze_a: bool,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            local_steps: 10,
            learning_rate: 1e-3,
            batch_size: 4,
            sequence_len: 128,
            codec: Codec::default(),
            lora_dropout: 0.05,
            freeze_a: false,
        }
    }
}

impl TrainingSection {
    /// The plan carried in a task for adapters shaped by `adapter`.
    pub fn plan(&self, adapter: &AdapterSpec) -> TrainingPlan {
        let lora_alpha = match adapter {
            AdapterSpec::Lora { alpha, .. } => *alpha,
            AdapterSpec::Synthetic { .. } => 0.0,
        };
        TrainingPlan {
            local_steps: self.local_steps,
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            sequence_len: self.sequence_len,
            codec: self.codec,
            lora_alpha,
            lora_dropout: self.lora_dropout,
            freeze_a: self.freeze_a,
        }
    }
}

/// `[data]`: what tasks train on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// `synthetic`, `local`, or a public dataset name such as `shakespeare`.
    pub dataset: String,
    /// Client ids to assign (public datasets).
    pub clients: Vec<String>,
    /// Clients per task.
    pub clients_per_task: u32,
    /// Samples per task (synthetic data).
    pub samples_per_task: u64,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            dataset: "synthetic".into(),
            clients: Vec::new(),
            clients_per_task: 1,
            samples_per_task: 64,
        }
    }
}

/// `[evaluation]`: the coordinator hands an evaluation task to a trainer for every adapter the
/// experiment reaches (the initial one, then each round's merged one); the trainer scores it on
/// held-out text and reports the loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationSection {
    /// On or off; unset means on for public datasets and off for `synthetic` and `local` data
    /// (a volunteer's own data is not a shared yardstick; `local` cannot be evaluated, and
    /// `synthetic` only when asked: synthetic trainers score their made-up objective).
    pub enabled: Option<bool>,
    /// Clients whose held-out split is scored; empty means every client in `[data]`. Clients
    /// that no task trains on measure how well the adapter carries over to unseen ones.
    pub clients: Vec<String>,
    /// Most held-out sequences scored per evaluation (spread over the clients).
    pub max_sequences: u32,
    /// Seconds a trainer has to report before the evaluation goes to another trainer.
    pub timeout_secs: f64,
    /// Trainers, drawn at random, that score each adapter; the score kept is their median, so
    /// one liar cannot fake it. With a fleet smaller than this, an adapter waits a timeout for
    /// more evaluators and is then scored by those it had.
    pub evaluators: u32,
}

impl Default for EvaluationSection {
    fn default() -> Self {
        Self {
            enabled: None,
            clients: Vec::new(),
            max_sequences: 32,
            timeout_secs: 600.0,
            evaluators: 3,
        }
    }
}

impl EvaluationSection {
    /// The held-out data evaluations score, or `None` when evaluation is off.
    pub fn assignment(&self, data: &DataSection) -> Option<DataAssignment> {
        let public = data.dataset != "synthetic" && data.dataset != "local";
        if !self.enabled.unwrap_or(public) || data.dataset == "local" {
            return None;
        }
        let clients = if self.clients.is_empty() {
            data.clients.clone()
        } else {
            self.clients.clone()
        };
        Some(DataAssignment::Clients {
            dataset: data.dataset.clone(),
            clients,
        })
    }
}

/// `[verification]`: spot re-execution. A share of tasks is also given, unannounced, to a second
/// trainer with the same start adapter, data, seed and hyper-parameters, and the two deltas are
/// compared ([`crate::replica`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerificationSection {
    /// Share of tasks replicated, 0 to 1; 0 turns checking off. Each replica costs one more
    /// task's training, so this is also the extra compute spent on checking.
    pub replicate: f64,
    /// Largest relative L2 distance `‖a − b‖ / max(‖a‖, ‖b‖)` between a task's two deltas that
    /// still agrees.
    pub max_distance: f64,
    /// Smallest cosine similarity between them that still agrees.
    pub min_cosine: f64,
    /// Flags (disputes a referee settled against a trainer, failed loss checks) after which a
    /// trainer gets no more tasks; a trainer with one flag is back on probation, never checks
    /// anyone, and its later deltas do not count.
    pub exclude_after: u32,
    /// Share of counted deltas, 0 to 1, whose loss on their own training data is checked: the
    /// experiment's evaluators score the start adapter and the start adapter plus the delta on
    /// the sequences the task trained on, and a delta whose median improvement is not positive
    /// is flagged as not trained. Needs evaluation on (a text dataset); two forward passes over
    /// at most `[evaluation] max_sequences` sequences per evaluator.
    pub loss_check: f64,
}

impl Default for VerificationSection {
    fn default() -> Self {
        Self {
            replicate: 0.1,
            max_distance: 0.1,
            min_cosine: 0.99,
            exclude_after: 2,
            loss_check: 0.1,
        }
    }
}

impl VerificationSection {
    /// Checking switched off.
    pub const OFF: VerificationSection = VerificationSection {
        replicate: 0.0,
        max_distance: 0.1,
        min_cosine: 0.99,
        exclude_after: 2,
        loss_check: 0.0,
    };

    /// The tolerance two deltas of one task are judged by.
    pub fn tolerance(&self) -> crate::replica::Tolerance {
        crate::replica::Tolerance {
            max_distance: self.max_distance,
            min_cosine: self.min_cosine,
        }
    }
}

/// Who may join an experiment: `[admission]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionSection {
    /// `open` (anyone: a volunteer network of strangers), `token` (a trainer presents an
    /// enrollment token from `tokens_file`) or `allowlist` (only the keys in `allowlist_file`).
    pub mode: AdmissionMode,
    /// Token mode: a file of `BLAKE3-HEX MAX-IDENTITIES` lines, the hashes of the enrollment
    /// tokens and how many trainer identities each may bring (`tributary-coordinator token`
    /// writes them). The file never holds a token itself.
    pub tokens_file: Option<String>,
    /// Allowlist mode: a file of trainer public keys, hex, one a line.
    pub allowlist_file: Option<String>,
    /// Trainer identities connected at once from one IPv4 address or IPv6 /64.
    pub identities_per_address: u32,
    /// Most of a round's tasks (a fraction) that go to identities on probation: those with no
    /// delta accepted in an earlier round of the experiment. Unset: 0.5 for an open experiment
    /// (a flood of fresh Sybils never outnumbers the volunteers who already did work), 1 (no
    /// limit) for token and allowlist fleets.
    pub probation_share: Option<f64>,
}

impl AdmissionSection {
    /// The share of a round's tasks open to identities on probation.
    pub fn probation_share(&self) -> f64 {
        self.probation_share.unwrap_or(match self.mode {
            AdmissionMode::Open => 0.5,
            AdmissionMode::Token | AdmissionMode::Allowlist => 1.0,
        })
    }
}

impl Default for AdmissionSection {
    fn default() -> Self {
        Self {
            mode: AdmissionMode::Open,
            tokens_file: None,
            allowlist_file: None,
            identities_per_address: 8,
            probation_share: None,
        }
    }
}

/// Who may join; see [`AdmissionSection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdmissionMode {
    /// Anyone.
    Open,
    /// Holders of an enrollment token.
    Token,
    /// Listed keys only.
    Allowlist,
}

/// `[limits]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest accepted upload; 0 means 2 × the raw f32 size of the adapter + 64 KiB.
    pub max_upload_bytes: u64,
    /// Largest sample count a submission may claim. It is the delta's FedAvg weight, so an
    /// unbounded claim would let one trainer outweigh all others.
    pub max_sample_count: u64,
    /// Largest absolute value a delta may hold; larger values are refused like NaN.
    pub max_abs_value: f32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_upload_bytes: 0,
            max_sample_count: 1_000_000,
            max_abs_value: 1e4,
        }
    }
}

/// A configuration value that is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid value for `{key}`: {detail}")]
pub struct ConfigError {
    /// The dotted key, e.g. `selection.quorum`.
    pub key: String,
    /// What is wrong.
    pub detail: String,
}

impl ConfigError {
    /// An error about `key`.
    pub fn invalid(key: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            detail: detail.into(),
        }
    }
}

impl ExperimentConfig {
    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.experiment.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::invalid(
                "experiment.name",
                format!("{name:?} must be 1-64 letters, digits, '-', '_' or '.'"),
            ));
        }
        if let Some(hash) = &self.model.hash {
            if hash.parse::<crate::BlobHash>().is_err() {
                return Err(ConfigError::invalid(
                    "model.hash",
                    "must be a blake3 hash: 64 hex digits",
                ));
            }
        }
        if self.experiment.rounds == 0 {
            return Err(ConfigError::invalid(
                "experiment.rounds",
                "must be at least 1",
            ));
        }
        let selection = &self.selection;
        if selection.trainers_per_round == 0 {
            return Err(ConfigError::invalid(
                "selection.trainers_per_round",
                "must be at least 1",
            ));
        }
        if !(selection.over_selection.is_finite() && selection.over_selection >= 1.0) {
            return Err(ConfigError::invalid(
                "selection.over_selection",
                "must be a number >= 1",
            ));
        }
        if selection.quorum == 0 || selection.quorum > selection.trainers_per_round {
            return Err(ConfigError::invalid(
                "selection.quorum",
                "must be between 1 and selection.trainers_per_round",
            ));
        }
        if selection.min_trainers < selection.quorum {
            return Err(ConfigError::invalid(
                "selection.min_trainers",
                "must be at least selection.quorum",
            ));
        }
        for (key, secs) in [
            ("selection.round_timeout_secs", selection.round_timeout_secs),
            (
                "selection.gather_timeout_secs",
                selection.gather_timeout_secs,
            ),
        ] {
            if !(secs.is_finite() && secs > 0.0 && secs < 1e7) {
                return Err(ConfigError::invalid(
                    key,
                    "must be a positive number of seconds",
                ));
            }
        }
        let training = &self.training;
        if training.local_steps == 0 || training.batch_size == 0 || training.sequence_len == 0 {
            return Err(ConfigError::invalid(
                "training",
                "local_steps, batch_size and sequence_len must be at least 1",
            ));
        }
        if !(training.learning_rate.is_finite() && training.learning_rate > 0.0) {
            return Err(ConfigError::invalid(
                "training.learning_rate",
                "must be a positive number",
            ));
        }
        if !(0.0..1.0).contains(&training.lora_dropout) {
            return Err(ConfigError::invalid(
                "training.lora_dropout",
                "must be in [0, 1)",
            ));
        }
        training
            .codec
            .validate()
            .map_err(|error| ConfigError::invalid("training.codec", error.to_string()))?;
        self.aggregation()
            .validate()
            .map_err(|error| ConfigError::invalid("aggregation", error.to_string()))?;
        let admission = &self.admission;
        match admission.mode {
            AdmissionMode::Token if admission.tokens_file.is_none() => {
                return Err(ConfigError::invalid(
                    "admission.tokens_file",
                    "token mode needs a tokens file",
                ));
            }
            AdmissionMode::Allowlist if admission.allowlist_file.is_none() => {
                return Err(ConfigError::invalid(
                    "admission.allowlist_file",
                    "allowlist mode needs an allowlist file",
                ));
            }
            _ => {}
        }
        if let Some(share) = admission.probation_share {
            if !(share > 0.0 && share <= 1.0) {
                return Err(ConfigError::invalid(
                    "admission.probation_share",
                    "must be in (0, 1]",
                ));
            }
        }
        if admission.identities_per_address == 0 {
            return Err(ConfigError::invalid(
                "admission.identities_per_address",
                "must be at least 1",
            ));
        }
        self.server_optimizer
            .validate()
            .map_err(|error| ConfigError::invalid("server_optimizer", error.to_string()))?;
        match &self.adapter {
            AdapterSpec::Synthetic { params, tensors } => {
                if *params == 0 || *tensors == 0 || u64::from(*tensors) > *params {
                    return Err(ConfigError::invalid(
                        "adapter.params",
                        "needs params >= tensors >= 1",
                    ));
                }
                if *params > 1 << 30 {
                    return Err(ConfigError::invalid("adapter.params", "at most 2^30"));
                }
            }
            AdapterSpec::Lora {
                layers,
                hidden_size,
                kv_size,
                q_size,
                intermediate_size,
                rank,
                alpha,
                targets,
            } => {
                let sizes = [*layers, *hidden_size, *kv_size, *intermediate_size, *rank];
                if sizes.contains(&0) || *q_size == Some(0) {
                    return Err(ConfigError::invalid(
                        "adapter",
                        "layers, sizes and rank must be at least 1",
                    ));
                }
                if !(alpha.is_finite() && *alpha > 0.0) {
                    return Err(ConfigError::invalid("adapter.alpha", "must be positive"));
                }
                if targets.is_empty() {
                    return Err(ConfigError::invalid("adapter.targets", "must not be empty"));
                }
            }
        }
        self.adapter.layout()?;
        if self.limits.max_sample_count == 0 {
            return Err(ConfigError::invalid(
                "limits.max_sample_count",
                "must be at least 1",
            ));
        }
        if !(self.limits.max_abs_value.is_finite() && self.limits.max_abs_value > 0.0) {
            return Err(ConfigError::invalid(
                "limits.max_abs_value",
                "must be a positive number",
            ));
        }
        if self.data.dataset.is_empty() {
            return Err(ConfigError::invalid("data.dataset", "must not be empty"));
        }
        if self.data.dataset != "synthetic" && self.data.dataset != "local" {
            if self.data.clients.is_empty() {
                return Err(ConfigError::invalid(
                    "data.clients",
                    "a public dataset needs a list of client ids",
                ));
            }
            if self.data.clients_per_task == 0 {
                return Err(ConfigError::invalid(
                    "data.clients_per_task",
                    "must be at least 1",
                ));
            }
        }
        if let Some(verification) = &self.verification {
            if !(0.0..=1.0).contains(&verification.replicate) {
                return Err(ConfigError::invalid(
                    "verification.replicate",
                    "must be a share of tasks between 0 and 1",
                ));
            }
            if !(0.0..=1.0).contains(&verification.loss_check) {
                return Err(ConfigError::invalid(
                    "verification.loss_check",
                    "must be a share of deltas between 0 and 1",
                ));
            }
            if verification.replicate > 0.0 && self.data.dataset == "local" {
                return Err(ConfigError::invalid(
                    "verification.replicate",
                    "must be 0 for `local` data: a volunteer's own data cannot be replicated",
                ));
            }
            if !(verification.max_distance.is_finite() && verification.max_distance >= 0.0) {
                return Err(ConfigError::invalid(
                    "verification.max_distance",
                    "must be a finite number at least 0",
                ));
            }
            if verification.exclude_after == 0 {
                return Err(ConfigError::invalid(
                    "verification.exclude_after",
                    "must be at least 1",
                ));
            }
            if !(-1.0..=1.0).contains(&verification.min_cosine) {
                return Err(ConfigError::invalid(
                    "verification.min_cosine",
                    "must be between -1 and 1",
                ));
            }
        }
        let evaluation = &self.evaluation;
        if evaluation.enabled == Some(true) && evaluation.assignment(&self.data).is_none() {
            return Err(ConfigError::invalid(
                "evaluation.enabled",
                "needs a shared dataset in [data] (a volunteer's local data is no yardstick)",
            ));
        }
        if !(1..=64).contains(&evaluation.evaluators) {
            return Err(ConfigError::invalid(
                "evaluation.evaluators",
                "must be from 1 to 64",
            ));
        }
        if evaluation.max_sequences == 0 {
            return Err(ConfigError::invalid(
                "evaluation.max_sequences",
                "must be at least 1",
            ));
        }
        if !(evaluation.timeout_secs.is_finite()
            && evaluation.timeout_secs > 0.0
            && evaluation.timeout_secs < 1e7)
        {
            return Err(ConfigError::invalid(
                "evaluation.timeout_secs",
                "must be a positive number of seconds",
            ));
        }
        Ok(())
    }

    /// How deltas are combined: the `[aggregation]` section when given. A coordinator pins the
    /// default into the stored configuration when it creates an experiment
    /// ([`ExperimentConfig::pinned`]), so a later change of defaults never changes how a stored
    /// round re-derives; a stored configuration without one predates pinning and means the
    /// default of its time (clipping and trimming, no agreement filter, when open).
    pub fn aggregation(&self) -> AggregationConfig {
        self.aggregation
            .unwrap_or_else(|| match self.admission.mode {
                AdmissionMode::Open => AggregationConfig {
                    min_agreement: None,
                    ..AggregationConfig::robust()
                },
                AdmissionMode::Token | AdmissionMode::Allowlist => AggregationConfig::default(),
            })
    }

    /// This configuration with the current defaults written in where it has none: for the
    /// aggregation, robust ([`AggregationConfig::robust`]) for an open experiment and plain
    /// FedAvg for a closed fleet (token or allowlist admission); for verification, 10 % of
    /// tasks replicated in an open experiment on shared data, none for a closed fleet or on
    /// `local` data (a volunteer's own data cannot be given to a second trainer). What a new
    /// experiment stores.
    pub fn pinned(&self) -> ExperimentConfig {
        let mut pinned = self.clone();
        pinned.aggregation.get_or_insert(match self.admission.mode {
            AdmissionMode::Open => AggregationConfig::robust(),
            AdmissionMode::Token | AdmissionMode::Allowlist => AggregationConfig::default(),
        });
        let open = self.admission.mode == AdmissionMode::Open;
        pinned
            .verification
            .get_or_insert(if open && self.data.dataset != "local" {
                VerificationSection::default()
            } else {
                VerificationSection::OFF
            });
        pinned
    }

    /// How work is checked: the `[verification]` section when given. A coordinator pins the
    /// default into a new experiment ([`ExperimentConfig::pinned`]); a stored configuration
    /// without one predates checking and means none.
    pub fn verification(&self) -> VerificationSection {
        self.verification.unwrap_or(VerificationSection::OFF)
    }

    /// What one task is worth as a FedAvg weight, derived from what the task asks for: the
    /// samples of a synthetic task, else the tokens of its local steps (steps × batch ×
    /// sequence length). A trainer's claim can lower a delta's weight below it, never raise it.
    pub fn task_budget(&self) -> u64 {
        if self.data.dataset == "synthetic" {
            self.data.samples_per_task.max(1)
        } else {
            (u64::from(self.training.local_steps)
                * u64::from(self.training.batch_size)
                * u64::from(self.training.sequence_len))
            .max(1)
        }
    }

    /// The upload cap in bytes for this experiment's adapter.
    pub fn max_upload_bytes(&self) -> u64 {
        if self.limits.max_upload_bytes > 0 {
            return self.limits.max_upload_bytes;
        }
        let raw = self
            .adapter
            .layout()
            .map(|layout| layout.element_count() as u64 * 4)
            .unwrap_or(0);
        raw.saturating_mul(2).saturating_add(64 * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(params: u64) -> ExperimentConfig {
        ExperimentConfig {
            experiment: ExperimentSection {
                name: "test".into(),
                description: String::new(),
                rounds: 2,
                seed: 1,
                publish_deltas: false,
            },
            model: ModelSection::default(),
            adapter: AdapterSpec::Synthetic { params, tensors: 3 },
            selection: SelectionSection::default(),
            training: TrainingSection::default(),
            data: DataSection::default(),
            admission: AdmissionSection::default(),
            aggregation: None,
            server_optimizer: ServerOptimizer::default(),
            limits: LimitsSection::default(),
            evaluation: EvaluationSection::default(),
            verification: None,
        }
    }

    #[test]
    fn the_default_aggregation_is_pinned_when_stored_and_old_stored_configs_keep_theirs() {
        use crate::aggregate::AggregationConfig;
        let mut open = synthetic(10);
        open.aggregation = None;
        assert_eq!(open.pinned().aggregation, Some(AggregationConfig::robust()));
        assert_eq!(open.pinned().aggregation(), AggregationConfig::robust());
        // Stored before pinning: the default of its time, without the agreement filter.
        assert_eq!(open.aggregation().min_agreement, None);
        assert_eq!(open.aggregation().clip_to_median, Some(2.0));
        let mut closed = open.clone();
        closed.admission.mode = AdmissionMode::Allowlist;
        assert_eq!(
            closed.pinned().aggregation,
            Some(AggregationConfig::default())
        );
        // An explicit section is kept as written.
        let explicit = AggregationConfig {
            clip_norm: Some(3.0),
            ..AggregationConfig::default()
        };
        open.aggregation = Some(explicit);
        assert_eq!(open.pinned().aggregation, Some(explicit));
    }

    #[test]
    fn verification_is_pinned_on_for_open_shared_data_and_off_otherwise() {
        let mut open = synthetic(10);
        open.verification = None;
        assert_eq!(
            open.verification().replicate,
            0.0,
            "stored before checking: none"
        );
        assert_eq!(
            open.pinned().verification,
            Some(VerificationSection::default())
        );
        assert!(open.pinned().verification().replicate > 0.0);
        let mut closed = open.clone();
        closed.admission.mode = AdmissionMode::Token;
        assert_eq!(closed.pinned().verification().replicate, 0.0);
        let mut local = open.clone();
        local.data.dataset = "local".into();
        assert_eq!(local.pinned().verification().replicate, 0.0);
        local.verification = Some(VerificationSection::default());
        assert_eq!(local.validate().unwrap_err().key, "verification.replicate");
        for (key, section) in [
            (
                "verification.replicate",
                VerificationSection {
                    replicate: 1.5,
                    ..Default::default()
                },
            ),
            (
                "verification.max_distance",
                VerificationSection {
                    max_distance: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "verification.min_cosine",
                VerificationSection {
                    min_cosine: 2.0,
                    ..Default::default()
                },
            ),
        ] {
            open.verification = Some(section);
            assert_eq!(open.validate().unwrap_err().key, key);
        }
        let parsed: VerificationSection = serde_json::from_str(r#"{"replicate": 0.25}"#).unwrap();
        assert_eq!(parsed.replicate, 0.25);
        assert_eq!(parsed.loss_check, 0.1, "unset keys take the defaults");
        assert_eq!(
            parsed.max_distance,
            VerificationSection::default().max_distance
        );
    }

    #[test]
    fn evaluation_defaults_to_every_client_of_a_public_dataset() {
        let mut config = synthetic(10);
        assert_eq!(config.evaluation.assignment(&config.data), None);
        // Synthetic trainers can score their made-up objective when asked to.
        config.evaluation.enabled = Some(true);
        assert!(config.validate().is_ok());
        assert!(config.evaluation.assignment(&config.data).is_some());
        // A volunteer's own data is no yardstick.
        config.data.dataset = "local".into();
        assert_eq!(config.validate().unwrap_err().key, "evaluation.enabled");
        config.data = DataSection {
            dataset: "shakespeare".into(),
            clients: vec!["a".into(), "b".into()],
            ..DataSection::default()
        };
        config.evaluation.enabled = None;
        assert!(config.validate().is_ok());
        let all = DataAssignment::Clients {
            dataset: "shakespeare".into(),
            clients: vec!["a".into(), "b".into()],
        };
        assert_eq!(config.evaluation.assignment(&config.data), Some(all));
        config.evaluation.clients = vec!["unseen".into()];
        let unseen = DataAssignment::Clients {
            dataset: "shakespeare".into(),
            clients: vec!["unseen".into()],
        };
        assert_eq!(config.evaluation.assignment(&config.data), Some(unseen));
        config.evaluation.enabled = Some(false);
        assert_eq!(config.evaluation.assignment(&config.data), None);
        config.evaluation.enabled = None;
        config.evaluation.max_sequences = 0;
        assert_eq!(
            config.validate().unwrap_err().key,
            "evaluation.max_sequences"
        );
    }

    #[test]
    fn synthetic_layout_splits_params() {
        let layout = synthetic(10).adapter.layout().unwrap();
        let sizes: Vec<usize> = layout.tensors.iter().map(|(_, s)| s[0]).collect();
        assert_eq!(sizes, vec![4, 3, 3]);
        assert_eq!(layout.element_count(), 10);
    }

    #[test]
    fn lora_layout_uses_peft_names_and_shapes() {
        let spec = AdapterSpec::Lora {
            layers: 2,
            hidden_size: 8,
            kv_size: 4,
            q_size: None,
            intermediate_size: 16,
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        };
        let layout = spec.layout().unwrap();
        assert_eq!(layout.tensors.len(), 8);
        let a = layout
            .tensors
            .iter()
            .find(|(n, _)| n == "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight")
            .unwrap();
        assert_eq!(a.1, vec![2, 8]);
        let b = layout
            .tensors
            .iter()
            .find(|(n, _)| n == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
            .unwrap();
        assert_eq!(b.1, vec![4, 2]);
        let adapter = spec.initial_adapter(7).unwrap();
        assert_eq!(adapter, spec.initial_adapter(7).unwrap());
        assert_ne!(adapter, spec.initial_adapter(8).unwrap());
        let b_values = adapter.get(&b.0).unwrap().values();
        assert!(b_values.iter().all(|v| *v == 0.0));
        let a_values = adapter.get(&a.0).unwrap().values();
        assert!(a_values.iter().all(|v| v.abs() <= 1.0 / 8f32.sqrt()));
        // Heads wider than hidden / heads (Qwen3): q's output and o's input follow q_size.
        let wide = AdapterSpec::Lora {
            layers: 2,
            hidden_size: 8,
            kv_size: 4,
            q_size: Some(12),
            intermediate_size: 16,
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "o_proj".into()],
        };
        let shapes: Vec<Vec<usize>> = wide.layout().unwrap().tensors[..4]
            .iter()
            .map(|(_, shape)| shape.clone())
            .collect();
        // Sorted by name: o_proj (in 12, out 8), then q_proj (in 8, out 12).
        assert_eq!(shapes, [vec![2, 12], vec![8, 2], vec![2, 8], vec![12, 2]]);
        // Absent q_size is not written, so existing experiment files keep their bytes.
        assert!(!serde_json::to_string(&spec).unwrap().contains("q_size"));
        assert!(serde_json::to_string(&wide)
            .unwrap()
            .contains("\"q_size\":12"));
        assert!(a_values.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn validation_names_the_key() {
        let mut config = synthetic(10);
        assert!(config.validate().is_ok());
        config.selection.quorum = 0;
        assert_eq!(config.validate().unwrap_err().key, "selection.quorum");
        let mut config = synthetic(10);
        config.experiment.name = "bad name!".into();
        assert_eq!(config.validate().unwrap_err().key, "experiment.name");
        let mut config = synthetic(10);
        config.adapter = AdapterSpec::Lora {
            layers: 1,
            hidden_size: 4,
            kv_size: 4,
            q_size: None,
            intermediate_size: 4,
            rank: 1,
            alpha: 1.0,
            targets: vec!["x_proj".into()],
        };
        assert_eq!(config.validate().unwrap_err().key, "adapter.targets");
    }
}
