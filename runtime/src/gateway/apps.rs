//! Deploy, list, inspect and remove apps.

use std::sync::Arc;

use axum::Json;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Payload, read_body};
use crate::config::AppConfig;
use crate::metrics::{AppGauges, DeviceGauges};
use crate::node::{Cluster, Node};
use crate::queue::{Published, QueueError};
use crate::registry::{self, App, Deployed, Follows};
use crate::supervisor::ReplicaState;

/// Most bytes an app's config may have: a real one has a few hundred, and
/// the node keeps each app's in memory.
const MAX_CONFIG: usize = 64 * 1024;

pub(crate) async fn deploy(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let limit = node.limits.max_component;
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| (value.starts_with("multipart/form-data"), value.contains("boundary=")));
    if multipart != Some((true, true)) {
        // Read the body first: a client still sending it would otherwise see
        // a broken pipe instead of the reason.
        read_body(request.into_body(), limit, Payload::Component).await?;
        return Err(not_multipart(match multipart {
            Some((true, false)) => {
                "its Content-Type, multipart/form-data, has no boundary= (a client that builds the \
                                    form, as curl -F does, sets it)"
            }
            _ => "the request is not multipart/form-data",
        }));
    }
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| not_multipart(&e.body_text()))?;
    let upload_error = move |e: MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(Payload::Component, limit)
        } else {
            ApiError::bad_request(format!("failed to read the upload: {}", e.body_text()))
        }
    };
    let (mut component, mut config, mut twice, mut oversized) = (None, None, None, None);
    while let Some(field) = multipart.next_field().await.map_err(upload_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        if (name == "component" && component.is_some()) || (name == "config" && config.is_some()) {
            // Read on, so the client is not cut off mid-upload.
            field.bytes().await.map_err(upload_error)?;
            twice = Some(name);
            continue;
        }
        match name.as_str() {
            "component" => component = Some(field.bytes().await.map_err(upload_error)?),
            "config" => {
                let bytes = field.bytes().await.map_err(upload_error)?;
                if bytes.len() > MAX_CONFIG && !bytes.starts_with(b"\0asm") {
                    oversized = Some(bytes.len());
                    continue;
                }
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    let what = if bytes.starts_with(b"\0asm") { "a WebAssembly file" } else { "not UTF-8 text" };
                    let message = format!("the config part is {what}; send the app's TOML config there");
                    ApiError::new(StatusCode::BAD_REQUEST, "BAD_CONFIG", message)
                })?;
                config = Some(text);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown multipart part {other:?}; send `component` (the .wasm) and optionally `config` (TOML)"
                )));
            }
        }
    }
    if let Some(name) = twice {
        return Err(ApiError::bad_request(format!("the upload has two `{name}` parts; send one")));
    }
    if let Some(size) = oversized {
        let message = format!(
            "the config part is {}, more than the {} an app's config may be; send the app's TOML config there \
             (a few hundred bytes)",
            crate::config::describe_size(size as u64),
            crate::config::describe_size(MAX_CONFIG as u64)
        );
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", message));
    }
    let sent_config = config.is_some();
    let config = config.unwrap_or_default();
    let component = component.ok_or_else(|| {
        ApiError::bad_request("the upload has no `component` part; attach the .wasm file as `component`")
    })?;
    if component.len() > limit {
        return Err(ApiError::too_large(Payload::Component, limit));
    }
    let registry_node = node.clone();
    let counts = node.dispatch.counts(&name);
    let unfinished = counts.queued + counts.running;
    let deployed = tokio::task::spawn_blocking(move || {
        let node = &registry_node;
        let _changing = node.registry.changing();
        let Some(cluster) = &node.cluster else {
            let fits = |config: &AppConfig| registry::fits_node(config, node.capacity, &node.gpus);
            let deployed = node.registry.deploy(&name, &component, &config, fits, unfinished, Follows::ThisNode)?;
            // A new app's first replica, before it takes its room.
            let no_room =
                deployed.previous.is_none().then(|| node.supervisor.room_for_new(&deployed.app).err()).flatten();
            node.run_app(&deployed.app);
            return Ok((deployed, no_room));
        };
        let superseded = {
            // The new version is the cluster's before any sync runs.
            let _held = cluster.hold();
            let read = cluster.current(&name).map_err(|e| {
                ApiError::from(QueueError::Backend(format!(
                    "{e:#}; nothing was deployed: deploy again once Redis answers"
                )))
            })?;
            // Another node may be the one to run it (a GPU app deployed
            // through a node without a GPU).
            let fits = |config: &AppConfig| cluster.fits_some_node(config, node.capacity, &node.gpus);
            let follows = Follows::Cluster(read.version.as_ref());
            let before = node.registry.get(&name);
            let deployed = node.registry.deploy(&name, &component, &config, fits, unfinished, follows)?;
            let published = cluster.publish(&deployed.app, &component, &read).map_err(|e| {
                // Its answer may be what was lost: this node's copy goes back
                // to what it was, and the sync takes on what Redis has.
                if let Err(e) = node.registry.restore(&name, before) {
                    tracing::warn!(app = %name, "failed to put the app's last version back: {e:#}");
                }
                unshared(&format!("{e:#}"))
            })?;
            match published {
                Published::Current => {
                    // Before a sync can take on a later version.
                    node.run_app(&deployed.app);
                    return Ok((deployed, None));
                }
                Published::Superseded(now) => (deployed.app.version.version, now),
            }
        };
        // This node's copy of the app goes back to the cluster's.
        node.sync_app(&name);
        let (version, now) = superseded;
        Err(ApiError::deploy_conflict(&name, version, now))
    })
    .await
    .map_err(ApiError::internal)?;
    // What the version replaced (or a refused deploy) left unused.
    collect_unused(&node);
    let (Deployed { app, uses_gpu, previous }, no_room) = deployed?;
    // A redeploy without a config is easy to do by mistake.
    let default_config = crate::config::parse("").ok();
    let configured_before = previous
        .filter(|previous| !sent_config && crate::config::parse(&previous.config_toml).ok() != default_config)
        .map(|previous| previous.version);
    tracing::info!(app = %app.version.name, version = app.version.version, digest = %app.version.digest, "deployed");
    let version = &app.version;
    let mut warnings: Vec<String> = configured_before
        .map(|before| {
            format!(
                "no config was sent: version {} runs with the default config, not version {before}'s; send the \
                 config with every deploy (beamlet deploy --config FILE) to keep it",
                version.version
            )
        })
        .into_iter()
        .collect();
    if uses_gpu && app.config.runtime.gpu.is_none() {
        warnings.push(
            "the component calls the GPU (it imports beamlet:function/gpu) but the config asks for none: its GPU \
             calls will fail; add gpu = \"any\" (or a model name) under [runtime]"
                .into(),
        );
    }
    if let Some(reason) = no_room {
        warnings.push(format!(
            "no replica of it fits on this node now ({reason}): calls are refused with 503 NO_CAPACITY and \
             tasks wait until other apps free room"
        ));
    }
    if !uses_gpu && app.config.runtime.gpu.is_some() {
        warnings.push(
            "the config asks for a GPU but the component never calls it (it does not import \
             beamlet:function/gpu): each replica holds a whole GPU it cannot use; remove gpu (and gpu_memory) \
             from [runtime]"
                .into(),
        );
    }
    let body = json!({
        "name": version.name,
        "version": version.version,
        "world": version.world,
        "digest": version.digest,
        "callback_secret": version.callback_secret,
        "warnings": warnings,
    });
    Ok((StatusCode::CREATED, Json(body)))
}

