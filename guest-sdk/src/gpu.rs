//! The replica's GPU: typed buffers, built-in operations and custom kernels.
//!
//! Safe wrappers over the `beamlet:function/gpu` interface (SPEC §6). An app
//! gets a GPU by asking for one in its config (`gpu = "any"`, and a per-worker
//! `gpu_memory` quota); without it every call answers [`GpuError::Unavailable`].
//! `beamlet serve --gpu-backend cpu` runs the same calls on the CPU, all but
//! custom [`Kernel`]s, so GPU apps can be developed and tested anywhere.
//!
//! - [`Device::info`] names the device and the backend (`"cuda"` or `"cpu"`).
//! - [`Buffer<T>`] is device memory of `f32`, [`half::f16`] or [`half::bf16`]
//!   elements, zeroed when made and freed when dropped; the guest never sees a
//!   device pointer, and the host checks every offset and shape.
//! - [`Gemm`] (column-major, as cuBLAS), [`add`], [`mul`], [`add_bias`],
//!   [`relu`] and [`softmax_columns`] are enough to run an MLP.
//! - [`Kernel`] compiles CUDA C or PTX and launches it with checked arguments.
//!
//! All work of one worker runs in order on that worker's stream. Calls return
//! once the work is queued; [`Buffer::read`] waits for the work before it, and
//! [`synchronize`] waits for all of it.
//!
//! Every error is a [`GpuError`], and `?` turns it into a [`crate::Error`]
//! that fails the task with the error's text.
//!
//! ```no_run
//! use beamlet_sdk::gpu::{self, Buffer, Gemm};
//! use beamlet_sdk::{Context, Error};
//!
//! // One dense layer with a ReLU: y = relu(w * x + b) for a batch of 2 columns.
//! fn layer(_ctx: &Context, x: Vec<f32>) -> Result<Vec<f32>, Error> {
//!     let (outputs, inputs, batch) = (3, 4, 2);
//!     if x.len() != inputs * batch {
//!         return Err(Error::bad_input("expected 8 numbers"));
//!     }
//!     let w = Buffer::<f32>::from_fn((outputs * inputs) as u64, |i| i as f32 / 10.0)?;
//!     let b = Buffer::from_slice(&[0.5f32, 0.0, -0.5])?;
//!     let x = Buffer::from_slice(&x)?;
//!     let y = Buffer::<f32>::zeros((outputs * batch) as u64)?;
//!     Gemm::new(outputs as u64, batch as u64, inputs as u64).run(&w, &x, &y)?;
//!     gpu::add_bias(&y, &b, outputs as u64, batch as u64)?;
//!     gpu::relu(&y)?;
//!     Ok(y.to_vec()?)
//! }
//!
//! beamlet_sdk::export!(layer);
//! # fn main() {}
//! ```

mod buffer;
mod device;
mod element;
mod error;
mod kernel;
mod ops;

pub use buffer::Buffer;
pub use device::{Device, DeviceInfo, synchronize};
pub use element::{Dtype, Element};
pub use error::GpuError;
/// The `half` crate, for the [`half::f16`] and [`half::bf16`] element types.
pub use half;
pub use kernel::{Arg, BufferArg, Kernel, LaunchConfig, Param};
pub use ops::{Gemm, add, add_bias, mul, relu, softmax_columns};

/// The generated bindings of the `gpu` interface, seen only by this module.
use crate::__bindings::beamlet::function::gpu as raw;
