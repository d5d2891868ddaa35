//! `ANY /http/{name}/{path..}`: plain HTTP for `wasi:http/proxy` apps. The
//! request becomes a task like any other (same queue, replicas, limits and
//! autoscaling); its output is the guest's response.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body::Body as _;

use super::tasks::{app_of_world, new_task, refuse_without_capacity, with_task_id};
use super::{ApiError, Payload, read_body};
use crate::bodies::ResponseStart;
use crate::ipc::{HttpRequest, HttpResponse};
use crate::node::Node;
use crate::queue::{Ended, TaskStatus};
use crate::registry::World;

pub(crate) async fn root(State(node): State<Arc<Node>>, Path(name): Path<String>, request: Request) -> Response {
    proxy(&node, &name, request).await.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn path(
    State(node): State<Arc<Node>>,
    Path((name, _)): Path<(String, String)>,
    request: Request,
) -> Response {
    proxy(&node, &name, request).await.unwrap_or_else(IntoResponse::into_response)
}

/// The path after `/http/{name}`, as the client sent it: the guest gets it
/// undecoded (`%3F` stays `%3F`, not a query), as from any HTTP server.
fn raw_rest(path: &str) -> &str {
    let after_prefix = path.strip_prefix("/http/").unwrap_or(path);
    after_prefix.find('/').map_or("", |slash| &after_prefix[slash + 1..])
}

async fn proxy(node: &Node, name: &str, request: Request) -> Result<Response, ApiError> {
    super::errors::refuse_callback(request.headers())?;
    let app = app_of_world(node, name, World::HttpProxy)?;
    refuse_without_capacity(node, name)?;
    let (parts, body) = request.into_parts();
    let rest = raw_rest(parts.uri.path());
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let headers = parts.headers.iter().map(|(name, value)| (name.to_string(), value.as_bytes().to_vec())).collect();
    // A small body of known size goes with the request; any other streams.
    let (body, streamed) = if body.is_end_stream() {
        (Vec::new(), None)
    } else if body.size_hint().exact().is_some_and(|len| len <= INLINE_BODY as u64) {
        (read_body(body, INLINE_BODY, Payload::Input).await?.to_vec(), None)
    } else {
        (Vec::new(), Some(body))
    };
    let idempotent = parts.method.is_idempotent();
    let request = HttpRequest {
        method: parts.method.to_string(),
        path_with_query: format!("/{rest}{query}"),
        headers,
        body,
        streamed: streamed.is_some(),
    };
    let mut task = new_task(&app, request.encode().into(), None, false);
    // A proxy does not send a POST twice: the first run may have done what
    // it was asked before it failed.
    if !idempotent {
        task.retries = 0;
    }
    let id = task.id.clone();
    let (_open, head) = node.bodies.open(&id, streamed);
    // Until the response starts, a caller that goes away cancels the task;
    // after, its streamed body does.
    let abandoned = node.dispatch.cancel_on_drop(&id);
    let call = node.dispatch.call(task);
    tokio::pin!(call);
    let response = tokio::select! {
        // The head comes before the task's end, so a streamed response is seen first.
        biased;
        Ok(ResponseStart { status, headers, body }) = head => {
            abandoned.disarm();
            guest_response(status, headers, body)
        }
        ended = &mut call => {
            abandoned.disarm();
            match ended {
                Ok(ended) => answer(ended),
                Err(e) => ApiError::from(e).into_response(),
            }
        }
    };
    Ok(with_task_id(response, &id))
}

/// The guest's response, or the error its task ended with.
fn answer(Ended { record, output }: Ended) -> Response {
    match (record.status, &record.error) {
        (TaskStatus::Complete, _) => {
            let output = output.unwrap_or_default();
            match HttpResponse::decode(&output) {
                Ok(HttpResponse { status, headers, body }) => guest_response(status, headers, Body::from(body)),
                Err(e) => ApiError::internal(e).into_response(),
            }
        }
        (_, Some(error)) => ApiError::task_failed(error, record.attempts).into_response(),
        (status, None) => {
            ApiError::internal(format!("task ended {} without an error", status.as_str())).into_response()
        }
    }
}

/// Request bodies up to this size travel with the request; bigger ones, and
/// those of unknown size, stream to the guest as it reads them.
const INLINE_BODY: usize = 64 * 1024;

/// The guest's response as the client gets it, or 502 when it is none.
fn guest_response(status: u16, headers: Vec<(String, Vec<u8>)>, body: Body) -> Response {
    // 1xx are interim answers, not a response; a proxy cannot pass them on.
    let Some(status) = StatusCode::from_u16(status).ok().filter(|_| (200..=599).contains(&status)) else {
        let message = format!("the app answered with status {status}; a response's status must be 200-599");
        return ApiError::new(StatusCode::BAD_GATEWAY, "GUEST_ERROR", message).into_response();
    };
    // These carry no body, so no length of one either.
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let mut out = Response::new(if bodiless { Body::empty() } else { body });
    *out.status_mut() = status;
    for (name, value) in headers {
        let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value)) else { continue };
        if bodiless && name == axum::http::header::CONTENT_LENGTH {
            continue;
        }
        out.headers_mut().append(name, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::raw_rest;

    #[test]
    fn the_guest_path_is_the_raw_one_after_the_app_name() {
        assert_eq!(raw_rest("/http/web"), "");
        assert_eq!(raw_rest("/http/web/"), "");
        assert_eq!(raw_rest("/http/web/echo%3Fevil=1"), "echo%3Fevil=1");
        assert_eq!(raw_rest("/http/w%65b/a%2Fb/c%20d"), "a%2Fb/c%20d");
    }
}
