//! Invoking apps: synchronously (`invoke`) or through the task queue.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, Payload, read_body};
use crate::node::Node;
use crate::queue::{Ended, NewTask, QueueError, TaskRecord, TaskStatus, new_task_id};
use crate::registry::{App, World};

pub(super) const TASK_ID_HEADER: &str = "x-beamlet-task-id";
/// The longest `?wait=` a status call may hold.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// The app `name`, if it serves `world`.
pub(super) fn app_of_world(node: &Node, name: &str, world: World) -> Result<App, ApiError> {
    let app = node.registry.get(name).ok_or_else(|| super::missing_app(node, name))?;
    match (app.version.world, world) {
        (actual, wanted) if actual == wanted => Ok(app),
        (World::HttpProxy, _) => Err(ApiError::bad_request(format!(
            "app {name:?} is a wasi:http/proxy component: send it plain HTTP under /http/{name}/"
        ))),
        (World::Function, _) => Err(ApiError::bad_request(format!(
            "app {name:?} is a beamlet:function handler: call it with POST /v1/apps/{name}/invoke or /tasks"
        ))),
    }
}

/// A call whose caller waits is refused at once when every replica of the
/// app waits for capacity (a GPU, cores, memory): it could otherwise wait
/// until its `ttl`. Tasks submitted to `/tasks` wait for capacity instead.
/// (A call queued while the app had no replica yet is refused by the
/// autoscaler's loop once the replica it started turns out pending.)
pub(super) fn refuse_without_capacity(node: &Node, name: &str) -> Result<(), ApiError> {
    // In a cluster, an app that fits no node alive (a GPU app while every
    // GPU node is down) would wait until its ttl.
    if crate::node::cluster::runs_nowhere(node, name) {
        let reason = no_capacity(name, crate::node::cluster::RUNS_NOWHERE);
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NO_CAPACITY", reason));
    }
    match node.supervisor.no_capacity(name) {
        // In a cluster another node's replicas may run it.
        Some(_) if node.cluster.as_ref().is_some_and(|cluster| cluster.runs_elsewhere(name)) => Ok(()),
        Some(reason) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NO_CAPACITY", no_capacity(name, &reason)).retry_later())
        }
        None => Ok(()),
    }
}

/// The message of a call refused for want of capacity.
pub(crate) fn no_capacity(name: &str, reason: &str) -> String {
    format!("app {name:?} has no replica that can run the call: {reason}; submit it to /tasks to wait for one")
}

/// A task of the `function` app `name` with the request body as input.
/// `durable`: journal it (queued tasks); `false` for calls whose caller waits
/// (refused when the app has no replica that can run them).
async fn task_for(
    node: &Node,
    name: &str,
    body: Body,
    callback_url: Option<String>,
    durable: bool,
) -> Result<NewTask, ApiError> {
    let app = app_of_world(node, name, World::Function)?;
    if !durable {
        refuse_without_capacity(node, name)?;
    }
    if let Some(url) = &callback_url {
        crate::config::check_callback_url(url).map_err(|e| ApiError::bad_request(format!("callback_url: {e}")))?;
    }
    let input = read_body(body, node.limits.max_input, Payload::Input).await?;
    Ok(new_task(&app, input, callback_url, durable))
}

/// A task of `app` with `input`, under the app's queue settings.
pub(super) fn new_task(app: &App, input: bytes::Bytes, callback_url: Option<String>, durable: bool) -> NewTask {
    let name = &app.version.name;
    let queue = &app.config.task_queue;
    NewTask {
        id: new_task_id(),
        app: name.to_owned(),
        input,
        retries: queue.retries,
        timeout: app.config.runtime.timeout,
        ttl: queue.ttl,
        result_ttl: queue.result_ttl,
        max_result_size: queue.max_result_size,
        callback_url: callback_url.or_else(|| queue.callback_url.clone()),
        max_queued: queue.max_queued,
        durable,
    }
}

pub(super) fn with_task_id(mut response: Response, id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert(TASK_ID_HEADER, value);
    }
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InvokeQuery {
    /// Only to say that it belongs to `/tasks`.
    callback_url: Option<String>,
}

/// `POST /v1/apps/{name}/invoke`: runs the task and answers with its output.
pub(crate) async fn invoke(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Query(query): Query<InvokeQuery>,
    body: Body,
) -> Response {
    if query.callback_url.is_some() {
        return ApiError::bad_request(format!(
            "callback_url is for queued tasks (POST /v1/apps/{name}/tasks); /invoke answers with the output itself"
        ))
        .into_response();
    }
    let task = match task_for(&node, &name, body, None, false).await {
        Ok(task) => task,
        Err(e) => return e.into_response(),
    };
    let id = task.id.clone();
    let abandoned = node.dispatch.cancel_on_drop(&id);
    let ended = node.dispatch.call(task).await;
    abandoned.disarm();
    let response = match ended {
        Ok(ended) => output_response(&ended),
        Err(e) => ApiError::from(e).into_response(),
    };
    with_task_id(response, &id)
}

