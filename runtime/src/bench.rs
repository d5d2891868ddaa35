//! `beamlet bench`: micro-benchmarks of the paths that decide cold and warm
//! latency. Not a test: it prints a table and checks nothing about speed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use wasmtime::Store;
use wasmtime::component::Component;

use crate::engine::{self, Allocation};
use crate::host::bindings::FunctionPre;
use crate::host::gpu::WorkerGpu;
use crate::host::{self, WorkerState};
use crate::ipc::{self, FromReplica, Outcome, ReplicaSpec, RunTask, ToReplica};

const MEMORY: u64 = 64 << 20;

/// Compiles `wasm` into a scratch dir; returns (dir, compiled path, size, compile time).
fn precompile(wasm: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf, usize, Duration)> {
    let bytes = std::fs::read(wasm).with_context(|| format!("failed to read {wasm:?}"))?;
    let dir = std::env::temp_dir().join(format!("beamlet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let compiled = dir.join("app.cwasm");
    let started = Instant::now();
    let engine = engine::new_engine(Allocation::OnDemand)?;
    let component = Component::new(&engine, &bytes).map_err(anyhow::Error::from).context("failed to compile")?;
    std::fs::write(&compiled, component.serialize().map_err(anyhow::Error::from)?)?;
    Ok((dir, compiled, bytes.len(), started.elapsed()))
}

fn bench_spec(compiled: &Path) -> ReplicaSpec {
    ReplicaSpec {
        app: "bench".into(),
        version: 1,
        replica: "bench-r0".into(),
        compiled: compiled.to_string_lossy().into_owned(),
        world: crate::registry::World::Function,
        workers: 1,
        memory_per_worker: MEMORY,
        fresh_instance_per_task: false,
        init_timeout_ms: 60_000,
        allowed_outbound_hosts: Vec::new(),
        gpu: None,
    }
}

/// Starts a replica, times its first result (the cold start) and then
/// `warm` more tasks one at a time (the node -> replica hop).
async fn replica_round_trips(spec: &ReplicaSpec, input: &str, warm: usize) -> Result<(Duration, Vec<Duration>)> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let (mut child, stream) = crate::supervisor::start_process(&exe, None)?;
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    ipc::write_async(&mut write, &ToReplica::Start(spec.clone())).await?;
    let run = |seq| RunTask {
        seq,
        task_id: format!("t{seq}"),
        attempt: 1,
        timeout_ms: 60_000,
        input: input.as_bytes().to_vec(),
        stream: false,
    };
    ipc::write_async(&mut write, &ToReplica::Run(run(0))).await?;
    await_done(&mut read).await?;
    let cold = started.elapsed();
    let mut times = Vec::with_capacity(warm);
    for seq in 1..=warm as u64 {
        let sent = Instant::now();
        ipc::write_async(&mut write, &ToReplica::Run(run(seq))).await?;
        await_done(&mut read).await?;
        times.push(sent.elapsed());
    }
    ipc::write_async(&mut write, &ToReplica::Drain).await?;
    child.wait().await?;
    Ok((cold, times))
}

pub(crate) async fn run(wasm: &Path, input: &str, iterations: usize, cold_starts: usize) -> Result<()> {
    let (dir, compiled, size, compile) = precompile(wasm)?;

    let (instantiate, instantiate_init) = tokio::task::spawn_blocking({
        let compiled = compiled.clone();
        move || instantiate_times(&compiled, iterations)
    })
    .await??;

    let spec = bench_spec(&compiled);
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for round in 0..cold_starts {
        let (first, times) = replica_round_trips(&spec, input, if round == 0 { iterations } else { 0 }).await?;
        cold.push(first);
        warm.extend(times);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!("component: {} ({} KiB), compiled once in {:.1} ms", wasm.display(), size / 1024, ms(compile));
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
    let linker = host::linker(&engine)?;
    let pre = FunctionPre::new(linker.instantiate_pre(&component).map_err(anyhow::Error::from)?)
        .map_err(anyhow::Error::from)?;
    let cancel = std::sync::Arc::default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut plain = Vec::with_capacity(iterations);
    let mut with_init = Vec::with_capacity(iterations);
    for round in 0..iterations * 2 {
        let started = Instant::now();
        let mut store = Store::new(
            &engine,
            WorkerState::new(
                MEMORY,
                std::sync::Arc::clone(&cancel),
                Vec::new().into(),
                WorkerGpu::Unavailable("bench".into()),
            ),
        );
        store.limiter(|state| &mut state.limiter);
        // No epoch ticker here: a deadline never reached.
        store.set_epoch_deadline(u64::MAX / 2);
        // Driven like a worker's calls: on a single-threaded runtime.
        let bindings = runtime.block_on(pre.instantiate_async(&mut store)).map_err(anyhow::Error::from)?;
        if round % 2 == 0 {
            plain.push(started.elapsed());
        } else {
            if let Err(message) = runtime.block_on(bindings.call_init(&mut store)).map_err(anyhow::Error::from)? {
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

fn pick(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) { format!("{:.1} us", d.as_secs_f64() * 1e6) } else { format!("{:.2} ms", ms(d)) }
}

fn row(what: &str, samples: &[Duration]) {
    println!("{what:<52} {:>10} {:>10} {:>8}", fmt(pick(samples, 0.5)), fmt(pick(samples, 0.99)), samples.len());
}

/// `beamlet bench queue`: a real node on a scratch data dir (durable queue),
/// the same component called through the queue and directly on a replica.
pub(crate) async fn queue(
    wasm: &Path,
    input: &str,
    tasks: usize,
    concurrency: usize,
    workers: u32,
    redis: Option<&str>,
) -> Result<()> {
    let (dir, compiled, _, _) = precompile(wasm)?;
    let (_, direct) = replica_round_trips(&bench_spec(&compiled), input, 2000).await?;

    let data_dir = dir.join("node");
    let mut node = tokio::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .args(redis.map(|url| ["--redis", url]).into_iter().flatten())
        .env("BEAMLET_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = tokio::io::BufReader::new(node.stdout.take().expect("piped"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line).await?;
    let base = line.trim().strip_prefix("listening on ").context("serve did not print its address")?.to_owned();
    let http = crate::client::http_client().build()?;
    let config = format!("[runtime]\nworkers = {workers}\n[task_queue]\nmax_queued = {}\n", tasks + 1);
    let form = reqwest::multipart::Form::new()
        .part("component", reqwest::multipart::Part::bytes(std::fs::read(wasm)?).file_name("app.wasm"))
        .text("config", config);
    let response = http.put(format!("{base}/v1/apps/bench")).multipart(form).send().await?;
    if !response.status().is_success() {
        bail!("deploy failed: {}", response.text().await?);
    }
    let invoke = format!("{base}/v1/apps/bench/invoke");
    let mut through_queue = Vec::with_capacity(2000);
    for round in 0..2200 {
        let started = Instant::now();
        let response = http.post(&invoke).body(input.to_owned()).send().await?;
        if !response.status().is_success() {
            bail!("invoke failed: {}", response.text().await?);
        }
        response.bytes().await?;
        if round >= 200 {
            through_queue.push(started.elapsed());
        }
    }

    let submit = format!("{base}/v1/apps/bench/tasks");
    let started = Instant::now();
    let per_client = tasks.div_ceil(concurrency);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, submit, input) = (http.clone(), submit.clone(), input.to_owned());
        clients.spawn(async move {
            for _ in 0..per_client {
                let response = http.post(&submit).body(input.clone()).send().await?;
                if response.status() != reqwest::StatusCode::ACCEPTED {
                    bail!("submit failed: {}", response.text().await?);
                }
            }
            Ok(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    let submitted = started.elapsed();
    loop {
        let status: serde_json::Value = http.get(format!("{base}/v1/apps/bench")).send().await?.json().await?;
        if status["queue"]["queued"] == 0 && status["queue"]["running"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = started.elapsed();
    let total = per_client * concurrency;
    node.kill().await?;
    let _ = std::fs::remove_dir_all(&dir);

    println!("{:<52} {:>10} {:>10} {:>8}", "what", "median", "p99", "runs");
    row("direct: task on a warm replica (socket round trip)", &direct);
    row("through the durable queue: HTTP invoke", &through_queue);
    let overhead = |q: f64| pick(&through_queue, q).saturating_sub(pick(&direct, q));
    println!("{:<52} {:>10} {:>10}", "queue + HTTP overhead", fmt(overhead(0.5)), fmt(overhead(0.99)));
    println!(
        "submit -> COMPLETE: {total} tasks, {concurrency} clients, {workers} workers: submitted in {:.2} s, all complete in {:.2} s = {:.0} tasks/s",
        submitted.as_secs_f64(),
        drained.as_secs_f64(),
        total as f64 / drained.as_secs_f64()
    );
    Ok(())
}

/// `beamlet bench load`: `connections` clients POST `data` to `url` back to
/// back for `duration`; every answer must be a success.
pub(crate) async fn load(url: &str, data: &str, connections: usize, duration: Duration) -> Result<()> {
    let http = crate::client::http_client().build()?;
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let (http, url, data) = (http.clone(), url.to_owned(), data.to_owned());
        clients.spawn(async move {
            let mut times = Vec::new();
            while started.elapsed() < duration {
                let sent = Instant::now();
                let response = http.post(&url).body(data.clone()).send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                if !status.is_success() {
                    bail!("{url} answered {status}: {}", String::from_utf8_lossy(&body));
                }
                times.push(sent.elapsed());
            }
            Ok(times)
        });
    }
    let mut times = Vec::new();
    while let Some(done) = clients.join_next().await {
        times.extend(done??);
    }
    let elapsed = started.elapsed();
    times.sort();
    let rps = times.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{{\"requests\": {}, \"rps\": {rps:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
        times.len(),
        ms(pick(&times, 0.5)),
        ms(pick(&times, 0.99))
    );
    Ok(())
}
