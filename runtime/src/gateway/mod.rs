//! The HTTP API (SPEC §4). Handlers translate HTTP to node calls and back;
//! they know nothing of replicas or wasm.

mod apps;
mod errors;
mod http;
mod server;
mod tasks;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

pub(crate) use self::errors::{ApiError, Payload};
pub(crate) use self::server::serve;
pub(crate) use self::tasks::no_capacity;
use crate::node::Node;
use crate::queue::QueueError;

pub(crate) fn router(node: Arc<Node>) -> Router {
    let upload_limit = node.limits.max_component + 1024 * 1024;
    Router::new()
        .route("/v1/apps", get(apps::list))
        .route(
            "/v1/apps/{name}",
            get(apps::status).delete(apps::remove).put(apps::deploy).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/apps/{name}/logs", get(apps::logs))
        .route("/v1/apps/{name}/warmup", post(apps::warmup))
        .route("/v1/apps/{name}/invoke", post(tasks::invoke))
        .route("/v1/apps/{name}/tasks", post(tasks::submit).get(tasks::list))
        .route("/v1/tasks/{id}", get(tasks::status).delete(tasks::cancel))
        .route("/v1/tasks/{id}/result", get(tasks::result))
        .route("/metrics", get(apps::metrics))
        .route_layer(axum::middleware::from_fn(errors::refuse_loops))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/http/{name}", any(http::root))
        .route("/http/{name}/", any(http::root))
        .route("/http/{name}/{*path}", any(http::path))
        .fallback(|| async {
            ApiError::new(axum::http::StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint; see the API in README.md")
        })
        .layer(axum::middleware::from_fn(errors::as_json))
        .layer(axum::middleware::from_fn(errors::close_unread))
        .with_state(node)
}

/// `GET /readyz`: whether this node can take work now, that is whether its
/// task store answers and saves (`/healthz` says only that the process
/// lives). A stopping node takes no new connections at all.
async fn ready(axum::extract::State(node): axum::extract::State<Arc<Node>>) -> Result<&'static str, ApiError> {
    if !node.dispatch.store_available() {
        return Err(QueueError::Backend("it does not answer now; see the node's log".into()).into());
    }
    if !node.dispatch.store_saves() {
        let message = format!("the task store saves nothing now ({}); see the node's log", crate::queue::STORE_HINT);
        return Err(ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "STORE_FAILED", message).retry_later());
    }
    Ok("ready\n")
}

/// The answer for app `name`, which this node does not have: in a cluster,
/// one deployed through another node may still be being taken on here (its
/// component compiled), which is not "deploy it first".
pub(crate) fn missing_app(node: &Node, name: &str) -> ApiError {
    let shared = node.cluster.as_ref().is_some_and(|cluster| matches!(cluster.queue.app(name), Ok(Some(_))));
    if !shared {
        return ApiError::unknown_app(name);
    }
    let message = format!(
        "app {name:?} was deployed through another node, and this node is still taking it on (compiling its \
         component); call again in a few seconds"
    );
    ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "APP_SYNCING", message).retry_later()
}

/// Reads a request body of at most `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize, what: Payload) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::too_large(what, limit)),
        Err(e) => Err(ApiError::bad_request(format!("failed to read the request body: {e}"))),
    }
}

/// A limit on how long a client may keep a poll waiting (for its next
/// bytes, or for room for ours): it starts when a poll finds nothing and
/// starts over whenever one finds something.
pub(crate) struct IdleTimer {
    after: std::time::Duration,
    /// Made when first needed: most bodies are read without a wait.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl IdleTimer {
    pub(crate) fn new(after: std::time::Duration) -> Self {
        Self { after, timer: None, waiting: false }
    }

    pub(crate) fn after(&self) -> std::time::Duration {
        self.after
    }

    /// Notes how a poll went (`ready`: it found something); for one that
    /// did not, whether the client has kept it waiting `after` (else the
    /// timer wakes `cx` when it will have).
    pub(crate) fn ran_out(&mut self, ready: bool, cx: &mut std::task::Context<'_>) -> bool {
        if ready {
            self.waiting = false;
            return false;
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + self.after;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let timer = self.timer.as_mut().expect("armed when the wait began");
        std::future::Future::poll(timer.as_mut(), cx).is_ready()
    }
}
