//! `tributary-trainer robustness`: what lying clients do to a federation, and what the robust
//! aggregation default (norm clipping against the round's median, leaving out deltas that point
//! elsewhere than the majority, then a trimmed mean) costs and buys. Every arm is the study's federated arm (the same training, compression and
//! aggregation code the coordinator runs), on the same clients and budget: once with every client
//! honest, and once per attack with the last `hostile` clients lying, each under plain FedAvg and
//! under the robust default.

use serde::{Deserialize, Serialize};
use tributary_shared::aggregate::AggregationConfig;

use crate::attack::Attack;
use crate::lora::LoraAdapter;
use crate::model::Llama;
use crate::study::{score, Federation, Plot, Scores, StudyClient, StudyError, StudySettings};

/// What to compare.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RobustnessSettings {
    /// Budget and hyper-parameters (its `fedsgd_max_rounds` is unused).
    pub study: StudySettings,
    /// How many clients lie in the hostile arms (the last ones).
    pub hostile: usize,
    /// The lies tried, one hostile arm pair each.
    pub attacks: Vec<Attack>,
    /// How much the flip and noise attacks boost their delta.
    pub boost: f32,
}

/// One federated run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arm {
    /// `fed_avg` or `robust`.
    pub aggregation: String,
    /// The lie told by the hostile clients (`None`: everyone honest).
    pub attack: Option<Attack>,
    /// Held-out scores after each round.
    pub rounds: Vec<Scores>,
}

impl Arm {
    /// Mean held-out loss after the last round.
    pub fn final_mean(&self) -> Option<f64> {
        self.rounds.last().map(|s| s.mean)
    }
}

/// Everything measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RobustnessResults {
    /// The settings.
    pub settings: RobustnessSettings,
    /// Client ids.
    pub clients: Vec<String>,
    /// The base model's scores (round 0 of every arm).
    pub base: Scores,
    /// Every arm, the honest pair first.
    pub arms: Vec<Arm>,
}

/// Runs every arm; `progress` receives a line per round.
pub fn run(
    model: &Llama,
    clients: &[StudyClient],
    settings: &RobustnessSettings,
    mut progress: impl FnMut(&str),
) -> Result<RobustnessResults, StudyError> {
    if settings.hostile >= clients.len() {
        return Err(StudyError::Setup(format!(
            "{} hostile clients among {}: some must be honest",
            settings.hostile,
            clients.len()
        )));
    }
    let study = &settings.study;
    let initial = LoraAdapter::init(&study.lora, model.config(), study.seed, model.device())?;
    let initial_delta = initial.to_delta();
    let base = score(model, clients, None);
    progress(&format!("base model: mean held-out loss {:.4}", base.mean));
    let honest_count = clients.len() - settings.hostile;
    let scenarios = std::iter::once(None).chain(settings.attacks.iter().copied().map(Some));
    let mut arms = Vec::new();
    for attack in scenarios {
        for (name, aggregation) in [
            ("fed_avg", AggregationConfig::default()),
            ("robust", AggregationConfig::robust()),
        ] {
            let hostile: Vec<Option<Attack>> = (0..clients.len())
                .map(|i| if i >= honest_count { attack } else { None })
                .collect();
            let mut federation = Federation::new(model, clients, study, &initial_delta)
                .aggregating(aggregation)
                .with_hostile(hostile, settings.boost);
            let mut rounds = Vec::new();
            for round in 0..study.rounds {
                federation.round(round, study.local_steps, &|steps, seed| {
                    study.train_settings(steps, seed)
                })?;
                let scores = score(model, clients, Some(&federation.adapter()?));
                progress(&format!(
                    "{name}, {}: round {} mean held-out {:.4}",
                    attack.map_or("honest", Attack::name),
                    round + 1,
                    scores.mean
                ));
                rounds.push(scores);
            }
            arms.push(Arm {
                aggregation: name.into(),
                attack,
                rounds,
            });
        }
    }
    Ok(RobustnessResults {
        settings: settings.clone(),
        clients: clients.iter().map(|c| c.id.clone()).collect(),
        base,
        arms,
    })
}

