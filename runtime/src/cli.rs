//! The command line: `serve` and `replica` run beamlet; the rest are clients
//! of a running node's HTTP API.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::client::Client;
use crate::node::{GpuBackendChoice, Limits, ServeOptions};

#[derive(Parser)]
#[command(name = "beamlet", version, about = "Serverless functions as WebAssembly components")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Server {
    /// The node to talk to.
    #[arg(long, env = "BEAMLET_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: the HTTP API, the task queue and the replicas.
    Serve {
        /// Address to listen on; port 0 picks a free one.
        #[arg(long, env = "BEAMLET_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
        listen: SocketAddr,
        /// Where apps, compiled components and queues are kept.
        #[arg(long, default_value = ".beamlet")]
        data_dir: PathBuf,
        /// Where GPU apps' GPUs come from: the NVIDIA GPUs found (auto, cuda)
        /// or GPUs backed by the CPU backend (cpu), for machines without one.
        #[arg(long, value_enum, default_value = "auto")]
        gpu_backend: GpuBackendChoice,
        /// How many GPUs to offer [default: all found; 1 for --gpu-backend cpu].
        #[arg(long)]
        gpus: Option<u32>,
        /// Memory each CPU-backed GPU reports (--gpu-backend cpu), e.g. 16Gi.
        #[arg(long, default_value = "16Gi", value_parser = parse_size)]
        cpu_gpu_memory: u64,
        /// Largest component upload, e.g. 64Mi.
        #[arg(long, default_value = "64Mi", value_parser = parse_size)]
        max_component_size: u64,
        /// Largest task input, e.g. 16Mi.
        #[arg(long, default_value = "16Mi", value_parser = parse_size)]
        max_input_size: u64,
        /// Most bytes the node holds for its tasks, all apps together:
        /// inputs not yet run and results kept for result_ttl (without
        /// --redis, in its memory; past it submits get 429), e.g. 4Gi
        /// [default: a quarter of this machine's memory].
        #[arg(long, value_parser = parse_size)]
        max_task_bytes: Option<u64>,
        /// Cores replicas may reserve on this node [default: this machine's].
        #[arg(long)]
        cpus: Option<f64>,
        /// Threads of the node's own event loop (HTTP, queue, replica
        /// sockets) [default: a quarter of the cores, at least 1; with
        /// --redis, the cores, at least 4]. The guests
        /// run on their replicas' threads, not these; fewer node threads mean
        /// fewer hand-offs between them per request.
        #[arg(long)]
        threads: Option<usize>,
        /// Memory replicas may reserve on this node, e.g. 16Gi [default: this machine's].
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// On Ctrl-C or SIGTERM, how long replicas may finish the tasks they
        /// hold before the node exits (a second signal exits at once).
        #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
        shutdown_grace: std::time::Duration,
        /// Share the task queue with other nodes through this Redis server,
        /// e.g. redis://127.0.0.1:6379/0 [default: the embedded queue under
        /// --data-dir]. Every node of a cluster needs its own --data-dir.
        #[arg(long, env = "BEAMLET_REDIS")]
        redis: Option<String>,
    },
    /// Upload a component as a new version of an app.
    Deploy {
        /// The .wasm component.
        wasm: PathBuf,
        /// The app's name: 1-63 lowercase letters, digits and '-'.
        #[arg(long)]
        name: String,
        /// App config (beamlet.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        server: Server,
    },
    /// Call an app and print its output (the REST API).
    Invoke {
        /// The app.
        name: String,
        #[command(flatten)]
        input: Input,
        #[command(flatten)]
        server: Server,
    },
    /// Work with the task queue.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
        #[command(flatten)]
        server: Server,
    },
    /// List apps.
    Apps {
        #[command(flatten)]
        server: Server,
    },
    /// Show an app's version, config, replicas and queue.
    Status {
        /// The app.
        name: String,
        /// Print the server's JSON record of the app as is.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: Server,
    },
    /// Show an app's recent guest output.
    Logs {
        /// The app.
        name: String,
        /// How many of the latest lines.
        #[arg(long, default_value_t = 200)]
        lines: usize,
        #[command(flatten)]
        server: Server,
    },
    /// Remove an app and stop its replicas.
    Delete {
        /// The app.
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Measure worker instantiation, replica cold start and the warm replica hop.
    #[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        queue: Option<BenchQueue>,
        /// A `function` component, e.g. the hello example.
        #[arg(required = true)]
        wasm: Option<PathBuf>,
        /// The input each benchmark task gets.
        #[arg(long, default_value = r#"{"name":"bench"}"#)]
        data: String,
        /// Instantiations and warm round trips to time.
        #[arg(long, default_value_t = 2000)]
        iterations: usize,
        /// Replica cold starts to time.
        #[arg(long, default_value_t = 20)]
        cold_starts: usize,
    },
    /// Run the real autoscaler in virtual time over an arrival trace, with
    /// autoscaling on and off, and print how each served it.
    Simulate {
        /// CSV with header `arrival_s,duration_s`.
        #[arg(required_unless_present_any = ["bursty", "seeds"])]
        trace: Option<PathBuf>,
        /// The app config (beamlet.toml) whose [runtime] and [autoscaler] to simulate.
        #[arg(long, required_unless_present = "seeds")]
        config: Option<PathBuf>,
        /// Use a synthetic bursty trace generated from this seed instead of a file.
        #[arg(long, conflicts_with = "trace")]
        bursty: Option<u64>,
        /// Run SPEC §7's seed scenarios instead.
        #[arg(long, conflicts_with_all = ["trace", "bursty", "config"])]
        seeds: bool,
        /// Write an SVG plot of queue depth and replicas (autoscaling on) here.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Write the trace used as CSV here (to keep a synthetic one).
        #[arg(long)]
        trace_out: Option<PathBuf>,
        /// Time from a replica's start to its first task [default: 1s].
        #[arg(long)]
        cold_start: Option<String>,
    },
    /// Internal: a replica process, started by `serve`.
    #[command(hide = true)]
    Replica {
        /// The inherited socket to the node.
        #[arg(long)]
        fd: i32,
    },
}

