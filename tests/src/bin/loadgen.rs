//! `tributary-loadgen`: many synthetic trainers in one process against a coordinator, printing
//! per-round wall time and any lost or rejected submission.
//!
//! Without `--coordinator` it starts its own coordinator in this process on loopback, serving a
//! synthetic experiment of `--params` values with `--trainers` trainers a round.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use tributary_coordinator::service::{self, ServeOptions, ServerLimits, TlsSource};
use tributary_coordinator::settings::load_experiment_str;
use tributary_shared::identity::Identity;
use tributary_shared::RoundId;
use tributary_tests::client::client_endpoint;
use tributary_tests::synthetic::{self, Fault, SyntheticOptions};
use tributary_tests::tls::ServerTrust;

#[derive(Parser, Debug)]
#[command(
    name = "tributary-loadgen",
    version,
    about = "Load-test a Tributary coordinator with synthetic trainers"
)]
struct Args {
    /// A running coordinator (needs --fingerprint). Without it, one is started in-process.
    #[arg(long)]
    coordinator: Option<SocketAddr>,
    /// The coordinator's certificate fingerprint.
    #[arg(long)]
    fingerprint: Option<String>,
    /// Synthetic trainers (and deltas a round).
    #[arg(long, default_value_t = 100)]
    trainers: u32,
    /// Rounds (for the in-process coordinator).
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Adapter parameters (for the in-process coordinator).
    #[arg(long, default_value_t = 1000)]
    params: u64,
    /// Delta codec for the in-process coordinator: f32, f16, int8, int4.
    #[arg(long, default_value = "f32")]
    codec: String,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut _data_dir = None;
    let mut in_process = None;
    let (addr, fingerprint) = match (args.coordinator, &args.fingerprint) {
        (Some(addr), Some(fingerprint)) => (addr, fingerprint.clone()),
        (Some(_), None) => bail!("--coordinator needs --fingerprint"),
        (None, _) => {
            let dir = tempfile_dir()?;
            let codec = match args.codec.as_str() {
                "f32" | "f16" => format!("{{ kind = \"{}\" }}", args.codec),
                "int8" | "int4" => format!("{{ kind = \"{}\", block = 64 }}", args.codec),
                other => bail!("unknown codec {other}"),
            };
            let toml = format!(
                "[experiment]\nname = \"loadgen\"\nrounds = {rounds}\n\n[adapter]\nkind = \"synthetic\"\nparams = {params}\ntensors = 1\n\n\
                 [selection]\ntrainers_per_round = {n}\nquorum = {n}\nmin_trainers = {n}\nround_timeout_secs = 600\ngather_timeout_secs = 600\n\n\
                 [training]\ncodec = {codec}\n",
                rounds = args.rounds,
                params = args.params,
                n = args.trainers,
            );
            let config = load_experiment_str(&toml, "loadgen", Default::default(), &[])?;
            let running = service::start(ServeOptions {
                data_dir: dir.clone(),
                listen: "127.0.0.1:0".parse()?,
                experiment: Some(config),
                http: None,
                tls: TlsSource::SelfSigned {
                    names: vec!["localhost".into()],
                },
                enrollment_tokens: vec![],
                limits: ServerLimits {
                    connections_per_address: args.trainers as usize + 16,
                    concurrent_uploads: args.trainers as usize + 16,
                    ..ServerLimits::default()
                },
            })
            .await?;
            let found = (running.addr, running.fingerprint.clone());
            _data_dir = Some(dir);
            in_process = Some(running);
            found
        }
    };
    println!(
        "{} synthetic trainers against {addr} ({})",
        args.trainers,
        if in_process.is_some() {
            "in-process coordinator"
        } else {
            "external coordinator"
        }
    );
    let started = Instant::now();
    let mut handles = Vec::new();
    for index in 0..args.trainers {
        // One endpoint (UDP socket) per trainer, as separate machines would have.
        let endpoint = client_endpoint(&ServerTrust::Fingerprint(fingerprint.clone()))?;
        let mut secret = [0u8; 32];
        secret[..4].copy_from_slice(&index.to_le_bytes());
        secret[31] = 0x7b;
        let options = SyntheticOptions {
            addr,
            identity: Identity::from_secret(secret),
            fault: Fault::None,
            enrollment_token: None,
            gate: None,
            hold_round: RoundId(u64::MAX),
            events: None,
            reconnect_for: Duration::from_secs(30),
            samples: 1,
        };
        handles.push(tokio::spawn(synthetic::run(endpoint, options)));
    }
    let mut reports = Vec::new();
    for handle in handles {
        reports.push(handle.await.context("trainer task panicked")??);
    }
    let total = started.elapsed();
    // Per-round wall time: between consecutive round-close announcements, the first round from
    // the first task.
    let mut closes: Vec<(RoundId, Instant)> = Vec::new();
    for report in &reports {
        for (round, at) in &report.rounds_closed {
            match closes.iter_mut().find(|(r, _)| r == round) {
                Some(existing) => existing.1 = existing.1.min(*at),
                None => closes.push((*round, *at)),
            }
        }
    }
    closes.sort();
    let mut previous = started;
    let mut durations: Vec<Duration> = Vec::new();
    for (_, at) in &closes {
        durations.push(at.saturating_duration_since(previous));
        previous = *at;
    }
    let uploads: u64 = reports.iter().map(|r| r.uploads).sum();
    let accepted: u64 = reports.iter().map(|r| r.accepted).sum();
    let rejected: usize = reports.iter().map(|r| r.rejected.len()).sum();
    let lost = uploads.saturating_sub(accepted + rejected as u64);
    println!("rounds closed: {}", closes.len());
    if !durations.is_empty() {
        let first = durations[0];
        let mut steady: Vec<Duration> = durations[1..].to_vec();
        steady.sort();
        println!(
            "round 0 (includes connecting {} trainers): {:.3} s",
            args.trainers,
            first.as_secs_f64()
        );
        if !steady.is_empty() {
            println!(
                "per-round wall time, rounds 1..: median {:.4} s, min {:.4} s, max {:.4} s",
                steady[steady.len() / 2].as_secs_f64(),
                steady[0].as_secs_f64(),
                steady[steady.len() - 1].as_secs_f64()
            );
        }
    }
    println!("uploads {uploads}, accepted {accepted}, rejected {rejected}, lost {lost}");
    for report in reports.iter().filter(|r| !r.rejected.is_empty()) {
        for (reason, detail) in &report.rejected {
            println!("  rejected: {reason}: {detail}");
        }
    }
    println!("total {:.2} s", total.as_secs_f64());
    if let Some(running) = in_process {
        running.shutdown().await?;
    }
    if let Some(dir) = _data_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("tributary-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
