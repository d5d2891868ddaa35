//! Argument checks shared by every backend, so a guest meets the same
//! errors on the CPU and on a GPU. Arithmetic on guest numbers is checked:
//! an overflow is an error, never a wrap.

use crate::{DType, DeviceLimits, GpuError, KernelArg, KernelSource, LaunchConfig, ParamKind, Result};

/// Largest kernel source accepted, in bytes.
pub const MAX_KERNEL_SOURCE_BYTES: usize = 1 << 20;
/// Most parameters a custom kernel may declare.
pub const MAX_KERNEL_PARAMS: usize = 64;
/// Longest kernel entry name, in bytes.
pub const MAX_ENTRY_NAME_BYTES: usize = 256;

fn invalid(message: String) -> GpuError {
    GpuError::InvalidArgument(message)
}

/// Checks that `offset + len` elements fit in a buffer of `buffer_len`.
pub(crate) fn range(what: &str, offset: u64, len: u64, buffer_len: u64) -> Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| GpuError::OutOfBounds(format!("{what}: offset {offset} + length {len} overflows")))?;
    if end > buffer_len {
        return Err(GpuError::OutOfBounds(format!(
            "{what}: elements {offset}..{end} are past the buffer's {buffer_len}"
        )));
    }
    Ok(())
}

/// Bytes `len` elements of `dtype` take.
pub(crate) fn bytes(dtype: DType, len: u64) -> Result<u64> {
    len.checked_mul(dtype.size() as u64)
        .ok_or_else(|| GpuError::OutOfBounds(format!("{len} elements of {dtype:?} overflow")))
}

/// Elements in `byte_len` bytes written to a `dtype` buffer: whole ones only.
pub(crate) fn write_elements(dtype: DType, byte_len: usize) -> Result<u64> {
    let size = dtype.size();
    if !byte_len.is_multiple_of(size) {
        return Err(invalid(format!("{byte_len} bytes is not a whole number of {size}-byte {dtype:?} elements")));
    }
    Ok((byte_len / size) as u64)
}

pub(crate) fn same_dtype(dtypes: &[DType]) -> Result<()> {
    if dtypes.windows(2).any(|w| w[0] != w[1]) {
        return Err(invalid(format!("buffers must share one element type, got {dtypes:?}")));
    }
    Ok(())
}

/// `out = a op b`: one type, one length.
pub(crate) fn binary(a: (DType, u64), b: (DType, u64), out: (DType, u64)) -> Result<()> {
    same_dtype(&[a.0, b.0, out.0])?;
    if a.1 != b.1 || a.1 != out.1 {
        return Err(invalid(format!("element-wise ops need equal lengths, got {}, {} and {}", a.1, b.1, out.1)));
    }
    Ok(())
}

/// `rows x cols` must be exactly `len` elements.
fn matrix(what: &str, len: u64, rows: u64, cols: u64) -> Result<()> {
    let cells =
        rows.checked_mul(cols).ok_or_else(|| GpuError::OutOfBounds(format!("{what}: {rows} x {cols} overflows")))?;
    if cells != len {
        return Err(invalid(format!("{what}: {len} elements are not {rows} x {cols}")));
    }
    Ok(())
}

pub(crate) fn add_bias(x: (DType, u64), bias: (DType, u64), rows: u64, cols: u64) -> Result<()> {
    same_dtype(&[x.0, bias.0])?;
    matrix("add_bias", x.1, rows, cols)?;
    if bias.1 != rows {
        return Err(invalid(format!("add_bias: bias has {} elements for {rows} rows", bias.1)));
    }
    Ok(())
}

pub(crate) fn softmax(len: u64, rows: u64, cols: u64) -> Result<()> {
    if rows == 0 && cols > 0 {
        return Err(invalid("softmax: a column needs at least one row".into()));
    }
    matrix("softmax", len, rows, cols)
}

