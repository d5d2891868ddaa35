//! GEMM arguments and their checks, shared by every backend.

use crate::{BufferId, DType, GpuError, Result, checks};

/// `c = alpha * op(a) * op(b) + beta * c` on column-major matrices, as cuBLAS
/// takes it: `op(a)` is `m x k`, `op(b)` is `k x n`, `c` is `m x n`; a
/// transposed operand is stored as the transpose (`k x m` for `a`).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmArgs {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub alpha: f32,
    pub beta: f32,
    pub a: BufferId,
    pub lda: u64,
    pub trans_a: bool,
    pub b: BufferId,
    pub ldb: u64,
    pub trans_b: bool,
    pub c: BufferId,
    pub ldc: u64,
}

/// Elements a column-major `rows x cols` matrix with leading dimension `ld`
/// spans: `ld * (cols - 1) + rows`; checks `ld >= rows`.
fn span(name: &str, rows: u64, cols: u64, ld: u64) -> Result<u64> {
    if ld < rows.max(1) {
        return Err(GpuError::InvalidArgument(format!("{name}: leading dimension {ld} is less than its {rows} rows")));
    }
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    ld.checked_mul(cols - 1)
        .and_then(|n| n.checked_add(rows))
        .ok_or_else(|| GpuError::OutOfBounds(format!("{name}: {rows} x {cols} with leading dimension {ld} overflows")))
}

impl GemmArgs {
    /// Checks element types (one for all three) and then [`GemmArgs::check`],
    /// given each buffer's type and length.
    pub fn check_buffers(&self, a: (DType, u64), b: (DType, u64), c: (DType, u64)) -> Result<()> {
        checks::same_dtype(&[a.0, b.0, c.0])?;
        self.check(a.1, b.1, c.1)
    }

    /// Checks shapes and leading dimensions against the buffers' lengths.
    pub fn check(&self, a_len: u64, b_len: u64, c_len: u64) -> Result<()> {
        let (a_rows, a_cols) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (b_rows, b_cols) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        for (name, rows, cols, ld, len) in [
            ("a", a_rows, a_cols, self.lda, a_len),
            ("b", b_rows, b_cols, self.ldb, b_len),
            ("c", self.m, self.n, self.ldc, c_len),
        ] {
            let needed = span(name, rows, cols, ld)?;
            if needed > len {
                return Err(GpuError::OutOfBounds(format!(
                    "{name}: a {rows} x {cols} matrix with leading dimension {ld} needs {needed} elements, the buffer has {len}"
                )));
            }
        }
        if self.c == self.a || self.c == self.b {
            return Err(GpuError::InvalidArgument("c must not be the same buffer as a or b".into()));
        }
        Ok(())
    }
}
