//! `beamlet simulate`: replays an arrival trace through the real scaling policy
//! ([`decide`], SPEC §7) in virtual time and reports how well it served the trace.
//!
//! The model is event-driven and deterministic. Each replica has `[runtime]
//! workers` slots. A replica the policy starts is `Starting` for `cold_start`,
//! then `Ready`; the replicas of the baseline pool are ready from the start.
//! Tasks wait in one FIFO queue and start on a free slot of a ready replica (the
//! oldest replica with a free slot first), and run for exactly their duration
//! (no timeouts, no retries). Like the node's control loop, the controller
//! samples and calls [`decide`] every [`TICK`] of virtual time and on every
//! arrival, starts the replicas it asks for and removes the ones it stops.
//! The average task time it reports is the mean of the last 50 finished tasks.
//!
//! A run ends when the last task finishes; replica-seconds count every replica
//! from its start (cold start included) until it stops or the run ends.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::autoscaler::policy::{Placement, ReplicaSample, Sample, decide};
use crate::config::{AppConfig, Policy, format_duration};

/// How often the controller evaluates the policy between arrivals.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// Time from starting a replica until it takes tasks, unless `--cold-start` says otherwise.
pub(crate) const DEFAULT_COLD_START: Duration = Duration::from_secs(1);
/// The latency goal a run is measured against when its config has no `request_latency` policy.
pub(crate) const DEFAULT_LATENCY_GOAL: Duration = Duration::from_secs(30);
/// How many recent tasks the average task time covers (as on the node).
const RECENT_TASKS: usize = 50;
/// Latest arrival a trace may hold: one week.
const MAX_ARRIVAL: Duration = Duration::from_secs(7 * 86_400);
/// Longest task a trace may hold: the longest `[runtime] timeout`.
const MAX_TASK: Duration = Duration::from_secs(86_400);
/// The header line of a trace.
const TRACE_HEADER: &str = "arrival_s,duration_s";

/// One task of a trace: when it is submitted and how long it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// Since the start of the trace.
    pub at: Duration,
    pub duration: Duration,
}

/// Parses a CSV trace: the header `arrival_s,duration_s`, then one task per line
/// as two numbers of seconds (`0.5,3.25`). Blank lines and `#` comments are skipped;
/// arrivals need not be sorted.
pub(crate) fn parse_trace(text: &str) -> anyhow::Result<Vec<Arrival>> {
    let mut lines = text
        .trim_start_matches('\u{feff}')
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let Some((number, header)) = lines.next() else {
        bail!("the trace is empty; it needs the header line \"{TRACE_HEADER}\" and one task per line");
    };
    if header.split(',').map(str::trim).ne(TRACE_HEADER.split(',')) {
        bail!("line {number}: expected the header \"{TRACE_HEADER}\", got {header:?}");
    }
    let mut arrivals = Vec::new();
    for (number, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [at, duration] = fields[..] else {
            bail!("line {number}: expected 2 numbers \"{TRACE_HEADER}\", got {} fields in {line:?}", fields.len());
        };
        let at = seconds(at, MAX_ARRIVAL).map_err(|e| anyhow::anyhow!("line {number}: arrival_s {e}"))?;
        let duration = seconds(duration, MAX_TASK).map_err(|e| anyhow::anyhow!("line {number}: duration_s {e}"))?;
        arrivals.push(Arrival { at, duration });
    }
    if arrivals.is_empty() {
        bail!("the trace has a header but no tasks");
    }
    Ok(arrivals)
}

/// A number of seconds in `0..=max`, to the nanosecond.
fn seconds(text: &str, max: Duration) -> Result<Duration, String> {
    let value: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(value >= 0.0 && value <= max.as_secs_f64()) {
        return Err(format!("{text:?} is out of range; use 0 to {} seconds", max.as_secs()));
    }
    // Rounding to whole nanoseconds reads "1.234" back as exactly 1.234 s.
    Ok(Duration::from_nanos((value * 1e9).round() as u64))
}

