//! A node in a cluster (`--redis`): the apps it serves follow the ones
//! recorded in Redis, whichever node they were deployed or removed on. An
//! app whose replicas this node cannot run (too few cores, no GPU of its
//! model) is still known here, so calls to it are taken and queued for the
//! nodes that can.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::Node;
use crate::config::AppConfig;
use crate::queue::{AppsChanged, Published, RedisQueue};
use crate::registry::{self, App, AppVersion, DeployError};
use crate::supervisor::{ClusterSlots, Demand, Gpus};

pub(crate) struct Cluster {
    pub queue: Arc<RedisQueue>,
    /// Held while this node's apps and the cluster's are brought in line,
    /// and by a deploy or delete here from its local change to its record
    /// in Redis (a sync in between would undo it).
    sync: Mutex<()>,
}

impl Cluster {
    pub(crate) fn new(queue: Arc<RedisQueue>) -> Self {
        Self { queue, sync: Mutex::new(()) }
    }

    pub(crate) fn hold(&self) -> MutexGuard<'_, ()> {
        self.sync.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes `app`, just deployed here, the cluster's version, unless the
    /// cluster's record of it is no longer `read` (see
    /// [`RedisQueue::publish_app`]).
    pub(crate) fn publish(&self, app: &App, wasm: &[u8], read: &SharedApp) -> Result<Published> {
        let record = serde_json::to_vec(&app.version)?;
        let name = &app.version.name;
        self.queue
            .publish_app(name, &record, read.record.as_deref(), &app.version.digest, wasm)
            .with_context(|| format!("failed to share app {name:?} with the other nodes"))
    }

    /// The cluster's current version of `name`: a version deployed here
    /// follows it. An error when Redis does not answer, has lost the
    /// cluster's data (the nodes share their apps again first), or holds a
    /// record this node cannot read.
    pub(crate) fn current(&self, name: &str) -> Result<SharedApp> {
        let unreadable = || format!("failed to read app {name:?} from Redis");
        if !self.queue.holds_cluster().with_context(unreadable)? {
            anyhow::bail!(
                "Redis lost the cluster's data (restarted without persistence?); the nodes share their apps again within seconds"
            );
        }
        let record = self.queue.app(name).with_context(unreadable)?;
        let version = match record.as_deref().map(serde_json::from_slice::<AppVersion>) {
            None => None,
            Some(Ok(version)) => Some(version),
            Some(Err(e)) => anyhow::bail!(
                "the cluster's record of app {name:?} is unreadable here ({e}): is another node running another beamlet version?"
            ),
        };
        Ok(SharedApp { record, version })
    }

    /// Whether another node runs `name` at all (with replicas or none
    /// now); a store that does not answer counts as yes.
    pub(crate) fn others_run(&self, name: &str) -> bool {
        self.queue.elsewhere(name).map_or(true, |elsewhere| elsewhere.nodes > 0)
    }

    /// Whether another node runs a replica of `name` (starting or ready).
    pub(crate) fn runs_elsewhere(&self, name: &str) -> bool {
        self.queue.elsewhere(name).is_ok_and(|elsewhere| elsewhere.all > 0)
    }

    /// Whether this node or another of the cluster can run replicas of an
    /// app with `config`; the error says why not, for this node and the rest.
    /// The baseline (`min_replicas`, the fixed pool) is the nodes' together.
    pub(crate) fn fits_some_node(&self, config: &AppConfig, here: Demand, gpus: &Gpus) -> Result<(), DeployError> {
        let Err(not_here) = registry::fits_node(config, here, gpus) else { return Ok(()) };
        let others = self.queue.node_infos().map_err(|e| DeployError::Internal(e.into()))?;
        let mut elsewhere = Vec::new();
        let mut fitting = registry::replicas_fitting(config, here, gpus);
        for (node, info) in others.iter().filter(|(node, _)| node != self.queue.node()) {
            let Ok(info) = serde_json::from_slice::<NodeInfo>(info) else { continue };
            match registry::fits_node(config, info.capacity, &info.gpus) {
                Ok(()) => return Ok(()),
                // Each node's own reason: the one with a GPU says what to change.
                Err(e) => elsewhere.push(format!("node {}: {e}", RedisQueue::node_tag(node))),
            }
            fitting = fitting.saturating_add(registry::replicas_fitting(config, info.capacity, &info.gpus));
        }
        let baseline = config.autoscaler.baseline_replicas();
        if fitting >= baseline.max(1) {
            return Ok(());
        }
        let nor = match elsewhere.as_slice() {
            [] => "; nor can any other node of the cluster run it (none is live now)".to_owned(),
            reasons => format!("; nor can any other node of the cluster run it ({})", reasons.join("; ")),
        };
        let together = match fitting {
            0 => String::new(),
            n => format!("; the cluster's nodes together fit {n} of the {baseline} replicas kept with no load"),
        };
        let why = format!("this node: {not_here}{nor}{together}");
        Err(match not_here {
            DeployError::NoFittingGpu(_) => DeployError::NoFittingGpu(why),
            DeployError::TooBigForNode(_) => DeployError::TooBigForNode(why),
            other => other,
        })
    }

