//! `publish`: writes an experiment's latest adapter as a PEFT folder (`adapter_model.safetensors`,
//! `adapter_config.json`, and a model card `README.md` with its lineage) for upload to any
//! PEFT-compatible hub.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context as _};
use tributary_shared::codec;
use tributary_shared::config::ExperimentConfig;
use tributary_shared::peft::{to_safetensors, AdapterConfig};
use tributary_shared::{ExperimentId, TrainerId};

use crate::store::db::Db;
use crate::store::{BlobSource, StoredBlobs};

/// What was written.
#[derive(Debug, Clone)]
pub struct Published {
    /// Rounds the adapter has been through.
    pub rounds: u64,
    /// The adapter's blob hash.
    pub adapter: tributary_shared::BlobHash,
    /// The ledger head it corresponds to.
    pub ledger_head: Option<tributary_shared::BlobHash>,
}

/// A PEFT folder's files, in memory.
#[derive(Debug, Clone)]
pub struct PeftFolder {
    /// `(file name, contents)`: `adapter_model.safetensors`, `adapter_config.json`, `README.md`.
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// What they hold.
    pub published: Published,
}

/// Writes the latest adapter of `experiment` (or the only/latest experiment) into `out`.
pub fn publish(data_dir: &Path, experiment: Option<&str>, out: &Path) -> anyhow::Result<Published> {
    let folder = build(data_dir, experiment)?;
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} exists and is not empty", out.display());
    }
    std::fs::create_dir_all(out)?;
    for (name, bytes) in &folder.files {
        std::fs::write(out.join(name), bytes)?;
    }
    Ok(folder.published)
}

/// Opens a data directory's database read-only (safe while a coordinator serves it) and finds
/// `experiment`, or the latest experiment.
pub fn open_experiment(
    data_dir: &Path,
    experiment: Option<&str>,
) -> anyhow::Result<(Db, crate::store::db::StoredExperiment)> {
    let db = Db::open_read_only_in(data_dir).context("cannot open the database")?;
    let mut experiments = db.experiments()?;
    let stored = match experiment {
        Some(name) => {
            let index = experiments
                .iter()
                .position(|e| e.id.0 == name)
                .with_context(|| format!("no experiment {name:?} in {}", data_dir.display()))?;
            experiments.swap_remove(index)
        }
        None => experiments
            .pop()
            .context("the data directory holds no experiment")?,
    };
    Ok((db, stored))
}

/// Builds the PEFT folder of the latest adapter of `experiment` (or the latest experiment),
/// reading the data directory (safe while a coordinator serves it).
pub fn build(data_dir: &Path, experiment: Option<&str>) -> anyhow::Result<PeftFolder> {
    let (db, stored) = open_experiment(data_dir, experiment)?;
    let config: ExperimentConfig = serde_json::from_str(&stored.config_json)
        .context("the stored configuration does not parse")?;
    let adapter_config = AdapterConfig::from_spec(&config.adapter, config.model.hub_id())
        .context("only LoRA experiments can be published as PEFT adapters")?;
    let ledger = db.ledger(&stored.id)?;
    let adapter_hash = ledger
        .last()
        .map(|(_, entry)| entry.adapter_after)
        .unwrap_or(stored.initial_adapter);
    let blobs = StoredBlobs::open(data_dir)?;
    let max_elements = config.adapter.layout()?.element_count();
    let adapter = codec::decode(&blobs.get(&adapter_hash)?, max_elements)
        .context("the adapter blob does not decode")?;
    let contributors: BTreeSet<TrainerId> = ledger
        .iter()
        .flat_map(|(_, entry)| entry.accepted.iter().map(|a| a.trainer))
        .collect();
    let ledger_head = ledger.last().map(|(hash, _)| *hash);
    let evaluations = db.evaluations(&stored.id)?;
    let card = model_card(
        &stored.id,
        &config,
        &adapter_config,
        &ledger,
        &evaluations,
        &contributors,
        adapter_hash,
    );
    Ok(PeftFolder {
        files: vec![
            ("adapter_model.safetensors", to_safetensors(&adapter)?),
            ("adapter_config.json", adapter_config.to_json().into_bytes()),
            ("README.md", card.into_bytes()),
        ],
        published: Published {
            rounds: ledger.len() as u64,
            adapter: adapter_hash,
            ledger_head,
        },
    })
}