/// A deploy or delete done here that the other nodes could not be told
/// of (Redis is down): once Redis answers, the cluster's record wins.
fn unshared(error: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "STORE_FAILED",
        format!("{error}; the change may not last: do it again once Redis answers"),
    )
}

fn not_multipart(reason: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{reason}: deploy takes multipart/form-data with a `component` part (and optionally `config`), \
         e.g. curl -X PUT URL/v1/apps/NAME -F component=@app.wasm -F config=@beamlet.toml"
    ))
}

pub(crate) async fn list(State(node): State<Arc<Node>>) -> Json<Value> {
    let apps: Vec<Value> = node
        .registry
        .list()
        .iter()
        .map(|app| {
            let replicas = node.supervisor.replicas(&app.version.name);
            // A pending replica waits for capacity, a failing one fails to
            // start: neither runs anything.
            let pending = replicas.iter().filter(|r| r.state == ReplicaState::Pending).count();
            let failing = replicas.iter().filter(|r| r.state != ReplicaState::Pending && r.failing).count();
            json!({
                "name": app.version.name,
                "version": app.version.version,
                "world": app.version.world,
                "replicas": replicas.len() - pending - failing,
                "pending_replicas": pending,
                "failing_replicas": failing,
                "replicas_on_other_nodes": other_replicas(&node, &app.version.name),
                "queue": node.dispatch.counts(&app.version.name),
            })
        })
        .collect();
    Json(json!({ "apps": apps }))
}

pub(crate) async fn status(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let app = node.registry.get(&name).ok_or_else(|| super::missing_app(&node, &name))?;
    Ok(Json(describe(&node, &app)))
}

fn describe(node: &Node, app: &App) -> Value {
    let name = &app.version.name;
    let replicas = node.supervisor.replicas(name);
    let decision = node.supervisor.last_decision(name);
    let avg_task_ms = node.supervisor.average_task_time(name).map(|t| t.as_secs_f64() * 1000.0);
    json!({
        "name": name,
        "version": app.version.version,
        "world": app.version.world,
        "digest": app.version.digest,
        "deployed_at": app.version.deployed_at,
        "callback_secret": app.version.callback_secret,
        "config": app.config,
        "replicas": replicas,
        "replicas_on_other_nodes": other_replicas(node, name),
        "queue": node.dispatch.counts(name),
        "avg_task_ms": avg_task_ms,
        "autoscaler": {
            "desired": decision.as_ref().map(|d| d.desired),
            "max": app.config.autoscaler.max_replicas(),
            "reason": decision.as_ref().map(|d| d.reason.clone()),
        },
    })
}