/// A kernel source: not empty, at most [`MAX_KERNEL_SOURCE_BYTES`], no NUL
/// (NVRTC and the PTX loader read C strings).
pub(crate) fn kernel_source(source: &KernelSource) -> Result<()> {
    let text = source.text();
    if text.trim().is_empty() {
        return Err(invalid("kernel source is empty".into()));
    }
    if text.len() > MAX_KERNEL_SOURCE_BYTES {
        return Err(invalid(format!(
            "kernel source is {} bytes, more than the {MAX_KERNEL_SOURCE_BYTES} allowed",
            text.len()
        )));
    }
    if let Some(at) = text.bytes().position(|b| b == 0) {
        return Err(invalid(format!("kernel source has a NUL byte at {at}")));
    }
    Ok(())
}

/// An entry name: a C identifier (the `extern "C"` name, looked up as is).
pub(crate) fn entry(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = name.len() <= MAX_ENTRY_NAME_BYTES
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(invalid(format!(
            "kernel entry {name:?} is not a C identifier of at most {MAX_ENTRY_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

pub(crate) fn params(params: &[ParamKind]) -> Result<()> {
    if params.len() > MAX_KERNEL_PARAMS {
        return Err(invalid(format!("{} kernel parameters, at most {MAX_KERNEL_PARAMS} allowed", params.len())));
    }
    Ok(())
}

/// Launch arguments match the declared parameters one for one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn args(params: &[ParamKind], args: &[KernelArg]) -> Result<()> {
    if params.len() != args.len() {
        return Err(invalid(format!("the kernel takes {} arguments, got {}", params.len(), args.len())));
    }
    for (i, (param, arg)) in params.iter().zip(args).enumerate() {
        if *param != arg.kind() {
            return Err(invalid(format!("argument {i} is declared {param:?}, got {:?}", arg.kind())));
        }
    }
    Ok(())
}

/// Grid and block sizes: none zero, each within the device's limits, and the
/// block's threads all together too.
pub(crate) fn launch(config: &LaunchConfig, limits: &DeviceLimits) -> Result<()> {
    const AXES: [char; 3] = ['x', 'y', 'z'];
    for (i, axis) in AXES.iter().enumerate() {
        let (grid, block) = (config.grid[i], config.block[i]);
        if grid == 0 || block == 0 {
            return Err(invalid(format!("launch: grid {:?} and block {:?} must not be 0", config.grid, config.block)));
        }
        if grid > limits.max_grid_dims[i] {
            return Err(invalid(format!(
                "launch: grid {axis} {grid} is over the device's {}",
                limits.max_grid_dims[i]
            )));
        }
        if block > limits.max_block_dims[i] {
            return Err(invalid(format!(
                "launch: block {axis} {block} is over the device's {}",
                limits.max_block_dims[i]
            )));
        }
    }
    let threads = config.block.iter().map(|&n| u64::from(n)).product::<u64>();
    if threads > u64::from(limits.max_threads_per_block) {
        return Err(invalid(format!(
            "launch: {threads} threads per block, the device allows {}",
            limits.max_threads_per_block
        )));
    }
    if config.shared_mem_bytes > limits.max_shared_mem_per_block {
        return Err(invalid(format!(
            "launch: {} bytes of shared memory per block, the device allows {}",
            config.shared_mem_bytes, limits.max_shared_mem_per_block
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BufferId;

    fn is_invalid<T: std::fmt::Debug>(result: Result<T>) -> bool {
        matches!(result, Err(GpuError::InvalidArgument(_)))
    }

    #[test]
    fn ranges_and_sizes_are_checked_without_overflow() {
        assert!(range("read", 2, 2, 4).is_ok());
        assert!(matches!(range("read", 3, 2, 4), Err(GpuError::OutOfBounds(_))));
        assert!(matches!(range("read", u64::MAX, 2, 4), Err(GpuError::OutOfBounds(_))));
        assert_eq!(bytes(DType::BF16, 3).unwrap(), 6);
        assert!(matches!(bytes(DType::F32, u64::MAX / 2), Err(GpuError::OutOfBounds(_))));
        assert_eq!(write_elements(DType::F32, 8).unwrap(), 2);
        assert!(is_invalid(write_elements(DType::F32, 6)));
        assert!(is_invalid(write_elements(DType::F16, 3)));
    }

    #[test]
    fn op_shapes_and_dtypes() {
        let f32s = |n| (DType::F32, n);
        assert!(binary(f32s(4), f32s(4), f32s(4)).is_ok());
        assert!(is_invalid(binary(f32s(4), f32s(3), f32s(4))));
        assert!(is_invalid(binary(f32s(4), (DType::BF16, 4), f32s(4))), "dtype mismatch");
        assert!(add_bias(f32s(6), f32s(2), 2, 3).is_ok());
        assert!(is_invalid(add_bias(f32s(6), f32s(3), 2, 3)), "bias length must match rows");
        assert!(is_invalid(add_bias(f32s(6), f32s(2), 2, 2)));
        assert!(matches!(add_bias(f32s(6), f32s(2), u64::MAX, 2), Err(GpuError::OutOfBounds(_))));
        assert!(softmax(6, 3, 2).is_ok());
        assert!(softmax(0, 0, 0).is_ok());
        assert!(is_invalid(softmax(0, 0, 2)));
        assert!(is_invalid(softmax(6, 4, 2)));
    }

    #[test]
    fn kernel_sources_and_entries() {
        assert!(kernel_source(&KernelSource::CudaC("extern \"C\" __global__ void k() {}".into())).is_ok());
        assert!(is_invalid(kernel_source(&KernelSource::Ptx("  ".into()))));
        assert!(is_invalid(kernel_source(&KernelSource::CudaC("a\0b".into()))));
        assert!(is_invalid(kernel_source(&KernelSource::Ptx("x".repeat(MAX_KERNEL_SOURCE_BYTES + 1)))));
        for ok in ["saxpy", "_k2", "A_b_9"] {
            assert!(entry(ok).is_ok(), "{ok}");
        }
        for bad in ["", "9k", "k-1", "k k", "ñ", "k\0", &"k".repeat(MAX_ENTRY_NAME_BYTES + 1)] {
            assert!(is_invalid(entry(bad)), "{bad:?}");
        }
        assert!(params(&[ParamKind::Buffer; MAX_KERNEL_PARAMS]).is_ok());
        assert!(is_invalid(params(&[ParamKind::Buffer; MAX_KERNEL_PARAMS + 1])));
    }

    #[test]
    fn args_match_declared_params() {
        let declared = [ParamKind::Buffer, ParamKind::F32, ParamKind::U64];
        let good = [KernelArg::Buffer(BufferId(1)), KernelArg::F32(2.0), KernelArg::U64(3)];
        assert!(args(&declared, &good).is_ok());
        assert!(is_invalid(args(&declared, &good[..2])), "too few");
        assert!(is_invalid(args(&declared, &[good[0], good[1], KernelArg::I64(3)])), "wrong kind");
        assert!(is_invalid(args(&[], &good[..1])), "too many");
    }

    #[test]
    fn launch_dims_within_limits() {
        let limits = DeviceLimits::TYPICAL_CUDA;
        let config = LaunchConfig { grid: [1024, 1, 1], block: [256, 1, 1], shared_mem_bytes: 0 };
        assert!(launch(&config, &limits).is_ok());
        assert!(launch(&LaunchConfig { grid: [i32::MAX as u32, 65535, 65535], ..config }, &limits).is_ok());
        for bad in [
            LaunchConfig { grid: [0, 1, 1], ..config },
            LaunchConfig { block: [256, 0, 1], ..config },
            LaunchConfig { grid: [u32::MAX, 1, 1], ..config },
            LaunchConfig { grid: [1, 65536, 1], ..config },
            LaunchConfig { block: [2048, 1, 1], ..config },
            LaunchConfig { block: [1, 1, 65], ..config },
            LaunchConfig { block: [64, 32, 1], ..config }, // 2048 threads in all
            LaunchConfig { block: [u32::MAX, u32::MAX, u32::MAX], ..config },
            LaunchConfig { shared_mem_bytes: 48 * 1024 + 1, ..config },
        ] {
            assert!(is_invalid(launch(&bad, &limits)), "{bad:?}");
        }
    }
}
