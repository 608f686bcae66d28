//! Throughput of aggregation and the server optimizers, beside a memory copy and blake3 hashing of
//! the same bytes in the same run.
//!
//! `cargo bench -p tributary-shared --bench aggregation`. Environment:
//! `TRIBUTARY_BENCH_ELEMENTS` (f32 values per contribution, default 4 Mi),
//! `TRIBUTARY_BENCH_CONTRIBUTIONS` (default 16), `TRIBUTARY_BENCH_ITERATIONS` (default 5).
//!
//! Aggregation rates count input bytes (contributions × elements × 4); optimizer rates count the
//! adapter's bytes (elements × 4). Each figure is the median of the iterations.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tributary_shared::aggregate::{
    aggregate, AggregationConfig, AggregationRule, Contribution, OptimizerState, ServerOptimizer,
};
use tributary_shared::{BlobHash, Delta, NamedTensor};

/// Values per tensor: a rank-16 LoRA factor of a 4096-wide projection.
const TENSOR_LEN: usize = 16 * 4096;

fn main() {
    let n_elements = env_usize("TRIBUTARY_BENCH_ELEMENTS", 4 << 20);
    let n_contributions = env_usize("TRIBUTARY_BENCH_CONTRIBUTIONS", 16);
    let n_iterations = env_usize("TRIBUTARY_BENCH_ITERATIONS", 5);
    let deltas: Vec<Delta> = (0..n_contributions)
        .map(|index| random_delta(n_elements, index as u64 + 1))
        .collect();
    let contributions: Vec<Contribution<'_>> = deltas
        .iter()
        .enumerate()
        .map(|(index, delta)| Contribution {
            hash: BlobHash::of(&index.to_le_bytes()),
            weight: 100.0 + index as f64,
            delta,
        })
        .collect();
    let encoded: Vec<Vec<u8>> = deltas.iter().map(little_endian_bytes).collect();
    let input_bytes = n_contributions * n_elements * 4;
    let adapter_bytes = n_elements * 4;
    println!(
        "aggregation bench: {n_contributions} contributions × {n_elements} f32 \
         ({:.1} MB input), median of {n_iterations} iterations",
        input_bytes as f64 / 1e6
    );

    let mut rows: Vec<(String, usize, Duration)> = Vec::new();
    let mut copy_target = vec![0.0f32; n_elements];
    rows.push((
        "memcpy (same bytes)".into(),
        input_bytes,
        median_time(n_iterations, || {
            for delta in &deltas {
                let mut offset = 0;
                for tensor in delta.tensors() {
                    let values = tensor.values();
                    copy_target[offset..offset + values.len()].copy_from_slice(values);
                    offset += values.len();
                }
                black_box(&mut copy_target);
            }
        }),
    ));
    rows.push((
        "blake3 (same bytes)".into(),
        input_bytes,
        median_time(n_iterations, || {
            for bytes in &encoded {
                black_box(blake3::hash(black_box(bytes)));
            }
        }),
    ));
    drop(encoded);

    // Roughly half the contributions are clipped.
    let typical_norm = deltas[0].l2_norm();
    let configs = [
        ("FedAvg", AggregationRule::FedAvg, None),
        ("FedAvg + clip", AggregationRule::FedAvg, Some(typical_norm)),
        (
            "TrimmedMean(0.1)",
            AggregationRule::TrimmedMean { trim_fraction: 0.1 },
            None,
        ),
        ("Median", AggregationRule::Median, None),
    ];
    let configs = configs
        .into_iter()
        .map(|(name, rule, clip_norm)| {
            let config = AggregationConfig {
                rule,
                clip_norm,
                clip_to_median: None,
                min_agreement: None,
            };
            (name, config)
        })
        .chain([("Robust default (open)", AggregationConfig::robust())]);
    for (name, config) in configs {
        rows.push((
            name.into(),
            input_bytes,
            median_time(n_iterations, || {
                black_box(aggregate(&config, black_box(&contributions)).expect("valid input"));
            }),
        ));
    }

    let aggregated = aggregate(&AggregationConfig::default(), &contributions).expect("valid input");
    let optimizers = [
        ("Plain apply", ServerOptimizer::Plain { learning_rate: 1.0 }),
        (
            "Momentum (Nesterov) apply",
            ServerOptimizer::Momentum {
                learning_rate: 0.7,
                beta: 0.9,
                nesterov: true,
            },
        ),
        (
            "Adam apply",
            ServerOptimizer::Adam {
                learning_rate: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                epsilon: 1e-3,
            },
        ),
    ];
    for (name, optimizer) in optimizers {
        let mut adapter = random_delta(n_elements, 1000);
        let mut state = OptimizerState::default();
        // The first step allocates the moments; time the steady state.
        optimizer
            .apply(&mut state, &mut adapter, &aggregated)
            .expect("valid input");
        rows.push((
            name.into(),
            adapter_bytes,
            median_time(n_iterations, || {
                optimizer
                    .apply(&mut state, black_box(&mut adapter), black_box(&aggregated))
                    .expect("valid input");
            }),
        ));
    }

    let memcpy_rate = rate(rows[0].1, rows[0].2);
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>11}",
        "operation", "ms", "GB/s", "vs memcpy"
    );
    for (name, bytes, time) in &rows {
        let gigabytes_per_second = rate(*bytes, *time);
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.3}x",
            name,
            time.as_secs_f64() * 1e3,
            gigabytes_per_second,
            gigabytes_per_second / memcpy_rate
        );
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {text:?}")),
        Err(_) => default,
    }
}

/// Gigabytes (1e9 bytes) per second.
fn rate(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

fn median_time(n_iterations: usize, mut run: impl FnMut()) -> Duration {
    run(); // Warm-up: page faults, caches.
    let mut times: Vec<Duration> = (0..n_iterations.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// A delta of `n_elements` values in tensors of [`TENSOR_LEN`], drawn from `seed` with
/// splitmix64: roughly normal values (a sum of four uniforms) around 0 with scale 1e-3.
fn random_delta(n_elements: usize, seed: u64) -> Delta {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next_uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut tensors = Vec::new();
    let mut remaining = n_elements;
    while remaining > 0 {
        let len = remaining.min(TENSOR_LEN);
        let values: Vec<f32> = (0..len)
            .map(|_| {
                let sum = next_uniform() + next_uniform() + next_uniform() + next_uniform();
                (sum - 2.0) * 1e-3
            })
            .collect();
        let name = format!("layers.{:04}.lora", tensors.len());
        tensors.push(NamedTensor::new(name, vec![len], values).expect("shape matches"));
        remaining -= len;
    }
    Delta::new(tensors).expect("unique names")
}

/// The values as little-endian bytes, as a codec would hash them.
fn little_endian_bytes(delta: &Delta) -> Vec<u8> {
    delta
        .tensors()
        .iter()
        .flat_map(|tensor| tensor.values().iter().flat_map(|value| value.to_le_bytes()))
        .collect()
}