fn model_card(
    id: &ExperimentId,
    config: &ExperimentConfig,
    adapter: &AdapterConfig,
    ledger: &[(
        tributary_shared::BlobHash,
        tributary_shared::ledger::LedgerEntry,
    )],
    evaluations: &[crate::store::db::StoredEvaluation],
    contributors: &BTreeSet<TrainerId>,
    adapter_hash: tributary_shared::BlobHash,
) -> String {
    let mut card = format!(
        "---\nlibrary_name: peft\nbase_model: {base:?}\ntags:\n- lora\n- federated-learning\n- tributary\n---\n\n\
         # {id}\n\n{description}\n\nA LoRA adapter for `{base}` trained by federated fine-tuning with Tributary: \
         {rounds} rounds, {n} contributors.\n\n\
         | | |\n|---|---|\n| rank / alpha | {r} / {alpha} |\n| target modules | {targets} |\n\
         | adapter (blake3 of the canonical f32 encoding) | `{adapter_hash}` |\n| ledger head | `{head}` |\n\n\
         ## Lineage\n\nEach round's entry lists the deltas it aggregated (by blake3 hash) and their trainers' \
         ed25519 keys; `tributary-coordinator verify` re-derives every round.\n\n\
         Held-out loss: the median of the losses reported by trainers drawn at random to score \
         each adapter on held-out text, with how many of them agreed (within 1 %).\n\n\
         | round | deltas | held-out loss (median) | evaluators agreeing | train loss (self-reported) | adapter |\n\
         |---|---|---|---|---|---|\n",
        base = config.model.hub_id(),
        description = config.experiment.description,
        rounds = ledger.len(),
        n = contributors.len(),
        r = adapter.r,
        alpha = adapter.lora_alpha,
        targets = adapter.target_modules.join(", "),
        head = ledger.last().map(|(h, _)| h.to_hex()).unwrap_or_else(|| "(none)".into()),
    );
    let scored = |adapter: &tributary_shared::BlobHash| {
        let hex = adapter.to_hex();
        evaluations.iter().find(|e| e.adapter == hex).map_or_else(
            || ("-".to_string(), "-".to_string()),
            |e| {
                (
                    format!("{:.4}", e.loss),
                    format!("{} of {}", e.agreeing, e.evaluators),
                )
            },
        )
    };
    for (_, entry) in ledger {
        let (held_out, agreeing) = scored(&entry.adapter_after);
        card.push_str(&format!(
            "| {} | {} | {held_out} | {agreeing} | {} | `{}` |\n",
            entry.round,
            entry.accepted.len(),
            entry
                .metrics
                .reported_train_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            entry.adapter_after.short()
        ));
    }
    // By credited work, from the ledger alone (`tributary-coordinator credits`).
    let entries: Vec<tributary_shared::ledger::LedgerEntry> =
        ledger.iter().map(|(_, entry)| entry.clone()).collect();
    card.push_str(
        "\n## Contributors\n\nBy the work credited to them from the ledger alone: aggregated deltas \
         and checks that agreed, each at the weight its task justified; a delta withheld by a \
         disagreeing re-execution earns nothing unless a referee clears it. Verified: tasks an \
         independent re-execution matched. Flagged: disputes a referee settled against them; a \
         flagged trainer's later deltas count for nothing.\n\n\
         | trainer | deltas | verified | flagged | rounds | share of the work |\n\
         |---|---|---|---|---|---|\n",
    );
    for credit in crate::credits::credits(&entries)
        .iter()
        .filter(|c| c.work > 0 || c.flagged > 0)
    {
        card.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {:.1} % |\n",
            credit.trainer,
            credit.accepted,
            credit.verified,
            credit.flagged,
            credit.rounds,
            100.0 * credit.share
        ));
    }
    card
}
