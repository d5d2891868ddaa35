//! Callback delivery: when a task with a `callback_url` ends, its result is
//! POSTed there, signed, with retries, off the queue's path.
//!
//! The request carries `x-beamlet-task-id`, `x-beamlet-status`,
//! `x-beamlet-timestamp` (Unix seconds) and `x-beamlet-signature:
//! sha256=HEX`, where HEX is HMAC-SHA256 with the app's callback secret over
//! `"{timestamp}.{body}"`. The body is the output of a COMPLETE task, or
//! `{"error": {"code", "message"}}` for any other end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};

use super::Node;
use crate::queue::{TaskRecord, TaskStatus};

/// Attempts per callback, with doubling waits from `FIRST_RETRY` up to
/// `LONGEST_WAIT` (about two minutes in all). A callback not settled yet when
/// the node stops is delivered when it starts again.
const ATTEMPTS: u32 = 10;
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LONGEST_WAIT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight to one receiver (scheme, host and port) at a time: a
/// burst of callbacks (an app removed with hundreds of tasks) must not time
/// out on a receiver that takes a few connections at once, and be sent twice.
const PER_RECEIVER: usize = 8;

/// One semaphore per receiver.
#[derive(Default)]
struct Receivers(Mutex<HashMap<String, Arc<Semaphore>>>);

impl Receivers {
    fn of(&self, url: &str) -> Arc<Semaphore> {
        let key = reqwest::Url::parse(url).map_or_else(|_| url.to_owned(), |url| url.origin().ascii_serialization());
        self.0.lock().unwrap().entry(key).or_insert_with(|| Arc::new(Semaphore::new(PER_RECEIVER))).clone()
    }
}

pub(crate) fn spawn(node: Arc<Node>, mut ended: mpsc::UnboundedReceiver<(TaskRecord, Option<Bytes>)>) {
    let http = crate::client::http_client().timeout(REQUEST_TIMEOUT).build().expect("a default HTTP client builds");
    let receivers = Arc::new(Receivers::default());
    tokio::spawn(async move {
        while let Some((record, output)) = ended.recv().await {
            let Some(url) = record.callback_url.clone() else { continue };
            let Some(secret) = node.callback_secret(&record.app, record.created_at) else {
                // The app was removed before this node started: nothing to sign with.
                tracing::warn!(task = %record.id, app = %record.app, "callback not sent: the app was removed");
                node.dispatch.callback_settled(&record.id, false);
                continue;
            };
            let body = match (record.status, &record.error) {
                (TaskStatus::Complete, _) => output.unwrap_or_default(),
                (_, error) => {
                    Bytes::from(serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default())
                }
            };
            let node = node.clone();
            let http = http.clone();
            let receiver = receivers.of(&url);
            tokio::spawn(async move {
                let delivered = deliver(http, &receiver, url, secret, &record, body).await;
                node.dispatch.callback_settled(&record.id, delivered);
            });
        }
    });
}

/// `sha256=HEX` of HMAC-SHA256(secret, "{timestamp}.{body}").
pub(crate) fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("sha256={}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

async fn deliver(
    http: reqwest::Client,
    receiver: &Semaphore,
    url: String,
    secret: String,
    record: &TaskRecord,
    body: Bytes,
) -> bool {
    let mut wait = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        let sent = {
            let _turn = receiver.acquire().await.expect("the semaphore is never closed");
            // Signed when sent, not when it began to wait for its turn.
            let timestamp = crate::queue::now_ms() / 1000;
            http.post(&url)
                .header("content-type", "application/json")
                .header("x-beamlet-task-id", &record.id)
                .header("x-beamlet-status", record.status.as_str())
                .header("x-beamlet-timestamp", timestamp.to_string())
                .header("x-beamlet-signature", signature(&secret, timestamp, &body))
                .body(body.clone())
                .send()
                .await
        };
        let failure = match sent {
            Ok(response) if response.status().is_success() => {
                tracing::debug!(task = %record.id, %url, attempt, "callback delivered");
                return true;
            }
            Ok(response) => format!("HTTP {}", response.status()),
            Err(e) if e.is_timeout() => format!("no answer within {REQUEST_TIMEOUT:?}"),
            Err(e) if e.is_connect() => format!("could not connect: {}", crate::client::describe_http_error(&e)),
            Err(e) => crate::client::describe_http_error(&e),
        };
        tracing::warn!(task = %record.id, %url, attempt, "callback failed: {failure}");
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(LONGEST_WAIT);
        }
    }
    tracing::error!(task = %record.id, %url, "callback given up after {ATTEMPTS} attempts");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_to_one_receiver_share_its_limit() {
        let receivers = Receivers::default();
        let hook = receivers.of("http://127.0.0.1:9000/a");
        assert!(Arc::ptr_eq(&hook, &receivers.of("http://127.0.0.1:9000/b?x=1")));
        assert!(!Arc::ptr_eq(&hook, &receivers.of("http://127.0.0.1:9001/a")));
        assert!(!Arc::ptr_eq(&hook, &receivers.of("https://127.0.0.1:9000/a")));
        assert_eq!(hook.available_permits(), PER_RECEIVER);
    }

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_and_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let signature = signature("Jefe", 0, b"");
        assert_eq!(signature.len(), "sha256=".len() + 64);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(expected, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_ne!(super::signature("Jefe", 1, b"x"), super::signature("Jefe", 2, b"x"), "the timestamp is signed");
    }
}
