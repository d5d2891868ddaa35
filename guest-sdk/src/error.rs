use std::fmt;

use crate::__bindings;

/// Why a handler refused or failed a task.
///
/// Returning an `Error` is an orderly answer: the task ends `FAILED` with this
/// message and the worker keeps serving. A panic is not an error; it traps,
/// fails the task with the panic message and replaces the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Which side is at fault, which decides the HTTP status the caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The input could not be understood; the caller should fix it (HTTP 400).
    BadInput,
    /// The handler could not do the work (HTTP 500).
    Failed,
}

impl Error {
    /// The caller sent something this handler cannot use (HTTP 400).
    pub fn bad_input(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::BadInput, message: message.into() }
    }

    /// The handler could not do the work (HTTP 500).
    pub fn failed(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Failed, message: message.into() }
    }

    /// Whether this is a bad-input or a failed error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message the caller will see.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// A JSON error inside a handler (say, parsing a nested document) fails the task;
/// the SDK's own input decoding reports [`ErrorKind::BadInput`] instead.
impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::failed(err.to_string())
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::failed(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::failed(message)
    }
}

impl From<Error> for __bindings::Error {
    fn from(err: Error) -> Self {
        match err.kind {
            ErrorKind::BadInput => __bindings::Error::BadInput(err.message),
            ErrorKind::Failed => __bindings::Error::Failed(err.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_fail_and_keep_the_message() {
        let from_str: Error = "no".into();
        let from_string: Error = String::from("no").into();
        assert_eq!(from_str, Error::failed("no"));
        assert_eq!(from_string, Error::failed("no"));
        assert_eq!(from_str.to_string(), "no");
    }

    #[test]
    fn maps_onto_the_wit_variant() {
        assert!(matches!(__bindings::Error::from(Error::bad_input("x")), __bindings::Error::BadInput(m) if m == "x"));
        assert!(matches!(__bindings::Error::from(Error::failed("y")), __bindings::Error::Failed(m) if m == "y"));
    }
}