    pub(crate) fn unpublish(&self, app: &App) -> Result<()> {
        let name = &app.version.name;
        let record = serde_json::to_vec(&app.version)?;
        self.queue
            .unpublish_app(name, &record)
            .with_context(|| format!("failed to remove app {name:?} for the other nodes"))
    }
}

impl ClusterSlots for RedisQueue {
    fn claim(&self, app: &str, replica: &str, desired: u32) -> Result<(), String> {
        if !crate::queue::Queue::is_available(self) {
            return Err("Redis does not answer: it starts once Redis says the cluster still lacks it".to_owned());
        }
        match self.claim_replica(app, replica, desired) {
            Ok(None) => Ok(()),
            Ok(Some(running)) => Err(format!(
                "the cluster's nodes run {running} replicas of it, the {desired} wanted now: it starts if they lack one"
            )),
            Err(e) => Err(format!("failed to count the cluster's replicas in Redis: {e}")),
        }
    }
}

/// The cluster's record of an app as a deploy read it.
pub(crate) struct SharedApp {
    /// As stored (JSON); `None`: the cluster has no such app.
    record: Option<Vec<u8>>,
    pub version: Option<AppVersion>,
}

/// What a node tells the others about itself: what its replicas may use.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct NodeInfo {
    pub capacity: Demand,
    pub gpus: Gpus,
}

/// Starts the thread that applies app changes, and returns how to tell it.
pub(crate) fn app_sync(node: Weak<Node>, runtime: tokio::runtime::Handle) -> Result<AppsChanged> {
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::Builder::new().name("app-sync".into()).spawn(move || {
        while let Ok(first) = rx.recv() {
            // Coalesce what piled up meanwhile (a full sync covers every name).
            let mut names: Vec<Option<String>> = vec![first];
            names.extend(rx.try_iter());
            let Some(node) = node.upgrade() else { return };
            let _runtime = runtime.enter();
            if names.iter().any(Option::is_none) {
                sync(&node, None);
            } else {
                names.sort();
                names.dedup();
                for name in names.iter().flatten() {
                    sync(&node, Some(name));
                }
            }
        }
    })?;
    Ok(Arc::new(move |name| {
        let _ = tx.send(name);
    }))
}

/// At start: apps this node has that the cluster lacks join it (nothing
/// the node kept is dropped), then the node takes on the cluster's apps.
pub(crate) fn join(node: &Node) -> Result<()> {
    let cluster = node.cluster.as_ref().expect("a cluster node");
    let info = NodeInfo { capacity: node.capacity, gpus: node.gpus.clone() };
    cluster.queue.advertise(serde_json::to_vec(&info)?)?;
    share_own_apps(node, cluster)?;
    sync(node, None);
    Ok(())
}

/// Publishes the apps this node has that the cluster lacks.
fn share_own_apps(node: &Node, cluster: &Cluster) -> Result<()> {
    let _held = cluster.hold();
    let _changing = node.registry.changing();
    let shared: Vec<String> = cluster.queue.apps()?.into_iter().map(|(name, _)| name).collect();
    for app in node.registry.list() {
        let name = &app.version.name;
        if shared.contains(name) {
            continue;
        }
        // Deleted from the cluster while this node was away: drop it here
        // too, unless this node has a newer version than the one deleted.
        let deleted =
            cluster.queue.deleted_app(name)?.and_then(|record| serde_json::from_slice::<AppVersion>(&record).ok());
        if deleted.is_some_and(|deleted| deleted.deployed_at >= app.version.deployed_at) {
            node.registry.remove(name)?;
            node.drop_app(&app);
            let _ = cluster.queue.clear_replicas(name);
            tracing::info!(app = %name, "removed: it was deleted from the cluster while this node was away");
            continue;
        }
        let wasm = node
            .registry
            .component(&app.version.digest)
            .with_context(|| format!("failed to read the component of app {name:?} to share it"))?;
        let absent = SharedApp { record: None, version: None };
        match cluster.publish(&app, &wasm, &absent)? {
            Published::Current => tracing::info!(app = %name, "shared this node's app with the cluster"),
            // Deployed through another node meanwhile: the sync takes it on.
            Published::Superseded(_) => {}
        }
    }
    cluster.queue.mark_cluster()?;
    Ok(())
}

/// Brings this node's apps (all, or `only`) in line with the cluster's.
pub(super) fn sync(node: &Node, only: Option<&str>) {
    let cluster = node.cluster.as_ref().expect("a cluster node");
    // An empty Redis (restarted without persistence) is not "every app was
    // deleted": the nodes share theirs again rather than drop them.
    match cluster.queue.holds_cluster() {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                "Redis lost the cluster's data (restarted without persistence?): sharing this node's apps again"
            );
            if let Err(e) = share_own_apps(node, cluster) {
                return tracing::warn!("failed to share this node's apps: {e:#}");
            }
        }
        Err(e) => return tracing::warn!("failed to read the cluster's apps: {e}"),
    }
    {
        let _held = cluster.hold();
        let _changing = node.registry.changing();
        take_on(node, cluster, only);
    }
    // What versions replaced or apps removed on other nodes left unused.
    node.registry.collect_unused();
}

