//! The replica's end of streamed HTTP bodies (`wasi:http/proxy` apps).
//!
//! A request body bigger than the node sends inline arrives in parts: the
//! guest's reads take parts from a [`RequestBody`], and each part taken asks
//! the node for one more, so at most [`BODY_WINDOW`] parts wait here. The
//! response goes the other way: [`stream_response`] sends the head and then
//! body parts, each spending a credit the node returns once it has passed the
//! part on, so a slow client slows the guest's writes instead of filling
//! memory. Both sides give up at the task's deadline, and a cancel (or a
//! client that went away) closes them, which ends the guest's blocked read or
//! write with an error.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::sync::{Semaphore, mpsc};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::Replies;
use crate::ipc::{BODY_PART, BODY_WINDOW, FromReplica, HttpResponse};

/// One request body part from the node, or why the upload broke off.
type Part = Result<Vec<u8>, String>;

/// The streams of the runs in progress, by run sequence number.
#[derive(Default)]
pub(crate) struct Flows(Mutex<HashMap<u64, Flow>>);

struct Flow {
    /// Where request body parts go; `None` once the body ended.
    request: Option<mpsc::UnboundedSender<Part>>,
    /// Response parts the node is ready for.
    credits: Arc<Semaphore>,
}

/// A run's handles on its streams; closes them when dropped.
pub(crate) struct FlowHandle {
    flows: Arc<Flows>,
    seq: u64,
    pub(crate) request: Option<mpsc::UnboundedReceiver<Part>>,
    pub(crate) credits: Arc<Semaphore>,
}

impl Drop for FlowHandle {
    fn drop(&mut self) {
        self.flows.0.lock().unwrap().remove(&self.seq);
    }
}

