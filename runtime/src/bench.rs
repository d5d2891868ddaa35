//! `beamlet bench`: micro-benchmarks of the paths that decide cold and warm
//! latency. Not a test: it prints a table and checks nothing about speed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use wasmtime::Store;
use wasmtime::component::Component;

use crate::engine::{self, Allocation};
use crate::host::bindings::FunctionPre;
use crate::host::{self, WorkerState};
use crate::ipc::{self, FromReplica, Outcome, ReplicaSpec, RunTask, ToReplica};

const MEMORY: u64 = 64 << 20;

pub(crate) async fn run(wasm: &Path, input: &str, iterations: usize, cold_starts: usize) -> Result<()> {
    let bytes = std::fs::read(wasm).with_context(|| format!("failed to read {wasm:?}"))?;
    let dir = std::env::temp_dir().join(format!("beamlet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let compiled = dir.join("app.cwasm");
    let compile_started = Instant::now();
    let engine = engine::new_engine(Allocation::OnDemand)?;
    let component = Component::new(&engine, &bytes).map_err(anyhow::Error::from).context("failed to compile")?;
    std::fs::write(&compiled, component.serialize().map_err(anyhow::Error::from)?)?;
    let compile = compile_started.elapsed();

    let (instantiate, instantiate_init) = tokio::task::spawn_blocking({
        let compiled = compiled.clone();
        move || instantiate_times(&compiled, iterations)
    })
    .await??;

    let spec = ReplicaSpec {
        app: "bench".into(),
        version: 1,
        replica: "bench-r0".into(),
        compiled: compiled.to_string_lossy().into_owned(),
        workers: 1,
        memory_per_worker: MEMORY,
        fresh_instance_per_task: false,
        init_timeout_ms: 60_000,
    };
    let exe = std::env::current_exe()?;
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for round in 0..cold_starts {
        let started = Instant::now();
        let (mut child, stream) = crate::supervisor::start_process(&exe)?;
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        ipc::write_async(&mut write, &ToReplica::Start(spec.clone())).await?;
        let run = |seq| RunTask {
            seq,
            task_id: format!("t{seq}"),
            attempt: 1,
            timeout_ms: 60_000,
            input: input.as_bytes().to_vec(),
        };
        ipc::write_async(&mut write, &ToReplica::Run(run(0))).await?;
        await_done(&mut read).await?;
        cold.push(started.elapsed());
        if round == 0 {
            for seq in 1..=iterations as u64 {
                let sent = Instant::now();
                ipc::write_async(&mut write, &ToReplica::Run(run(seq))).await?;
                await_done(&mut read).await?;
                warm.push(sent.elapsed());
            }
        }
        ipc::write_async(&mut write, &ToReplica::Drain).await?;
        child.wait().await?;
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!("component: {} ({} KiB), compiled once in {:.1} ms", wasm.display(), bytes.len() / 1024, ms(compile));
    println!("{:<52} {:>10} {:>10} {:>8}", "what", "median", "p99", "runs");
    row("instantiate one worker (pooling, reused InstancePre)", &instantiate);
    row("instantiate one worker + init", &instantiate_init);
    row("replica cold start: process start to first result", &cold);
    row("warm task through the replica socket (round trip)", &warm);
    Ok(())
}

fn instantiate_times(compiled: &Path, iterations: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let engine = engine::new_engine(Allocation::Pooling { slots: 2, memory_bytes: MEMORY })?;
    // SAFETY: written just above by this process from the same engine settings.
    let component = unsafe { Component::deserialize_file(&engine, compiled) }.map_err(anyhow::Error::from)?;
    let linker = host::function_linker(&engine)?;
    let pre = FunctionPre::new(linker.instantiate_pre(&component).map_err(anyhow::Error::from)?)
        .map_err(anyhow::Error::from)?;
    let cancel = std::sync::Arc::default();
    let mut plain = Vec::with_capacity(iterations);
    let mut with_init = Vec::with_capacity(iterations);
    for round in 0..iterations * 2 {
        let started = Instant::now();
        let mut store = Store::new(&engine, WorkerState::new(MEMORY, std::sync::Arc::clone(&cancel)));
        store.limiter(|state| &mut state.limiter);
        let bindings = pre.instantiate(&mut store).map_err(anyhow::Error::from)?;
        if round % 2 == 0 {
            plain.push(started.elapsed());
        } else {
            if let Err(message) = bindings.call_init(&mut store).map_err(anyhow::Error::from)? {
                bail!("init failed: {message}");
            }
            with_init.push(started.elapsed());
        }
    }
    Ok((plain, with_init))
}

async fn await_done(read: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<()> {
    loop {
        match ipc::read_async::<FromReplica>(read).await? {
            Some(FromReplica::Done(done)) => {
                return match done.outcome {
                    Outcome::Complete(_) => Ok(()),
                    other => bail!("the benchmark task failed: {other:?}"),
                };
            }
            Some(FromReplica::StartFailed { message }) => bail!("replica failed to start: {message}"),
            Some(_) => {}
            None => bail!("replica exited"),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(what: &str, samples: &[Duration]) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let pick = |q: f64| sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    let fmt = |d: Duration| {
        if d < Duration::from_millis(1) {
            format!("{:.1} us", d.as_secs_f64() * 1e6)
        } else {
            format!("{:.2} ms", ms(d))
        }
    };
    println!("{what:<52} {:>10} {:>10} {:>8}", fmt(pick(0.5)), fmt(pick(0.99)), sorted.len());
}