/// [`sync`] once Redis is known to hold the cluster's data.
fn take_on(node: &Node, cluster: &Cluster, only: Option<&str>) {
    let shared = match cluster.queue.apps() {
        Ok(apps) => apps,
        Err(e) => return tracing::warn!("failed to read the cluster's apps: {e}"),
    };
    let mut versions = BTreeMap::new();
    // Kept as they are here: an app the cluster has is not removed.
    let mut unreadable = Vec::new();
    for (name, record) in shared {
        match serde_json::from_slice::<AppVersion>(&record) {
            Ok(version) => {
                versions.insert(name, version);
            }
            Err(e) => {
                tracing::error!(app = %name, "the cluster's record of the app is unreadable: {e}");
                unreadable.push(name);
            }
        }
    }
    let wanted = |name: &str| only.is_none_or(|only| only == name);
    for app in node.registry.list() {
        let name = &app.version.name;
        if wanted(name) && !versions.contains_key(name) && !unreadable.contains(name) {
            match node.registry.remove(name) {
                Ok(_) => tracing::info!(app = %name, "removed (on another node)"),
                Err(e) => tracing::error!(app = %name, "failed to remove the app: {e:#}"),
            }
            node.drop_app(&app);
        }
    }
    for (name, version) in versions {
        // The whole record: two deploys of one component in the same
        // millisecond differ only in their configs.
        let same = node.registry.get(&name).is_some_and(|current| current.version == version);
        if !wanted(&name) || same {
            continue;
        }
        let wasm = match node.registry.component(&version.digest) {
            Some(wasm) => Ok(Some(wasm)),
            None => cluster.queue.component(&version.digest),
        };
        let wasm = match wasm {
            Ok(Some(wasm)) => wasm,
            Ok(None) => {
                tracing::error!(app = %name, digest = %version.digest, "the cluster has no component for the app");
                continue;
            }
            Err(e) => {
                tracing::warn!(app = %name, "failed to fetch the app's component: {e}");
                continue;
            }
        };
        match node.registry.adopt(version, &wasm) {
            Ok(app) => {
                tracing::info!(app = %name, version = app.version.version, "deployed (on another node)");
                run_here(node, &app);
            }
            Err(e) => tracing::error!(app = %name, "failed to take on the app deployed on another node: {e}"),
        }
    }
}

/// Why a call to an app [`runs_nowhere`] is refused.
pub(crate) const RUNS_NOWHERE: &str =
    "no live node of the cluster can run it (none has the cores, memory or GPU it asks for)";

/// Whether no live node of the cluster can run app `name` now: this node
/// does not, and no other node that runs it is alive (a GPU app while every
/// GPU node is down). Not for an app just deployed: the other nodes may
/// still be taking it on.
pub(crate) fn runs_nowhere(node: &Node, name: &str) -> bool {
    let Some(cluster) = &node.cluster else { return false };
    let settled = node
        .registry
        .get(name)
        .is_some_and(|app| crate::queue::now_ms().saturating_sub(app.version.deployed_at) > SETTLE_MS);
    settled && !node.supervisor.runs(name) && !cluster.others_run(name)
}

/// How long after a deploy every node of a cluster has surely taken it on.
const SETTLE_MS: u64 = 10_000;

/// Every second: ends the waiting calls to the apps no live node can run
/// (the last node that could died while they waited), as calls made then
/// are refused. Queued tasks wait for such a node.
pub(crate) async fn refuse_calls_run_nowhere(node: Arc<Node>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        for app in node.registry.list() {
            let name = &app.version.name;
            if runs_nowhere(&node, name) && node.dispatch.counts(name).queued > 0 {
                node.dispatch.refuse_calls(name, crate::gateway::no_capacity(name, RUNS_NOWHERE));
            }
        }
    }
}

/// Runs the app's replicas here if they fit this node; otherwise the other
/// nodes run its tasks.
pub(crate) fn run_here(node: &Node, app: &App) {
    match registry::fits_one(&app.config, node.capacity, &node.gpus) {
        // Its autoscaler starts the baseline, counting other nodes' replicas;
        // saying at once that this node runs the app makes junior nodes
        // wait for it.
        Ok(()) => {
            node.supervisor.run(app, false);
            let cluster = node.cluster.as_ref().expect("a cluster node");
            let serving = node.supervisor.serving_replicas(&app.version.name);
            let _ = cluster.queue.set_replicas(&app.version.name, serving);
        }
        Err(e) => {
            tracing::info!(app = %app.version.name, "this node runs no replica of the app (other nodes do): {e}");
            node.supervisor.remove(&app.version.name);
            let cluster = node.cluster.as_ref().expect("a cluster node");
            let _ = cluster.queue.clear_replicas(&app.version.name);
        }
    }
}