/// Writes a trace in the form [`parse_trace`] reads, to the millisecond.
pub(crate) fn format_trace(arrivals: &[Arrival]) -> String {
    let mut out = format!("{TRACE_HEADER}\n");
    for arrival in arrivals {
        let _ = writeln!(out, "{:.3},{:.3}", arrival.at.as_secs_f64(), arrival.duration.as_secs_f64());
    }
    out
}

/// splitmix64: a tiny seeded generator, enough for synthetic traces.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (the modulo bias is negligible for small `n`).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Exponentially distributed with the given mean.
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A task time: log-normal around 3 s, kept within 0.1 s to 2 min.
    fn task_time(&mut self) -> f64 {
        (3f64.ln() + 0.7 * self.normal()).exp().clamp(0.1, 120.0)
    }
}

/// A synthetic trace of about ten minutes, the same for the same seed: sparse
/// arrivals (one every 15 s on average) with 3 to 5 bursts of 20 to 60 tasks
/// arriving within a few seconds; task times log-normal around 3 s.
pub(crate) fn bursty_trace(seed: u64) -> Vec<Arrival> {
    const LENGTH_S: f64 = 600.0;
    let mut rng = Rng(seed);
    let mut tasks: Vec<(f64, f64)> = Vec::new();
    let mut at = rng.exponential(15.0);
    while at < LENGTH_S {
        tasks.push((at, rng.task_time()));
        at += rng.exponential(15.0);
    }
    for _ in 0..3 + rng.below(3) {
        let start = 20.0 + rng.unit() * (LENGTH_S - 80.0);
        let spread = 1.0 + rng.unit() * 4.0;
        for _ in 0..20 + rng.below(41) {
            tasks.push((start + rng.unit() * spread, rng.task_time()));
        }
    }
    let millis = |s: f64| Duration::from_millis((s * 1000.0).round() as u64);
    let mut arrivals: Vec<Arrival> =
        tasks.into_iter().map(|(at, duration)| Arrival { at: millis(at), duration: millis(duration) }).collect();
    arrivals.sort_by_key(|arrival| arrival.at);
    arrivals
}

/// The seed scenarios of SPEC §7 as (name, config TOML, trace).
pub(crate) fn seed_scenarios() -> Vec<(String, String, Vec<Arrival>)> {
    let at_once = |count, seconds| vec![Arrival { at: Duration::ZERO, duration: Duration::from_secs(seconds) }; count];
    vec![
        (
            "request_latency: 3 x 60s at once".to_owned(),
            "[runtime]\nworkers = 1\n\n[autoscaler]\nkind = \"request_latency\"\ndesired_latency = \"30s\"\n\
             max_replicas = 5\nmin_replicas = 1\n"
                .to_owned(),
            at_once(3, 60),
        ),
        (
            "queue_depth: 12 x 10s at once".to_owned(),
            "[runtime]\nworkers = 1\n\n[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 3\n\
             max_replicas = 3\n"
                .to_owned(),
            at_once(12, 10),
        ),
    ]
}

/// How a run served its trace.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    /// Tasks in the trace.
    pub tasks: usize,
    /// Tasks that never finished (only if the run had to be cut off; 0 normally).
    pub unfinished: usize,
    /// L: the wait a task should start within.
    pub latency_goal: Duration,
    /// Tasks that started within L of their arrival.
    pub within_goal: usize,
    /// Median wait from arrival to start.
    pub p50_wait: Duration,
    /// 99th percentile wait.
    pub p99_wait: Duration,
    /// When the last task finished.
    pub makespan: Duration,
    /// Sum over replicas of their alive time, cold start included.
    pub replica_seconds: f64,
    /// Most replicas at once, in any placement.
    pub peak_replicas: u32,
}

impl Report {
    /// The share of tasks that started within L, in `0..=1` (1 for an empty trace).
    pub(crate) fn within_goal_share(&self) -> f64 {
        if self.tasks == 0 { 1.0 } else { self.within_goal as f64 / self.tasks as f64 }
    }
}

