//! The `tributary-coordinator` command line: `serve`, `verify`, `status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::service::{self, ServeOptions, ServerLimits, TlsSource};
use crate::settings::{experiment_env_overrides, load_experiment};
use crate::store::db::Db;
use crate::verify::verify_data_dir;
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-coordinator",
    version,
    about = "Runs federated fine-tuning rounds over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve an experiment to trainers.
    Serve(Box<ServeArgs>),
    /// Re-derive every round from the stored deltas and check the ledger chain.
    Verify {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Write an experiment's latest adapter as a PEFT folder (safetensors, adapter_config.json,
    /// model card with lineage) for upload to any PEFT-compatible hub.
    Publish {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
        /// The experiment (default: the latest).
        #[arg(long)]
        experiment: Option<String>,
        /// The folder to write (must be empty or absent).
        #[arg(long)]
        to: PathBuf,
    },
    /// Print each experiment's progress as JSON.
    Status {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The data directory (database, blobs, TLS identity).
    #[arg(long, env = "TRIBUTARY_DATA_DIR")]
    data_dir: PathBuf,
    /// QUIC listen address.
    #[arg(long, env = "TRIBUTARY_LISTEN", default_value = "0.0.0.0:7878")]
    listen: SocketAddr,
    /// Experiment file (TOML). Without it, the latest unfinished experiment resumes.
    #[arg(long, env = "TRIBUTARY_EXPERIMENT")]
    experiment: Option<PathBuf>,
    /// Override an experiment key, e.g. `--set selection.quorum=3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// HTTP listen address for /healthz, /metrics and /status.
    #[arg(long, env = "TRIBUTARY_HTTP")]
    http: Option<SocketAddr>,
    /// PEM certificate chain (with --tls-key); default: a self-signed one kept in the data dir.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Subject names for the self-signed certificate (repeatable).
    #[arg(long = "tls-name", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
    tls_names: Vec<String>,
    /// Require trainers to present one of these tokens (repeatable; or comma-separated in the env).
    #[arg(
        long = "enrollment-token",
        env = "TRIBUTARY_ENROLLMENT_TOKENS",
        value_delimiter = ','
    )]
    enrollment_tokens: Vec<String>,
    /// Connections allowed from one IP address.
    #[arg(long, default_value_t = 64)]
    connections_per_address: usize,
    /// Uploads received at once across all trainers.
    #[arg(long, default_value_t = 64)]
    concurrent_uploads: usize,
    /// Exit once every round is committed (default: keep serving downloads).
    #[arg(long)]
    exit_when_finished: bool,
    /// Write the bound address and fingerprint as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// Parses the command line and runs it; the binary's whole `main`.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(*args),
        Command::Verify { data_dir } => run_verify(&data_dir),
        Command::Status { data_dir } => run_status(&data_dir),
        Command::Publish {
            data_dir,
            experiment,
            to,
        } => {
            let published =
                crate::publish::publish(&data_dir, experiment.as_deref(), &to).map(|published| {
                    println!(
                        "wrote {} ({} rounds, adapter {})",
                        to.display(),
                        published.rounds,
                        published.adapter
                    );
                });
            published.map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let experiment = match &args.experiment {
        Some(path) => Some(load_experiment(
            path,
            experiment_env_overrides(std::env::vars()),
            &args.overrides,
        )?),
        None => None,
    };
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => TlsSource::Files { cert, key },
        _ => TlsSource::SelfSigned {
            names: args.tls_names,
        },
    };
    let limits = ServerLimits {
        connections_per_address: args.connections_per_address,
        concurrent_uploads: args.concurrent_uploads,
        ..ServerLimits::default()
    };
    let options = ServeOptions {
        data_dir: args.data_dir,
        listen: args.listen,
        experiment,
        http: args.http,
        tls,
        enrollment_tokens: args
            .enrollment_tokens
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect(),
        limits,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let running = service::start(options).await?;
        println!("listening on {}", running.addr);
        println!("certificate sha-256 fingerprint: {}", running.fingerprint);
        if let Some(path) = &args.ready_file {
            let ready = serde_json::json!({
                "addr": running.addr.to_string(),
                "fingerprint": running.fingerprint,
                "http": running.http_addr.map(|a| a.to_string()),
                "experiment": running.experiment.0,
            });
            let temp = path.with_extension("tmp");
            std::fs::write(&temp, ready.to_string())?;
            std::fs::rename(&temp, path)?;
        }
        let mut progress = running.progress.clone();
        let exit_when_finished = args.exit_when_finished;
        let stop = async move {
            let finished = async {
                if exit_when_finished {
                    let _ = progress.wait_for(|p| p.finished).await;
                    // Give trainers a moment to read the news and hang up.
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        progress.wait_for(|p| p.connected == 0),
                    )
                    .await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
                _ = finished => tracing::info!("all rounds done; shutting down"),
            }
        };
        running.wait(stop).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn run_verify(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    match verify_data_dir(data_dir) {
        Ok(experiments) => {
            for verified in experiments {
                println!(
                    "ok: experiment {} — {} rounds re-derived, ledger head {}, adapter {}",
                    verified.experiment,
                    verified.rounds,
                    verified
                        .head
                        .map(|h| h.to_hex())
                        .unwrap_or_else(|| "(empty)".into()),
                    verified
                        .adapter
                        .map(|h| h.to_hex())
                        .unwrap_or_else(|| "(initial)".into()),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            println!("FAILED: {error}");
            Ok(ExitCode::from(2))
        }
    }
}

fn run_status(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let db =
        Db::open_read_only(&data_dir.join("tributary.db")).context("cannot open the database")?;
    let mut out = Vec::new();
    for experiment in db.experiments()? {
        let status = db.status(&experiment.id)?;
        out.push(serde_json::json!({ "experiment": experiment.id.0, "status": status }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
