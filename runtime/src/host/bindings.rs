//! Host bindings for the `beamlet:function` package, generated from `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "function",
});

pub(crate) use beamlet::function::types::{Context as TaskContext, Error as GuestError};