/// The app's state at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimelinePoint {
    pub t: Duration,
    pub queued: u64,
    pub running: u64,
    /// In any placement.
    pub replicas: u32,
}

/// What a run looked like over time.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Timeline {
    /// One point per tick, and one at the end of the run.
    pub points: Vec<TimelinePoint>,
    /// Every decision that started or stopped replicas: (when, the policy's reason).
    pub scaling: Vec<(Duration, String)>,
}

/// L for `config`: its `request_latency` goal, else [`DEFAULT_LATENCY_GOAL`].
pub(crate) fn latency_goal(config: &AppConfig) -> Duration {
    match config.autoscaler.policy {
        Some(Policy::RequestLatency { desired_latency, .. }) => desired_latency,
        _ => DEFAULT_LATENCY_GOAL,
    }
}

/// `config` with autoscaling off: the same runtime, a fixed pool of `max(min_replicas, 1)`.
pub(crate) fn autoscaling_off(config: &AppConfig) -> AppConfig {
    let mut off = config.clone();
    off.autoscaler.policy = None;
    off
}

/// Runs `trace` under `config`'s autoscaler, measured against [`latency_goal`].
pub(crate) fn simulate(trace: &[Arrival], config: &AppConfig, cold_start: Duration) -> (Report, Timeline) {
    simulate_with_goal(trace, config, cold_start, latency_goal(config))
}

/// Runs `trace` with autoscaling off, measured against the same L as [`simulate`] with `config`.
pub(crate) fn simulate_off(trace: &[Arrival], config: &AppConfig, cold_start: Duration) -> (Report, Timeline) {
    simulate_with_goal(trace, &autoscaling_off(config), cold_start, latency_goal(config))
}

/// Runs `trace` under `config`, counting the tasks that start within `goal`.
pub(crate) fn simulate_with_goal(
    trace: &[Arrival],
    config: &AppConfig,
    cold_start: Duration,
    goal: Duration,
) -> (Report, Timeline) {
    let mut order: Vec<usize> = (0..trace.len()).collect();
    order.sort_by_key(|&task| trace[task].at);
    // A policy always wants a replica while there is work, so every run ends; this
    // only guards against looping forever should that ever change.
    let last_arrival = order.last().map_or(Duration::ZERO, |&task| trace[task].at);
    let horizon = last_arrival + trace.iter().map(|a| a.duration).sum::<Duration>() + cold_start + 3600 * TICK;

    let mut sim = Sim::new(trace, config, cold_start);
    let mut next = 0;
    let mut next_tick = Duration::ZERO;
    loop {
        let idle = next == order.len() && sim.queue.is_empty() && sim.running.is_empty();
        if idle || sim.now > horizon {
            break;
        }
        let mut now = next_tick;
        if let Some(&task) = order.get(next) {
            now = now.min(trace[task].at);
        }
        if let Some(Reverse((end, _, _))) = sim.running.peek() {
            now = now.min(*end);
        }
        for replica in sim.replicas.iter().filter(|r| !r.ready) {
            now = now.min(replica.ready_at);
        }
        sim.now = now;
        sim.finish_tasks();
        sim.settle();
        while let Some(&task) = order.get(next).filter(|&&task| trace[task].at <= now) {
            sim.queue.push_back(task);
            next += 1;
            sim.dispatch();
            sim.control();
        }
        if next_tick <= now {
            sim.control();
            sim.record();
            next_tick += TICK;
        }
    }
    if sim.timeline.points.last().is_none_or(|point| point.t < sim.now) {
        sim.record();
    }
    sim.report(goal)
}

struct Replica {
    number: u64,
    id: String,
    started: Duration,
    ready_at: Duration,
    ready: bool,
    busy: u32,
    idle_since: Option<Duration>,
}

