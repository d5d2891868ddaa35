//! The scaling policy (SPEC §7): a pure function from a [`Sample`] of an app's
//! load and replicas, its [`AutoscalerConfig`] and the current time to a
//! [`Decision`]. It reads no clock and touches no replica; the controller takes
//! a sample, calls [`decide`] and applies the result, and tests drive it with
//! explicit instants.
//!
//! Both policies look at N = tasks queued + running and W = workers per replica.
//!
//! - **`queue_depth`**: each replica carries up to `max_tasks_per_replica` tasks,
//!   so desired = ceil(N / max_tasks_per_replica). With 3 per replica, a backlog
//!   of more than 3 adds a second replica and more than 6 a third.
//! - **`request_latency`**: enough worker slots that every task starts within
//!   L = `desired_latency`. With T = the recent average task time, a worker
//!   finishes a task every T, so a task starts within L if at most floor(L / T)
//!   tasks wait ahead of it in that worker's line. One worker therefore serves
//!   1 + floor(L / T) tasks, a replica W * (1 + floor(L / T)), and
//!   desired = ceil(N / (W * (1 + floor(L / T)))).
//!
//!   Seed example: desired latency 30 s, max 5 replicas, W = 1, and 3 tasks of
//!   60 s submitted at once. No task has finished, so T is unknown and taken as
//!   T >= L (a task that waits for another would miss L): floor(L / T) = 0, one
//!   task per slot, desired = ceil(3 / 1) = 3. Once tasks finish, T = 60 s >= L
//!   keeps floor(L / T) = 0 and 3 replicas. All three tasks run side by side and
//!   finish in about one task time instead of three back to back.
//!
//!   Short tasks: T = 10 s, L = 30 s, W = 2. Three tasks may wait ahead of each
//!   one, so a worker serves 1 + floor(30 / 10) = 4 tasks within L and a replica
//!   2 * 4 = 8; 8 tasks need 1 replica, 9 need 2, 20 need 3.
//!
//!   An average of zero (tasks that finish within the clock's resolution) would
//!   divide by zero; the tasks that may wait ahead are capped at N, so any
//!   T << L yields one replica that holds the whole backlog.
//!
//! Either way the result is clamped to `[min_replicas, max_replicas]`, and
//! `max_replicas` wins over the latency goal. With no policy the app runs a fixed
//! pool of [`AutoscalerConfig::baseline_replicas`] whatever the load.
//!
//! [`decide`] scales up at once and down slowly: a surplus replica stops only when
//! it runs no task and has been idle for `keep_warm`, or at once when another
//! app's replica waits for the room it holds (a GPU it would sit on idle).
//! Pending replicas (never placed) go first, then the idle ready ones wanted
//! elsewhere, then the longest-idle; a starting or busy replica is never
//! stopped.

use std::time::{Duration, Instant};

use crate::config::{AutoscalerConfig, Policy, format_duration};

/// Where a replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Requested but not placed: no node has the cores, memory or GPUs for it yet.
    Pending,
    /// Placed; its process is starting its workers.
    Starting,
    /// Its process failed (to start, or while running) and it waits to be
    /// restarted: it holds its cores, memory and GPU but runs nothing.
    Failing,
    /// All workers are up; it takes tasks.
    Ready,
}

/// One replica as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReplicaSample {
    pub id: String,
    pub placement: Placement,
    /// Tasks running on it now.
    pub busy: u32,
    /// When it last became idle; `None` while it runs a task (or has no idle time to report).
    pub idle_since: Option<Instant>,
    /// Another app whose pending replica would fit on the node if this one
    /// gave its room back: idle and surplus, it stops then without waiting
    /// out `keep_warm`.
    pub wanted_by: Option<String>,
}

/// An app's load and replicas at one moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    /// Tasks waiting for a worker.
    pub queued: u64,
    /// Tasks running on some worker.
    pub running: u64,
    /// `[runtime] workers`; 0 is read as 1.
    pub workers_per_replica: u32,
    /// Recent average task run time; `None` before any task has finished.
    pub avg_task_time: Option<Duration>,
    /// How long the oldest run in progress has run: when longer than the
    /// average, it is T instead (a burst of long tasks after tiny ones; the
    /// average learns of them only as they end).
    pub longest_run: Duration,
    /// Every replica the app has, in any placement.
    pub replicas: Vec<ReplicaSample>,
    /// Replicas (starting or ready) that nodes senior to this one run, in a
    /// cluster: this node adds only what they lack, and its surplus over
    /// them goes, so the cluster settles at `desired` in all.
    pub elsewhere: u32,
    /// Replicas (starting or ready) that every other node runs: this node's
    /// pending replicas beyond what the cluster still lacks go (a full
    /// senior node's, once junior nodes with room run them), and none is
    /// added for what others already run.
    pub others: u32,
}

