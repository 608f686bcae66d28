//! `tributary-trainer study`: do the clients learn from each other? One process runs, on the same
//! clients and the same budget, the base model, each client's local-only adapter, federated
//! averaging (FedAvg: several local steps a round), FedSGD-style rounds (one local step a round)
//! and a centrally trained adapter on the pooled data, and scores each on every client's held-out
//! text.
//!
//! The federated arms use the code the real system uses: each client's update is trained by
//! [`train::train`] exactly as a `join` task trains it (constant learning rate, fresh AdamW per
//! task), compressed with the experiment codec and the client's error-feedback residual,
//! decoded, combined by the shared crate's FedAvg and applied by its server optimizer. What is
//! left out is only the network, which changes no number (the end-to-end tests cover it).

use serde::{Deserialize, Serialize};
use tributary_shared::aggregate::{
    aggregate, AggregationConfig, Contribution, OptimizerState, ServerOptimizer,
};
use tributary_shared::codec::{self, Codec, ErrorFeedback};
use tributary_shared::delta::Delta;
use tributary_shared::BlobHash;

use crate::attack::Attack;
use crate::data::PackedData;
use crate::lora::{LoraAdapter, LoraError, LoraSettings};
use crate::model::Llama;
use crate::optim::OptimSettings;
use crate::train::{self, TrainSettings};

/// One client: its training sequences and its held-out sequences.
#[derive(Debug, Clone)]
pub struct StudyClient {
    /// Client id (e.g. `hamlet:HAMLET`).
    pub id: String,
    /// Training sequences.
    pub train: PackedData,
    /// Held-out sequences (scored, never trained on).
    pub held_out: PackedData,
}

/// The budget and hyper-parameters shared by every arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudySettings {
    /// FedAvg rounds.
    pub rounds: u32,
    /// FedAvg local steps per client per round.
    pub local_steps: u32,
    /// Most FedSGD rounds (one local step each) before giving up on the target.
    pub fedsgd_max_rounds: u32,
    /// Sequences per step.
    pub batch_size: usize,
    /// Local learning rate (constant, as in `join` tasks).
    pub learning_rate: f64,
    /// LoRA settings.
    #[serde(default)]
    pub lora: LoraSettings,
    /// Delta compression of the federated arms.
    #[serde(default)]
    pub codec: Codec,
    /// Seed of the initial adapter, data order and dropout.
    pub seed: u64,
}

/// A score on every client's held-out text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    /// Held-out loss per client, in the clients' order.
    pub per_client: Vec<f64>,
    /// Their mean.
    pub mean: f64,
}

/// Everything the study measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudyResults {
    /// The settings.
    pub settings: StudySettings,
    /// Client ids.
    pub clients: Vec<String>,
    /// The base model.
    pub base: Scores,
    /// Client `i`'s adapter trained on its own data only for `rounds × local_steps` steps (the
    /// compute it gives the federation), scored on every client.
    pub local: Vec<Scores>,
    /// The FedAvg adapter after each round.
    pub fedavg: Vec<Scores>,
    /// The FedSGD adapter after each round (stops once the target is reached).
    pub fedsgd: Vec<Scores>,
    /// An adapter trained on all clients' data pooled, with the federation's total compute
    /// (`clients × rounds × local_steps` steps).
    pub central: Scores,
    /// The mean held-out loss counted as "reached": halfway from the base model to the final
    /// FedAvg adapter.
    pub target: f64,
    /// First FedAvg round (1-based) at or below the target.
    pub fedavg_rounds_to_target: Option<usize>,
    /// First FedSGD round (1-based) at or below the target.
    pub fedsgd_rounds_to_target: Option<usize>,
    /// Compressed bytes uploaded by the FedAvg arm, and their raw f32 size.
    pub fedavg_bytes: (u64, u64),
}