struct Sim<'a> {
    trace: &'a [Arrival],
    config: &'a AppConfig,
    workers: u32,
    cold_start: Duration,
    origin: Instant,
    now: Duration,
    /// Waiting tasks, by index into `trace`, oldest first.
    queue: VecDeque<usize>,
    /// Running tasks as (end, task, replica number), soonest end on top.
    running: BinaryHeap<Reverse<(Duration, usize, u64)>>,
    replicas: Vec<Replica>,
    started_replicas: u64,
    /// Run times of the last [`RECENT_TASKS`] finished tasks.
    recent: VecDeque<Duration>,
    /// When each task started.
    starts: Vec<Option<Duration>>,
    finished: usize,
    makespan: Duration,
    stopped_replica_time: Duration,
    peak: u32,
    timeline: Timeline,
}

impl<'a> Sim<'a> {
    fn new(trace: &'a [Arrival], config: &'a AppConfig, cold_start: Duration) -> Self {
        let mut sim = Self {
            trace,
            config,
            workers: config.runtime.workers.max(1),
            cold_start,
            origin: Instant::now(),
            now: Duration::ZERO,
            queue: VecDeque::new(),
            running: BinaryHeap::new(),
            replicas: Vec::new(),
            started_replicas: 0,
            recent: VecDeque::new(),
            starts: vec![None; trace.len()],
            finished: 0,
            makespan: Duration::ZERO,
            stopped_replica_time: Duration::ZERO,
            peak: 0,
            timeline: Timeline::default(),
        };
        // The baseline pool was started before the trace begins and is warm.
        for _ in 0..config.autoscaler.baseline_replicas() {
            sim.start_replica(Duration::ZERO);
        }
        sim.settle();
        sim
    }

    fn start_replica(&mut self, cold_start: Duration) {
        self.started_replicas += 1;
        let number = self.started_replicas;
        self.replicas.push(Replica {
            number,
            id: format!("r{number}"),
            started: self.now,
            ready_at: self.now + cold_start,
            ready: false,
            busy: 0,
            idle_since: None,
        });
        self.peak = self.peak.max(u32::try_from(self.replicas.len()).unwrap_or(u32::MAX));
    }

    /// Frees the slots of the tasks that have ended by now.
    fn finish_tasks(&mut self) {
        while let Some(&Reverse((end, task, number))) = self.running.peek() {
            if end > self.now {
                break;
            }
            self.running.pop();
            if let Some(replica) = self.replicas.iter_mut().find(|r| r.number == number) {
                replica.busy -= 1;
                if replica.busy == 0 {
                    replica.idle_since = Some(end);
                }
            }
            if self.recent.len() == RECENT_TASKS {
                self.recent.pop_front();
            }
            self.recent.push_back(self.trace[task].duration);
            self.finished += 1;
            self.makespan = self.makespan.max(end);
        }
    }

    /// Marks the replicas whose cold start is over as ready and hands them work.
    fn settle(&mut self) {
        let now = self.now;
        for replica in self.replicas.iter_mut().filter(|r| !r.ready && r.ready_at <= now) {
            replica.ready = true;
            replica.idle_since = Some(now);
        }
        self.dispatch();
    }

    /// Starts queued tasks, oldest first, on free slots of ready replicas.
    fn dispatch(&mut self) {
        while let Some(&task) = self.queue.front() {
            let workers = self.workers;
            let Some(replica) = self.replicas.iter_mut().find(|r| r.ready && r.busy < workers) else { break };
            self.queue.pop_front();
            replica.busy += 1;
            replica.idle_since = None;
            self.starts[task] = Some(self.now);
            self.running.push(Reverse((self.now + self.trace[task].duration, task, replica.number)));
        }
    }

