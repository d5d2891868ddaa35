//! Host bindings for the `beamlet:function` package, generated from `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "function",
    // Host calls may trap (a handle the resource table does not know).
    imports: { default: trappable },
    // Called with `call_async`: the linker's WASI is async.
    exports: { default: async },
    with: {
        "beamlet:function/gpu.buffer": super::gpu::GpuBuffer,
        "beamlet:function/gpu.kernel": super::gpu::GpuKernel,
    },
});

pub(crate) use beamlet::function::types::{Context as TaskContext, Error as GuestError};
