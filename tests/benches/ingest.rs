//! End-to-end ingest: N synthetic trainers uploading deltas to a coordinator over loopback QUIC,
//! in deltas/s and MB/s, beside a baseline measured in the same run: the same bytes sent over
//! plain quinn streams on loopback (same TLS, no protocol, no checks, no storage).
//!
//! Env: `TRIBUTARY_BENCH_TRAINERS` (default 16), `TRIBUTARY_BENCH_PARAMS` (default 262144, i.e.
//! 1 MiB as f32), `TRIBUTARY_BENCH_ROUNDS` (default 6).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tributary_coordinator::net::tls::{load_or_create, server_config, TransportLimits};
use tributary_tests::client::client_endpoint;
use tributary_tests::load::{run_trainers, summarize, LocalCoordinator};
use tributary_tests::tls::ServerTrust;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let trainers = env("TRIBUTARY_BENCH_TRAINERS", 16) as u32;
    let params = env("TRIBUTARY_BENCH_PARAMS", 262_144);
    let rounds = env("TRIBUTARY_BENCH_ROUNDS", 6);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        println!("ingest: {trainers} trainers, {params} parameters, {rounds} rounds");
        let raw_bytes = params * 4;
        let baseline = plain_quic(trainers, raw_bytes as usize, 5).await?;
        let baseline_mbs = (trainers as f64 * raw_bytes as f64) / baseline.as_secs_f64() / 1e6;
        println!(
            "{:<34} {:>10} {:>12} {:>10} {:>9}",
            "case", "round ms", "deltas/s", "MB/s", "vs plain"
        );
        println!(
            "{:<34} {:>10.1} {:>12.0} {:>10.1} {:>9.2}",
            "plain quinn streams (baseline)",
            baseline.as_secs_f64() * 1e3,
            trainers as f64 / baseline.as_secs_f64(),
            baseline_mbs,
            1.0
        );
        for codec in ["f32", "int8"] {
            let local = LocalCoordinator::start(trainers, rounds, params, codec).await?;
            let report = run_trainers(local.running.addr, &local.running.fingerprint, trainers).await?;
            local.stop().await?;
            anyhow::ensure!(report.lost() == 0 && report.rejected.is_empty(), "lost or rejected uploads: {:?}", report.rejected);
            let (median, _, _) = summarize(&report.round_times).ok_or_else(|| anyhow::anyhow!("no rounds"))?;
            let per_delta = report.bytes_up as f64 / report.uploads.max(1) as f64;
            let mbs = trainers as f64 * per_delta / median.as_secs_f64() / 1e6;
            // Ratio on deltas/s: how many deltas a round ingests per plain-stream transfer time.
            let ratio = baseline.as_secs_f64() / median.as_secs_f64();
            println!(
                "{:<34} {:>10.1} {:>12.0} {:>10.1} {:>9.2}",
                format!("tributary round, {codec} ({:.0} KiB/delta)", per_delta / 1024.0),
                median.as_secs_f64() * 1e3,
                trainers as f64 / median.as_secs_f64(),
                mbs,
                ratio
            );
        }
        println!("(a tributary round also sends every trainer its task and the adapter, verifies, stores, aggregates and commits)");
        Ok(())
    })
}

/// Median time for `clients` connections to each send `bytes` on one uni stream to a plain
/// quinn server that reads and discards them.
async fn plain_quic(clients: u32, bytes: usize, repeats: usize) -> anyhow::Result<Duration> {
    let dir = std::env::temp_dir().join(format!("tributary-bench-tls-{}", std::process::id()));
    let identity = load_or_create(&dir, &["localhost".to_string()])?;
    let server = quinn::Endpoint::server(
        server_config(&identity, &TransportLimits::default())?,
        "127.0.0.1:0".parse()?,
    )?;
    let addr = server.local_addr()?;
    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(incoming) = server.accept().await {
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else {
                        return;
                    };
                    while let Ok(mut stream) = connection.accept_uni().await {
                        tokio::spawn(async move {
                            while let Ok(Some(_)) = stream.read_chunk(64 * 1024, true).await {}
                        });
                    }
                });
            }
        }
    });
    let payload = Arc::new(vec![7u8; bytes]);
    let mut connections = Vec::new();
    for _ in 0..clients {
        let endpoint = client_endpoint(&ServerTrust::Fingerprint(identity.fingerprint.clone()))?;
        connections.push(endpoint.connect(addr, "localhost")?.await?);
    }
    let mut times = Vec::new();
    for _ in 0..repeats {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for connection in &connections {
            let (connection, payload) = (connection.clone(), payload.clone());
            tasks.push(tokio::spawn(async move {
                let mut send = connection.open_uni().await?;
                send.write_all(&payload).await?;
                send.finish()?;
                let _ = send.stopped().await;
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        times.push(started.elapsed());
    }
    server.close(0u32.into(), b"done");
    accept.abort();
    let _ = std::fs::remove_dir_all(&dir);
    times.sort();
    Ok(times[times.len() / 2])
}