    fn sample(&self) -> Sample {
        let recent = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        Sample {
            queued: self.queue.len() as u64,
            running: self.running.len() as u64,
            workers_per_replica: self.config.runtime.workers,
            avg_task_time: (recent > 0).then(|| self.recent.iter().sum::<Duration>() / recent),
            longest_run: (self.running.iter())
                .map(|Reverse((end, task, _))| self.now.saturating_sub(end.saturating_sub(self.trace[*task].duration)))
                .max()
                .unwrap_or_default(),
            replicas: self
                .replicas
                .iter()
                .map(|r| ReplicaSample {
                    id: r.id.clone(),
                    placement: if r.ready { Placement::Ready } else { Placement::Starting },
                    busy: r.busy,
                    idle_since: r.idle_since.map(|since| self.origin + since),
                    wanted_by: None,
                })
                .collect(),
            elsewhere: 0,
            others: 0,
        }
    }

    /// Asks the policy and applies its decision.
    fn control(&mut self) {
        let decision = decide(&self.sample(), &self.config.autoscaler, self.origin + self.now);
        for _ in 0..decision.start {
            self.start_replica(self.cold_start);
        }
        for id in &decision.stop {
            // The policy never stops a busy replica; should it, the replica keeps running.
            if let Some(index) = self.replicas.iter().position(|r| r.id == *id && r.busy == 0) {
                let replica = self.replicas.remove(index);
                self.stopped_replica_time += self.now - replica.started;
            }
        }
        if decision.start > 0 || !decision.stop.is_empty() {
            self.timeline.scaling.push((self.now, decision.reason));
        }
        self.settle();
    }

    fn record(&mut self) {
        self.timeline.points.push(TimelinePoint {
            t: self.now,
            queued: self.queue.len() as u64,
            running: self.running.len() as u64,
            replicas: u32::try_from(self.replicas.len()).unwrap_or(u32::MAX),
        });
    }

    fn report(self, goal: Duration) -> (Report, Timeline) {
        let mut waits: Vec<Duration> = self
            .starts
            .iter()
            .zip(self.trace)
            .filter_map(|(start, arrival)| Some(*start.as_ref()? - arrival.at))
            .collect();
        waits.sort();
        let alive: Duration = self.replicas.iter().map(|r| self.now - r.started).sum();
        let report = Report {
            tasks: self.trace.len(),
            unfinished: self.trace.len() - self.finished,
            latency_goal: goal,
            within_goal: waits.iter().filter(|wait| **wait <= goal).count(),
            p50_wait: percentile(&waits, 50),
            p99_wait: percentile(&waits, 99),
            makespan: self.makespan,
            replica_seconds: (self.stopped_replica_time + alive).as_secs_f64(),
            peak_replicas: self.peak,
        };
        (report, self.timeline)
    }
}

/// The nearest-rank `p`th percentile of sorted `values`; zero for none.
fn percentile(values: &[Duration], p: usize) -> Duration {
    match values.len() {
        0 => Duration::ZERO,
        n => values[(n * p).div_ceil(100).clamp(1, n) - 1],
    }
}

