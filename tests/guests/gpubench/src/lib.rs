//! The guest side of the GPU benchmark, and a correctness check of the host's
//! GPU interface that runs on any backend.
//!
//! Input (JSON, `op` picks the run):
//!
//! - `{"op": "gemm", "dtype": "bf16"|"f16"|"f32", "n": 8192, "iters": 10}`:
//!   `c = a * b` on n x n matrices. Answers `ms_per_op`, `tflops` (2n³ per
//!   run) and a `sample` of c's elements checked against the guest's own sum
//!   (`max_err`, and `ok` when it is within the dtype's rounding).
//! - `{"op": "saxpy", "n": 67108864, "iters": 20}`: `y = 0.5 * x + y` with a
//!   custom CUDA C kernel (CUDA only). Answers `ms_per_op` and `gb_per_s`
//!   (12 bytes moved per element).
//! - `{"op": "launch", "iters": 10000}`: launches of an empty kernel (CUDA
//!   only). Answers `launch_us` (host time per launch call) and `total_us`
//!   (per launch, including the final synchronize).
//! - `{"op": "check", "n": 64}`: every built-in op in every dtype on n x n
//!   inputs (n up to 256), compared in full with the guest's arithmetic.
//!   Answers `ok` and, per op, `max_err`, `tolerance` and a `checksum`.
//!
//! Timed runs warm up once, queue `iters` runs, synchronize once and report
//! the mean. Every answer also names the `backend` and `device`. The inputs
//! are multiples of 1/8, so every backend must give the same sums: compare a
//! CUDA run's `sample` or `checksum` with the CPU backend's at a small n.
//!
//! GPU memory per worker: gemm takes 3 n² elements (n = 8192: 384 MiB in
//! bf16, 768 MiB in f32), saxpy 8 n bytes (n = 2^26: 512 MiB).

mod bench;
mod check;
mod data;

use beamlet_sdk::gpu::Device;
use beamlet_sdk::gpu::half::{bf16, f16};
use beamlet_sdk::{Context, Error};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Largest n for `gemm` (n² elements must also fit the worker's `gpu_memory`).
const MAX_GEMM_N: u64 = 32768;
/// Largest n for `check`, whose reference is O(n³) in the guest.
const MAX_CHECK_N: u64 = 256;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Gemm {
        #[serde(default)]
        dtype: DtypeName,
        n: u64,
        #[serde(default = "ten")]
        iters: u32,
    },
    Saxpy {
        n: u64,
        #[serde(default = "ten")]
        iters: u32,
    },
    Launch {
        #[serde(default = "thousand")]
        iters: u32,
    },
    Check {
        #[serde(default = "sixty_four")]
        n: u64,
    },
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DtypeName {
    #[default]
    F32,
    F16,
    Bf16,
}

fn ten() -> u32 {
    10
}

fn thousand() -> u32 {
    1000
}

fn sixty_four() -> u64 {
    64
}

fn in_range(name: &str, value: u64, max: u64) -> Result<(), Error> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::bad_input(format!("`{name}` must be 1 to {max}, not {value}")))
    }
}

fn handle(_ctx: &Context, request: Request) -> Result<Value, Error> {
    let device = Device::info()?;
    let mut answer = match request {
        Request::Gemm { dtype, n, iters } => {
            in_range("n", n, MAX_GEMM_N)?;
            in_range("iters", iters.into(), 1_000_000)?;
            let timed = match dtype {
                DtypeName::F32 => bench::gemm::<f32>(n, iters)?,
                DtypeName::F16 => bench::gemm::<f16>(n, iters)?,
                DtypeName::Bf16 => bench::gemm::<bf16>(n, iters)?,
            };
            let tflops = 2.0 * (n as f64).powi(3) / (timed.ms_per_op * 1e-3) / 1e12;
            with(json!({"op": "gemm", "dtype": dtype_name(dtype), "n": n, "tflops": tflops}), &timed)
        }
        Request::Saxpy { n, iters } => {
            in_range("n", n, 1 << 32)?;
            in_range("iters", iters.into(), 1_000_000)?;
            let timed = bench::saxpy(n, iters)?;
            let gb_per_s = 12.0 * n as f64 / (timed.result.ms_per_op * 1e-3) / 1e9;
            with(json!({"op": "saxpy", "n": n, "gb_per_s": gb_per_s}), &timed)
        }
        Request::Launch { iters } => {
            in_range("iters", iters.into(), 10_000_000)?;
            with(json!({"op": "launch"}), &bench::launch(iters)?)
        }
        Request::Check { n } => {
            in_range("n", n, MAX_CHECK_N)?;
            let results = check::all(n)?;
            let ok = results.iter().all(|r| r.ok);
            json!({"op": "check", "n": n, "ok": ok, "results": results})
        }
    };
    answer["backend"] = device.backend.into();
    answer["device"] = device.name.into();
    Ok(answer)
}

fn dtype_name(dtype: DtypeName) -> &'static str {
    match dtype {
        DtypeName::F32 => "f32",
        DtypeName::F16 => "f16",
        DtypeName::Bf16 => "bf16",
    }
}

/// `head` with the fields of `rest` added.
fn with(mut head: Value, rest: &impl Serialize) -> Value {
    if let (Some(head), Ok(Value::Object(rest))) = (head.as_object_mut(), serde_json::to_value(rest)) {
        head.extend(rest);
    }
    head
}

beamlet_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn requests_decode_with_defaults() {
        assert!(matches!(
            parse(r#"{"op": "gemm", "dtype": "bf16", "n": 8192, "iters": 10}"#).unwrap(),
            Request::Gemm { dtype: DtypeName::Bf16, n: 8192, iters: 10 }
        ));
        assert!(matches!(
            parse(r#"{"op": "gemm", "n": 64}"#).unwrap(),
            Request::Gemm { dtype: DtypeName::F32, iters: 10, .. }
        ));
        assert!(matches!(
            parse(r#"{"op": "saxpy", "n": 67108864, "iters": 20}"#).unwrap(),
            Request::Saxpy { iters: 20, .. }
        ));
        assert!(matches!(parse(r#"{"op": "launch"}"#).unwrap(), Request::Launch { iters: 1000 }));
        assert!(matches!(parse(r#"{"op": "check"}"#).unwrap(), Request::Check { n: 64 }));
    }

    #[test]
    fn unknown_ops_fields_and_dtypes_are_refused() {
        assert!(parse(r#"{"op": "conv", "n": 1}"#).is_err());
        assert!(parse(r#"{"op": "gemm", "n": 1, "m": 2}"#).is_err());
        assert!(parse(r#"{"op": "gemm", "dtype": "f64", "n": 1}"#).is_err());
        assert!(parse(r#"{"n": 1}"#).is_err());
    }

    #[test]
    fn ranges_name_the_field() {
        assert_eq!(in_range("n", 0, 10).unwrap_err().message(), "`n` must be 1 to 10, not 0");
        assert!(in_range("n", 10, 10).is_ok());
    }

    #[test]
    fn with_merges_fields() {
        #[derive(Serialize)]
        struct Rest {
            ms_per_op: f64,
        }
        assert_eq!(with(json!({"op": "x"}), &Rest { ms_per_op: 1.5 }), json!({"op": "x", "ms_per_op": 1.5}));
    }
}
