//! The replica process (`beamlet replica`): loads one precompiled component,
//! starts `workers` instances and runs the tasks the node sends, each worker
//! one task at a time. It exits when the node asks it to drain, and at once
//! when the node's end of the socket closes (the node died: no orphans).

pub(crate) mod cancel;
mod flows;
mod worker;

use std::io::BufReader;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, mpsc};

use anyhow::{Context as _, Result, bail};
use wasmtime::component::Component;

use crate::engine::{self, Allocation};
use crate::host;
use crate::host::bindings::FunctionPre;
use crate::ipc::{self, FromReplica, GpuBackendKind, GpuSpec, ReplicaSpec, RunTask, ToReplica};
use beamlet_gpu::Backend;
use beamlet_gpu::cpu::CpuBackend;

use self::cancel::Cancels;
use self::flows::Flows;
use self::worker::{GuestPre, Worker};
use crate::registry::World;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// The replica's end of the socket, shared by the workers for their replies.
#[derive(Clone)]
pub(crate) struct Replies(Arc<Mutex<UnixStream>>);

impl Replies {
    pub(crate) fn send(&self, message: &FromReplica) {
        let mut stream = self.0.lock().unwrap();
        if let Err(e) = ipc::write_blocking(&mut *stream, message) {
            // The node is gone; nothing left to do for it.
            tracing::debug!("failed to reply to the node: {e:#}");
            std::process::exit(0);
        }
    }
}

/// Entry point of `beamlet replica --fd N`.
pub(crate) fn main(fd: RawFd) -> Result<()> {
    // SAFETY: the node hands this descriptor to the child and nothing else owns it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let replies = Replies(Arc::new(Mutex::new(stream.try_clone().context("failed to clone the node socket")?)));
    let mut input = BufReader::new(stream);
    let spec = match ipc::read_blocking::<ToReplica>(&mut input)? {
        Some(ToReplica::Start(spec)) => spec,
        Some(other) => bail!("expected a start frame from the node, got {other:?}"),
        None => return Ok(()),
    };
    let flows = Arc::new(Flows::default());
    let workers = match start_workers(&spec, &replies, &flows) {
        Ok(workers) => workers,
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!(app = %spec.app, replica = %spec.replica, "replica failed to start: {message}");
            replies.send(&FromReplica::StartFailed { message });
            std::process::exit(1);
        }
    };
    replies.send(&FromReplica::Ready);
    serve(input, workers, &flows, &replies)
}

fn start_workers(spec: &ReplicaSpec, replies: &Replies, flows: &Arc<Flows>) -> Result<Vec<Worker>> {
    let engine =
        engine::new_engine(Allocation::Pooling { slots: spec.workers + 1, memory_bytes: spec.memory_per_worker })?;
    engine::start_epoch_ticker(engine.clone());
    // SAFETY: the node wrote this file from `Component::serialize` of the same
    // build, under a name that carries the engine's compatibility key.
    let component = unsafe { Component::deserialize_file(&engine, &spec.compiled) }
        .map_err(anyhow::Error::from)
        .with_context(|| format!("failed to load the compiled component {:?}", spec.compiled))?;
    let linker = host::linker(&engine)?;
    let pre =
        linker.instantiate_pre(&component).map_err(anyhow::Error::from).context("failed to link the component")?;
    let pre = match spec.world {
        World::Function => GuestPre::Function(FunctionPre::new(pre).map_err(anyhow::Error::from)?),
        World::HttpProxy => GuestPre::Proxy(ProxyPre::new(pre).map_err(anyhow::Error::from)?),
    };
    let gpu = spec.gpu.as_ref().map(open_gpu).transpose()?;
    let spec = Arc::new(spec.clone());
    // Workers instantiate and run `init` side by side: a replica whose init
    // loads a model is ready after one init, not one per worker.
    std::thread::scope(|scope| {
        let starting: Vec<_> = (0..spec.workers)
            .map(|index| {
                let (spec, pre, replies, flows, gpu) =
                    (spec.clone(), pre.clone(), replies.clone(), flows.clone(), gpu.clone());
                std::thread::Builder::new()
                    .name(format!("start-worker-{index}"))
                    .spawn_scoped(scope, move || Worker::start(index, spec, pre, replies, flows, gpu))
                    .context("failed to spawn a thread to start a worker")
            })
            .collect::<Result<_>>()?;
        starting
            .into_iter()
            .map(|thread| thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker's start panicked"))))
            .collect()
    })
}

/// The replica's GPU, shared by its workers: one context, one cuBLAS handle
/// and one kernel cache (SPEC §6).
fn open_gpu(gpu: &GpuSpec) -> Result<Arc<dyn Backend>> {
    match gpu.backend {
        GpuBackendKind::Cpu => Ok(Arc::new(CpuBackend::new(gpu.name.clone(), gpu.memory_bytes))),
        // The node made this device the only one the process sees.
        GpuBackendKind::Cuda => beamlet_gpu::cuda::CudaBackend::new(0)
            .map(|backend| Arc::new(backend) as Arc<dyn Backend>)
            .map_err(|e| anyhow::anyhow!("failed to open GPU {} ({}): {e}", gpu.index, gpu.name)),
    }
}

/// Reads the node's frames until it says drain or goes away.
fn serve(mut input: BufReader<UnixStream>, workers: Vec<Worker>, flows: &Flows, replies: &Replies) -> Result<()> {
    let (tasks, queue) = mpsc::channel::<RunTask>();
    let queue = Arc::new(Mutex::new(queue));
    let cancels = Arc::new(Cancels::default());
    let threads: Vec<_> = workers
        .into_iter()
        .map(|worker| {
            let (queue, cancels) = (queue.clone(), cancels.clone());
            std::thread::Builder::new()
                .name(format!("worker-{}", worker.index()))
                .spawn(move || worker.run(&queue, &cancels))
                .context("failed to spawn a worker thread")
        })
        .collect::<Result<_>>()?;
    // Frames keep coming while the replica drains: cancels and body parts
    // for the runs it still holds.
    let mut tasks = Some(tasks);
    let mut threads = Some(threads);
    loop {
        match ipc::read_blocking::<ToReplica>(&mut input) {
            Ok(Some(ToReplica::Run(task))) => match &tasks {
                Some(tasks) => {
                    cancels.queued(task.seq);
                    tasks.send(task).expect("workers outlive the reader");
                }
                None => bail!("the node sent a run after asking the replica to drain"),
            },
            Ok(Some(ToReplica::Cancel { seq })) => {
                cancels.cancel(seq);
                flows.abort(seq);
            }
            Ok(Some(ToReplica::Recall { seq })) => {
                if cancels.recall(seq) {
                    replies.send(&FromReplica::Returned { seq });
                }
            }
            Ok(Some(ToReplica::Body { seq, part })) => flows.request_part(seq, part),
            Ok(Some(ToReplica::Credit { seq })) => flows.credit(seq),
            Ok(Some(ToReplica::Drain)) => {
                // Workers finish the runs already sent, then return; the
                // replica exits once they all have.
                tasks = None;
                if let Some(threads) = threads.take() {
                    std::thread::spawn(move || {
                        for thread in threads {
                            let _ = thread.join();
                        }
                        std::process::exit(0);
                    });
                }
            }
            Ok(Some(ToReplica::Start(_))) => bail!("the node sent a second start frame"),
            Ok(None) | Err(_) => {
                // The node died or the socket broke: stop now, whatever runs.
                std::process::exit(0);
            }
        }
    }
}