#[derive(Subcommand)]
enum BenchQueue {
    /// Submit -> COMPLETE throughput of the durable queue, and its latency
    /// overhead against calling a warm replica directly.
    Queue {
        /// A `function` component, e.g. the hello example.
        wasm: PathBuf,
        #[arg(long, default_value = r#"{"name":"bench"}"#)]
        data: String,
        #[arg(long, default_value_t = 20_000)]
        tasks: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Measure the Redis queue at this URL instead of the embedded one
        /// (use a Redis of its own: the bench deploys an app there).
        #[arg(long)]
        redis: Option<String>,
    },
    /// POST the same body to a URL from several connections for a while and
    /// print req/s, p50 and p99 (a load generator for machines without wrk).
    Load {
        url: String,
        #[arg(long, default_value = "{}")]
        data: String,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// e.g. 10s.
        #[arg(long, default_value = "10s")]
        duration: String,
    },
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Queue a task; prints its id.
    Submit {
        /// The app.
        name: String,
        #[command(flatten)]
        input: Input,
    },
    /// Print a task's status.
    Status {
        /// The task id `submit` printed.
        id: String,
    },
    /// Wait for a task to end; prints its status, then its output.
    Wait {
        /// The task id `submit` printed.
        id: String,
        /// Give up after this long, e.g. 30s.
        #[arg(long, default_value = "300s")]
        timeout: String,
    },
    /// Cancel a queued or running task.
    Cancel {
        /// The task id `submit` printed.
        id: String,
    },
    /// List an app's tasks, newest first, a line each.
    List {
        /// The app.
        name: String,
        /// Only tasks in this state, e.g. RUNNING or FAILED.
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only tasks older than this one (the `next` a list printed).
        #[arg(long)]
        before: Option<String>,
    },
}

/// A call's input: inline or from a file; `{}` when neither is given.
#[derive(clap::Args)]
struct Input {
    /// The input, inline (JSON for SDK handlers) [default: {}].
    #[arg(long, conflicts_with = "file")]
    data: Option<String>,
    /// The input, from a file ("-" reads stdin).
    #[arg(long)]
    file: Option<PathBuf>,
}

impl Input {
    fn read(self) -> Result<Vec<u8>> {
        match (self.data, self.file) {
            (Some(data), _) => Ok(data.into_bytes()),
            (None, Some(path)) if path.as_os_str() == "-" => {
                let mut input = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut input).context("failed to read stdin")?;
                Ok(input)
            }
            (None, Some(path)) => std::fs::read(&path).with_context(|| format!("failed to read input file {path:?}")),
            (None, None) => Ok(b"{}".to_vec()),
        }
    }
}

/// `--listen`: an IP address and a port (a host name is not looked up).
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("{text:?} is not an IP address and port; write e.g. 127.0.0.1:8080 (0.0.0.0:8080 for every interface)")
    })
}