/// What the controller should do now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    /// Replicas the app should have.
    pub desired: u32,
    /// Replicas to start now.
    pub start: u32,
    /// Ids of replicas to stop now, in the order chosen.
    pub stop: Vec<String>,
    /// The apps whose pending replicas those stopped give their room to.
    pub making_room_for: Vec<String>,
    /// One log line: the numbers that went in and what came out.
    pub reason: String,
}

/// Replicas the app should have for `sample`'s load, clamped to
/// `[min_replicas, max_replicas]`, with a one-line reason.
pub(crate) fn desired(sample: &Sample, config: &AutoscalerConfig) -> (u32, String) {
    let n = sample.queued.saturating_add(sample.running);
    let load = format!("{} ({} queued + {} running)", count(n, "task"), sample.queued, sample.running);
    let Some(policy) = config.policy else {
        let desired = config.baseline_replicas();
        return (desired, format!("fixed pool: {load}, no autoscaler policy -> desired {desired}"));
    };
    let (needed, how) = match policy {
        Policy::QueueDepth { max_tasks_per_replica, .. } => {
            let per_replica = u64::from(max_tasks_per_replica.max(1));
            (n.div_ceil(per_replica), format!("queue_depth: {load}, {per_replica} tasks/replica"))
        }
        Policy::RequestLatency { desired_latency, .. } => {
            let workers = u64::from(sample.workers_per_replica.max(1));
            let latency = format_duration(desired_latency);
            let (per_worker, model) = match sample.avg_task_time {
                None => (1, format!("avg task time unknown, assumed >= desired latency {latency} -> 1 task/worker")),
                Some(avg) => {
                    let per_worker_within = |ahead: u64| format!("{}/worker", count(ahead.saturating_add(1), "task"));
                    let measured = if sample.longest_run > avg {
                        format!(
                            "avg task time {avg:?} but a run in progress for {:?}, desired latency {latency}",
                            sample.longest_run
                        )
                    } else {
                        format!("avg task time {avg:?}, desired latency {latency}")
                    };
                    let task_time = avg.max(sample.longest_run);
                    // More than N tasks waiting ahead never happens, so capping at N changes no
                    // answer; it keeps a zero or tiny average from dividing by zero or overflowing.
                    let ahead = desired_latency.as_nanos().checked_div(task_time.as_nanos()).unwrap_or(u128::MAX);
                    match u64::try_from(ahead) {
                        Ok(ahead) if ahead <= n => (ahead + 1, format!("{measured} -> {}", per_worker_within(ahead))),
                        _ => (
                            n.saturating_add(1),
                            format!("{measured} -> {} (capped by the backlog)", per_worker_within(n)),
                        ),
                    }
                }
            };
            let per_replica = workers.saturating_mul(per_worker);
            let needed = n.div_ceil(per_replica);
            let slots = format!("{} = {}/replica", count(workers, "worker"), count(per_replica, "slot"));
            (needed, format!("request_latency: {load}, {model} x {slots}"))
        }
    };
    let (min, max) = (config.min_replicas, policy.max_replicas());
    let needed_u32 = u32::try_from(needed).unwrap_or(u32::MAX);
    let desired = needed_u32.max(min).min(max);
    let clamp = if needed_u32 > max {
        format!("capped at max {max}")
    } else if needed_u32 < min {
        format!("raised to min {min}")
    } else {
        format!("min {min}, max {max}")
    };
    (desired, format!("{how} -> {} needed; desired {desired} ({clamp})", count(needed, "replica")))
}