fn secs(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// The reports as an aligned text table, one row per (name, report).
pub(crate) fn table(rows: &[(String, Report)]) -> String {
    let header = ["run", "tasks", "L", "within L", "p50 wait", "p99 wait", "makespan", "replica-s", "peak"];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for (name, report) in rows {
        let tasks = match report.unfinished {
            0 => report.tasks.to_string(),
            unfinished => format!("{} ({unfinished} unfinished)", report.tasks),
        };
        cells.push(vec![
            name.clone(),
            tasks,
            format_duration(report.latency_goal),
            format!("{:.1}%", 100.0 * report.within_goal_share()),
            secs(report.p50_wait),
            secs(report.p99_wait),
            secs(report.makespan),
            format!("{:.1}", report.replica_seconds),
            report.peak_replicas.to_string(),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|col| cells.iter().map(|row| row[col].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(col, (cell, &width))| if col == 0 { format!("{cell:<width$}") } else { format!("{cell:>width$}") })
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

/// A tick step of 1, 2 or 5 times a power of ten that cuts `0..max` into about `count` parts.
fn nice_step(max: f64, count: f64) -> f64 {
    let rough = (max / count).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|step| *step >= rough).unwrap_or(10.0 * magnitude)
}

fn label(value: f64, step: f64) -> String {
    if step >= 1.0 { format!("{value:.0}") } else { format!("{value:.1}") }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// At most `limit` points, each the maximum of a run of consecutive ones, so peaks survive.
fn downsample(points: &[TimelinePoint], limit: usize) -> Vec<(f64, f64, f64)> {
    let chunk = points.len().div_ceil(limit.max(1)).max(1);
    points
        .chunks(chunk)
        .map(|run| {
            let depth = run.iter().map(|p| p.queued + p.running).max().unwrap_or(0);
            let replicas = run.iter().map(|p| p.replicas).max().unwrap_or(0);
            (run[0].t.as_secs_f64(), depth as f64, f64::from(replicas))
        })
        .collect()
}

/// An 800x300 SVG chart of queue depth (queued + running) and replicas over time.
pub(crate) fn svg(timeline: &Timeline, title: &str) -> String {
    const WIDTH: f64 = 800.0;
    const HEIGHT: f64 = 300.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 36.0;
    const BOTTOM: f64 = 44.0;
    const SERIES: [(&str, &str); 2] = [("queue depth (queued + running)", "#1f77b4"), ("replicas", "#d62728")];
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);

    let mut points = downsample(&timeline.points, 1000);
    if points.is_empty() {
        points.push((0.0, 0.0, 0.0));
    }
    let t_last = points.last().map_or(0.0, |p| p.0);
    let y_top = points.iter().map(|p| p.1.max(p.2)).fold(1.0, f64::max);
    let x_step = nice_step(t_last.max(1.0), 6.0);
    let y_step = nice_step(y_top, 5.0);
    let x_end = (t_last.max(1.0) / x_step).ceil() * x_step;
    let y_end = (y_top / y_step).ceil() * y_step;
    let x = |t: f64| LEFT + t / x_end * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_end * plot_h;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );

    // Grid lines and tick labels.
    let mut tick = 0.0;
    while tick <= y_end + y_step / 2.0 {
        let py = y(tick);
        let _ =
            writeln!(out, r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/>"##, LEFT + plot_w);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            py + 4.0,
            label(tick, y_step)
        );
        tick += y_step;
    }
    let mut tick = 0.0;
    while tick <= x_end + x_step / 2.0 {
        let px = x(tick);
        let (bottom, top) = (TOP + plot_h, TOP);
        let _ = writeln!(out, r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{bottom}" stroke="#eee"/>"##);
        let _ = writeln!(
            out,
            r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#,
            bottom + 16.0,
            label(tick, x_step)
        );
        tick += x_step;
    }
    // Axes and their names.
    let _ =
        writeln!(out, r#"<path d="M{LEFT} {TOP} V{} H{}" fill="none" stroke="black"/>"#, TOP + plot_h, LEFT + plot_w);
    let _ =
        writeln!(out, r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text>"#, LEFT + plot_w / 2.0, HEIGHT - 8.0);
    let _ = writeln!(
        out,
        r#"<text x="14" y="{0}" text-anchor="middle" transform="rotate(-90 14 {0})">tasks / replicas</text>"#,
        TOP + plot_h / 2.0
    );

    // The two series as step lines: a value holds until the next point.
    for (index, (_, color)) in SERIES.iter().enumerate() {
        let value = |p: &(f64, f64, f64)| if index == 0 { p.1 } else { p.2 };
        let mut coords = Vec::with_capacity(points.len() * 2);
        for (i, p) in points.iter().enumerate() {
            coords.push(format!("{:.1},{:.1}", x(p.0), y(value(p))));
            if let Some(next) = points.get(i + 1) {
                coords.push(format!("{:.1},{:.1}", x(next.0), y(value(p))));
            }
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            coords.join(" ")
        );
    }

    // Legend, top right inside the plot.
    let legend_x = LEFT + plot_w - 210.0;
    for (index, (name, color)) in SERIES.iter().enumerate() {
        let ly = TOP + 12.0 + 16.0 * index as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{legend_x}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/>"#,
            legend_x + 20.0
        );
        let _ = writeln!(out, r#"<text x="{}" y="{}">{name}</text>"#, legend_x + 26.0, ly + 4.0);
    }
    out += "</svg>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const SECOND: Duration = Duration::from_secs(1);

    fn run_seed(index: usize) -> ((Report, Timeline), (Report, Timeline)) {
        let (_, toml, trace) = &seed_scenarios()[index];
        let config = parse(toml).unwrap();
        (simulate(trace, &config, DEFAULT_COLD_START), simulate_off(trace, &config, DEFAULT_COLD_START))
    }

    #[test]
    fn request_latency_seed_runs_three_long_tasks_side_by_side() {
        let ((on, timeline), (off, _)) = run_seed(0);
        assert_eq!(on.peak_replicas, 3, "{on:?}\n{:#?}", timeline.scaling);
        // One task time plus one cold start, not three task times.
        assert!(on.makespan < 2 * 60 * SECOND, "{on:?}");
        assert_eq!(on.makespan, 61 * SECOND);
        assert_eq!((on.within_goal, on.p99_wait, on.latency_goal), (3, SECOND, 30 * SECOND));
        assert_eq!((off.peak_replicas, off.makespan, off.within_goal), (1, 180 * SECOND, 1));
        assert_eq!((off.p50_wait, off.p99_wait, off.latency_goal), (60 * SECOND, 120 * SECOND, 30 * SECOND));
        assert_eq!(off.replica_seconds, 180.0);
    }

    #[test]
    fn queue_depth_seed_peaks_at_three_replicas() {
        let ((on, timeline), (off, _)) = run_seed(1);
        assert_eq!(on.peak_replicas, 3, "{on:?}");
        assert!(timeline.points.iter().all(|p| p.replicas <= 3));
        // Cold start, then four rounds of three 10 s tasks.
        assert_eq!(on.makespan, 41 * SECOND);
        assert_eq!((off.peak_replicas, off.makespan), (1, 120 * SECOND));
        assert_eq!(on.unfinished + off.unfinished, 0);
    }

    #[test]
    fn timeline_has_a_point_per_tick_and_ends_idle() {
        let ((on, timeline), _) = run_seed(1);
        let ticks = on.makespan.as_secs() as usize;
        assert_eq!(timeline.points.len(), ticks + 1, "{:?}", timeline.points);
        assert_eq!(timeline.points[0], TimelinePoint { t: Duration::ZERO, queued: 12, running: 0, replicas: 3 });
        let last = timeline.points.last().unwrap();
        assert_eq!((last.t, last.queued, last.running), (on.makespan, 0, 0));
        assert!(!timeline.scaling.is_empty());
    }

    #[test]
    fn idle_replicas_stop_after_keep_warm() {
        let config = parse(
            "[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 1\nmax_replicas = 2\nkeep_warm = \"5s\"",
        )
        .unwrap();
        // Two tasks at once, then one long after: the second replica stops in between.
        let trace = [
            Arrival { at: Duration::ZERO, duration: 2 * SECOND },
            Arrival { at: Duration::ZERO, duration: 2 * SECOND },
            Arrival { at: 60 * SECOND, duration: SECOND },
        ];
        let (report, timeline) = simulate(&trace, &config, SECOND);
        assert_eq!((report.peak_replicas, report.makespan), (2, 62 * SECOND));
        let at = |s: u32| timeline.points.iter().find(|p| p.t == s * SECOND).unwrap().replicas;
        assert_eq!((at(2), at(7), at(8), at(59)), (2, 2, 0, 0));
        assert_eq!(report.p50_wait, SECOND);
    }

    #[test]
    fn zero_cold_start_starts_at_once() {
        let config =
            parse("[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 1\nmax_replicas = 4").unwrap();
        let trace = vec![Arrival { at: SECOND / 2, duration: 10 * SECOND }; 4];
        let (report, _) = simulate(&trace, &config, Duration::ZERO);
        assert_eq!((report.peak_replicas, report.p99_wait, report.within_goal), (4, Duration::ZERO, 4));
        assert_eq!(report.makespan, 10 * SECOND + SECOND / 2);
    }

    #[test]
    fn bursty_trace_is_deterministic_per_seed() {
        let trace = bursty_trace(1);
        assert_eq!(trace, bursty_trace(1));
        assert_ne!(trace, bursty_trace(2));
        assert!((80..500).contains(&trace.len()), "{}", trace.len());
        assert!(trace.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(trace.last().unwrap().at < 600 * SECOND);
        let mean = trace.iter().map(|a| a.duration).sum::<Duration>() / trace.len() as u32;
        assert!((SECOND..10 * SECOND).contains(&mean), "{mean:?}");
        assert_eq!(parse_trace(&format_trace(&trace)).unwrap(), trace);
    }

    #[test]
    fn traces_parse_and_errors_name_the_line() {
        let trace = parse_trace("arrival_s, duration_s\n# a comment\n\n0,1.5\n 2.25 ,0.001\n1,3\n").unwrap();
        let want = [(0, 1500), (2250, 1), (1000, 3000)]
            .map(|(at, d)| Arrival { at: Duration::from_millis(at), duration: Duration::from_millis(d) });
        assert_eq!(trace, want);

        let error = |text: &str| parse_trace(text).unwrap_err().to_string();
        assert_eq!(
            error("arrival_s,duration_s\n0,1\n0,abc\n"),
            "line 3: duration_s \"abc\" is not a number of seconds"
        );
        assert!(error("arrival_s,duration_s\n0,1\n\n-1,2").starts_with("line 4: arrival_s \"-1\" is out of range"));
        assert!(error("arrival_s,duration_s\n1,2,3").starts_with("line 2: expected 2 numbers"));
        assert!(error("arrival_s,duration_s\nNaN,2").starts_with("line 2: arrival_s"));
        assert!(error("arrival_s,duration_s\n0,1e9").starts_with("line 2: duration_s"));
        assert!(error("0,1\n").starts_with("line 1: expected the header"));
        assert!(error("").contains("empty"));
        assert!(error("arrival_s,duration_s\n").contains("no tasks"));
    }

    #[test]
    fn fixed_pool_uses_min_replicas() {
        let config = parse("[runtime]\nworkers = 2\n[autoscaler]\nmin_replicas = 2").unwrap();
        let trace = vec![Arrival { at: Duration::ZERO, duration: 5 * SECOND }; 8];
        let (report, _) = simulate(&trace, &config, SECOND);
        assert_eq!((report.peak_replicas, report.makespan, report.replica_seconds), (2, 10 * SECOND, 20.0));
        assert_eq!(simulate_off(&trace, &config, SECOND).0, report);
    }

    #[test]
    fn table_aligns_columns() {
        let ((on, _), (off, _)) = run_seed(0);
        let text = table(&[("autoscaled".to_owned(), on), ("off".to_owned(), off)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("run ") && lines[0].ends_with("peak"), "{text}");
        assert!(lines[1].contains("100.0%") && lines[1].contains("61.0s"), "{text}");
        assert!(lines[2].contains("33.3%") && lines[2].contains("180.0s"), "{text}");
        assert_eq!(lines[1].find("30s"), lines[2].find("30s"), "{text}");
    }

    #[test]
    fn svg_has_two_polylines_and_a_legend() {
        let ((_, timeline), _) = run_seed(1);
        let chart = svg(&timeline, "queue_depth <seed>");
        assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
        assert_eq!(chart.matches("<polyline").count(), 2);
        assert!(chart.contains("queue_depth &lt;seed&gt;") && chart.contains(">replicas</text>"));
        assert_eq!(svg(&Timeline::default(), "empty").matches("<polyline").count(), 2);
        let (_, long) = simulate(&bursty_trace(3), &parse("").unwrap(), SECOND);
        assert_eq!(svg(&long, "bursty").matches("<polyline").count(), 2);
    }
}