fn parse_size(text: &str) -> Result<u64, String> {
    crate::config::parse_size(text)
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_client = !matches!(cli.command, Command::Serve { .. } | Command::Replica { .. });
    init_tracing(if quiet_client { "warn" } else { "info" });
    if quiet_client {
        // A client piped into `head` ends quietly when the pipe closes, as
        // other command-line tools do (Rust ignores SIGPIPE, and printing
        // to a closed pipe panics). Sockets send with MSG_NOSIGNAL.
        // SAFETY: restoring a signal's default action before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let serve = matches!(cli.command, Command::Serve { .. });
    let result = match cli.command {
        Command::Replica { fd } => crate::replica::main(fd),
        command => runtime(&command).and_then(|rt| {
            let result = rt.block_on(run(command));
            if serve {
                // See below: not a drop, which waits for every blocked thread.
                rt.shutdown_background();
            }
            result
        }),
    };
    let ok = match result {
        Ok(()) => true,
        Err(e) => {
            // Not `eprintln!`: it panics when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            false
        }
    };
    if serve {
        // A node that stopped has saved what it must. Threads still waiting
        // on a store that does not answer (Redis frozen) would hold up the
        // runtime's drop for their whole timeout, then trip on its teardown.
        std::process::exit(if ok { 0 } else { 1 });
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BEAMLET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A log line that cannot be written is dropped: reporting that with
    // `eprintln!` would panic when stderr is a closed pipe (`serve 2>&1 | head`).
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| EventWriter(Vec::new()))
        .with_ansi(ansi)
        .log_internal_errors(false)
        .init();
}

/// One log event, written to stderr as one line: line breaks in it (a
/// guest's stderr quoted in a message) go on indented, so nothing a guest
/// prints passes for a line of the node's own.
struct EventWriter(Vec<u8>);

impl std::io::Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &one_line(&self.0));
    }
}

/// `event` as one log line: its inner line breaks indent what follows them.
fn one_line(event: &[u8]) -> Vec<u8> {
    let event = event.strip_suffix(b"\n").unwrap_or(event);
    let mut line = Vec::with_capacity(event.len() + 16);
    for (i, part) in event.split(|b| *b == b'\n').enumerate() {
        if i > 0 {
            line.extend_from_slice(b"\n    ");
        }
        line.extend_from_slice(part);
    }
    line.push(b'\n');
    line
}

fn runtime(command: &Command) -> Result<tokio::runtime::Runtime> {
    let threads = match command {
        Command::Serve { threads: Some(threads), .. } => (*threads).max(1),
        // Calls to Redis block their thread for a round trip: more threads
        // keep the node's other work going meanwhile.
        Command::Serve { threads: None, redis: Some(_), .. } => {
            std::thread::available_parallelism().map_or(4, |n| n.get().max(4))
        }
        Command::Serve { threads: None, .. } => {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
        }
        // Clients (and `bench load`'s connections) wait on the network.
        _ => 1,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads).enable_all().build().context("failed to start the async runtime")
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve {
            listen,
            data_dir,
            gpu_backend,
            gpus,
            cpu_gpu_memory,
            max_component_size,
            max_input_size,
            max_task_bytes,
            cpus,
            memory,
            threads,
            shutdown_grace,
            redis,
        } => {
            if threads == Some(0) {
                bail!("--threads must be more than 0: the node's HTTP and queue work runs on them");
            }
            if cpus.is_some_and(|cpus| cpus.is_nan() || cpus <= 0.0) {
                bail!("--cpus must be more than 0: replicas reserve cores from it");
            }
            if memory == Some(0) {
                bail!("--memory must be more than 0: replicas reserve memory from it");
            }
            let machine = crate::supervisor::Capacity::of_this_machine();
            let max_task_bytes = max_task_bytes.unwrap_or(machine.memory / 4);
            let sizes = [
                ("--max-input-size", max_input_size, "task input"),
                ("--max-component-size", max_component_size, "component upload"),
                ("--max-task-bytes", max_task_bytes, "memory the node holds for its tasks"),
            ];
            for (flag, size, what) in sizes {
                if size == 0 {
                    bail!("{flag} must be more than 0: it is the largest {what} the node takes");
                }
            }
            if let Some(url) = &redis {
                crate::queue::RedisQueue::check_url(url)?;
            }
            let gpus = crate::node::discover_gpus(gpu_backend, gpus, cpu_gpu_memory)?;
            let capacity = crate::supervisor::Demand {
                cpu: cpus.unwrap_or(machine.cpu),
                memory: memory.unwrap_or(machine.memory),
            };
            let limits = Limits {
                max_component: usize::try_from(max_component_size).context("--max-component-size is too large")?,
                max_input: usize::try_from(max_input_size).context("--max-input-size is too large")?,
                max_task_bytes,
            };
            crate::node::serve(ServeOptions { listen, data_dir, limits, capacity, gpus, shutdown_grace, redis }).await
        }
        Command::Deploy { wasm, name, config, server } => {
            Client::new(&server.server)?.deploy(&wasm, &name, config.as_deref()).await
        }
        Command::Invoke { name, input, server } => Client::new(&server.server)?.invoke(&name, input.read()?).await,
        Command::Task { command, server } => {
            let client = Client::new(&server.server)?;
            match command {
                TaskCommand::Submit { name, input } => client.task_submit(&name, input.read()?).await,
                TaskCommand::Status { id } => client.task_status(&id).await,
                TaskCommand::Wait { id, timeout } => client.task_wait(&id, &timeout).await,
                TaskCommand::Cancel { id } => client.task_cancel(&id).await,
                TaskCommand::List { name, status, limit, before } => {
                    client.task_list(&name, status.as_deref(), limit, before.as_deref()).await
                }
            }
        }
        Command::Apps { server } => Client::new(&server.server)?.apps().await,
        Command::Status { name, json, server } => Client::new(&server.server)?.status(&name, json).await,
        Command::Logs { name, lines, server } => Client::new(&server.server)?.logs(&name, lines).await,
        Command::Delete { name, server } => Client::new(&server.server)?.delete(&name).await,
        Command::Bench {
            queue: Some(BenchQueue::Queue { wasm, data, tasks, concurrency, workers, redis }), ..
        } => crate::bench::queue(&wasm, &data, tasks, concurrency, workers, redis.as_deref()).await,
        Command::Bench { queue: Some(BenchQueue::Load { url, data, connections, duration }), .. } => {
            let duration = crate::config::parse_duration(&duration).map_err(anyhow::Error::msg)?;
            crate::bench::load(&url, &data, connections, duration).await
        }
        Command::Bench { queue: None, wasm, data, iterations, cold_starts } => {
            let wasm = wasm.context("give the component to measure: beamlet bench APP.wasm")?;
            crate::bench::run(&wasm, &data, iterations, cold_starts).await
        }
        Command::Simulate { trace, config, bursty, seeds, svg, trace_out, cold_start } => {
            let cold_start = match cold_start {
                Some(text) => crate::config::parse_duration(&text).map_err(|e| anyhow::anyhow!("--cold-start: {e}"))?,
                None => crate::simulate::DEFAULT_COLD_START,
            };
            simulate(trace, config, bursty, seeds, svg, trace_out, cold_start)
        }
        Command::Replica { .. } => unreachable!("handled before the async runtime starts"),
    }
}