impl RobustnessResults {
    fn arm(&self, aggregation: &str, attack: Option<Attack>) -> Option<&Arm> {
        self.arms
            .iter()
            .find(|arm| arm.aggregation == aggregation && arm.attack == attack)
    }

    /// The results as Markdown tables (the command is added by the caller).
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let s = &self.settings;
        let hostile = &self.clients[self.clients.len() - s.hostile..];
        let _ = writeln!(
            out,
            "{} clients ({}), {} rounds × {} local steps each (batch {}, lr {}); hostile arms: \
             the last {} ({}) lie, boost {}. Robust (the default for open experiments) = clip \
             each delta to 2 × the round's median norm, leave out deltas whose cosine with the \
             coordinate-wise median is under half the median cosine, then a trimmed mean (20 % \
             each end) from 5 deltas up.\n",
            self.clients.len(),
            self.clients.join(", "),
            s.study.rounds,
            s.study.local_steps,
            s.study.batch_size,
            s.study.learning_rate,
            s.hostile,
            hostile.join(", "),
            s.boost
        );
        let _ = write!(out, "| aggregation | clients | round 0 |");
        for round in 1..=s.study.rounds {
            let _ = write!(out, " round {round} |");
        }
        let _ = writeln!(out, " against honest FedAvg |");
        let _ = writeln!(
            out,
            "|---|---|{}---|",
            "---|".repeat(s.study.rounds as usize + 1)
        );
        let baseline = self.arm("fed_avg", None).and_then(Arm::final_mean);
        for arm in &self.arms {
            let who = arm.attack.map_or_else(
                || "all honest".to_string(),
                |a| format!("{} {a}", s.hostile),
            );
            let _ = write!(
                out,
                "| {} | {who} | {:.4} |",
                arm.aggregation.replace('_', " "),
                self.base.mean
            );
            for scores in &arm.rounds {
                let _ = write!(out, " {:.4} |", scores.mean);
            }
            let ratio = match (arm.final_mean(), baseline) {
                (Some(value), Some(base)) => format!("{:+.2} %", 100.0 * (value / base - 1.0)),
                _ => String::new(),
            };
            let _ = writeln!(out, " {ratio} |");
        }
        out
    }

    /// Mean held-out loss per round of every arm, as an SVG line plot (FedAvg red, robust blue;
    /// one dash pattern per attack).
    pub fn svg(&self) -> String {
        let (w, h, pad, legend) = (720.0, 360.0, 50.0, 190.0);
        let rounds = f64::from(self.settings.study.rounds.max(1));
        let values: Vec<f64> = std::iter::once(self.base.mean)
            .chain(
                self.arms
                    .iter()
                    .flat_map(|a| a.rounds.iter().map(|s| s.mean)),
            )
            .collect();
        let plot = Plot::new((w, h, pad, legend), rounds, &values);
        let (x, y) = (|r| plot.x(r), |v| plot.y(v));
        let mut svg = plot.open();
        for (n, arm) in self.arms.iter().enumerate() {
            let color = if arm.aggregation == "robust" {
                "#1f77b4"
            } else {
                "#d62728"
            };
            let dash = match arm.attack {
                None => "",
                Some(Attack::Flip) => "8 4",
                Some(Attack::Noise) => "2 3",
                Some(Attack::Replace) => "10 3 2 3",
                Some(Attack::Zero) => "4 4",
            };
            let mut points = format!("{:.1},{:.1}", x(0.0), y(self.base.mean));
            for (i, s) in arm.rounds.iter().enumerate() {
                points.push_str(&format!(" {:.1},{:.1}", x(i as f64 + 1.0), y(s.mean)));
            }
            let name = format!(
                "{}, {}",
                arm.aggregation.replace('_', " "),
                arm.attack.map_or("all honest", Attack::name)
            );
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{points}\"/>\n\
                 <line x1=\"{}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/>\n\
                 <text x=\"{}\" y=\"{}\">{name}</text>\n",
                w - legend,
                w - legend + 24.0,
                36 + 16 * n,
                36 + 16 * n,
                w - legend + 30.0,
                40 + 16 * n
            ));
        }
        svg.push_str(&plot.close());
        svg
    }
}
