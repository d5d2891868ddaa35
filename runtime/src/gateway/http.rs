//! `ANY /http/{name}/{path..}`: plain HTTP for `wasi:http/proxy` apps. The
//! request becomes a task like any other (same queue, replicas, limits and
//! autoscaling); its output is the guest's response.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::tasks::{app_of_world, new_task, with_task_id};
use super::{ApiError, read_body};
use crate::ipc::{HttpRequest, HttpResponse};
use crate::node::Node;
use crate::queue::{Ended, TaskStatus};
use crate::registry::World;

pub(crate) async fn root(State(node): State<Arc<Node>>, Path(name): Path<String>, request: Request) -> Response {
    proxy(&node, &name, "", request).await.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn path(
    State(node): State<Arc<Node>>,
    Path((name, rest)): Path<(String, String)>,
    request: Request,
) -> Response {
    proxy(&node, &name, &rest, request).await.unwrap_or_else(IntoResponse::into_response)
}

async fn proxy(node: &Node, name: &str, rest: &str, request: Request) -> Result<Response, ApiError> {
    let app = app_of_world(node, name, World::HttpProxy)?;
    let (parts, body) = request.into_parts();
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let headers = parts.headers.iter().map(|(name, value)| (name.to_string(), value.as_bytes().to_vec())).collect();
    let body = read_body(body, node.limits.max_input, "request body").await?;
    let request = HttpRequest {
        method: parts.method.to_string(),
        path_with_query: format!("/{rest}{query}"),
        headers,
        body: body.to_vec(),
    };
    let Ended { record, output } = node.dispatch.call(new_task(&app, request.encode().into(), None, false)).await?;
    let response = match (record.status, &record.error) {
        (TaskStatus::Complete, _) => {
            let output = output.unwrap_or_default();
            let response = HttpResponse::decode(&output).map_err(ApiError::internal)?;
            into_response(response)?
        }
        (_, Some(error)) => ApiError::from(error).into_response(),
        (status, None) => {
            ApiError::internal(format!("task ended {} without an error", status.as_str())).into_response()
        }
    };
    Ok(with_task_id(response, &record.id))
}

fn into_response(response: HttpResponse) -> Result<Response, ApiError> {
    let status = StatusCode::from_u16(response.status)
        .map_err(|_| ApiError::internal(format!("the guest answered with status {}", response.status)))?;
    let mut out = Response::new(Body::from(response.body));
    *out.status_mut() = status;
    for (name, value) in response.headers {
        let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value)) else { continue };
        out.headers_mut().append(name, value);
    }
    Ok(out)
}
