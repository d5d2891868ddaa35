//! Node <-> replica frames on the replica's local socket (a socket pair whose
//! replica end is inherited as a file descriptor).
//!
//! A frame is a little-endian `u32` length followed by a postcard-encoded
//! message. The node writes [`ToReplica`]; the replica writes [`FromReplica`].

use std::io::{Read, Write};

use anyhow::{Context as _, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest frame either side accepts: the biggest payload plus headroom.
pub(crate) const MAX_FRAME: usize = 128 * 1024 * 1024;

/// What a replica must know to start: sent once, first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReplicaSpec {
    pub app: String,
    pub version: u32,
    pub replica: String,
    /// Path of the precompiled component.
    pub compiled: String,
    pub world: crate::registry::World,
    pub workers: u32,
    /// Wasm memory limit of each worker, in bytes.
    pub memory_per_worker: u64,
    /// A fresh instance for every task instead of one per worker.
    pub fresh_instance_per_task: bool,
    /// How long `init` may run, in milliseconds.
    pub init_timeout_ms: u64,
    /// Where guests may send HTTP requests (`host` or `host:port`).
    pub allowed_outbound_hosts: Vec<String>,
    /// The GPU placed for this replica; `None` for a CPU app.
    pub gpu: Option<GpuSpec>,
}

/// The GPU a replica owns while it lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct GpuSpec {
    pub backend: GpuBackendKind,
    /// The device's index on the node. A CUDA replica sees only this device
    /// (`CUDA_VISIBLE_DEVICES`), as its device 0.
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub memory_bytes: u64,
    /// Device memory each worker may hold at once (the app's `gpu_memory`).
    pub quota_per_worker: u64,
}

/// Which implementation backs a node's GPUs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum GpuBackendKind {
    Cuda,
    /// Host memory and CPU code behind the same interface (`--gpu-backend cpu`).
    Cpu,
}

/// A request for a `wasi:http/proxy` component: the input of its tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HttpRequest {
    pub method: String,
    /// Path and query as the guest sees them, e.g. `/echo?x=1`.
    pub path_with_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, or its first part when `streamed`.
    #[serde(with = "raw")]
    pub body: Vec<u8>,
    /// The rest of the body follows as [`ToReplica::Body`] frames, each asked
    /// for with [`FromReplica::WantBody`].
    pub streamed: bool,
}

/// The guest's response: the output of its tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    #[serde(with = "raw")]
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub(crate) fn encode(&self) -> Vec<u8> {
        to_bytes(self)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).context("failed to decode the HTTP request")
    }
}

impl HttpResponse {
    pub(crate) fn encode(&self) -> Vec<u8> {
        to_bytes(self)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).context("failed to decode the HTTP response")
    }
}

fn to_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding to memory cannot fail")
}

/// One task for one worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunTask {
    /// The node's handle for this run; `Done` and `Cancel` refer to it.
    pub seq: u64,
    pub task_id: String,
    pub attempt: u32,
    pub timeout_ms: u64,
    #[serde(with = "raw")]
    pub input: Vec<u8>,
    /// A wasi:http response may stream (and go out before the guest
    /// returns): its caller waits on this node. One whose caller waits on
    /// another node of a cluster goes whole, as the task's output.
    pub stream: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToReplica {
    Start(ReplicaSpec),
    Run(RunTask),
    /// Stop the run `seq` if it is still going; it ends `Cancelled`.
    Cancel {
        seq: u64,
    },
    /// Give back run `seq` if no worker has begun it: it is answered with
    /// [`FromReplica::Returned`] then, else it runs and ends as usual.
    Recall {
        seq: u64,
    },
    /// Finish the tasks already sent, then exit.
    Drain,
    /// Request body of run `seq` (a streamed [`HttpRequest`]): the next part,
    /// or its end (`None`). `Err`: the client's upload broke off.
    Body {
        seq: u64,
        #[serde(with = "raw_part")]
        part: Option<Result<Vec<u8>, String>>,
    },
    /// The node passed on one more [`FromReplica::ResponseBody`] part of run
    /// `seq`: the replica may send another.
    Credit {
        seq: u64,
    },
}

