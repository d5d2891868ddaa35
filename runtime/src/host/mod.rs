//! What the host gives a guest: one module per WIT interface, wired into one
//! linker here. A worker's store holds a [`WorkerState`].

pub(crate) mod bindings;
pub(crate) mod gpu;
pub(crate) mod http;
pub(crate) mod limits;
pub(crate) mod logs;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use wasmtime::Engine;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use self::gpu::WorkerGpu;
use self::limits::MemoryLimiter;
use self::logs::LogPipe;
use crate::replica::cancel::CancelFlag;

/// Everything a worker's store carries for the guest.
pub(crate) struct WorkerState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) stdout: LogPipe,
    pub(crate) stderr: LogPipe,
    /// When the running call must stop; checked on every epoch tick.
    pub(crate) deadline: Option<Instant>,
    /// Set by the node to cancel the running call.
    pub(crate) cancel: Arc<CancelFlag>,
    http: WasiHttpCtx,
    outbound: http::Outbound,
    /// The replica's GPU as this worker sees it.
    pub(crate) gpu: WorkerGpu,
}

impl WorkerState {
    /// A guest gets stdio (captured), clocks and random; no filesystem,
    /// environment, arguments or sockets, and outbound HTTP only to
    /// `allowed_hosts`.
    pub(crate) fn new(
        memory_limit: u64,
        cancel: Arc<CancelFlag>,
        allowed_hosts: Arc<[String]>,
        gpu: WorkerGpu,
    ) -> Self {
        let stdout = LogPipe::default();
        let stderr = LogPipe::default();
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_limit),
            stdout,
            stderr,
            deadline: None,
            cancel,
            http: WasiHttpCtx::new(),
            outbound: http::Outbound::new(allowed_hosts),
            gpu,
        }
    }
}

impl WasiView for WorkerState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for WorkerState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

/// The linker every component is instantiated with, whatever its world.
pub(crate) fn linker(engine: &Engine) -> Result<Linker<WorkerState>> {
    let mut linker = Linker::new(engine);
    // Async WASI: a guest blocked in a host call (a sleep, a poll, a body
    // read) is a pending future the worker can drop at the task's deadline.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    bindings::beamlet::function::gpu::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}