/// In a cluster, the replicas (starting or ready) other nodes run; `None`
/// on a node of its own.
fn other_replicas(node: &Node, name: &str) -> Option<u32> {
    let cluster = node.cluster.as_ref()?;
    cluster.queue.elsewhere(name).ok().map(|elsewhere| elsewhere.all)
}

pub(crate) async fn remove(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let holder = node.clone();
    let named = name.clone();
    // Blocking: the cluster's hold may be taken by a deploy compiling.
    let removed = tokio::task::spawn_blocking(move || {
        let node = &holder;
        let _held = node.cluster.as_ref().map(Cluster::hold);
        let removed = node.registry.remove(&named).map_err(ApiError::internal)?;
        if let (Some(cluster), Some(app)) = (&node.cluster, &removed) {
            cluster.unpublish(app).map_err(|e| unshared(&format!("{e:#}")))?;
        }
        Ok::<_, ApiError>(removed)
    })
    .await
    .map_err(ApiError::internal)??;
    let Some(app) = removed else { return Err(super::missing_app(&node, &name)) };
    node.drop_app(&app);
    node.dispatch.remove_app(&name);
    // Answered once the cancellations are saved: a crash right after the
    // answer must not bring the app's tasks back.
    if node.dispatch.sync().await.is_err() {
        tracing::error!(app = %name, "the task store could not save the cancellation of the removed app's tasks yet");
    }
    tracing::info!(app = %name, "removed");
    collect_unused(&node);
    Ok(Json(json!({ "name": name, "removed": true })))
}

/// Deletes, off the request, the components no app uses any more.
fn collect_unused(node: &Arc<Node>) {
    let node = node.clone();
    tokio::task::spawn_blocking(move || node.registry.collect_unused());
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    lines: Option<usize>,
}

pub(crate) async fn logs(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Result<Json<Value>, ApiError> {
    node.registry.get(&name).ok_or_else(|| super::missing_app(&node, &name))?;
    let lines = node.logs.tail(&name, query.lines.unwrap_or(200));
    Ok(Json(json!({ "name": name, "lines": lines })))
}

/// `POST /v1/apps/{name}/warmup`: starts one replica now.
pub(crate) async fn warmup(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let started = match (node.supervisor.warmup(&name), node.registry.get(&name)) {
        (Some(started), _) => started,
        // In a cluster: an app whose replicas do not fit this node.
        (None, Some(app)) => Err(match crate::registry::fits_one(&app.config, node.capacity, &node.gpus) {
            Err(why) => format!("this node cannot run its replicas ({why}); warm it up through a node that can"),
            Ok(()) => "this node does not run its replicas yet; try again in a moment".to_owned(),
        }),
        (None, None) => return Err(super::missing_app(&node, &name)),
    };
    if started.is_ok() {
        node.metrics.scaled(&name, 1, 0);
    }
    let mut answer = json!({ "name": name, "started": started.is_ok(), "replicas": node.supervisor.replicas(&name) });
    if let Err(reason) = started {
        answer["reason"] = reason.into();
    }
    Ok(Json(answer))
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(node): State<Arc<Node>>) -> impl axum::response::IntoResponse {
    let apps: Vec<(String, AppGauges)> = node
        .registry
        .list()
        .into_iter()
        .map(|app| {
            let name = app.version.name;
            let counts = node.dispatch.counts(&name);
            let replicas = node.supervisor.replicas(&name);
            // Every state has a series, 0 included: an app scaled to zero
            // shows 0 ready replicas rather than no line at all.
            let states: Vec<(String, u64)> = ReplicaState::LIVE
                .iter()
                .map(|state| (state.name(), replicas.iter().filter(|r| r.state == *state).count() as u64))
                .collect();
            let workers =
                replicas.iter().filter(|r| r.state == ReplicaState::Ready).map(|r| u64::from(r.workers)).sum();
            let gpus = replicas.iter().filter(|r| r.gpu.is_some()).count() as u64;
            let gpu_memory = replicas.iter().map(|r| r.gpu_memory_used).sum();
            let gauges = AppGauges {
                queued: counts.queued,
                running: counts.running,
                workers,
                replicas: states,
                gpus,
                gpu_memory,
            };
            (name, gauges)
        })
        .collect();
    let devices: Vec<DeviceGauges> = node
        .supervisor
        .gpus_held()
        .into_iter()
        .map(|(gpu, held)| DeviceGauges {
            index: gpu.index,
            usage: node.gpu_monitor.as_ref().map(|monitor| monitor.usage(gpu.index)).unwrap_or_default(),
            name: gpu.name,
            held,
            memory_bytes: gpu.memory_bytes,
        })
        .collect();
    let text = node.metrics.render(&apps, &devices, node.dispatch.waiting() as u64);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}
