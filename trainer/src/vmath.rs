//! Math for the CPU kernels' inner loops that the compiler can vectorize, with results that do
//! not depend on the vector width.
//!
//! `f32::exp` is a call into the C library, one value at a time, and it stops a loop from being
//! vectorized: the LM-head loss, SwiGLU and attention take tens of millions of exponentials a
//! step. [`exp`] is branch-free arithmetic (Cody–Waite range reduction, a degree-6 polynomial,
//! the power of two built from its bits), so a loop over it compiles to SIMD code. Rust never
//! fuses a multiply and an add on its own, so each lane computes exactly what the scalar code
//! computes: the same bits on a CPU with AVX-512, with AVX2 or with neither, so these loops add
//! no difference between machines (the gemm kernels burn picks per instruction set may).
//! Reductions are written with a fixed number of accumulators for the same reason (a compiler
//! does not reorder float sums by itself).

/// `e^x` within 2 ulp of the exact value for `x` in `[-87.3, 88]`; the ends of that range
/// below and above it (so `e^x` never becomes 0, a subnormal or infinite); NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 · 2²³: adding it rounds to an integer, held in the low bits of the sum.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let whole = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits((whole.wrapping_add(127) as u32) << 23)
}

/// The logistic sigmoid `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Lanes of [`max`] and [`sum_f64`]: a fixed order of operations for any vector width.
const LANES: usize = 16;

/// The largest value of `values` (negative infinity when empty; NaN values are skipped, as
/// `f32::max` skips them).
#[inline(always)]
pub fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// The sum of `values` in f64, in a fixed order: [`LANES`] running sums, then the tail, then
/// the lanes added in order.
#[inline(always)]
pub fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    lanes.iter().fold(tail, |s, &v| s + v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_over_its_range_and_exact_at_zero() {
        assert_eq!(exp(0.0), 1.0);
        let mut worst = 0.0f64;
        let mut x = -87.3f32;
        while x < 88.0 {
            let exact = f64::from(x).exp();
            let error = (f64::from(exp(x)) - exact).abs() / exact;
            worst = worst.max(error);
            x += 0.000_37;
        }
        // One ulp of an f32 is 2^-23 ≈ 1.19e-7 of the value at most.
        assert!(worst < 2.0 * 1.2e-7, "relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn the_reductions_match_the_plain_ones() {
        let values: Vec<f32> = crate::test_values::uniform(1000, 3, 50.0);
        for len in [0, 1, 15, 16, 17, 999, 1000] {
            let values = &values[..len];
            let plain = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(values), plain);
            let plain: f64 = values.iter().map(|&v| f64::from(v)).sum();
            assert!((sum_f64(values) - plain).abs() <= 1e-9 * plain.abs().max(1.0));
        }
    }
}
