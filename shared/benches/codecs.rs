//! Throughput of the delta codecs, beside a memory copy and blake3 hashing of the same bytes in the
//! same run.
//!
//! `cargo bench -p tributary-shared --bench codecs`. Environment: `TRIBUTARY_BENCH_ELEMENTS` (f32
//! values in the delta, default 16 Mi = 64 MiB), `TRIBUTARY_BENCH_ITERATIONS` (default 7).
//!
//! Every rate counts the delta's f32 bytes (elements × 4), whatever the operation reads or writes,
//! so rates compare directly. Encoding appends to a reused buffer; decoding allocates the decoded
//! delta, as a receiver does, so "clone delta" (fresh tensors, every value written) is the floor
//! under every decode. "size" is the encoded length over the raw f32 length.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tributary_shared::codec::{decode, encode, Codec};
use tributary_shared::{Delta, NamedTensor};

/// Values per tensor: a rank-16 LoRA factor of a 4096-wide projection.
const TENSOR_LEN: usize = 16 * 4096;

fn main() {
    let n_elements = env_usize("TRIBUTARY_BENCH_ELEMENTS", 1 << 24);
    let n_iterations = env_usize("TRIBUTARY_BENCH_ITERATIONS", 7).max(1);
    let delta = lora_delta(n_elements);
    let n_elements = delta.element_count();
    let raw: Vec<u8> = delta
        .tensors()
        .iter()
        .flat_map(|tensor| tensor.values().iter().flat_map(|value| value.to_le_bytes()))
        .collect();
    let raw_len = raw.len();
    println!(
        "codec bench: {} tensors, {n_elements} f32 ({:.1} MiB); median and best of {n_iterations} \
         iterations",
        delta.tensors().len(),
        raw_len as f64 / (1 << 20) as f64
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut copy_target = vec![0u8; raw_len];
    rows.push(Row::new(
        "memcpy (same bytes)",
        measure(n_iterations, || {
            copy_target.copy_from_slice(black_box(&raw));
            black_box(&copy_target);
        }),
        None,
    ));
    // What any decode must at least do: allocate fresh tensors and write every value.
    rows.push(Row::new(
        "clone delta (alloc)",
        measure(n_iterations, || {
            black_box(black_box(&delta).clone());
        }),
        None,
    ));
    rows.push(Row::new(
        "blake3 (same bytes)",
        measure(n_iterations, || {
            black_box(blake3::hash(black_box(&raw)));
        }),
        None,
    ));

    let codecs = [
        Codec::F32,
        Codec::F16,
        Codec::Int8 { block: 64 },
        Codec::Int4 { block: 64 },
        Codec::TopK { fraction: 0.1 },
        Codec::TopK { fraction: 0.01 },
    ];
    for codec in codecs {
        let label = match codec {
            Codec::Int8 { block } | Codec::Int4 { block } => format!("{} b{block}", codec.name()),
            Codec::TopK { fraction } => format!("{} {fraction}", codec.name()),
            _ => codec.name().to_owned(),
        };
        let mut out = Vec::new();
        encode(&delta, codec, &mut out).expect("the bench delta is finite");
        let encoded = out.clone();
        let size = encoded.len() as f64 / raw_len as f64;
        rows.push(Row::new(
            format!("encode {label}"),
            measure(n_iterations, || {
                out.clear();
                encode(black_box(&delta), codec, &mut out).expect("the bench delta is finite");
                black_box(&out);
            }),
            Some(size),
        ));
        rows.push(Row::new(
            format!("decode {label}"),
            measure(n_iterations, || {
                let decoded = decode(black_box(&encoded), n_elements).expect("canonical bytes");
                black_box(decoded);
            }),
            Some(size),
        ));
    }

    let memcpy_median = rows[0].median;
    let rate = |time: Duration| raw_len as f64 / time.as_secs_f64() / 1e9;
    println!(
        "{:<22} {:>12} {:>10} {:>10} {:>8}",
        "operation", "median GB/s", "best GB/s", "vs memcpy", "size"
    );
    for row in &rows {
        let size = row
            .size
            .map_or_else(|| "-".to_owned(), |size| format!("{size:.4}"));
        println!(
            "{:<22} {:>12.2} {:>10.2} {:>10.3} {:>8}",
            row.name,
            rate(row.median),
            rate(row.best),
            memcpy_median.as_secs_f64() / row.median.as_secs_f64(),
            size
        );
    }
}

/// One line of the table.
struct Row {
    name: String,
    median: Duration,
    best: Duration,
    size: Option<f64>,
}

impl Row {
    fn new(name: impl Into<String>, mut times: Vec<Duration>, size: Option<f64>) -> Self {
        times.sort();
        Self {
            name: name.into(),
            median: times[times.len() / 2],
            best: times[0],
            size,
        }
    }
}

/// Runs `operation` once to warm up, then `n_iterations` timed times.
fn measure(n_iterations: usize, mut operation: impl FnMut()) -> Vec<Duration> {
    operation();
    (0..n_iterations)
        .map(|_| {
            let start = Instant::now();
            operation();
            start.elapsed()
        })
        .collect()
}

/// A deterministic LoRA-like delta: `lora_A` `[16, 4096]` and `lora_B` `[4096, 16]` factors of
/// the attention projections, layer after layer, until `n_elements` values (fewer than one tensor
/// gives one flat tensor). Values are roughly normal, with a scale that differs per tensor.
fn lora_delta(n_elements: usize) -> Delta {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_uniform = move || {
        // xorshift64*: uniform in [-1, 1).
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    };
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    if n_elements < TENSOR_LEN {
        shapes.push(("delta".to_owned(), vec![n_elements]));
    } else {
        let projections = ["q_proj", "k_proj", "v_proj", "o_proj"];
        for index in 0..n_elements / TENSOR_LEN {
            let layer = index / 8;
            let projection = projections[(index / 2) % 4];
            let (factor, shape) = if index % 2 == 0 {
                ("A", vec![16, 4096])
            } else {
                ("B", vec![4096, 16])
            };
            shapes.push((
                format!("model.layers.{layer}.self_attn.{projection}.lora_{factor}.weight"),
                shape,
            ));
        }
    }
    let tensors = shapes
        .into_iter()
        .enumerate()
        .map(|(index, (name, shape))| {
            let len: usize = shape.iter().product();
            let scale = 1e-3 * (1.0 + (index % 7) as f32);
            let values = (0..len)
                .map(|_| {
                    let sum = next_uniform() + next_uniform() + next_uniform() + next_uniform();
                    sum * scale
                })
                .collect();
            NamedTensor::new(name, shape, values).expect("shape and values agree")
        })
        .collect();
    Delta::new(tensors).expect("names are unique")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}