/// Runs every arm. `progress` receives one line per finished piece of work.
pub fn run(
    model: &Llama,
    clients: &[StudyClient],
    settings: &StudySettings,
    mut progress: impl FnMut(&str),
) -> Result<StudyResults, StudyError> {
    if clients.is_empty() {
        return Err(StudyError::Setup(
            "a study needs at least one client".into(),
        ));
    }
    let config = model.config();
    let device = model.device();
    let initial = LoraAdapter::init(&settings.lora, config, settings.seed, device)?;
    let initial_delta = initial.to_delta();
    let score = |adapter: Option<&LoraAdapter>| score(model, clients, adapter);
    let train_settings = |steps: u64, seed: u64| settings.train_settings(steps, seed);

    let base = score(None);
    progress(&format!("base model: mean held-out loss {:.4}", base.mean));

    let budget = u64::from(settings.rounds) * u64::from(settings.local_steps);
    let mut local = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let mut adapter = LoraAdapter::from_delta(&initial_delta, &settings.lora, config, device)?;
        let seed = settings.seed ^ (0x10CA1 + index as u64);
        train::train(
            model,
            &mut adapter,
            &client.train,
            &train_settings(budget, seed),
            |_| {},
        );
        let scores = score(Some(&adapter));
        progress(&format!(
            "local-only {}: own held-out {:.4}, mean {:.4}",
            client.id, scores.per_client[index], scores.mean
        ));
        local.push(scores);
    }

    let mut federation = Federation::new(model, clients, settings, &initial_delta);
    let mut fedavg = Vec::new();
    for round in 0..settings.rounds {
        federation.round(round, settings.local_steps, &train_settings)?;
        let scores = score(Some(&federation.adapter()?));
        progress(&format!(
            "FedAvg round {}: mean held-out {:.4}",
            round + 1,
            scores.mean
        ));
        fedavg.push(scores);
    }
    let fedavg_bytes = (federation.bytes_up, federation.raw_bytes);
    let final_fedavg = fedavg.last().map_or(base.mean, |s| s.mean);
    let target = base.mean - 0.5 * (base.mean - final_fedavg);
    let reached = |curve: &[Scores]| curve.iter().position(|s| s.mean <= target).map(|i| i + 1);

    let mut federation = Federation::new(model, clients, settings, &initial_delta);
    let mut fedsgd = Vec::new();
    for round in 0..settings.fedsgd_max_rounds {
        federation.round(round, 1, &train_settings)?;
        let scores = score(Some(&federation.adapter()?));
        progress(&format!(
            "FedSGD round {}: mean held-out {:.4} (target {target:.4})",
            round + 1,
            scores.mean
        ));
        let done = scores.mean <= target;
        fedsgd.push(scores);
        if done {
            break;
        }
    }

    let pooled = PackedData::concat(&clients.iter().map(|c| &c.train).collect::<Vec<_>>());
    let mut adapter = LoraAdapter::from_delta(&initial_delta, &settings.lora, config, device)?;
    let steps = budget * clients.len() as u64;
    train::train(
        model,
        &mut adapter,
        &pooled,
        &train_settings(steps, settings.seed ^ 0xCE47),
        |_| {},
    );
    let central = score(Some(&adapter));
    progress(&format!(
        "central (pooled): mean held-out {:.4}",
        central.mean
    ));

    Ok(StudyResults {
        settings: settings.clone(),
        clients: clients.iter().map(|c| c.id.clone()).collect(),
        base,
        local,
        fedavg_rounds_to_target: reached(&fedavg),
        fedsgd_rounds_to_target: reached(&fedsgd),
        fedavg,
        fedsgd,
        central,
        target,
        fedavg_bytes,
    })
}

/// A study that could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StudyError {
    /// Bad inputs.
    #[error("{0}")]
    Setup(String),
    /// The adapter does not fit the model.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// Compression or aggregation failed.
    #[error("federated step: {0}")]
    Federated(String),
}

impl StudySettings {
    /// How a client trains `steps` steps (as a `join` task does).
    pub(crate) fn train_settings(&self, steps: u64, seed: u64) -> TrainSettings {
        TrainSettings {
            steps,
            batch_size: self.batch_size,
            grad_accum: 1,
            seed,
            optim: OptimSettings {
                lr: self.learning_rate,
                warmup_steps: 0,
                min_lr_ratio: 1.0,
                ..OptimSettings::default()
            },
            recompute_layers: false,
        }
    }
}

