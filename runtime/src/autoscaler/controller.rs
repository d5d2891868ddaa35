//! The control loop: every second, and at once when a task is queued (a cold
//! app must not wait for a tick), each app is sampled and scaled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::policy;
use crate::gateway::no_capacity;
use crate::metrics::Metrics;
use crate::queue::{Dispatch, Elsewhere, RedisQueue};
use crate::supervisor::Supervisor;

const TICK: Duration = Duration::from_secs(1);
/// Least time between two evaluations woken by enqueues: the first enqueue
/// is acted on at once, a flood of them costs one evaluation per interval.
const DEMAND_INTERVAL: Duration = Duration::from_millis(5);

/// `cluster`: the Redis queue other nodes share, whose replicas count.
pub(crate) async fn run(
    supervisor: Arc<Supervisor>,
    dispatch: Arc<Dispatch>,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<RedisQueue>>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_capacity_check = Instant::now();
    // Apps whose scale-up waits for senior nodes, since when.
    let mut deferred: HashMap<String, Instant> = HashMap::new();
    // Apps with calls queued and no replica anywhere to run them, since when.
    let mut starved: HashMap<String, Instant> = HashMap::new();
    // This node's serving replicas of each app, as last told to the cluster.
    let mut published: HashMap<String, u64> = HashMap::new();
    // Redis did not answer, and that was logged.
    let mut unread_said = false;
    loop {
        // Replicas started this round that find no room are pending by the
        // next: another app's idle replica may give them its room then.
        let mut started = false;
        let demand = dispatch.demand();
        tokio::pin!(demand);
        demand.as_mut().enable();
        // A node shutting down starts nothing, nor logs that it would.
        let apps = if supervisor.is_closed() { Vec::new() } else { supervisor.apps() };
        let check_capacity = last_capacity_check.elapsed() >= TICK;
        if check_capacity {
            last_capacity_check = Instant::now();
        }
        for name in apps {
            let counts = dispatch.counts(&name);
            let elsewhere = match cluster.as_ref().map(|cluster| cluster.elsewhere(&name)) {
                Some(Ok(elsewhere)) => {
                    unread_said = false;
                    elsewhere
                }
                // Not knowing what the other nodes run, a node would start
                // the whole cluster's replicas itself: this node's stay as
                // they are until Redis answers (no call runs meanwhile).
                Some(Err(e)) => {
                    if !std::mem::replace(&mut unread_said, true) {
                        tracing::warn!(
                            "failed to read other nodes' replicas: {e}; this node's replicas stay as they are until \
                             Redis answers"
                        );
                    }
                    continue;
                }
                None => Elsewhere::default(),
            };
            // A call queued while its app had no replica, whose new replica
            // then found no room (here or on any other node), would wait
            // until its ttl: refuse it. Other nodes that run the app get two
            // ticks to start one first (a junior node waits one, see below),
            // and so does room another app's idle replica is about to give.
            if check_capacity {
                match supervisor.no_capacity(&name).filter(|_| counts.queued > 0 && elsewhere.all == 0) {
                    Some(reason) => {
                        let since = *starved.entry(name.clone()).or_insert_with(Instant::now);
                        let waits = elsewhere.nodes > 0 || supervisor.room_coming(&name);
                        if !waits || since.elapsed() >= 2 * TICK {
                            dispatch.refuse_calls(&name, no_capacity(&name, &reason));
                        }
                    }
                    None => {
                        starved.remove(&name);
                    }
                }
            }
            let Some((mut sample, config)) = supervisor.sample(&name, counts) else { continue };
            sample.elsewhere = elsewhere.senior;
            sample.others = elsewhere.all;
            let decision = policy::decide(&sample, &config, Instant::now());
            // Nodes senior to this one start what they lack at once, and say
            // so within a tick: a scale-up here waits a tick per senior node
            // running the app, so that nodes do not all start the replicas
            // one of them needed.
            if decision.start > 0 && elsewhere.senior_nodes > 0 {
                let since = *deferred.entry(name.clone()).or_insert_with(Instant::now);
                if since.elapsed() < TICK * elsewhere.senior_nodes {
                    continue;
                }
            }
            deferred.remove(&name);
            // The node began to shut down while this looked (a shared store can be slow to answer).
            if supervisor.is_closed() {
                break;
            }
            if decision.start > 0 || !decision.stop.is_empty() {
                tracing::info!(app = %name, desired = decision.desired, "scaling: {}", decision.reason);
                metrics.scaled(&name, decision.start, decision.stop.len() as u32);
            }
            started |= decision.start > 0;
            supervisor.apply(&name, decision);
            // Said when it changes, and once a tick (Redis may have lost it):
            // evaluations on enqueue come every few milliseconds under load.
            if let Some(cluster) = &cluster {
                let serving = supervisor.serving_replicas(&name);
                if check_capacity || published.get(&name) != Some(&serving) {
                    match cluster.set_replicas(&name, serving) {
                        Ok(()) => {
                            published.insert(name.clone(), serving);
                        }
                        Err(e) => tracing::warn!(app = %name, "failed to record this node's replicas: {e}"),
                    }
                }
            }
        }
        let evaluated = tokio::time::Instant::now();
        if started {
            tokio::time::sleep_until(evaluated + DEMAND_INTERVAL).await;
            continue;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = demand => tokio::time::sleep_until(evaluated + DEMAND_INTERVAL).await,
        }
    }
}
