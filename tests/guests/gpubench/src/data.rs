//! Deterministic inputs and plain-Rust references, shared by the timed runs and
//! the correctness check.

/// Element `i` of input `salt`: multiples of 1/8 in [-0.75, 0.75]. Exact in
/// bf16 and f16, and their products sum exactly in an f32 accumulator up to
/// n = 8192 and beyond, so every backend must give the same GEMM.
pub fn value(i: u64, salt: u64) -> f32 {
    ((i.wrapping_mul(7).wrapping_add(salt.wrapping_mul(3))) % 13) as f32 / 8.0 - 0.75
}

/// `alpha * op(a) * op(b) + beta * c` at (i, j), column-major, in f64.
#[allow(clippy::too_many_arguments)]
pub fn gemm_at(
    a: impl Fn(u64) -> f32,
    b: impl Fn(u64) -> f32,
    c: f32,
    (m, n, k): (u64, u64, u64),
    (trans_a, trans_b): (bool, bool),
    (alpha, beta): (f32, f32),
    (i, j): (u64, u64),
) -> f64 {
    let lda = if trans_a { k } else { m };
    let ldb = if trans_b { n } else { k };
    let dot: f64 = (0..k)
        .map(|p| {
            let a_ip = if trans_a { a(p + i * lda) } else { a(i + p * lda) };
            let b_pj = if trans_b { b(j + p * ldb) } else { b(p + j * ldb) };
            f64::from(a_ip) * f64::from(b_pj)
        })
        .sum();
    f64::from(alpha) * dot + f64::from(beta) * f64::from(c)
}

/// Softmax of one column, in f64.
pub fn softmax(column: &[f32]) -> Vec<f64> {
    let max = column.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = column.iter().map(|&v| f64::from(v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Error of `got` against `want`, relative once `want` passes 1 in size.
pub fn error(got: f32, want: f64) -> f64 {
    (f64::from(got) - want).abs() / want.abs().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_eighths_within_range() {
        for i in 0..100 {
            let v = value(i, 1);
            assert!((-0.75..=0.75).contains(&v));
            assert_eq!((v * 8.0).fract(), 0.0);
        }
        assert_ne!(value(5, 1), value(5, 2));
    }

    #[test]
    fn gemm_reference_is_column_major_with_transposes() {
        // a = [[1, 2], [3, 4]] stored by column; b = identity scaled by 2.
        let a = |i: u64| [1.0, 3.0, 2.0, 4.0][i as usize];
        let b = |i: u64| [2.0, 0.0, 0.0, 2.0][i as usize];
        let plain = |i, j| gemm_at(a, b, 0.0, (2, 2, 2), (false, false), (1.0, 0.0), (i, j));
        assert_eq!([plain(0, 0), plain(0, 1), plain(1, 0), plain(1, 1)], [2.0, 4.0, 6.0, 8.0]);
        // aᵀ * b, then alpha and beta: 0.5 * (2 aᵀ) + 3 * 1.
        let trans = |i, j| gemm_at(a, b, 1.0, (2, 2, 2), (true, false), (0.5, 3.0), (i, j));
        assert_eq!([trans(0, 0), trans(0, 1), trans(1, 0), trans(1, 1)], [4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[2] > p[1] && p[1] > p[0]);
    }

    #[test]
    fn errors_are_relative_past_one() {
        assert_eq!(error(1.5, 1.0), 0.5);
        assert_eq!(error(101.0, 100.0), 0.01);
    }
}
