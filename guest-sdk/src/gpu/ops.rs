//! The built-in operations: GEMM and the element-wise steps of an MLP.
//!
//! Matrices are column-major, as in cuBLAS: element (i, j) of a matrix with
//! leading dimension `ld` is at `i + j * ld`. Every operation is queued on the
//! worker's stream and returns before the device has finished; a later
//! [`Buffer::read`] or [`synchronize`](super::synchronize) waits for it.

use super::{Buffer, Element, GpuError, raw};

/// `c = alpha * op(a) * op(b) + beta * c` on column-major matrices, where op(a)
/// is m x k, op(b) is k x n and c is m x n, all of one element type.
///
/// [`Gemm::new`] is the common case, `c = a * b` on packed matrices (alpha 1,
/// beta 0, no transposes, each leading dimension its matrix's row count); the
/// other methods change one setting each.
///
/// ```no_run
/// use beamlet_sdk::gpu::{Buffer, Gemm};
///
/// // (2 x 3) * (3 x 1), column-major.
/// let a = Buffer::from_slice(&[1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0])?;
/// let b = Buffer::from_slice(&[1.0f32, 1.0, 1.0])?;
/// let c = Buffer::<f32>::zeros(2)?;
/// Gemm::new(2, 1, 3).run(&a, &b, &c)?;
/// assert_eq!(c.to_vec()?, [6.0, 15.0]);
///
/// // c = a^T * a, accumulating into what c holds.
/// let ata = Buffer::<f32>::zeros(9)?;
/// Gemm::new(3, 3, 2).trans_a(true).beta(1.0).run(&a, &a, &ata)?;
/// # Ok::<(), beamlet_sdk::gpu::GpuError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    m: u64,
    n: u64,
    k: u64,
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    lda: Option<u64>,
    ldb: Option<u64>,
    ldc: Option<u64>,
}

impl Gemm {
    /// `c = a * b` with op(a) m x k, op(b) k x n, c m x n, all packed.
    pub fn new(m: u64, n: u64, k: u64) -> Self {
        Gemm { m, n, k, alpha: 1.0, beta: 0.0, trans_a: false, trans_b: false, lda: None, ldb: None, ldc: None }
    }

    /// Scales the product (default 1).
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Scales what `c` held before (default 0: `c` is overwritten).
    pub fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    /// Whether `a` is stored transposed (k x m), so op(a) = aᵀ.
    pub fn trans_a(mut self, trans: bool) -> Self {
        self.trans_a = trans;
        self
    }

    /// Whether `b` is stored transposed (n x k), so op(b) = bᵀ.
    pub fn trans_b(mut self, trans: bool) -> Self {
        self.trans_b = trans;
        self
    }

    /// `a`'s leading dimension (default: its stored row count, m or k).
    pub fn lda(mut self, lda: u64) -> Self {
        self.lda = Some(lda);
        self
    }

    /// `b`'s leading dimension (default: its stored row count, k or n).
    pub fn ldb(mut self, ldb: u64) -> Self {
        self.ldb = Some(ldb);
        self
    }

    /// `c`'s leading dimension (default: m).
    pub fn ldc(mut self, ldc: u64) -> Self {
        self.ldc = Some(ldc);
        self
    }

    /// `(m, n, k)`.
    pub fn shape(&self) -> (u64, u64, u64) {
        (self.m, self.n, self.k)
    }

    /// The leading dimensions `(lda, ldb, ldc)` this GEMM runs with: the ones
    /// set, or those of packed matrices (never below 1, as cuBLAS asks).
    pub fn leading_dims(&self) -> (u64, u64, u64) {
        let rows_a = if self.trans_a { self.k } else { self.m };
        let rows_b = if self.trans_b { self.n } else { self.k };
        (self.lda.unwrap_or(rows_a.max(1)), self.ldb.unwrap_or(rows_b.max(1)), self.ldc.unwrap_or(self.m.max(1)))
    }

