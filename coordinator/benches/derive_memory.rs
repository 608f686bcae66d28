//! Peak memory and time of deriving one round from the blob store, against the number of
//! trainers: the streaming derivation (`derive_from_store`: deltas decoded one at a time,
//! spilled past 256 MiB, aggregated a 64 MiB slab at a time) beside the baseline of every
//! delta decoded in memory (`derive_round`, what a round cost before), measured in the same
//! run. Each measurement runs in a child process of its own, its peak resident memory read
//! from the kernel once the deltas are written.
//!
//!   cargo bench -p tributary-coordinator --bench derive_memory [-- PARAMS N...]
//!
//! (default: 100,000 values per int8 delta, 250, 1,000 and 4,000 trainers; the robust default
//! aggregation: clipping, agreement filter, trimmed mean).

use std::collections::BTreeSet;
use std::time::Instant;

use tributary_coordinator::derive::{
    derive_from_store, derive_round, encode_exact, Checks, RoundInputs, Scratch,
};
use tributary_coordinator::store::blobs::BlobStore;
use tributary_shared::aggregate::OptimizerState;
use tributary_shared::codec::{self, Codec};
use tributary_shared::config::{AdapterSpec, ExperimentConfig};
use tributary_shared::ledger::AcceptedDelta;
use tributary_shared::{BlobHash, Delta, NamedTensor, TaskId, TrainerId};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--child") {
        return child(&args[1..]);
    }
    let params: usize = args.first().map_or(Ok(100_000), |a| a.parse())?;
    let counts: Vec<usize> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?
    } else {
        vec![250, 1_000, 4_000]
    };
    println!("one round, {params} values per int8 delta, robust default aggregation");
    println!("| trainers | deltas decoded | all in memory (baseline) | streamed | same bits |");
    println!("|---|---|---|---|---|");
    for &n in &counts {
        let mut rows = Vec::new();
        for mode in ["memory", "stream"] {
            let output = std::process::Command::new(std::env::current_exe()?)
                .args(["--child", mode, &params.to_string(), &n.to_string()])
                .output()?;
            anyhow::ensure!(
                output.status.success(),
                "{mode} with {n} trainers failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            rows.push(String::from_utf8(output.stdout)?.trim().to_owned());
        }
        let field = |row: &str, i: usize| row.split(' ').nth(i).unwrap_or("?").to_owned();
        let mib =
            |bytes: String| format!("{:.0} MiB", bytes.parse::<f64>().unwrap_or(0.0) / 1048576.0);
        println!(
            "| {n} | {} | {} peak, {} s | {} peak, {} s | {} |",
            mib((n * params * 4).to_string()),
            mib(field(&rows[0], 0)),
            field(&rows[0], 1),
            mib(field(&rows[1], 0)),
            field(&rows[1], 1),
            field(&rows[0], 2) == field(&rows[1], 2),
        );
    }
    Ok(())
}

/// One measurement: prints the peak resident bytes above the start, the seconds and the
/// aggregate's hash.
fn child(args: &[String]) -> anyhow::Result<()> {
    let mode = args[0].as_str();
    let params: usize = args[1].parse()?;
    let n: usize = args[2].parse()?;
    let dir = tempfile::tempdir()?;
    let blobs = BlobStore::open(dir.path().join("blobs"))?;
    let mut config: ExperimentConfig = tributary_coordinator::settings::load_experiment_str(
        include_str!("../../experiments/synthetic.toml"),
        "synthetic",
        Default::default(),
        &[],
    )?
    .pinned();
    config.aggregation = Some(tributary_shared::aggregate::AggregationConfig::robust());
    config.adapter = AdapterSpec::Synthetic {
        params: params as u64,
        tensors: 1,
    };
    let before = delta(params, u64::MAX);
    let before_hash = blobs.put(&encode_exact(&before))?;
    let mut accepted = Vec::with_capacity(n);
    for i in 0..n {
        let bytes = codec::encode_to_vec(&delta(params, i as u64), Codec::Int8 { block: 64 })?;
        let hash = blobs.put(&bytes)?;
        accepted.push(AcceptedDelta {
            hash,
            trainer: TrainerId(BlobHash::of(&i.to_le_bytes()).0),
            weight: 1,
            claimed_samples: 1,
            reported_train_loss: 1.0,
            byte_len: bytes.len() as u64,
            task: TaskId(i as u64),
            reported_steps: 1,
            reported_tokens: 1,
            reported_train_ms: 1,
            signature: Vec::new(),
        });
    }
    accepted.sort_by_key(|a| a.hash);
    let state = OptimizerState::default();
    let flagged = BTreeSet::new();
    // The peak so far is set back to what is resident now.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let start_rss = status_bytes("VmRSS:")?;
    let started = Instant::now();
    let derived = match mode {
        "memory" => {
            let deltas: Vec<(AcceptedDelta, Delta)> = accepted
                .iter()
                .map(|a| {
                    let bytes = blobs.get(&a.hash)?;
                    Ok((a.clone(), codec::decode(&bytes, params)?))
                })
                .collect::<anyhow::Result<_>>()?;
            let checks = Checks {
                flagged: Some(&flagged),
                ..Checks::default()
            };
            derive_round(&config, &before, &deltas, checks, &state)?
        }
        _ => derive_from_store(
            &config,
            &blobs,
            RoundInputs {
                adapter_before: &before_hash,
                accepted: &accepted,
                replicas: &[],
                referees: &[],
                loss_checks: &[],
                flagged: &flagged,
            },
            &state,
            &Scratch::in_dir(dir.path()),
        )?,
    };
    let seconds = started.elapsed().as_secs_f64();
    let peak = status_bytes("VmHWM:")?.saturating_sub(start_rss);
    println!(
        "{peak} {seconds:.2} {}",
        BlobHash::of(&encode_exact(&derived.aggregate)).short()
    );
    Ok(())
}

/// A delta of `params` values drawn from `seed`: most near one direction, as honest deltas are.
fn delta(params: usize, seed: u64) -> Delta {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let values = (0..params)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 2001) as f32 / 1000.0 - 1.0;
            ((i % 17) as f32 - 8.0) * 0.01 + noise * 0.005
        })
        .collect();
    Delta::new(vec![
        NamedTensor::new("w", vec![params], values).expect("a valid tensor")
    ])
    .expect("a valid delta")
}

/// A `/proc/self/status` figure, in bytes.
fn status_bytes(key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with(key))
        .ok_or_else(|| anyhow::anyhow!("no {key} in /proc/self/status"))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}