/// Scores `adapter` (the base model without one) on every client's held-out text.
pub(crate) fn score(
    model: &Llama,
    clients: &[StudyClient],
    adapter: Option<&LoraAdapter>,
) -> Scores {
    let per_client: Vec<f64> = clients
        .iter()
        .map(|c| train::evaluate(model, adapter, &c.held_out, 4, None).loss)
        .collect();
    let mean = per_client.iter().sum::<f64>() / per_client.len().max(1) as f64;
    Scores { per_client, mean }
}

/// The federated arms' state: the global adapter, the server optimizer and each client's
/// error-feedback residual.
pub(crate) struct Federation<'a> {
    model: &'a Llama,
    clients: &'a [StudyClient],
    settings: &'a StudySettings,
    global: Delta,
    state: OptimizerState,
    feedback: Vec<ErrorFeedback>,
    bytes_up: u64,
    raw_bytes: u64,
    aggregation: AggregationConfig,
    /// What each client sends: its honest delta (`None`) or a lie.
    hostile: Vec<Option<Attack>>,
    /// How much the flip and noise attacks boost.
    boost: f32,
}

impl<'a> Federation<'a> {
    pub(crate) fn new(
        model: &'a Llama,
        clients: &'a [StudyClient],
        settings: &'a StudySettings,
        initial: &Delta,
    ) -> Self {
        Self {
            model,
            clients,
            settings,
            global: initial.clone(),
            state: OptimizerState::default(),
            feedback: clients.iter().map(|_| ErrorFeedback::new()).collect(),
            bytes_up: 0,
            raw_bytes: 0,
            aggregation: AggregationConfig::default(),
            hostile: vec![None; clients.len()],
            boost: 1.0,
        }
    }

    /// Combines the deltas with `aggregation` instead of plain FedAvg.
    pub(crate) fn aggregating(mut self, aggregation: AggregationConfig) -> Self {
        self.aggregation = aggregation;
        self
    }

    /// Client `i` sends `hostile[i]` instead of its honest delta, boosted by `boost`.
    pub(crate) fn with_hostile(mut self, hostile: Vec<Option<Attack>>, boost: f32) -> Self {
        self.hostile = hostile;
        self.boost = boost;
        self
    }

    pub(crate) fn adapter(&self) -> Result<LoraAdapter, StudyError> {
        let config = self.model.config();
        Ok(LoraAdapter::from_delta(
            &self.global,
            &self.settings.lora,
            config,
            self.model.device(),
        )?)
    }

    /// Every client trains `steps` from the global adapter; the decoded deltas are averaged
    /// (weighted by tokens) and applied. A hostile client sends its lie, with the weight its
    /// task justifies (the coordinator never takes a client's word for it).
    pub(crate) fn round(
        &mut self,
        round: u32,
        steps: u32,
        train_settings: &impl Fn(u64, u64) -> TrainSettings,
    ) -> Result<(), StudyError> {
        let fail = |e: &dyn std::fmt::Display| StudyError::Federated(e.to_string());
        let mut received = Vec::new();
        for (index, client) in self.clients.iter().enumerate() {
            let mut adapter = self.adapter()?;
            let seed = self.settings.seed ^ (u64::from(round) << 20) ^ index as u64;
            let reports = train::train(
                self.model,
                &mut adapter,
                &client.train,
                &train_settings(u64::from(steps), seed),
                |_| {},
            );
            let tokens: u64 = reports.iter().map(|r| r.tokens).sum();
            let mut delta = adapter.to_delta();
            delta.add_scaled(&self.global, -1.0).map_err(|e| fail(&e))?;
            let body = match self.hostile[index] {
                None => self.feedback[index]
                    .compress(&delta, self.settings.codec)
                    .map_err(|e| fail(&e))?,
                Some(attack) => {
                    let lie = attack.corrupt(
                        &delta,
                        &self.global,
                        self.boost,
                        self.clients.len(),
                        seed ^ 0xBAD,
                    );
                    codec::encode_to_vec(&lie, self.settings.codec).map_err(|e| fail(&e))?
                }
            };
            self.bytes_up += body.len() as u64;
            self.raw_bytes += delta.element_count() as u64 * 4;
            let decoded = codec::decode(&body, delta.element_count()).map_err(|e| fail(&e))?;
            received.push((BlobHash::of(&body), tokens.max(1) as f64, decoded));
        }
        let contributions: Vec<Contribution<'_>> = received
            .iter()
            .map(|(hash, weight, delta)| Contribution {
                hash: *hash,
                weight: *weight,
                delta,
            })
            .collect();
        let combined = aggregate(&self.aggregation, &contributions).map_err(|e| fail(&e))?;
        ServerOptimizer::Plain { learning_rate: 1.0 }
            .apply(&mut self.state, &mut self.global, &combined)
            .map_err(|e| fail(&e))?;
        Ok(())
    }
}