fn simulate(
    trace: Option<PathBuf>,
    config: Option<PathBuf>,
    bursty: Option<u64>,
    seeds: bool,
    svg: Option<PathBuf>,
    trace_out: Option<PathBuf>,
    cold_start: std::time::Duration,
) -> Result<()> {
    use crate::simulate as sim;
    let runs: Vec<(String, crate::config::AppConfig, Vec<sim::Arrival>)> = if seeds {
        sim::seed_scenarios()
            .into_iter()
            .map(|(name, toml, trace)| Ok((name, crate::config::parse(&toml)?, trace)))
            .collect::<Result<_>>()?
    } else {
        let path = config.context("--config is required")?;
        let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read config {path:?}"))?;
        let config = crate::config::parse(&text).with_context(|| format!("config {path:?}"))?;
        let (name, trace) = match (trace, bursty) {
            (_, Some(seed)) => (format!("bursty seed {seed}"), sim::bursty_trace(seed)),
            (Some(path), None) => {
                let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read trace {path:?}"))?;
                (path.display().to_string(), sim::parse_trace(&text).with_context(|| format!("trace {path:?}"))?)
            }
            (None, None) => anyhow::bail!("give a trace file, --bursty SEED or --seeds"),
        };
        vec![(name, config, trace)]
    };
    let mut rows = Vec::new();
    for (name, config, trace) in &runs {
        let (on, timeline) = sim::simulate(trace, config, cold_start);
        let (off, _) = sim::simulate_off(trace, config, cold_start);
        rows.push((format!("{name}: autoscaling on"), on));
        rows.push((format!("{name}: autoscaling off"), off));
        if let Some(path) = &svg {
            std::fs::write(path, sim::svg(&timeline, name)).with_context(|| format!("failed to write {path:?}"))?;
        }
        if let Some(path) = &trace_out {
            std::fs::write(path, sim::format_trace(trace)).with_context(|| format!("failed to write {path:?}"))?;
        }
    }
    print!("{}", sim::table(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_log_event_with_line_breaks_stays_one_line_with_indented_continuations() {
        assert_eq!(one_line(b"plain\n"), b"plain\n");
        let forged = b"WARN task cut short: guest stderr: oops\n2026-11-29T10:00:00Z ERROR beamlet::node: forged\n";
        let line = String::from_utf8(one_line(forged)).unwrap();
        assert_eq!(
            line,
            "WARN task cut short: guest stderr: oops\n    2026-11-29T10:00:00Z ERROR beamlet::node: forged\n"
        );
    }
}
