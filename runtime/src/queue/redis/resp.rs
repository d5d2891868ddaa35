//! A small blocking Redis client: RESP2 over TCP, a pool of connections,
//! Lua scripts by digest, and a subscriber connection. Blocking is on
//! purpose: the queue's interface is synchronous and each call is one
//! round trip on loopback or a LAN.

use std::io::{BufRead as _, BufReader, BufWriter, Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

/// How long one command may wait for its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections kept for reuse.
const POOL_SIZE: usize = 32;

/// Where the server is, from `redis://[[user]:password@]host[:port][/db]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RedisUrl {
    pub addr: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| {
            format!("{url:?} is not a Redis URL: write redis://host:port[/db] (TLS is not supported)")
        })?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (host_port, db) = match rest.split_once('/') {
            Some((host_port, "")) => (host_port, 0),
            Some((host_port, db)) => {
                (host_port, db.parse().map_err(|_| format!("{url:?}: the database {db:?} is not a number"))?)
            }
            None => (rest, 0),
        };
        if host_port.is_empty() {
            return Err(format!("{url:?} names no host: write redis://host:port"));
        }
        let has_port = match host_port.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => host_port.contains(':'),
        };
        let addr = if has_port { host_port.to_owned() } else { format!("{host_port}:6379") };
        let (username, password) = match auth.map(|auth| auth.split_once(':')) {
            None => (None, None),
            Some(None) => (None, Some(auth.unwrap_or_default().to_owned())),
            Some(Some((user, password))) => ((!user.is_empty()).then(|| user.to_owned()), Some(password.to_owned())),
        };
        Ok(Self { addr, username, password, db })
    }
}

/// One answer from the server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    Nil,
    Int(i64),
    /// A bulk or simple string.
    Data(Vec<u8>),
    Array(Vec<Reply>),
}

impl Reply {
    pub(crate) fn into_bytes(self) -> Option<Vec<u8>> {
        match self {
            Self::Data(bytes) => Some(bytes),
            Self::Int(n) => Some(n.to_string().into_bytes()),
            _ => None,
        }
    }

    pub(crate) fn into_string(self) -> Option<String> {
        self.into_bytes().and_then(|bytes| String::from_utf8(bytes).ok())
    }

    pub(crate) fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(n) => Some(*n),
            Self::Data(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
            _ => None,
        }
    }

    pub(crate) fn into_array(self) -> Vec<Reply> {
        match self {
            Self::Array(items) => items,
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisError {
    #[error("failed to reach Redis at {addr}: {error}")]
    Io { addr: String, error: std::io::Error },
    /// The server answered with an error.
    #[error("Redis answered: {0}")]
    Server(String),
    #[error("Redis sent something this client does not understand: {0}")]
    Protocol(String),
}

/// One connection, used by one caller at a time.
pub(crate) struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    addr: String,
}

impl Conn {
    pub(crate) fn open(url: &RedisUrl, read_timeout: Option<Duration>) -> Result<Self, RedisError> {
        let io = |error| RedisError::Io { addr: url.addr.clone(), error };
        // A bounded connect: an unreachable server must not hold a caller
        // for the system's SYN timeout (minutes).
        let addrs = std::net::ToSocketAddrs::to_socket_addrs(&url.addr).map_err(io)?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the host name resolves to no address");
        let mut connected = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = connected.ok_or_else(|| io(last))?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(read_timeout).map_err(io)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let writer = BufWriter::new(stream.try_clone().map_err(io)?);
        let mut conn = Self { reader: BufReader::new(stream), writer, addr: url.addr.clone() };
        if let Some(password) = &url.password {
            match &url.username {
                Some(user) => conn.call(&[b"AUTH", user.as_bytes(), password.as_bytes()])?,
                None => conn.call(&[b"AUTH", password.as_bytes()])?,
            };
        }
        if url.db != 0 {
            conn.call(&[b"SELECT", url.db.to_string().as_bytes()])?;
        }
        Ok(conn)
    }

    fn io(&self, error: std::io::Error) -> RedisError {
        // A read or write past its timeout says "resource temporarily unavailable".
        let error = match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {IO_TIMEOUT:?} (the server is overloaded, frozen or unreachable)"),
            ),
            _ => error,
        };
        RedisError::Io { addr: self.addr.clone(), error }
    }

    pub(crate) fn send(&mut self, args: &[&[u8]]) -> Result<(), RedisError> {
        let mut frame = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        frame.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            frame.extend_from_slice(arg);
            frame.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&frame).map_err(|e| self.io(e))?;
        self.writer.flush().map_err(|e| self.io(e))
    }

    pub(crate) fn call(&mut self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        self.send(args)?;
        self.read()
    }

    /// Reads one reply; a server error is an `Err`.
    pub(crate) fn read(&mut self) -> Result<Reply, RedisError> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line).map_err(|e| self.io(e))?;
        if line.is_empty() {
            let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the connection was closed");
            return Err(self.io(eof));
        }
        if !line.ends_with(b"\r\n") {
            return Err(RedisError::Protocol(format!("a line without CRLF: {:?}", String::from_utf8_lossy(&line))));
        }
        line.truncate(line.len() - 2);
        let (kind, body) = (line[0], &line[1..]);
        let text = String::from_utf8_lossy(body).into_owned();
        let number = || text.parse::<i64>().map_err(|_| RedisError::Protocol(format!("not a number: {text:?}")));
        match kind {
            b'+' => Ok(Reply::Data(body.to_vec())),
            b'-' => Err(RedisError::Server(text)),
            b':' => Ok(Reply::Int(number()?)),
            b'$' => {
                let Ok(len) = usize::try_from(number()?) else { return Ok(Reply::Nil) };
                let mut data = vec![0; len + 2];
                self.reader.read_exact(&mut data).map_err(|e| self.io(e))?;
                data.truncate(len);
                Ok(Reply::Data(data))
            }
            b'*' => {
                let Ok(len) = usize::try_from(number()?) else { return Ok(Reply::Nil) };
                let mut items = Vec::with_capacity(len.min(1024));
                for _ in 0..len {
                    // An error inside an array (a script's redis.error_reply) stays an error.
                    items.push(self.read()?);
                }
                Ok(Reply::Array(items))
            }
            _ => Err(RedisError::Protocol(format!("unknown reply type {:?}", kind as char))),
        }
    }
}