impl StudyResults {
    /// The results as a Markdown report (tables; the command that made them is added by the
    /// caller).
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(
            out,
            "Budget: {} rounds × {} local steps per client (batch {}, lr {}), {} clients; \
             local-only adapters get the same {} steps on their own data, the central adapter \
             {} steps on the pooled data.\n",
            s.rounds,
            s.local_steps,
            s.batch_size,
            s.learning_rate,
            self.clients.len(),
            s.rounds * s.local_steps,
            s.rounds * s.local_steps * self.clients.len() as u32
        );
        let _ = write!(out, "| held-out loss of | ");
        for id in &self.clients {
            let _ = write!(out, "{id} | ");
        }
        let _ = writeln!(out, "mean |");
        let _ = writeln!(out, "|---|{}---|", "---|".repeat(self.clients.len()));
        let mut row = |name: &str, scores: &Scores, own: Option<usize>| {
            let _ = write!(out, "| {name} | ");
            for (i, loss) in scores.per_client.iter().enumerate() {
                if own == Some(i) {
                    let _ = write!(out, "**{loss:.4}** | ");
                } else {
                    let _ = write!(out, "{loss:.4} | ");
                }
            }
            let _ = writeln!(out, "{:.4} |", scores.mean);
        };
        row("base model", &self.base, None);
        for (i, scores) in self.local.iter().enumerate() {
            row(&format!("local-only {}", self.clients[i]), scores, Some(i));
        }
        if let Some(last) = self.fedavg.last() {
            row("federated (FedAvg)", last, None);
        }
        row("central (pooled data)", &self.central, None);
        let own_local: Vec<f64> = self
            .local
            .iter()
            .enumerate()
            .map(|(i, s)| s.per_client[i])
            .collect();
        let mean_own_local = own_local.iter().sum::<f64>() / own_local.len().max(1) as f64;
        let _ = writeln!(
            out,
            "\nLocal-only adapters on their own client: mean {mean_own_local:.4} (bold above); \
             on all clients: mean {:.4}.\n",
            self.local.iter().map(|s| s.mean).sum::<f64>() / self.local.len().max(1) as f64
        );
        let fmt = |r: Option<usize>, max: usize| match r {
            Some(r) => r.to_string(),
            None => format!("not within {max}"),
        };
        let _ = writeln!(
            out,
            "Rounds to a mean held-out loss of {:.4} (halfway from the base model to the final \
             FedAvg adapter): FedAvg ({} local steps) {}, FedSGD (1 local step) {}.\n",
            self.target,
            s.local_steps,
            fmt(self.fedavg_rounds_to_target, self.fedavg.len()),
            fmt(self.fedsgd_rounds_to_target, s.fedsgd_max_rounds as usize),
        );
        let _ = writeln!(
            out,
            "| round | FedAvg mean held-out | FedSGD mean held-out |"
        );
        let _ = writeln!(out, "|---|---|---|");
        let rounds = self.fedavg.len().max(self.fedsgd.len());
        let cell = |curve: &[Scores], i: usize| {
            curve
                .get(i)
                .map_or_else(|| "".to_string(), |s| format!("{:.4}", s.mean))
        };
        let _ = writeln!(out, "| 0 | {:.4} | {:.4} |", self.base.mean, self.base.mean);
        for i in 0..rounds {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                i + 1,
                cell(&self.fedavg, i),
                cell(&self.fedsgd, i)
            );
        }
        let (up, raw) = self.fedavg_bytes;
        let _ = writeln!(
            out,
            "\nFedAvg uploads: {up} bytes compressed for {raw} as f32 ({:.3}).",
            up as f64 / raw.max(1) as f64
        );
        out
    }

    /// Mean held-out loss per round of FedAvg and FedSGD, with the base, local-only, and central
    /// levels, as an SVG line plot.
    pub fn svg(&self) -> String {
        // The plot area leaves a column on the right for the legend.
        let (w, h, pad, legend) = (700.0, 340.0, 50.0, 170.0);
        let rounds = self.fedavg.len().max(self.fedsgd.len()).max(1) as f64;
        let local_mean =
            self.local.iter().map(|s| s.mean).sum::<f64>() / self.local.len().max(1) as f64;
        let mut values = vec![self.base.mean, self.central.mean, local_mean];
        values.extend(self.fedavg.iter().chain(&self.fedsgd).map(|s| s.mean));
        let plot = Plot::new((w, h, pad, legend), rounds, &values);
        let (x, y) = (|r| plot.x(r), |v| plot.y(v));
        let mut svg = plot.open();
        let curve = |curve: &[Scores], color: &str, name: &str, n: usize| {
            let mut points = format!("{:.1},{:.1}", x(0.0), y(self.base.mean));
            for (i, s) in curve.iter().enumerate() {
                points.push_str(&format!(" {:.1},{:.1}", x(i as f64 + 1.0), y(s.mean)));
            }
            format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{points}\"/>\n\
                 <text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
                w - legend,
                40 + 16 * n
            )
        };
        svg.push_str(&curve(&self.fedavg, "#d62728", "FedAvg", 0));
        svg.push_str(&curve(&self.fedsgd, "#1f77b4", "FedSGD", 1));
        for (n, (value, color, name)) in [
            (self.base.mean, "#7f7f7f", "base model"),
            (local_mean, "#2ca02c", "local-only (mean)"),
            (self.central.mean, "#9467bd", "central"),
        ]
        .into_iter()
        .enumerate()
        {
            svg.push_str(&format!(
                "<line x1=\"{pad}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\n\
                 <text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
                x(rounds),
                y(value),
                y(value),
                w - legend,
                72 + 16 * n
            ));
        }
        svg.push_str(&plot.close());
        svg
    }
}