/// The output of a finished task, or the error it ended with.
fn output_response(ended: &Ended) -> Response {
    let record = &ended.record;
    match (record.status, &record.error) {
        (TaskStatus::Complete, _) => match ended.output.clone() {
            Some(output) => {
                let content_type = if serde_json::from_slice::<serde::de::IgnoredAny>(&output).is_ok() {
                    "application/json"
                } else {
                    "application/octet-stream"
                };
                ([(header::CONTENT_TYPE, content_type)], output).into_response()
            }
            None => ApiError::unknown_task(&record.id).into_response(),
        },
        (status, Some(error)) if status.is_terminal() => ApiError::task_failed(error, record.attempts).into_response(),
        (status, _) => ApiError::new(
            StatusCode::CONFLICT,
            "NOT_FINISHED",
            format!(
                "task {} is {}; wait for it with GET /v1/tasks/{}/result?wait=30s",
                record.id,
                status.as_str(),
                record.id
            ),
        )
        .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitQuery {
    callback_url: Option<String>,
}

/// `POST /v1/apps/{name}/tasks[?callback_url=URL]`: queues the task and answers at once.
pub(crate) async fn submit(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Query(query): Query<SubmitQuery>,
    body: Body,
) -> Response {
    let task = match task_for(&node, &name, body, query.callback_url, true).await {
        Ok(task) => task,
        Err(e) => return e.into_response(),
    };
    match node.dispatch.submit(task).await.map_err(ApiError::from) {
        Ok(record) => {
            let response = (StatusCode::ACCEPTED, Json(json!({ "task_id": record.id }))).into_response();
            with_task_id(response, &record.id)
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitQuery {
    wait: Option<String>,
}

/// `GET /v1/tasks/{id}[?wait=30s]`.
pub(crate) async fn status(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<TaskRecord>, ApiError> {
    let record = match query.wait {
        Some(wait) => node.dispatch.wait(&id, parse_wait(&wait)?).await.map(|ended| ended.record),
        None => node.dispatch.get(&id),
    };
    record.map(Json).ok_or_else(|| missing_task(&node, &id))
}

/// A `?wait=` duration, at most [`MAX_WAIT`].
fn parse_wait(wait: &str) -> Result<Duration, ApiError> {
    let wait = crate::config::parse_duration(wait).map_err(|e| ApiError::bad_request(format!("wait: {e}")))?;
    Ok(wait.min(MAX_WAIT))
}

/// A task the store did not give: unknown, or (a shared store that does
/// not answer) not readable now.
fn missing_task(node: &Node, id: &str) -> ApiError {
    if node.dispatch.store_available() {
        ApiError::unknown_task(id)
    } else {
        ApiError::from(QueueError::Backend(format!("task {id:?} cannot be read now: see the node's log")))
    }
}

/// `GET /v1/tasks/{id}/result[?wait=30s]`.
pub(crate) async fn result(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Response {
    let ended = match query.wait.as_deref().map(parse_wait) {
        Some(Ok(wait)) => node.dispatch.wait(&id, wait).await,
        Some(Err(e)) => return e.into_response(),
        None => node.dispatch.get(&id).map(|record| Ended { output: node.dispatch.output(&id), record }),
    };
    match ended {
        Some(ended) => with_task_id(output_response(&ended), &id),
        None => missing_task(&node, &id).into_response(),
    }
}

/// `DELETE /v1/tasks/{id}`.
pub(crate) async fn cancel(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<TaskRecord>, ApiError> {
    Ok(Json(node.dispatch.cancel(&id)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /v1/apps/{name}/tasks[?status=RUNNING&limit=100&before=ID]`:
/// newest first; `next` is the `before` of the next page (null on the last).
pub(crate) async fn list(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(TaskStatus::parse(&text.to_ascii_uppercase()).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status {text:?} is not a task state; use one of PENDING, RUNNING, COMPLETE, FAILED, TIMEOUT, CANCELLED, EXPIRED, RETRY"
            ))
        })?),
    };
    // Ids compare as text: in the form the node writes them.
    let before = match query.before.as_deref().map(|before| (before, uuid::Uuid::try_parse(before))) {
        None => None,
        Some((_, Ok(id))) => Some(id.hyphenated().to_string()),
        Some((before, Err(_))) => {
            return Err(ApiError::bad_request(format!(
                "before {before:?} is not a task id; pass the `next` of the page before"
            )));
        }
    };
    let limit = match query.limit.as_deref().map(str::parse::<usize>) {
        None => 100,
        Some(Ok(limit @ 1..=10_000)) => limit,
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "limit {:?} is not a number of tasks; ask for 1 to 10000",
                query.limit.unwrap_or_default()
            )));
        }
    };
    node.registry.get(&name).ok_or_else(|| super::missing_app(&node, &name))?;
    // One more than asked for tells whether there is a page after this one.
    let mut tasks = node.dispatch.list(&name, status, before.as_deref(), limit + 1);
    if tasks.is_empty() && !node.dispatch.store_available() {
        return Err(ApiError::from(QueueError::Backend(format!("the tasks of app {name:?} cannot be read now"))));
    }
    let more = tasks.len() > limit;
    tasks.truncate(limit);
    let next = more.then(|| tasks.last().map(|task| task.id.clone())).flatten();
    Ok(Json(json!({ "app": name, "tasks": tasks, "next": next })))
}