/// How a run ended, as the replica saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) enum Outcome {
    Complete(#[serde(with = "raw")] Vec<u8>),
    /// The handler returned `error::bad-input`.
    BadInput(String),
    /// The handler returned `error::failed`.
    Failed(String),
    /// The guest trapped; the message includes the trap and its stderr tail.
    Trap(String),
    /// The guest grew its memory past its limit and died of it.
    OutOfMemory(String),
    /// The run outlived its timeout and was stopped.
    Timeout,
    /// The GPU failed under the run; the replica exits after reporting it.
    DeviceLost(String),
    /// The node cancelled the run.
    Cancelled,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TaskDone {
    pub seq: u64,
    pub worker: u32,
    pub outcome: Outcome,
    #[serde(with = "raw")]
    pub stdout: Vec<u8>,
    #[serde(with = "raw")]
    pub stderr: Vec<u8>,
    /// Time spent in the guest, in microseconds.
    pub run_us: u64,
    /// GPU memory the worker holds after the run, in bytes.
    pub gpu_bytes: u64,
    /// The replica exits after this report, and why (its GPU failed or is
    /// stuck): no worker takes another run.
    pub exits: Option<String>,
    /// The worker builds a new instance (after a trap or a timeout, or for
    /// each task) before it takes another run, and says so with
    /// [`FromReplica::WorkerStarted`]; the replica exits if that fails.
    pub restarts: bool,
}

impl TaskDone {
    /// A run that ended without running the guest, so with no output or logs.
    pub(crate) fn empty(seq: u64, worker: u32, outcome: Outcome) -> Self {
        Self {
            seq,
            worker,
            outcome,
            stdout: Vec::new(),
            stderr: Vec::new(),
            run_us: 0,
            gpu_bytes: 0,
            exits: None,
            restarts: false,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromReplica {
    /// A worker's instance is up and its `init` returned.
    WorkerStarted {
        worker: u32,
        instantiate_us: u64,
        init_us: u64,
        #[serde(with = "raw")]
        stdout: Vec<u8>,
        #[serde(with = "raw")]
        stderr: Vec<u8>,
        /// GPU memory the worker holds after `init` (weights, say).
        gpu_bytes: u64,
    },
    /// Every worker started; the replica takes tasks.
    Ready,
    /// The replica cannot start (bad component, `init` failed); it exits next.
    StartFailed {
        message: String,
    },
    /// Run `seq` took request body parts: send up to `parts` more.
    WantBody {
        seq: u64,
        parts: u32,
    },
    /// Run `seq` streams its response: the head now, the body in
    /// [`FromReplica::ResponseBody`] parts (each spending a credit), and its
    /// `Done` (with an empty output when complete) ends the body.
    ResponseHead {
        seq: u64,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
    },
    ResponseBody {
        seq: u64,
        #[serde(with = "raw")]
        part: Vec<u8>,
    },
    /// Run `seq`'s streamed response body is complete, though the guest
    /// still runs (work after its response): the client gets its end now.
    ResponseEnd {
        seq: u64,
    },
    Done(TaskDone),
    /// Run `seq`, recalled, will not run here ([`ToReplica::Recall`]).
    Returned {
        seq: u64,
    },
}

/// Body parts either side may send ahead before the other asks for more:
/// with [`BODY_PART`] bytes each, what one stream holds in flight.
pub(crate) const BODY_WINDOW: u32 = 8;
/// The size a streamed response body is sent in (the last part may be smaller).
pub(crate) const BODY_PART: usize = 64 * 1024;

/// Byte strings as one run of bytes: serde's default for `Vec<u8>` is a
/// sequence of `u8`, encoded and decoded one call per byte. postcard writes
/// both the same way (a length, then the bytes), so only the speed differs.
mod raw {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(bytes)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

/// A request body part ([`ToReplica::Body`]) with its bytes as [`raw`].
mod raw_part {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    enum PartRef<'a> {
        End,
        Data(#[serde(with = "super::raw")] &'a [u8]),
        Broken(&'a str),
    }

    #[derive(Deserialize)]
    enum Part {
        End,
        Data(#[serde(with = "super::raw")] Vec<u8>),
        Broken(String),
    }

    pub(super) fn serialize<S: Serializer>(
        part: &Option<Result<Vec<u8>, String>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match part {
            None => PartRef::End,
            Some(Ok(bytes)) => PartRef::Data(bytes),
            Some(Err(message)) => PartRef::Broken(message),
        }
        .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Result<Vec<u8>, String>>, D::Error> {
        Ok(match Part::deserialize(deserializer)? {
            Part::End => None,
            Part::Data(bytes) => Some(Ok(bytes)),
            Part::Broken(message) => Some(Err(message)),
        })
    }
}

/// A message as a frame: its length, then its body.
pub(crate) fn frame<T: Serialize>(message: &T) -> Result<Vec<u8>> {
    let mut frame = postcard::to_extend(message, vec![0u8; 4]).context("failed to encode frame")?;
    let len = u32::try_from(frame.len() - 4).context("frame too large")?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    postcard::from_bytes(body).context("failed to decode frame")
}

fn check_len(len: u32) -> Result<usize> {
    let len = len as usize;
    if len > MAX_FRAME {
        bail!("frame of {len} bytes exceeds the {MAX_FRAME} byte limit");
    }
    Ok(len)
}

/// Blocking side, used by the replica process.
pub(crate) fn write_blocking<T: Serialize>(out: &mut impl Write, message: &T) -> Result<()> {
    out.write_all(&frame(message)?)?;
    out.flush()?;
    Ok(())
}

/// Reads one frame; `None` at a clean end of stream (the peer is gone).
pub(crate) fn read_blocking<T: DeserializeOwned>(input: &mut impl Read) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let mut body = vec![0u8; check_len(u32::from_le_bytes(len))?];
    input.read_exact(&mut body)?;
    decode(&body).map(Some)
}

/// Async side, used by the node.
pub(crate) async fn write_async<T: Serialize>(
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    message: &T,
) -> Result<()> {
    out.write_all(&frame(message)?).await?;
    out.flush().await?;
    Ok(())
}

pub(crate) async fn read_async<T: DeserializeOwned>(
    input: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Option<T>> {
    let len = match input.read_u32_le().await {
        Ok(len) => len,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut body = vec![0u8; check_len(len)?];
    input.read_exact(&mut body).await?;
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let run =
            RunTask { seq: 7, task_id: "t".into(), attempt: 2, timeout_ms: 10, input: b"{}".to_vec(), stream: true };
        write_blocking(&mut buf, &ToReplica::Run(run)).unwrap();
        write_blocking(&mut buf, &ToReplica::Drain).unwrap();
        let mut cursor = std::io::Cursor::new(buf);
        match read_blocking::<ToReplica>(&mut cursor).unwrap() {
            Some(ToReplica::Run(run)) => assert_eq!((run.seq, run.attempt, run.input.as_slice()), (7, 2, &b"{}"[..])),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(read_blocking::<ToReplica>(&mut cursor).unwrap(), Some(ToReplica::Drain)));
        assert!(read_blocking::<ToReplica>(&mut cursor).unwrap().is_none());
    }

    #[test]
    fn byte_payloads_round_trip() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut buf = Vec::new();
        for part in [Some(Ok(big.clone())), Some(Err("upload broke off".to_owned())), None, Some(Ok(Vec::new()))] {
            write_blocking(&mut buf, &ToReplica::Body { seq: 3, part }).unwrap();
        }
        let mut done = TaskDone::empty(4, 1, Outcome::Complete(big.clone()));
        done.stderr = b"oops".to_vec();
        write_blocking(&mut buf, &FromReplica::Done(done)).unwrap();
        let mut cursor = std::io::Cursor::new(buf);
        let mut parts = Vec::new();
        for _ in 0..4 {
            match read_blocking::<ToReplica>(&mut cursor).unwrap() {
                Some(ToReplica::Body { seq: 3, part }) => parts.push(part),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            parts,
            vec![Some(Ok(big.clone())), Some(Err("upload broke off".to_owned())), None, Some(Ok(Vec::new()))]
        );
        match read_blocking::<FromReplica>(&mut cursor).unwrap() {
            Some(FromReplica::Done(done)) => {
                assert_eq!((done.outcome, done.stderr), (Outcome::Complete(big), b"oops".to_vec()));
            }
            other => panic!("unexpected {other:?}"),
        }
        // The same bytes on the wire as serde's default for a Vec<u8>.
        let response = HttpResponse { status: 200, headers: Vec::new(), body: vec![1, 2, 3] };
        assert_eq!(
            response.encode(),
            postcard::to_allocvec(&(200u16, Vec::<(String, Vec<u8>)>::new(), vec![1u8, 2, 3])).unwrap()
        );
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut cursor = std::io::Cursor::new(u32::MAX.to_le_bytes().to_vec());
        assert!(read_blocking::<ToReplica>(&mut cursor).is_err());
    }
}