/// The frame of a loss-per-round SVG plot: the plot area leaves a column on the right for the
/// legend, and values are scaled to the range they span.
pub(crate) struct Plot {
    size: (f64, f64, f64, f64),
    rounds: f64,
    lo: f64,
    hi: f64,
}

impl Plot {
    /// A plot `(width, height, padding, legend width)` of `rounds` rounds holding `values`
    /// (non-finite ones ignored).
    pub(crate) fn new(size: (f64, f64, f64, f64), rounds: f64, values: &[f64]) -> Self {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let lo = finite.clone().fold(f64::INFINITY, f64::min);
        let hi = finite.fold(f64::NEG_INFINITY, f64::max);
        Self {
            size,
            rounds,
            lo,
            hi,
        }
    }

    /// The x coordinate of round `r`.
    pub(crate) fn x(&self, r: f64) -> f64 {
        let (w, _, pad, legend) = self.size;
        pad + (w - legend - 2.0 * pad) * r / self.rounds
    }

    /// The y coordinate of loss `v` (clamped to the plotted range).
    pub(crate) fn y(&self, v: f64) -> f64 {
        let (_, h, pad, _) = self.size;
        let span = (self.hi - self.lo).max(1e-6);
        h - pad - (h - 2.0 * pad) * (v.clamp(self.lo, self.hi) - self.lo) / span
    }

    /// The SVG header, background and title.
    pub(crate) fn open(&self) -> String {
        let (w, h, pad, _) = self.size;
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
             <text x=\"{pad}\" y=\"20\">mean held-out loss per round (x: round, y: loss)</text>\n"
        )
    }

    /// The axis labels and the end of the SVG.
    pub(crate) fn close(&self) -> String {
        let (_, h, _, _) = self.size;
        let (lo, hi, rounds) = (self.lo, self.hi, self.rounds);
        format!(
            "<text x=\"5\" y=\"{:.1}\">{hi:.2}</text><text x=\"5\" y=\"{:.1}\">{lo:.2}</text>\n\
             <text x=\"{:.1}\" y=\"{}\">0</text><text x=\"{:.1}\" y=\"{}\">{rounds}</text>\n</svg>\n",
            self.y(hi) + 4.0,
            self.y(lo) + 4.0,
            self.x(0.0) - 3.0,
            h - 30.0,
            self.x(rounds) - 6.0,
            h - 30.0
        )
    }
}
