//! Test inputs and comparisons shared by the unit tests of the numeric code.

use burn::tensor::Tensor;

/// `n` seeded values spread evenly over `[-half_width, half_width]` (in steps of
/// `half_width / 1000`).
pub fn uniform(n: usize, seed: u64, half_width: f32) -> Vec<f32> {
    let mut rng = tributary_shared::config::SplitMix64(seed);
    (0..n)
        .map(|_| ((rng.next_u64() % 2001) as f32 / 1000.0 - 1.0) * half_width)
        .collect()
}

/// A tensor's values on the host.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Asserts every value of `a` is within `tolerance` times the largest magnitude of `b` of
/// its counterpart (and that `b` is not all zeros).
pub fn assert_close(a: &[f32], b: &[f32], tolerance: f32) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tolerance * scale, "{x} vs {y}");
    }
}
