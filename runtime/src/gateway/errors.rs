//! Every error the API returns, mapped to its status in one place.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::queue::{ErrorCode, QueueError, TaskError};
use crate::registry::DeployError;

/// `{"error": {"code": "...", "message": "..."}}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub(crate) fn unknown_app(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_APP",
            format!(
                "no app named {name:?}; deploy it first (beamlet deploy APP.wasm --name {name}) or list apps with `beamlet apps`"
            ),
        )
    }

    pub(crate) fn unknown_task(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_TASK",
            format!("no task {id:?}; it never existed or its result has expired"),
        )
    }

    pub(crate) fn too_large(what: &str, limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the {what} is larger than the {} limit", crate::config::format_size(limit as u64)),
        )
    }

    pub(crate) fn internal(error: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("{error:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<DeployError> for ApiError {
    fn from(error: DeployError) -> Self {
        let code = match &error {
            DeployError::BadName(_) => "BAD_NAME",
            DeployError::BadConfig(_) | DeployError::GpuTooSmall(_) | DeployError::TooBigForNode(_) => "BAD_CONFIG",
            DeployError::Empty | DeployError::NotWasm => "NOT_WASM",
            DeployError::CoreModule => "NOT_A_COMPONENT",
            DeployError::Compile(_) => "COMPILE_FAILED",
            DeployError::WrongWorld { .. } => "WRONG_WORLD",
            DeployError::Internal(_) => return Self::internal(&error),
        };
        Self::new(StatusCode::BAD_REQUEST, code, error.to_string())
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match &error {
            QueueError::Full { .. } => Self::new(StatusCode::TOO_MANY_REQUESTS, "QUEUE_FULL", error.to_string()),
            QueueError::UnknownTask(id) => Self::unknown_task(id),
            QueueError::AlreadyEnded { .. } => Self::new(StatusCode::CONFLICT, "ALREADY_ENDED", error.to_string()),
            QueueError::Store => Self::new(StatusCode::SERVICE_UNAVAILABLE, "STORE_FAILED", error.to_string()),
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
        };
        Self::new(status, code, error.message.clone())
    }
}
