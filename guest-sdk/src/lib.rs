//! Write beamlet handlers in Rust: a typed function, one macro, a WebAssembly
//! component.
//!
//! A handler takes the task's [`Context`] and its input, decoded from JSON into
//! any `serde::Deserialize` type, and returns a `serde::Serialize` output or an
//! [`Error`]. [`export!`] turns it into the exports of the `beamlet:function`
//! world (`init` and `handle`), so the crate builds into a component that
//! `beamlet deploy` accepts.
//!
//! ```
//! use beamlet_sdk::{Context, Error};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct In {
//!     name: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Out {
//!     message: String,
//! }
//!
//! fn setup() -> Result<(), Error> {
//!     // Runs once per worker, before its first task: load a model, warm a cache.
//!     println!("ready");
//!     Ok(())
//! }
//!
//! fn hello(ctx: &Context, input: In) -> Result<Out, Error> {
//!     if input.name.is_empty() {
//!         return Err(Error::bad_input("`name` must not be empty"));
//!     }
//!     println!("task {} (attempt {}): greeting {}", ctx.task_id, ctx.attempt, input.name);
//!     Ok(Out { message: format!("Hello, {}!", input.name) })
//! }
//!
//! beamlet_sdk::export!(hello, init = setup);
//! # fn main() {}
//! ```
//!
//! The crate is a `cdylib` built for `wasm32-wasip2`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! beamlet-sdk = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! ```sh
//! cargo build --release --target wasm32-wasip2
//! beamlet deploy target/wasm32-wasip2/release/hello.wasm --name hello
//! beamlet invoke hello --data '{"name":"Ada"}'
//! ```
//!
//! # Inputs, outputs and errors
//!
//! - Input that does not decode into the handler's type answers
//!   [`ErrorKind::BadInput`] (HTTP 400) without running the handler. An empty
//!   input reads as JSON `null`, which `Option<T>` and `()` accept.
//! - [`Error::bad_input`] blames the caller (HTTP 400), [`Error::failed`] the
//!   handler (HTTP 500). `?` works on `serde_json::Error`, `String` and `&str`,
//!   which all become [`ErrorKind::Failed`].
//! - A panic is not an error: it traps, the task fails with the panic message,
//!   and the runtime replaces the instance. Static state (a loaded model, a
//!   counter) otherwise lives as long as the worker's instance, across tasks.
//!
//! # Logging
//!
//! Use `println!` and `eprintln!`. The runtime captures each task's stdout and
//! stderr into that task's logs (`beamlet logs NAME`); output from `init` goes
//! to the worker's logs.
//!
//! # GPU
//!
//! [`gpu`] holds typed buffers, GEMM and the element-wise steps of an MLP, and
//! custom CUDA kernels, for apps deployed with `gpu` in their config.

mod context;
mod error;
mod export;
pub mod gpu;

#[doc(hidden)]
#[path = "bindings.rs"]
pub mod __bindings;

pub use context::Context;
pub use error::{Error, ErrorKind};

#[doc(hidden)]
pub use export::__private;
