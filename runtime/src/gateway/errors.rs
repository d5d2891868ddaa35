//! Every error the API returns, mapped to its status in one place.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::Json;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::IdleTimer;
use crate::bodies::BODY_IDLE;
use crate::host::http::GUEST_HEADER;
use crate::queue::{ErrorCode, QueueError, TaskError};
use crate::registry::DeployError;

/// What a request carries that a node limits in size.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Payload {
    Component,
    Input,
}

/// `{"error": {"code": "...", "message": "..."}}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent with `Retry-After`: the same request may well succeed shortly.
    pub retry_later: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_later: false }
    }

    /// A passing condition of the node (not an answer about a task that
    /// ended): the answer says when to call again.
    pub(crate) fn retry_later(mut self) -> Self {
        self.retry_later = true;
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub(crate) fn unknown_app(name: &str) -> Self {
        let hint = match crate::registry::validate_name(name) {
            Ok(()) => {
                format!("deploy it first (beamlet deploy APP.wasm --name {name}) or list apps with `beamlet apps`")
            }
            Err(e) => format!("{e}; list apps with `beamlet apps`"),
        };
        Self::new(StatusCode::NOT_FOUND, "UNKNOWN_APP", format!("no app named {name:?}; {hint}"))
    }

    pub(crate) fn unknown_task(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_TASK",
            format!("no task {id:?}; it never existed or its result has expired"),
        )
    }

    pub(crate) fn too_large(what: Payload, limit: usize) -> Self {
        let (what, setting) = match what {
            Payload::Component => ("component upload", "--max-component-size"),
            Payload::Input => ("request body", "--max-input-size"),
        };
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!(
                "the {what} is larger than the {} limit; `beamlet serve {setting}` sets it",
                crate::config::format_size(limit as u64)
            ),
        )
    }

    pub(crate) fn internal(error: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("{error:#}"))
    }

    /// A deploy of `version` whose app changed through another node of the
    /// cluster meanwhile: it is `now` that version, or deleted (`None`).
    pub(crate) fn deploy_conflict(name: &str, version: u32, now: Option<u32>) -> Self {
        let changed = match now {
            Some(now) => format!("version {now} of app {name:?} was deployed"),
            None => format!("app {name:?} was deleted"),
        };
        Self::new(
            StatusCode::CONFLICT,
            "DEPLOY_CONFLICT",
            format!(
                "{changed} through another node while this deploy ran, so this one (version {version}) did not take \
                 effect; deploy again to make it the current version"
            ),
        )
    }

    /// The response for a task that ended without an output after
    /// `attempts` runs (said when there were several, ahead of the guest's
    /// stderr the message may end with: a timeout after a retry took twice
    /// the timeout).
    pub(crate) fn task_failed(error: &TaskError, attempts: u32) -> Self {
        let mut answer = Self::from(error);
        if attempts > 1 {
            answer.message = format!("after {attempts} attempts: {}", answer.message);
        }
        answer
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if self.retry_later {
            // Clients and proxies that honour it wait before calling again.
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// An answer that starts before the request's body was read to its end
/// (an error, or a guest that answered without reading it all) may leave
/// the rest on the connection, which hyper then closes after the answer:
/// saying so (`connection: close`) keeps a client from sending its next
/// request on it (a pooled client saw a broken pipe after a 404 to a POST,
/// and after a 200 from a guest that ignored a 70 KB body).
/// A body whose client sends nothing more of it for [`BODY_IDLE`] while it
/// is read fails, so a client that stops mid-body holds no connection (nor
/// a call waiting for its input) forever.
pub(crate) async fn close_unread(request: Request, next: Next) -> Response {
    if http_body::Body::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| Body::new(Tracked::new(inner, ended.clone(), BODY_IDLE)));
    let mut response = next.run(request).await;
    if !ended.load(Ordering::Relaxed) {
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end, and fails
/// once its reader has waited [`BODY_IDLE`] for the client's next bytes.
struct Tracked {
    inner: Body,
    ended: Arc<AtomicBool>,
    idle: IdleTimer,
}

impl Tracked {
    fn new(inner: Body, ended: Arc<AtomicBool>, idle_after: std::time::Duration) -> Self {
        Self { inner, ended, idle: IdleTimer::new(idle_after) }
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Relaxed);
        }
        if !self.idle.ran_out(polled.is_ready(), cx) {
            return polled;
        }
        let idle = crate::config::format_duration(self.idle.after());
        Poll::Ready(Some(Err(axum::Error::new(format!("the client sent nothing more of it for {idle}")))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Gives the errors the framework answers by itself (a method a path does
/// not take, a query or path that does not parse, a body of the wrong type)
/// the API's JSON shape. A guest's own responses (they name their task) and
/// JSON bodies pass untouched.
/// Carried by every callback (see `node::callbacks`).
const CALLBACK_HEADER: &str = "x-beamlet-signature";

/// Refuses, on the API (`/v1/...`, `/metrics`), a callback (see
/// [`refuse_callback`]), and a guest's request that would manage apps rather
/// than call them: a guest allowed to reach a node may invoke, submit and
/// read tasks, but not deploy, delete, read an app's status (its callback
/// secret), logs or metrics, nor give a task a `callback_url`.
pub(crate) async fn refuse_loops(request: Request, next: Next) -> Response {
    if let Err(refused) = refuse_callback(request.headers()) {
        return refused.into_response();
    }
    if request.headers().contains_key(GUEST_HEADER) {
        let (method, uri) = (request.method(), request.uri());
        if !guests_may(method, uri.path()) {
            let message = format!(
                "{method} {} is refused to a guest's request (it carries {GUEST_HEADER}): guests may call apps \
                 (/http/..., invoke, tasks) and read their tasks, not manage them",
                uri.path()
            );
            return ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", message).into_response();
        }
        if uri.query().is_some_and(|query| query.split('&').any(|pair| pair.starts_with("callback_url"))) {
            let message = "a guest's task may not set callback_url: the node would send its result to a host the \
                           guest's allowed_outbound_hosts may not list";
            return ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", message).into_response();
        }
    }
    next.run(request).await
}

/// A callback (it carries `x-beamlet-signature`) is refused by every route
/// but the health checks: sent to an app or the API, a task's result could
/// queue tasks again, perhaps without end.
pub(crate) fn refuse_callback(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if !headers.contains_key(CALLBACK_HEADER) {
        return Ok(());
    }
    let message = "this request is a beamlet callback (it carries x-beamlet-signature): a callback_url must point \
                   at your own receiver, not at a beamlet node (its API or an app), where a task's result could \
                   queue tasks again, perhaps without end";
    Err(ApiError::new(StatusCode::BAD_REQUEST, "BAD_INPUT", message))
}

/// What a guest's request may do on the API: call apps and follow their tasks.
fn guests_may(method: &Method, path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        (method.as_str(), parts.as_slice()),
        ("POST", ["v1", "apps", _, "invoke" | "tasks"]) | ("GET", ["v1", "tasks", _] | ["v1", "tasks", _, "result"])
    )
}

pub(crate) async fn as_json(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let headers = response.headers();
    let is_json = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let is_error = status.is_client_error() || status.is_server_error();
    if !is_error || is_json || headers.contains_key(super::tasks::TASK_ID_HEADER) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            ("METHOD_NOT_ALLOWED", format!("{method} is not allowed on {path}; the Allow header lists what is"))
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("PAYLOAD_TOO_LARGE", text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("UNSUPPORTED_MEDIA_TYPE", text),
        status if status.is_client_error() => ("BAD_REQUEST", text),
        _ => ("INTERNAL", text),
    };
    let message = if message.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { message };
    let mut out = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name, value.clone());
        }
    }
    out
}

impl From<DeployError> for ApiError {
    fn from(error: DeployError) -> Self {
        let code = match &error {
            DeployError::BadName(_) => "BAD_NAME",
            DeployError::BadConfig(_) | DeployError::NoFittingGpu(_) | DeployError::TooBigForNode(_) => "BAD_CONFIG",
            DeployError::Empty | DeployError::NotWasm => "NOT_WASM",
            DeployError::CoreModule => "NOT_A_COMPONENT",
            DeployError::Compile(_) => "COMPILE_FAILED",
            DeployError::WrongWorld { .. } | DeployError::UnsupportedImport(_) => "WRONG_WORLD",
            DeployError::WorldChange(_) => {
                return Self::new(StatusCode::CONFLICT, "WORLD_CHANGED", error.to_string());
            }
            DeployError::Internal(_) => return Self::internal(&error),
        };
        Self::new(StatusCode::BAD_REQUEST, code, error.to_string())
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match &error {
            QueueError::Full { .. } | QueueError::NodeFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "QUEUE_FULL", error.to_string()).retry_later()
            }
            QueueError::UnknownTask(id) => Self::unknown_task(id),
            QueueError::AlreadyEnded { .. } => Self::new(StatusCode::CONFLICT, "ALREADY_ENDED", error.to_string()),
            QueueError::Store | QueueError::Backend(_) | QueueError::Lost(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "STORE_FAILED", error.to_string()).retry_later()
            }
            QueueError::ShuttingDown | QueueError::CutOff => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN", error.to_string()).retry_later()
            }
        }
    }
}