    /// Queues the GEMM. The host checks that every matrix fits its buffer
    /// ([`GpuError::OutOfBounds`]) and that the leading dimensions are at least
    /// the stored row counts ([`GpuError::InvalidArgument`]).
    pub fn run<T: Element>(&self, a: &Buffer<T>, b: &Buffer<T>, c: &Buffer<T>) -> Result<(), GpuError> {
        Ok(raw::gemm(self.to_raw(), a.raw(), b.raw(), c.raw())?)
    }

    fn to_raw(self) -> raw::GemmArgs {
        let (lda, ldb, ldc) = self.leading_dims();
        raw::GemmArgs {
            m: self.m,
            n: self.n,
            k: self.k,
            alpha: self.alpha,
            beta: self.beta,
            trans_a: self.trans_a,
            lda,
            trans_b: self.trans_b,
            ldb,
            ldc,
        }
    }
}

/// `out[i] = a[i] + b[i]`; equal lengths (`out` may be `a` or `b`).
pub fn add<T: Element>(a: &Buffer<T>, b: &Buffer<T>, out: &Buffer<T>) -> Result<(), GpuError> {
    Ok(raw::elementwise(raw::BinaryOp::Add, a.raw(), b.raw(), out.raw())?)
}

/// `out[i] = a[i] * b[i]`; equal lengths (`out` may be `a` or `b`).
pub fn mul<T: Element>(a: &Buffer<T>, b: &Buffer<T>, out: &Buffer<T>) -> Result<(), GpuError> {
    Ok(raw::elementwise(raw::BinaryOp::Mul, a.raw(), b.raw(), out.raw())?)
}

/// `x[i + j * rows] += bias[i]`: adds `bias` (length `rows`) to every column of
/// the column-major `rows` x `cols` matrix `x`.
pub fn add_bias<T: Element>(x: &Buffer<T>, bias: &Buffer<T>, rows: u64, cols: u64) -> Result<(), GpuError> {
    Ok(raw::add_bias(x.raw(), bias.raw(), rows, cols)?)
}

/// `x[i] = max(x[i], 0)`, in place.
pub fn relu<T: Element>(x: &Buffer<T>) -> Result<(), GpuError> {
    Ok(raw::relu(x.raw())?)
}

/// Replaces each column of the column-major `rows` x `cols` matrix `x` with its
/// softmax, so every column sums to 1.
pub fn softmax_columns<T: Element>(x: &Buffer<T>, rows: u64, cols: u64) -> Result<(), GpuError> {
    Ok(raw::softmax_columns(x.raw(), rows, cols)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_leading_dims_are_the_stored_row_counts() {
        assert_eq!(Gemm::new(4, 5, 6).leading_dims(), (4, 6, 4));
        assert_eq!(Gemm::new(4, 5, 6).trans_a(true).leading_dims(), (6, 6, 4));
        assert_eq!(Gemm::new(4, 5, 6).trans_b(true).leading_dims(), (4, 5, 4));
        assert_eq!(Gemm::new(4, 5, 6).trans_a(true).trans_b(true).leading_dims(), (6, 5, 4));
        assert_eq!(Gemm::new(0, 0, 0).leading_dims(), (1, 1, 1));
    }

    #[test]
    fn explicit_settings_reach_the_wit_record() {
        let args = Gemm::new(2, 3, 4).alpha(0.5).beta(2.0).trans_b(true).lda(8).ldc(16).to_raw();
        assert_eq!((args.m, args.n, args.k), (2, 3, 4));
        assert_eq!((args.alpha, args.beta), (0.5, 2.0));
        assert_eq!((args.trans_a, args.trans_b), (false, true));
        assert_eq!((args.lda, args.ldb, args.ldc), (8, 3, 16));
    }

    #[test]
    fn defaults_are_a_plain_product() {
        let args = Gemm::new(2, 3, 4).to_raw();
        assert_eq!((args.alpha, args.beta, args.trans_a, args.trans_b), (1.0, 0.0, false, false));
    }
}
