//! The node's end of streamed HTTP bodies (`wasi:http/proxy` apps).
//!
//! The gateway opens an [`Exchange`] for each request before queuing its task:
//! the rest of the request body (when it was too big to send inline) and a
//! slot for the response head. The replica slot that runs the task takes the
//! body and pumps it to the replica part by part as the guest asks for it,
//! and when the guest streams its response, hands the gateway the head and a
//! body that yields the parts as they come. Once a body has started to move,
//! the request cannot be replayed: the run's failure is final.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::BodyExt as _;
use tokio::sync::{mpsc, oneshot};

use crate::ipc::{BODY_PART, ToReplica};
use crate::queue::TaskId;

/// The exchanges in progress, by task id.
#[derive(Default)]
pub(crate) struct Bodies(Mutex<HashMap<TaskId, Arc<Exchange>>>);

pub(crate) struct Exchange {
    /// The rest of the request body, taken by the run that streams it.
    request: Mutex<Option<Body>>,
    /// Where a streamed response's head goes.
    head: Mutex<Option<oneshot::Sender<ResponseStart>>>,
}

/// A streamed response as the gateway gets it.
pub(crate) struct ResponseStart {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Body,
}

/// Keeps an exchange open; it closes when this is dropped (the request ended,
/// or its client went away).
pub(crate) struct Open<'a> {
    bodies: &'a Bodies,
    id: TaskId,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.bodies.0.lock().unwrap().remove(&self.id);
    }
}

impl Bodies {
    /// Opens the exchange of task `id`; `rest`: the request body still to send.
    pub(crate) fn open(&self, id: &TaskId, rest: Option<Body>) -> (Open<'_>, oneshot::Receiver<ResponseStart>) {
        let (tx, rx) = oneshot::channel();
        let exchange = Exchange { request: Mutex::new(rest), head: Mutex::new(Some(tx)) };
        self.0.lock().unwrap().insert(id.clone(), Arc::new(exchange));
        (Open { bodies: self, id: id.clone() }, rx)
    }

    /// The rest of task `id`'s request body, for the run about to start.
    pub(crate) fn take_request(&self, id: &str) -> Option<Body> {
        let exchange = self.0.lock().unwrap().get(id).cloned()?;
        exchange.request.lock().unwrap().take()
    }

    /// Whether task `id`'s caller waits on this node for its response head.
    pub(crate) fn waits_for(&self, id: &str) -> bool {
        let exchange = self.0.lock().unwrap().get(id).cloned();
        exchange.is_some_and(|exchange| exchange.head.lock().unwrap().is_some())
    }

    /// Where task `id`'s response head goes; `None` when nobody waits for it.
    pub(crate) fn take_head(&self, id: &str) -> Option<oneshot::Sender<ResponseStart>> {
        let exchange = self.0.lock().unwrap().get(id).cloned()?;
        exchange.head.lock().unwrap().take()
    }
}

/// How long a client may send nothing more of a request body while it is
/// read (streamed to a run: while the replica has room for more) before the
/// body fails: a stalled upload would otherwise hold a worker until the
/// task's timeout, or its connection forever.
pub(crate) const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends `body` to run `seq` as [`ToReplica::Body`] frames (through `out`),
/// one part per part the replica asks for on `wants`. A part gathers what
/// the client has already sent, up to [`BODY_PART`] bytes, so small reads
/// from the connection do not each cost a frame. A client that sends
/// nothing for `idle` while the replica has room for more fails the body.
pub(crate) async fn pump_request(
    seq: u64,
    mut body: Body,
    mut wants: mpsc::UnboundedReceiver<u32>,
    out: mpsc::UnboundedSender<ToReplica>,
    idle: std::time::Duration,
) {
    let mut credit = 0u32;
    loop {
        while credit == 0 {
            match wants.recv().await {
                Some(parts) => credit = credit.saturating_add(parts),
                None => return,
            }
        }
        let mut part = Vec::new();
        // What ends the body after this part: `Some(None)` its end, `Some(Some(e))` a failure.
        let mut end: Option<Option<String>> = None;
        let mut next = match tokio::time::timeout(idle, body.frame()).await {
            Ok(frame) => Some(frame),
            Err(_) => {
                let idle = crate::config::format_duration(idle);
                end = Some(Some(format!("the client sent nothing more of its request body for {idle}")));
                None
            }
        };
        while let Some(frame) = next {
            match frame {
                None => end = Some(None),
                Some(Err(e)) => end = Some(Some(format!("the client's request body failed: {e}"))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        part.extend_from_slice(&data);
                    }
                }
            }
            next = if end.is_none() && part.len() < BODY_PART { body.frame().now_or_never() } else { None };
        }
        if !part.is_empty() {
            if out.send(ToReplica::Body { seq, part: Some(Ok(part)) }).is_err() {
                return;
            }
            credit -= 1;
        }
        if let Some(end) = end {
            let _ = out.send(ToReplica::Body { seq, part: end.map(Err) });
            return;
        }
    }
}

/// The response body of run `seq` as the gateway sends it: the parts the
/// replica streams, each returning a credit once taken; an `Err` part (the
/// run failed mid-body) aborts the client's connection. Dropped before its
/// end (the client went away), it says so on `gone`, so the run is stopped
/// even while the guest waits for credit and sends nothing.
pub(crate) fn response_body(
    seq: u64,
    parts: mpsc::UnboundedReceiver<Result<Bytes, String>>,
    out: mpsc::UnboundedSender<ToReplica>,
    gone: mpsc::UnboundedSender<u64>,
) -> Body {
    Body::from_stream(ResponseParts { seq, parts, out, gone, ended: false })
}

struct ResponseParts {
    seq: u64,
    parts: mpsc::UnboundedReceiver<Result<Bytes, String>>,
    out: mpsc::UnboundedSender<ToReplica>,
    gone: mpsc::UnboundedSender<u64>,
    ended: bool,
}

impl Drop for ResponseParts {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.gone.send(self.seq);
        }
    }
}

impl futures_util::Stream for ResponseParts {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.parts.poll_recv(cx) {
            Poll::Ready(Some(Ok(part))) => {
                let _ = this.out.send(ToReplica::Credit { seq: this.seq });
                Poll::Ready(Some(Ok(part)))
            }
            Poll::Ready(Some(Err(message))) => {
                this.ended = true;
                Poll::Ready(Some(Err(std::io::Error::other(message))))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    #[tokio::test]
    async fn an_upload_that_stalls_while_the_guest_waits_fails_its_body() {
        let sent = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abc"))]);
        let body = Body::from_stream(sent.chain(futures_util::stream::pending()));
        let (wants, asks) = mpsc::unbounded_channel();
        let (out, mut frames) = mpsc::unbounded_channel();
        wants.send(2).unwrap();
        let pump = tokio::spawn(pump_request(7, body, asks, out, std::time::Duration::from_millis(50)));
        let Some(ToReplica::Body { seq: 7, part: Some(Ok(part)) }) = frames.recv().await else {
            panic!("no first part")
        };
        assert_eq!(part, b"abc");
        let Some(ToReplica::Body { seq: 7, part: Some(Err(message)) }) = frames.recv().await else {
            panic!("the body did not fail")
        };
        assert!(message.contains("sent nothing more of its request body"), "{message}");
        pump.await.unwrap();
    }
}