/// Replicas to start and stop now: scale up at once; stop a surplus replica only
/// when it is failing or pending, or ready, running no task and idle for at
/// least `keep_warm`.
pub(crate) fn decide(sample: &Sample, config: &AutoscalerConfig, now: Instant) -> Decision {
    let (desired, mut reason) = desired(sample, config);
    let target = desired.saturating_sub(sample.elsewhere);
    if sample.elsewhere > 0 {
        reason += &format!("; {} on other nodes -> {target} here", count(sample.elsewhere.into(), "replica"));
    }
    let have = u32::try_from(sample.replicas.len()).unwrap_or(u32::MAX);
    let by = |placement| sample.replicas.iter().filter(|r| r.placement == placement).count();
    reason += &format!(
        "; have {have} ({} pending, {} starting, {} ready{})",
        by(Placement::Pending),
        by(Placement::Starting),
        by(Placement::Ready),
        match by(Placement::Failing) {
            0 => String::new(),
            failing => format!(", {failing} failing"),
        }
    );
    let pending = u32::try_from(by(Placement::Pending)).unwrap_or(u32::MAX);
    let serving = u32::try_from(by(Placement::Starting) + by(Placement::Ready)).unwrap_or(u32::MAX);
    // What the whole cluster still lacks (on one node: desired - serving).
    let lacking = desired.saturating_sub(sample.others.saturating_add(serving));
    if sample.others > sample.elsewhere {
        reason += &format!("; {} on all other nodes, the cluster lacks {lacking}", sample.others);
    }
    let start = target.saturating_sub(have).min(lacking.saturating_sub(pending));
    if start > 0 {
        reason += &format!(" -> start {start}");
        return Decision { desired, start, stop: Vec::new(), making_room_for: Vec::new(), reason };
    }
    let surplus = have.saturating_sub(target) as usize;
    // Pending here while other nodes run what they wait for: on one node
    // never more than the surplus.
    let pending_surplus = pending.saturating_sub(lacking) as usize;
    if surplus == 0 && pending_surplus == 0 {
        reason += " -> no change";
        return Decision { desired, start, stop: Vec::new(), making_room_for: Vec::new(), reason };
    }

    // keep_warm only applies under a policy; a fixed pool has no load to wait for.
    let keep_warm = if config.policy.is_some() { config.keep_warm } else { Duration::ZERO };
    let idle_for = |r: &ReplicaSample| r.idle_since.map(|since| now.saturating_duration_since(since));
    let not_running = |placement| sample.replicas.iter().filter(move |r| r.placement == placement && r.busy == 0);
    let failing = not_running(Placement::Failing).map(|r| (r.id.clone(), "failing".to_owned()));
    let pending = not_running(Placement::Pending).map(|r| (r.id.clone(), "pending".to_owned()));
    let mut idle: Vec<_> = sample
        .replicas
        .iter()
        .filter(|r| r.placement == Placement::Ready && r.busy == 0)
        .filter_map(|r| idle_for(r).filter(|idle| *idle >= keep_warm || r.wanted_by.is_some()).map(|idle| (idle, r)))
        .collect();
    // Wanted elsewhere first, then longest idle; the id breaks ties so the choice is stable.
    idle.sort_by(|(a, ra), (b, rb)| {
        (rb.wanted_by.is_some(), b).cmp(&(ra.wanted_by.is_some(), a)).then_with(|| ra.id.cmp(&rb.id))
    });
    let mut chosen: Vec<(String, String, Option<String>)> = failing
        .chain(pending)
        .map(|(id, why)| (id, why, None))
        .chain(idle.into_iter().map(|(idle, r)| match &r.wanted_by {
            Some(app) => (r.id.clone(), format!("idle {idle:?}, its room wanted by app {app}"), Some(app.clone())),
            None => (r.id.clone(), format!("idle {idle:?}"), None),
        }))
        .take(surplus)
        .collect();
    let pending_chosen = chosen.iter().filter(|(_, why, _)| why == "pending").count();
    let more_pending: Vec<_> = not_running(Placement::Pending)
        .filter(|r| !chosen.iter().any(|(id, ..)| *id == r.id))
        .take(pending_surplus.saturating_sub(pending_chosen))
        .map(|r| (r.id.clone(), "pending; other nodes run it".to_owned(), None))
        .collect();
    chosen.extend(more_pending);
    let surplus = surplus.max(chosen.len());

    if !chosen.is_empty() {
        let list: Vec<String> = chosen.iter().map(|(id, why, _)| format!("{id} ({why})")).collect();
        reason += &format!(" -> stop {}", list.join(", "));
    }
    let kept = surplus - chosen.len();
    if kept > 0 {
        let sep = if chosen.is_empty() { " ->" } else { ";" };
        reason += &format!(
            "{sep} keep {kept} surplus: busy, starting, or idle under keep_warm {}",
            format_duration(keep_warm)
        );
    }
    let making_room_for = chosen.iter().filter_map(|(_, _, app)| app.clone()).collect();
    Decision { desired, start, stop: chosen.into_iter().map(|(id, ..)| id).collect(), making_room_for, reason }
}