/// The peer closed the connection (rather than timing out).
fn closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted)
}

/// A Lua script: its source, and its digest once the server knows it.
pub(crate) struct Script {
    pub source: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    pub(crate) const fn new(source: &'static str) -> Self {
        Self { source, sha: Mutex::new(None) }
    }
}

/// Connections to one server, opened as needed and kept for reuse.
pub(crate) struct Client {
    url: RedisUrl,
    idle: Mutex<Vec<Conn>>,
}

impl Client {
    /// Connects once, so a wrong address or password is reported now.
    pub(crate) fn connect(url: RedisUrl) -> Result<Self, RedisError> {
        let conn = Conn::open(&url, Some(IO_TIMEOUT))?;
        Ok(Self { url, idle: Mutex::new(vec![conn]) })
    }

    pub(crate) fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// Runs `f` on an idle connection (or a new one); a connection that
    /// failed is dropped, not reused. An idle connection the server closed
    /// meanwhile (it restarted) fails at once: `f` runs again on a new one.
    fn with_conn<T>(&self, f: impl FnMut(&mut Conn) -> Result<T, RedisError>) -> Result<T, RedisError> {
        off_the_executor(|| self.with_conn_here(f))
    }

    fn with_conn_here<T>(&self, mut f: impl FnMut(&mut Conn) -> Result<T, RedisError>) -> Result<T, RedisError> {
        let idle = self.idle.lock().unwrap().pop();
        let reused = idle.is_some();
        let mut conn = match idle {
            Some(conn) => conn,
            None => Conn::open(&self.url, Some(IO_TIMEOUT))?,
        };
        let mut result = f(&mut conn);
        if reused && matches!(&result, Err(RedisError::Io { error, .. }) if closed(error)) {
            conn = Conn::open(&self.url, Some(IO_TIMEOUT))?;
            result = f(&mut conn);
        }
        if !matches!(result, Err(RedisError::Io { .. } | RedisError::Protocol(_))) {
            let mut idle = self.idle.lock().unwrap();
            if idle.len() < POOL_SIZE {
                idle.push(conn);
            }
        }
        result
    }

    pub(crate) fn call(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        self.with_conn(|conn| conn.call(args))
    }

    /// Runs `script` with `args` (it takes no keys: every key it touches is
    /// named from its arguments, so this works on one server, not a cluster).
    pub(crate) fn eval(&self, script: &Script, args: &[&[u8]]) -> Result<Reply, RedisError> {
        self.with_conn(|conn| {
            let known = script.sha.lock().unwrap().clone();
            if let Some(sha) = known {
                let mut call: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"0"];
                call.extend_from_slice(args);
                match conn.call(&call) {
                    Err(RedisError::Server(e)) if e.starts_with("NOSCRIPT") => {}
                    other => return other,
                }
            }
            // Unknown to the server (first use, or it restarted): load it.
            let sha = conn
                .call(&[b"SCRIPT", b"LOAD", script.source.as_bytes()])?
                .into_string()
                .ok_or_else(|| RedisError::Protocol("SCRIPT LOAD gave no digest".into()))?;
            *script.sha.lock().unwrap() = Some(sha.clone());
            let mut call: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"0"];
            call.extend_from_slice(args);
            conn.call(&call)
        })
    }
}

/// Runs `f`, which blocks on the network, so that the async tasks sharing
/// the caller's executor thread go on meanwhile: on a worker of the node's
/// runtime, that thread hands its work to another first. Without this, a
/// Redis that stops answering (frozen, or a network that drops packets)
/// would hold every worker for [`IO_TIMEOUT`] and the whole node, `/healthz`
/// included, would stop answering.
fn off_the_executor<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = RedisUrl::parse("redis://127.0.0.1:6390/2").unwrap();
        assert_eq!((url.addr.as_str(), url.db, url.password), ("127.0.0.1:6390", 2, None));
        assert_eq!(RedisUrl::parse("redis://cache").unwrap().addr, "cache:6379");
        assert_eq!(RedisUrl::parse("redis://[::1]").unwrap().addr, "[::1]:6379");
        assert_eq!(RedisUrl::parse("redis://[::1]:7000").unwrap().addr, "[::1]:7000");
        let url = RedisUrl::parse("redis://:s3cret@host:1/").unwrap();
        assert_eq!((url.username, url.password.as_deref(), url.db), (None, Some("s3cret"), 0));
        let url = RedisUrl::parse("redis://ann:pw@host").unwrap();
        assert_eq!((url.username.as_deref(), url.password.as_deref()), (Some("ann"), Some("pw")));
        assert!(RedisUrl::parse("http://host").unwrap_err().contains("not a Redis URL"));
        assert!(RedisUrl::parse("redis://host/x").unwrap_err().contains("not a number"));
        assert!(RedisUrl::parse("redis:///0").unwrap_err().contains("no host"));
    }
}
