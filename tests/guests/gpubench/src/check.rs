//! The correctness mode: every built-in operation on small n x n inputs,
//! compared in full against the guest's own arithmetic. Runs on any backend.

use beamlet_sdk::gpu::half::{bf16, f16};
use beamlet_sdk::gpu::{self, Buffer, Element, Gemm, GpuError};
use serde::Serialize;

use crate::data::{error, gemm_at, softmax, value};

#[derive(Debug, Serialize)]
pub struct Checked {
    /// e.g. `"gemm"`, `"gemm_trans"`, `"relu"`.
    pub op: &'static str,
    pub dtype: &'static str,
    /// Largest [`error`] over all elements.
    pub max_err: f64,
    /// What this op may be off by, for its dtype.
    pub tolerance: f64,
    pub ok: bool,
    /// Sum of the result's elements, to compare backends with.
    pub checksum: f64,
}

/// The output's rounding: exact inputs, one rounding of each result.
pub(crate) fn tolerance<T: Element>() -> f64 {
    match T::DTYPE.name() {
        "f32" => 1e-5,
        "f16" => 2e-3,
        _ => 1e-2,
    }
}

fn compare<T: Element>(op: &'static str, got: &[T], want: impl Fn(usize) -> f64) -> Checked {
    let max_err = got.iter().enumerate().map(|(i, g)| error(g.to_f32(), want(i))).fold(0.0, f64::max);
    let tolerance = tolerance::<T>();
    let checksum = got.iter().map(|g| f64::from(g.to_f32())).sum();
    Checked { op, dtype: T::DTYPE.name(), max_err, tolerance, ok: max_err <= tolerance, checksum }
}

fn filled<T: Element>(len: u64, salt: u64) -> Result<Buffer<T>, GpuError> {
    Buffer::from_fn(len, |i| T::from_f32(value(i, salt)))
}

/// `c = a * b`, and `c = 0.5 * aᵀ * bᵀ + 2 * c` on a c that held values.
fn gemms<T: Element>(n: u64, out: &mut Vec<Checked>) -> Result<(), GpuError> {
    let (a, b) = (filled::<T>(n * n, 1)?, filled::<T>(n * n, 2)?);
    let at = |i: usize| (i as u64 % n, i as u64 / n);
    let (va, vb) = (|x| value(x, 1), |x| value(x, 2));

    let c = Buffer::<T>::zeros(n * n)?;
    Gemm::new(n, n, n).run(&a, &b, &c)?;
    let want = |i| gemm_at(va, vb, 0.0, (n, n, n), (false, false), (1.0, 0.0), at(i));
    out.push(compare("gemm", &c.to_vec()?, want));

    let c = filled::<T>(n * n, 3)?;
    Gemm::new(n, n, n).trans_a(true).trans_b(true).alpha(0.5).beta(2.0).run(&a, &b, &c)?;
    let want = |i| gemm_at(va, vb, value(i as u64, 3), (n, n, n), (true, true), (0.5, 2.0), at(i));
    out.push(compare("gemm_trans", &c.to_vec()?, want));
    Ok(())
}

/// add, mul, add_bias, relu and softmax_columns on an n x n matrix of `T`.
fn elementwise<T: Element>(n: u64, out: &mut Vec<Checked>) -> Result<(), GpuError> {
    let len = n * n;
    let v = |i: usize, salt| f64::from(value(i as u64, salt));
    let (a, b) = (filled::<T>(len, 1)?, filled::<T>(len, 2)?);
    let sum = Buffer::<T>::zeros(len)?;
    gpu::add(&a, &b, &sum)?;
    out.push(compare("add", &sum.to_vec()?, |i| v(i, 1) + v(i, 2)));

    let product = Buffer::<T>::zeros(len)?;
    gpu::mul(&a, &b, &product)?;
    out.push(compare("mul", &product.to_vec()?, |i| v(i, 1) * v(i, 2)));

    let bias = filled::<T>(n, 4)?;
    gpu::add_bias(&a, &bias, n, n)?;
    out.push(compare("add_bias", &a.to_vec()?, |i| v(i, 1) + v(i % n as usize, 4)));

    gpu::relu(&b)?;
    out.push(compare("relu", &b.to_vec()?, |i| v(i, 2).max(0.0)));

    let x = Buffer::<T>::from_fn(len, |i| T::from_f32(value(i, 5) * 4.0))?;
    gpu::softmax_columns(&x, n, n)?;
    let columns: Vec<Vec<f64>> =
        (0..n).map(|j| softmax(&(0..n).map(|i| value(i + j * n, 5) * 4.0).collect::<Vec<_>>())).collect();
    out.push(compare("softmax_columns", &x.to_vec()?, |i| columns[i / n as usize][i % n as usize]));
    Ok(())
}

/// Every op in every dtype on n x n inputs.
pub fn all(n: u64) -> Result<Vec<Checked>, GpuError> {
    let mut out = Vec::new();
    gemms::<f32>(n, &mut out)?;
    gemms::<f16>(n, &mut out)?;
    gemms::<bf16>(n, &mut out)?;
    elementwise::<f32>(n, &mut out)?;
    elementwise::<f16>(n, &mut out)?;
    elementwise::<bf16>(n, &mut out)?;
    Ok(out)
}