/// The response for a task that ended without an output.
impl From<&TaskError> for ApiError {
    fn from(error: &TaskError) -> Self {
        let (status, code) = match error.code {
            ErrorCode::BadInput => (StatusCode::BAD_REQUEST, "BAD_INPUT"),
            ErrorCode::GuestError => (StatusCode::INTERNAL_SERVER_ERROR, "GUEST_ERROR"),
            ErrorCode::GuestTrap => (StatusCode::INTERNAL_SERVER_ERROR, "GUEST_TRAP"),
            ErrorCode::OutOfMemory => (StatusCode::INTERNAL_SERVER_ERROR, "OUT_OF_MEMORY"),
            ErrorCode::ReplicaLost => (StatusCode::INTERNAL_SERVER_ERROR, "REPLICA_LOST"),
            ErrorCode::ResultTooLarge => (StatusCode::INTERNAL_SERVER_ERROR, "RESULT_TOO_LARGE"),
            ErrorCode::StartFailed => (StatusCode::SERVICE_UNAVAILABLE, "START_FAILED"),
            ErrorCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, "TIMEOUT"),
            ErrorCode::Cancelled => (StatusCode::CONFLICT, "CANCELLED"),
            ErrorCode::Expired => (StatusCode::SERVICE_UNAVAILABLE, "EXPIRED"),
            ErrorCode::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN"),
            ErrorCode::NoCapacity => (StatusCode::SERVICE_UNAVAILABLE, "NO_CAPACITY"),
        };
        let answer = Self::new(status, code, error.message.clone());
        // Only calls end so (queued tasks wait instead): calling again soon
        // may well work.
        match error.code {
            ErrorCode::ShuttingDown | ErrorCode::NoCapacity => answer.retry_later(),
            _ => answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt as _;
    use http_body_util::BodyExt as _;

    use super::*;

    fn tracked(parts: Vec<(u64, &'static [u8])>, then_stall: bool) -> Tracked {
        let sent = futures_util::stream::iter(parts).then(|(wait_ms, part)| async move {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(part))
        });
        let body = if then_stall {
            Body::from_stream(sent.chain(futures_util::stream::pending()))
        } else {
            Body::from_stream(sent)
        };
        Tracked::new(body, Arc::default(), Duration::from_secs(2))
    }

    #[tokio::test]
    async fn a_body_whose_client_stops_sending_fails_and_a_slow_steady_one_does_not() {
        let error = tracked(vec![(0, b"abc")], true).collect().await.expect_err("the stalled body fails");
        assert_eq!(error.to_string(), "the client sent nothing more of it for 2s");
        // Each part within the idle time, all of them well past it.
        let parts = vec![(250, &b"a"[..]), (250, b"b"), (250, b"c"), (250, b"d"), (250, b"e")];
        let body = tracked(parts, false).collect().await.expect("a steady body is read whole");
        assert_eq!(body.to_bytes().as_ref(), b"abcde");
    }
}