impl Flows {
    /// Opens the streams of run `seq`; `streamed`: its request body follows in parts.
    pub(crate) fn open(self: &Arc<Self>, seq: u64, streamed: bool) -> FlowHandle {
        let (tx, rx) = if streamed {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let credits = Arc::new(Semaphore::new(BODY_WINDOW as usize));
        self.0.lock().unwrap().insert(seq, Flow { request: tx, credits: credits.clone() });
        FlowHandle { flows: self.clone(), seq, request: rx, credits }
    }

    /// A request body part (`None`: the end) from the node.
    pub(crate) fn request_part(&self, seq: u64, part: Option<Part>) {
        let mut flows = self.0.lock().unwrap();
        let Some(flow) = flows.get_mut(&seq) else { return };
        match (part, &flow.request) {
            (Some(part), Some(tx)) => {
                let _ = tx.send(part);
            }
            _ => flow.request = None,
        }
    }

    pub(crate) fn credit(&self, seq: u64) {
        if let Some(flow) = self.0.lock().unwrap().get(&seq) {
            flow.credits.add_permits(1);
        }
    }

    /// Ends both streams of run `seq` at once (it was cancelled): the guest's
    /// pending read or write fails, so it returns.
    pub(crate) fn abort(&self, seq: u64) {
        if let Some(flow) = self.0.lock().unwrap().get_mut(&seq) {
            if let Some(tx) = flow.request.take() {
                let _ = tx.send(Err("the task was cancelled".into()));
            }
            flow.credits.close();
        }
    }
}

/// A streamed request body as the guest reads it: the inline first part, then
/// the parts the node sends, asking for one more per part taken.
pub(crate) struct RequestBody {
    first: Option<Bytes>,
    parts: mpsc::UnboundedReceiver<Part>,
    seq: u64,
    replies: Replies,
    deadline: Instant,
    /// The deadline's timer, made on first use (it needs the body's runtime).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    asked: bool,
}

impl RequestBody {
    pub(crate) fn new(
        first: Vec<u8>,
        parts: mpsc::UnboundedReceiver<Part>,
        seq: u64,
        replies: Replies,
        deadline: Instant,
    ) -> Self {
        let first = (!first.is_empty()).then(|| Bytes::from(first));
        Self { first, parts, seq, replies, deadline, timer: None, asked: false }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if !this.asked {
            // The first read opens the window; later parts are asked one by one.
            this.asked = true;
            this.replies.send(&FromReplica::WantBody { seq: this.seq, parts: BODY_WINDOW });
        }
        match this.parts.poll_recv(cx) {
            Poll::Ready(Some(Ok(part))) => {
                this.replies.send(&FromReplica::WantBody { seq: this.seq, parts: 1 });
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(part)))))
            }
            Poll::Ready(Some(Err(message))) => {
                tracing::debug!(seq = this.seq, "request body broke off: {message}");
                // The guest's read error says why (the client stalled, sent
                // a malformed body, or went away), not just that it ended.
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(message)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(this.deadline.into())))
                .as_mut()
                .poll(cx)
            {
                Poll::Ready(()) => Poll::Ready(Some(Err(wasmtime_wasi_http::Error::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Passes a guest's response on while the guest writes it. A response that
/// is complete and small by the time it is read is returned whole, as the
/// task's output (the common case, one frame to the node); anything else is
/// streamed: head, then parts of [`BODY_PART`] bytes, flushed early whenever
/// the guest pauses, and `None` returned.
pub(crate) async fn stream_response(
    response: http::Response<HyperOutgoingBody>,
    seq: u64,
    replies: Replies,
    credits: Arc<Semaphore>,
    deadline: Instant,
    stream: bool,
) -> Result<Option<HttpResponse>, String> {
    let (parts, mut body) = response.into_parts();
    let headers = parts.headers.iter().map(|(name, value)| (name.to_string(), value.as_bytes().to_vec())).collect();
    let mut head = Some(HttpResponse { status: parts.status.as_u16(), headers, body: Vec::new() });
    let mut pending = BytesMut::new();
    let deadline = tokio::time::Instant::from(deadline);
    loop {
        // Take what is ready at once. When nothing is, wait a moment for the
        // rest before sending what we have, so a quick guest's whole response
        // still goes in one frame. Not `stream` (its caller waits on another
        // node), nothing is sent: the whole response is the output.
        let frame = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(frame) => frame,
            None if !stream || (pending.is_empty() && head.is_none()) => {
                tokio::time::timeout_at(deadline, body.frame())
                    .await
                    .map_err(|_| "the response outlived the task's timeout".to_owned())?
            }
            None => match tokio::time::timeout(LINGER, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => {
                    send_part(&replies, seq, head.take(), &mut pending, &credits, deadline).await?;
                    continue;
                }
            },
        };
        match frame {
            None => break,
            Some(Err(e)) => return Err(format!("the guest's response body failed: {e:?}")),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    pending.extend_from_slice(&data);
                }
                if stream && pending.len() >= BODY_PART {
                    send_part(&replies, seq, head.take(), &mut pending, &credits, deadline).await?;
                }
            }
        }
    }
    match head {
        // Nothing was sent yet: the whole response is the output.
        Some(mut response) => {
            response.body = pending.to_vec();
            Ok(Some(response))
        }
        None => {
            send_part(&replies, seq, None, &mut pending, &credits, deadline).await?;
            replies.send(&FromReplica::ResponseEnd { seq });
            Ok(None)
        }
    }
}

/// Sends a whole response of run `seq` now, as a stream that ends at once:
/// the guest is still running (work after its response), and its client
/// should not wait for that.
pub(crate) async fn send_early(
    response: HttpResponse,
    seq: u64,
    replies: &Replies,
    credits: &Semaphore,
    deadline: Instant,
) -> Result<(), String> {
    let HttpResponse { status, headers, body } = response;
    let mut pending = BytesMut::from(&body[..]);
    let head = Some(HttpResponse { status, headers, body: Vec::new() });
    send_part(replies, seq, head, &mut pending, credits, tokio::time::Instant::from(deadline)).await?;
    replies.send(&FromReplica::ResponseEnd { seq });
    Ok(())
}

/// How long a response waits for more of its body before what it has is sent.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// Sends the head (first time) and the pending bytes in parts of at most
/// [`BODY_PART`], each once the node has a credit for it.
async fn send_part(
    replies: &Replies,
    seq: u64,
    head: Option<HttpResponse>,
    pending: &mut BytesMut,
    credits: &Semaphore,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    if let Some(head) = head {
        replies.send(&FromReplica::ResponseHead { seq, status: head.status, headers: head.headers });
    }
    while !pending.is_empty() {
        let permit = tokio::time::timeout_at(deadline, credits.acquire())
            .await
            .map_err(|_| "the client did not read the response before the task's timeout".to_owned())?
            .map_err(|_| {
                "the response stream was closed (the task was cancelled or the client went away)".to_owned()
            })?;
        permit.forget();
        let part = pending.split_to(pending.len().min(BODY_PART));
        replies.send(&FromReplica::ResponseBody { seq, part: part.to_vec() });
    }
    Ok(())
}
