//! `tributary-loadgen`: many synthetic trainers in one process against a coordinator, printing
//! per-round wall time and any lost or rejected submission.
//!
//! Without `--coordinator` it starts its own coordinator in this process on loopback, serving a
//! synthetic experiment of `--params` values with `--trainers` trainers a round.

use std::net::SocketAddr;

use anyhow::bail;
use clap::Parser;
use tributary_coordinator::store::{test_garage::TestGarage, test_postgres::TestPostgres};
use tributary_tests::load::{quantile, run_trainers_from, summarize, LocalCoordinator, Storage};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-loadgen",
    version,
    about = "Load-test a Tributary coordinator with synthetic trainers"
)]
struct Args {
    /// A running coordinator (needs --fingerprint), or every node of a cluster, comma-separated.
    /// Without it, one is started in-process.
    #[arg(long, value_delimiter = ',')]
    coordinator: Vec<SocketAddr>,
    /// The coordinator's certificate fingerprint.
    #[arg(long)]
    fingerprint: Option<String>,
    /// Synthetic trainers to connect.
    #[arg(long, default_value_t = 100)]
    trainers: u32,
    /// Trainers selected a round (in-process coordinator; default: all of them).
    #[arg(long)]
    per_round: Option<u32>,
    /// Index of this process's first trainer, so several processes can load one external
    /// coordinator with distinct identities and addresses.
    #[arg(long, default_value_t = 0)]
    first_index: u32,
    /// Rounds (in-process coordinator).
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Adapter parameters (in-process coordinator).
    #[arg(long, default_value_t = 1000)]
    params: u64,
    /// Delta codec (in-process coordinator): f32, f16, int8, int4.
    #[arg(long, default_value = "f32")]
    codec: String,
    /// Where the in-process coordinator keeps its state: `embedded` (SQLite and a blob
    /// directory), `postgres` (a throwaway PostgreSQL started here) or `postgres-s3` (and a
    /// throwaway Garage for the blobs).
    #[arg(long, default_value = "embedded")]
    storage: String,
    /// Send each delta to the node of `--coordinator` its task id picks (a cluster's standby
    /// nodes stage uploads for the leader), instead of on the control connection.
    #[arg(long)]
    spread_uploads: bool,
    /// Also write the figures, with every acknowledgement latency, as JSON to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
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
    // The servers start before any thread, so the S3 settings can go into the environment.
    let mut storage = Storage::default();
    let (_postgres, _garage) = match args.storage.as_str() {
        "embedded" => (None, None),
        "postgres" | "postgres-s3" => {
            let postgres = TestPostgres::start()?;
            storage.database = Some(postgres.create_database("load")?);
            let garage = if args.storage == "postgres-s3" {
                let garage = TestGarage::start()?;
                for (key, value) in garage.env() {
                    std::env::set_var(key, value);
                }
                storage.blobs = Some(garage.url("load"));
                Some(garage)
            } else {
                None
            };
            (Some(postgres), garage)
        }
        other => bail!("--storage is embedded, postgres or postgres-s3, not {other:?}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, storage))
}

async fn run(args: Args, storage: Storage) -> anyhow::Result<()> {
    let local = match (args.coordinator.is_empty(), &args.fingerprint) {
        (false, None) => bail!("--coordinator needs --fingerprint"),
        (false, Some(_)) => None,
        (true, _) => Some(
            LocalCoordinator::start_stored(
                args.trainers,
                args.per_round.unwrap_or(args.trainers),
                args.rounds,
                args.params,
                &args.codec,
                &storage,
            )
            .await?,
        ),
    };
    let (nodes, fingerprint) = match &local {
        Some(local) => (vec![local.running.addr], local.running.fingerprint.clone()),
        None => (
            args.coordinator.clone(),
            args.fingerprint.clone().expect("checked above"),
        ),
    };
    let addr = nodes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "{} synthetic trainers against {addr} ({})",
        args.trainers,
        if local.is_some() {
            format!("in-process coordinator, {} storage", args.storage)
        } else {
            "external coordinator".into()
        }
    );
    let report = run_trainers_from(
        &nodes,
        &fingerprint,
        args.first_index,
        args.trainers,
        args.spread_uploads,
    )
    .await?;
    println!("rounds closed: {}", report.rounds_closed);
    if let Some(connect_all) = report.connect_all {
        println!(
            "all {} trainers connected after {:.3} s",
            args.trainers,
            connect_all.as_secs_f64()
        );
    }
    if let (Some(p50), Some(p99)) = (
        quantile(&report.ack_latencies, 0.5),
        quantile(&report.ack_latencies, 0.99),
    ) {
        println!(
            "upload end to acknowledgement: p50 {:.1} ms, p99 {:.1} ms ({} uploads)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            report.ack_latencies.len()
        );
    }
    if let Some(first) = report.first_round {
        println!(
            "round 0 (includes connecting {} trainers): {:.3} s",
            args.trainers,
            first.as_secs_f64()
        );
    }
    if let Some((median, min, max)) = summarize(&report.round_times) {
        println!(
            "per-round wall time, rounds 1..: median {:.4} s, min {:.4} s, max {:.4} s",
            median.as_secs_f64(),
            min.as_secs_f64(),
            max.as_secs_f64()
        );
    }
    println!(
        "uploads {}, accepted {}, rejected {}, lost {}, deferred and re-sent {}",
        report.uploads,
        report.accepted,
        report.rejected.len(),
        report.lost(),
        report.deferred
    );
    let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
    for rejection in &report.rejected {
        *reasons
            .entry(rejection.split(':').next().unwrap_or("?"))
            .or_default() += 1;
    }
    for (reason, count) in reasons {
        println!("  rejected {reason}: {count}");
    }
    println!("total {:.2} s", report.total.as_secs_f64());
    // Measured at the trainers, so a cluster and a single node compare alike.
    println!(
        "deltas uploaded {:.1} MB, {:.2} MB/s over the run",
        report.bytes_up as f64 / 1e6,
        report.bytes_up as f64 / 1e6 / report.total.as_secs_f64()
    );
    if let Some(local) = &local {
        let bytes_in = local
            .running
            .metrics
            .bytes_in
            .load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "ingest {:.1} MB/s ({:.1} MB received)",
            bytes_in as f64 / 1e6 / report.total.as_secs_f64(),
            bytes_in as f64 / 1e6
        );
    }
    if let Some(path) = &args.json_out {
        let json = serde_json::json!({
            "trainers": args.trainers,
            "rounds_closed": report.rounds_closed,
            "connect_all_s": report.connect_all.map(|d| d.as_secs_f64()),
            "first_round_s": report.first_round.map(|d| d.as_secs_f64()),
            "round_s": report.round_times.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
            "uploads": report.uploads,
            "accepted": report.accepted,
            "rejected": report.rejected.len(),
            "lost": report.lost(),
            "deferred": report.deferred,
            "ack_ms": report.ack_latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "total_s": report.total.as_secs_f64(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    }
    if let Some(local) = local {
        local.stop().await?;
    }
    Ok(())
}
