//! `GET /metrics`: Prometheus (OpenMetrics text) for every app: queue depth,
//! running tasks, task duration, replicas by state, workers, scale events,
//! GPUs held and GPU memory used; per GPU of the node, whether a replica
//! holds it, its memory, and (CUDA, through NVML) its utilization.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct App {
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppOutcome {
    app: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppState {
    app: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppDirection {
    app: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Device {
    gpu: String,
    name: String,
}

type Durations = Family<App, Histogram, fn() -> Histogram>;

/// How a run can end, as `beamlet_runs_total{outcome}` says it.
pub(crate) const OUTCOMES: [&str; 8] =
    ["complete", "bad_input", "guest_error", "trap", "out_of_memory", "timeout", "device_lost", "cancelled"];

pub(crate) struct Metrics {
    registry: Mutex<Registry>,
    queued: Family<App, Gauge>,
    running: Family<App, Gauge>,
    workers: Family<App, Gauge>,
    replicas: Family<AppState, Gauge>,
    task_seconds: Durations,
    runs: Family<AppOutcome, Counter>,
    scale_events: Family<AppDirection, Counter>,
    gpus: Family<App, Gauge>,
    gpu_memory: Family<App, Gauge>,
    device_held: Family<Device, Gauge>,
    device_memory: Family<Device, Gauge>,
    device_memory_used: Family<Device, Gauge>,
    device_utilization: Family<Device, Gauge>,
    waiting: Gauge,
}

/// One app's live numbers, read at scrape time.
pub(crate) struct AppGauges {
    pub queued: u64,
    pub running: u64,
    pub workers: u64,
    /// (state, count) for each replica state present.
    pub replicas: Vec<(String, u64)>,
    /// GPUs its replicas hold, and the GPU memory their workers hold.
    pub gpus: u64,
    pub gpu_memory: u64,
}

/// One GPU of the node, read at scrape time.
pub(crate) struct DeviceGauges {
    pub index: u32,
    pub name: String,
    /// A replica holds it.
    pub held: bool,
    pub memory_bytes: u64,
    /// What NVML sampled; all `None` on the CPU backend.
    pub usage: beamlet_gpu::discover::GpuUsage,
}

fn task_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("beamlet");
        let metrics = Self {
            registry: Mutex::new(Registry::default()),
            queued: Family::default(),
            running: Family::default(),
            workers: Family::default(),
            replicas: Family::default(),
            task_seconds: Family::new_with_constructor(task_histogram),
            runs: Family::default(),
            scale_events: Family::default(),
            gpus: Family::default(),
            gpu_memory: Family::default(),
            device_held: Family::default(),
            device_memory: Family::default(),
            device_memory_used: Family::default(),
            device_utilization: Family::default(),
            waiting: Gauge::default(),
        };
        registry.register("queue_depth", "Tasks queued (pending or awaiting a retry)", metrics.queued.clone());
        registry.register("running_tasks", "Tasks running on a worker", metrics.running.clone());
        registry.register("workers", "Workers of the app's ready replicas", metrics.workers.clone());
        registry.register("replicas", "Replicas by state", metrics.replicas.clone());
        registry.register("task_duration_seconds", "Time a run spent in the guest", metrics.task_seconds.clone());
        registry.register("task_runs", "Runs by how they ended", metrics.runs.clone());
        registry.register(
            "scale_events",
            "Replicas started (up) and stopped (down) by the autoscaler",
            metrics.scale_events.clone(),
        );
        registry.register("gpus", "GPUs held by the app's replicas", metrics.gpus.clone());
        registry.register(
            "gpu_memory_used_bytes",
            "GPU memory held by the app's workers (as of their last tasks)",
            metrics.gpu_memory.clone(),
        );
        registry.register("gpu_held", "Whether a replica holds this GPU of the node", metrics.device_held.clone());
        registry.register("gpu_memory_bytes", "Memory of this GPU of the node", metrics.device_memory.clone());
        registry.register(
            "gpu_memory_in_use_bytes",
            "Memory in use on this GPU by every process, as NVML reports it (CUDA only)",
            metrics.device_memory_used.clone(),
        );
        registry.register(
            "gpu_utilization_percent",
            "Percent of NVML's last sample period a kernel ran on this GPU (CUDA only)",
            metrics.device_utilization.clone(),
        );
        registry.register(
            "waiting_callers",
            "Requests open on the node waiting for a task to end: calls and long-polls",
            metrics.waiting.clone(),
        );
        *metrics.registry.lock().unwrap() = registry;
        metrics
    }

    pub(crate) fn run_ended(&self, app: &str, outcome: &str, time: Duration) {
        self.task_seconds.get_or_create(&App { app: app.to_owned() }).observe(time.as_secs_f64());
        self.runs.get_or_create(&AppOutcome { app: app.to_owned(), outcome: outcome.to_owned() }).inc();
    }

    /// Drops a removed app's counters and histogram: a later app of the
    /// same name starts from zero, and a removed one stops being exported.
    pub(crate) fn remove_app(&self, app: &str) {
        let _registry = self.registry.lock().unwrap();
        self.task_seconds.remove(&App { app: app.to_owned() });
        for outcome in OUTCOMES {
            self.runs.remove(&AppOutcome { app: app.to_owned(), outcome: outcome.to_owned() });
        }
        for direction in ["up", "down"] {
            self.scale_events.remove(&AppDirection { app: app.to_owned(), direction: direction.to_owned() });
        }
    }

    pub(crate) fn scaled(&self, app: &str, up: u32, down: u32) {
        for (direction, count) in [("up", up), ("down", down)] {
            if count > 0 {
                let labels = AppDirection { app: app.to_owned(), direction: direction.to_owned() };
                self.scale_events.get_or_create(&labels).inc_by(u64::from(count));
            }
        }
    }

    /// The text exposition, with gauges set from `apps` (name, numbers) and
    /// the node's GPUs.
    pub(crate) fn render(&self, apps: &[(String, AppGauges)], devices: &[DeviceGauges], waiting: u64) -> String {
        let registry = self.registry.lock().unwrap();
        self.waiting.set(waiting as i64);
        for family in [&self.queued, &self.running, &self.workers, &self.gpus, &self.gpu_memory] {
            family.clear();
        }
        self.replicas.clear();
        for device in devices {
            let labels = Device { gpu: device.index.to_string(), name: device.name.clone() };
            self.device_held.get_or_create(&labels).set(i64::from(device.held));
            self.device_memory.get_or_create(&labels).set(device.memory_bytes as i64);
            if let Some(used) = device.usage.memory_used_bytes {
                self.device_memory_used.get_or_create(&labels).set(used as i64);
            }
            if let Some(percent) = device.usage.utilization_percent {
                self.device_utilization.get_or_create(&labels).set(i64::from(percent));
            }
        }
        for (name, gauges) in apps {
            let app = App { app: name.clone() };
            self.queued.get_or_create(&app).set(gauges.queued as i64);
            self.running.get_or_create(&app).set(gauges.running as i64);
            self.workers.get_or_create(&app).set(gauges.workers as i64);
            self.gpus.get_or_create(&app).set(gauges.gpus as i64);
            self.gpu_memory.get_or_create(&app).set(gauges.gpu_memory as i64);
            for (state, count) in &gauges.replicas {
                self.replicas.get_or_create(&AppState { app: name.clone(), state: state.clone() }).set(*count as i64);
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_gauges_histograms_and_counters() {
        let metrics = Metrics::new();
        metrics.run_ended("hello", "complete", Duration::from_millis(3));
        metrics.run_ended("gone", "trap", Duration::from_millis(3));
        metrics.scaled("gone", 1, 0);
        metrics.remove_app("gone");
        metrics.scaled("hello", 2, 0);
        let gauges = AppGauges {
            queued: 4,
            running: 1,
            workers: 2,
            replicas: vec![("ready".into(), 2)],
            gpus: 1,
            gpu_memory: 4096,
        };
        let device = |index: u32, held: bool, usage| DeviceGauges {
            index,
            name: format!("gpu-{index}"),
            held,
            memory_bytes: 80 << 30,
            usage,
        };
        let sampled =
            beamlet_gpu::discover::GpuUsage { utilization_percent: Some(87), memory_used_bytes: Some(1 << 30) };
        let devices = [device(0, true, sampled), device(1, false, Default::default())];
        let text = metrics.render(&[("hello".into(), gauges)], &devices, 3);
        for expected in [
            r#"beamlet_queue_depth{app="hello"} 4"#,
            "beamlet_waiting_callers 3",
            r#"beamlet_running_tasks{app="hello"} 1"#,
            r#"beamlet_replicas{app="hello",state="ready"} 2"#,
            r#"beamlet_task_duration_seconds_count{app="hello"} 1"#,
            r#"beamlet_task_runs_total{app="hello",outcome="complete"} 1"#,
            r#"beamlet_scale_events_total{app="hello",direction="up"} 2"#,
            r#"beamlet_gpu_memory_used_bytes{app="hello"} 4096"#,
            r#"beamlet_gpu_held{gpu="0",name="gpu-0"} 1"#,
            r#"beamlet_gpu_held{gpu="1",name="gpu-1"} 0"#,
            r#"beamlet_gpu_memory_bytes{gpu="1",name="gpu-1"} 85899345920"#,
            r#"beamlet_gpu_utilization_percent{gpu="0",name="gpu-0"} 87"#,
            r#"beamlet_gpu_memory_in_use_bytes{gpu="0",name="gpu-0"} 1073741824"#,
        ] {
            assert!(text.contains(expected), "missing {expected} in:\n{text}");
        }
        assert!(!text.contains(r#"beamlet_gpu_utilization_percent{gpu="1""#), "not sampled, not shown:\n{text}");
        assert!(!text.contains(r#"app="gone""#), "a removed app's counters are dropped:\n{text}");
        let text = metrics.render(&[], &[], 0);
        assert!(!text.contains(r#"beamlet_queue_depth{app="hello"}"#), "removed apps drop out of the gauges");
    }
}