/// `"1 task"`, `"3 tasks"`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);
    const MILLISECOND: Duration = Duration::from_millis(1);

    fn request_latency(latency_s: u32, max_replicas: u32, min_replicas: u32) -> AutoscalerConfig {
        AutoscalerConfig {
            policy: Some(Policy::RequestLatency { desired_latency: latency_s * SECOND, max_replicas }),
            min_replicas,
            keep_warm: 10 * SECOND,
        }
    }

    fn queue_depth(max_tasks_per_replica: u32, max_replicas: u32, min_replicas: u32) -> AutoscalerConfig {
        AutoscalerConfig {
            policy: Some(Policy::QueueDepth { max_tasks_per_replica, max_replicas }),
            min_replicas,
            keep_warm: 10 * SECOND,
        }
    }

    fn load(queued: u64, running: u64, workers: u32, avg: Option<Duration>) -> Sample {
        Sample {
            queued,
            running,
            workers_per_replica: workers,
            avg_task_time: avg,
            longest_run: Duration::ZERO,
            replicas: Vec::new(),
            elsewhere: 0,
            others: 0,
        }
    }

    fn replica(id: &str, placement: Placement, busy: u32, idle_since: Option<Instant>) -> ReplicaSample {
        ReplicaSample { id: id.to_owned(), placement, busy, idle_since, wanted_by: None }
    }

    /// A ready replica idle since `since`.
    fn idle(id: &str, since: Instant) -> ReplicaSample {
        replica(id, Placement::Ready, 0, Some(since))
    }

    #[test]
    fn request_latency_seed_runs_three_sixty_second_tasks_side_by_side() {
        let config = request_latency(30, 5, 0);
        let t0 = Instant::now();
        let mut sample = load(2, 1, 1, None);
        sample.replicas = vec![replica("r1", Placement::Ready, 1, None)];
        let decision = decide(&sample, &config, t0);
        assert_eq!((decision.desired, decision.start, decision.stop.len()), (3, 2, 0), "{}", decision.reason);
        assert_eq!(
            decision.reason,
            "request_latency: 3 tasks (2 queued + 1 running), avg task time unknown, assumed >= desired latency \
             30s -> 1 task/worker x 1 worker = 1 slot/replica -> 3 replicas needed; desired 3 (min 0, max 5); \
             have 1 (0 pending, 0 starting, 1 ready) -> start 2"
        );
        // Once tasks have finished, T = 60 s >= L still gives one task per slot.
        assert_eq!(desired(&load(0, 3, 1, Some(60 * SECOND)), &config).0, 3);
    }

    #[test]
    fn request_latency_short_tasks_share_a_replica() {
        let config = request_latency(30, 5, 0);
        let avg = Some(10 * SECOND);
        for (n, want) in [(3, 1), (8, 1), (9, 2), (16, 2), (20, 3), (40, 5), (41, 5), (1000, 5)] {
            let (got, reason) = desired(&load(n, 0, 2, avg), &config);
            assert_eq!(got, want, "N = {n}: {reason}");
            assert!(reason.contains("4 tasks/worker x 2 workers = 8 slots/replica"), "{reason}");
        }
        // Exactly L is still within L: floor(30 / 15) = 2 may wait ahead.
        assert_eq!(desired(&load(6, 0, 1, Some(15 * SECOND)), &config).0, 2);
        assert_eq!(desired(&load(7, 0, 1, Some(15 * SECOND)), &config).0, 3);
    }

    #[test]
    fn a_run_in_progress_longer_than_the_average_counts_instead() {
        let config = request_latency(2, 5, 0);
        // Tiny tasks so far (10 ms), then three long ones: one has run 1.5 s.
        let sample = Sample { longest_run: 1500 * MILLISECOND, ..load(2, 1, 1, Some(10 * MILLISECOND)) };
        let (got, reason) = desired(&sample, &config);
        assert_eq!(got, 2, "floor(2 s / 1.5 s) = 1 may wait ahead: {reason}");
        assert!(reason.contains("avg task time 10ms but a run in progress for 1.5s, desired latency 2s"), "{reason}");
        let sample = Sample { longest_run: 2500 * MILLISECOND, ..sample };
        assert_eq!(desired(&sample, &config).0, 3);
        // A run shorter than the average changes nothing.
        let sample = Sample { longest_run: MILLISECOND, ..sample };
        let (got, reason) = desired(&sample, &config);
        assert_eq!(got, 1, "{reason}");
        assert!(reason.contains("avg task time 10ms, desired latency 2s"), "{reason}");
    }

    #[test]
    fn a_node_adds_only_what_senior_nodes_lack_and_its_idle_surplus_goes() {
        let config = queue_depth(3, 3, 0);
        let t0 = Instant::now();
        let mut sample = load(9, 0, 1, None);
        sample.elsewhere = 2;
        let decision = decide(&sample, &config, t0);
        assert_eq!((decision.desired, decision.start), (3, 1), "{}", decision.reason);
        assert!(decision.reason.contains("2 replicas on other nodes -> 1 here"), "{}", decision.reason);
        // Seniors cover it all: this node's busy replica stays, its idle one
        // goes after keep_warm.
        sample.elsewhere = 3;
        sample.replicas = vec![replica("busy", Placement::Ready, 1, None), idle("idle", t0)];
        let decision = decide(&sample, &config, t0 + 11 * SECOND);
        assert_eq!((decision.start, decision.stop.as_slice()), (0, &["idle".to_owned()][..]), "{}", decision.reason);
    }

    #[test]
    fn a_full_node_drops_pending_replicas_that_other_nodes_run_and_adds_none() {
        let config = queue_depth(8, 6, 1);
        let t0 = Instant::now();
        // The senior node (none before it) is full: one ready, five pending.
        let mut sample = load(40, 8, 4, None);
        sample.replicas = vec![replica("ready", Placement::Ready, 4, None)];
        sample.replicas.extend((0..5).map(|i| replica(&format!("p{i}"), Placement::Pending, 0, None)));
        let decision = decide(&sample, &config, t0);
        assert_eq!((decision.desired, decision.start, decision.stop.len()), (6, 0, 0), "{}", decision.reason);
        // Junior nodes with room run four: four of its pending replicas go, one stays for what is lacking.
        sample.others = 4;
        let decision = decide(&sample, &config, t0);
        assert_eq!((decision.start, decision.stop.len()), (0, 4), "{}", decision.reason);
        assert!(decision.reason.contains("4 on all other nodes, the cluster lacks 1"), "{}", decision.reason);
        assert!(decision.reason.contains("p0 (pending; other nodes run it)"), "{}", decision.reason);
        // With only its ready one left, it starts none while the others run the rest.
        sample.replicas.truncate(1);
        sample.others = 5;
        let decision = decide(&sample, &config, t0);
        assert_eq!((decision.start, decision.stop.len()), (0, 0), "{}", decision.reason);
        // A junior node adds only what the whole cluster lacks, not all that its seniors lack.
        let mut junior = load(40, 8, 4, None);
        (junior.elsewhere, junior.others) = (1, 5);
        let decision = decide(&junior, &config, t0);
        assert_eq!(decision.start, 1, "{}", decision.reason);
    }

    #[test]
    fn queue_depth_seed_adds_a_replica_per_three_tasks_up_to_three() {
        let config = queue_depth(3, 3, 0);
        let got: Vec<u32> = (1..=12).map(|n| desired(&load(n, 0, 1, None), &config).0).collect();
        assert_eq!(got, [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]);
        let (_, reason) = desired(&load(7, 5, 1, None), &config);
        assert_eq!(
            reason,
            "queue_depth: 12 tasks (7 queued + 5 running), 3 tasks/replica -> 4 replicas needed; desired 3 (capped at max 3)"
        );
    }

    #[test]
    fn clamps_to_min_and_max_and_max_wins() {
        let (got, reason) = desired(&load(1, 0, 1, None), &queue_depth(3, 5, 2));
        assert_eq!(got, 2);
        assert!(reason.ends_with("desired 2 (raised to min 2)"), "{reason}");
        assert_eq!(desired(&load(100, 0, 1, None), &queue_depth(3, 5, 2)).0, 5);
        // A latency goal that would need 100 replicas still gets max_replicas.
        assert_eq!(desired(&load(100, 0, 1, Some(60 * SECOND)), &request_latency(30, 5, 0)).0, 5);
        // Should min ever exceed max (the config parser refuses it), max wins.
        assert_eq!(desired(&load(0, 0, 1, None), &queue_depth(3, 2, 4)).0, 2);
    }

    #[test]
    fn unknown_or_zero_task_time_never_divides_by_zero() {
        let config = request_latency(30, 50, 0);
        // Unknown: one task per worker slot.
        assert_eq!(desired(&load(7, 0, 2, None), &config).0, 4);
        // Zero or tiny: one replica holds the whole backlog.
        for avg in [Duration::ZERO, Duration::from_nanos(1)] {
            let (got, reason) = desired(&load(7, 0, 2, Some(avg)), &config);
            assert_eq!(got, 1, "{reason}");
            assert!(
                reason.contains("-> 8 tasks/worker (capped by the backlog) x 2 workers = 16 slots/replica"),
                "{reason}"
            );
        }
        assert_eq!(desired(&load(u64::MAX, u64::MAX, u32::MAX, Some(Duration::ZERO)), &config).0, 1);
        assert_eq!(desired(&load(0, 0, 0, Some(Duration::ZERO)), &config).0, 0);
        // workers_per_replica 0 is read as 1.
        assert_eq!(desired(&load(3, 0, 0, None), &config).0, 3);
    }

    #[test]
    fn zero_backlog_scales_to_min_or_zero() {
        for config in [queue_depth(3, 3, 0), request_latency(30, 5, 0)] {
            assert_eq!(desired(&load(0, 0, 1, None), &config).0, 0);
        }
        assert_eq!(desired(&load(0, 0, 1, None), &queue_depth(3, 3, 1)).0, 1);
        assert_eq!(desired(&load(0, 0, 1, Some(SECOND)), &request_latency(30, 5, 2)).0, 2);
    }

    #[test]
    fn surplus_idle_replica_stops_only_after_keep_warm() {
        let config = queue_depth(3, 3, 0);
        let idle_at = Instant::now();
        let mut sample = load(0, 0, 1, None);
        sample.replicas = vec![idle("r1", idle_at)];

        let early = decide(&sample, &config, idle_at + config.keep_warm - Duration::from_millis(1));
        assert_eq!((early.desired, early.start), (0, 0));
        assert!(early.stop.is_empty(), "{}", early.reason);
        assert!(early.reason.ends_with("-> keep 1 surplus: busy, starting, or idle under keep_warm 10s"));

        let due = decide(&sample, &config, idle_at + config.keep_warm);
        assert_eq!(due.stop, ["r1"]);
        assert!(due.reason.ends_with("-> stop r1 (idle 10s)"), "{}", due.reason);
    }

    #[test]
    fn busy_and_starting_replicas_are_never_stopped() {
        let config = request_latency(30, 5, 0);
        let t0 = Instant::now();
        let now = t0 + 3600 * SECOND;
        // An empty backlog (as the queue may briefly report) makes desired 0.
        let mut sample = load(0, 0, 1, None);
        sample.replicas = vec![
            replica("busy", Placement::Ready, 2, None),
            replica("busy-stale-idle", Placement::Ready, 1, Some(t0)),
            replica("starting", Placement::Starting, 0, Some(t0)),
        ];
        let decision = decide(&sample, &config, now);
        assert_eq!(decision.desired, 0);
        assert!(decision.stop.is_empty(), "{}", decision.reason);
    }

    #[test]
    fn never_stops_below_min_nor_starts_above_max() {
        let config = queue_depth(3, 3, 2);
        let t0 = Instant::now();
        let now = t0 + 3600 * SECOND;
        let mut sample = load(0, 0, 1, None);
        sample.replicas = (1..=4).map(|i| idle(&format!("r{i}"), t0 + i * SECOND)).collect();
        let down = decide(&sample, &config, now);
        assert_eq!((down.desired, down.start), (2, 0));
        // The two longest idle go.
        assert_eq!(down.stop, ["r1", "r2"]);

        sample.queued = 100;
        sample.replicas.truncate(1);
        let up = decide(&sample, &config, now);
        assert_eq!((up.desired, up.start), (3, 2));
        assert!(up.stop.is_empty());
        sample.replicas = (1..=3).map(|i| replica(&format!("r{i}"), Placement::Ready, 3, None)).collect();
        let full = decide(&sample, &config, now);
        assert_eq!((full.start, full.stop.len()), (0, 0));
        assert!(full.reason.ends_with("-> no change"), "{}", full.reason);
    }

    #[test]
    fn an_idle_replica_whose_room_another_app_wants_stops_before_keep_warm() {
        let now = Instant::now();
        let mut wanted = idle("r0", now);
        wanted.wanted_by = Some("other".into());
        let mut sample = load(0, 0, 1, None);
        sample.replicas = vec![idle("r1", now), wanted];
        let decision = decide(&sample, &queue_depth(1, 4, 0), now);
        assert_eq!((decision.stop, decision.making_room_for), (vec!["r0".to_owned()], vec!["other".to_owned()]));
        assert!(decision.reason.contains("r0 (idle 0ns, its room wanted by app other)"), "{}", decision.reason);
        assert!(decision.reason.ends_with("keep 1 surplus: busy, starting, or idle under keep_warm 10s"));
        // Not surplus (min_replicas), it stays whoever wants its room.
        sample.replicas.truncate(1);
        sample.replicas[0].wanted_by = Some("other".into());
        let kept = decide(&sample, &queue_depth(1, 4, 1), now);
        assert!(kept.stop.is_empty(), "{}", kept.reason);
    }

    #[test]
    fn pending_replicas_stop_first_regardless_of_keep_warm() {
        let config = queue_depth(3, 5, 0);
        let t0 = Instant::now() + SECOND;
        let mut sample = load(3, 0, 1, None);
        sample.replicas = vec![
            idle("old-idle", t0),
            replica("pending", Placement::Pending, 0, None),
            idle("older-idle", t0 - SECOND),
            replica("fresh-idle", Placement::Ready, 0, Some(t0 + 59 * SECOND)),
        ];
        let decision = decide(&sample, &config, t0 + 60 * SECOND);
        assert_eq!(decision.desired, 1);
        assert_eq!(decision.stop, ["pending", "older-idle", "old-idle"]);
        assert!(decision.reason.contains("-> stop pending (pending), older-idle (idle 61s), old-idle (idle 60s)"));

        // Before keep_warm only the pending one goes.
        let early = decide(&sample, &config, t0 + 5 * SECOND);
        assert_eq!(early.stop, ["pending"]);
        assert!(early.reason.ends_with("; keep 2 surplus: busy, starting, or idle under keep_warm 10s"));
    }

    #[test]
    fn failing_replicas_are_surplus_at_once() {
        // A scale-to-zero app whose replicas keep failing to start must not
        // hold their GPUs, cores and memory with nothing to run.
        let config = queue_depth(1, 2, 0);
        let now = Instant::now();
        let mut sample = load(0, 0, 1, None);
        sample.replicas =
            vec![replica("crashed", Placement::Failing, 0, None), replica("starting", Placement::Starting, 0, None)];
        let decision = decide(&sample, &config, now);
        assert_eq!((decision.desired, decision.stop.as_slice()), (0, ["crashed".to_owned()].as_slice()));
        assert!(decision.reason.contains("1 failing) -> stop crashed (failing)"), "{}", decision.reason);
    }

    #[test]
    fn fixed_pool_ignores_load() {
        let config = AutoscalerConfig { policy: None, min_replicas: 0, ..AutoscalerConfig::default() };
        for n in [0, 1, 10, 10_000] {
            let (got, reason) = desired(&load(n, 0, 1, None), &config);
            assert_eq!(got, 1, "{reason}");
        }
        let config = AutoscalerConfig { min_replicas: 3, ..config };
        assert_eq!(
            desired(&load(500, 2, 4, Some(SECOND)), &config),
            (3, "fixed pool: 502 tasks (500 queued + 2 running), no autoscaler policy -> desired 3".to_owned())
        );
        let t0 = Instant::now();
        let mut sample = load(0, 0, 1, None);
        sample.replicas = vec![idle("a", t0)];
        let decision = decide(&sample, &config, t0);
        assert_eq!((decision.start, decision.stop.len()), (2, 0));
    }
}
