//! What ties the nodes on one Redis together: each listens on the
//! `beamlet:events` channel, beats its heartbeat, and takes over the work
//! of nodes whose heartbeat stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::resp::{Conn, Reply};
use super::{NODE_TTL, Reaped, RedisQueue, Saved};
use crate::queue::{Dispatch, now_ms};

/// Something another node (or this one) did that this node must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// The app's queue gained a task.
    Arrival(String),
    /// A task ended.
    Ended(String),
    /// A running task was cancelled: its replica must stop it.
    Cancel(String),
    /// An app was deployed or removed.
    AppChanged(String),
    /// Events may have been missed (the channel was down): look again at
    /// everything waited on.
    Resync,
}

impl Event {
    /// `me`: this node; an arrival it announced itself is no news.
    fn parse(message: &str, me: &str) -> Option<Self> {
        let (kind, subject) = message.split_once(' ')?;
        if kind == "a" {
            let (app, from) = subject.split_once(' ').unwrap_or((subject, ""));
            return (from != me).then(|| Self::Arrival(app.to_owned()));
        }
        let subject = subject.to_owned();
        match kind {
            "e" => Some(Self::Ended(subject)),
            "c" => Some(Self::Cancel(subject)),
            "d" => Some(Self::AppChanged(subject)),
            _ => None,
        }
    }
}

/// How often a node beats, reaps dead nodes, and looks again at what it
/// waits on (an event lost to a dropped connection is seen this late).
const BEAT: Duration = Duration::from_secs(1);
/// Between attempts to reach Redis again.
const RECONNECT: Duration = Duration::from_secs(1);
/// Every this many beats, a node looks for tasks Redis leased to it that it
/// never got ([`RedisQueue::release_orphans`]), and releases those seen so
/// for longer than a call to Redis may take.
const ORPHAN_CHECK_EVERY: u64 = 5;
const ORPHAN_AFTER: Duration = Duration::from_secs(30);

/// Told when apps may have changed: one app by name, or all (`None`).
pub(crate) type AppsChanged = Arc<dyn Fn(Option<String>) + Send + Sync>;

/// Starts the listener and the heartbeat threads.
pub(crate) fn spawn(queue: Arc<RedisQueue>, dispatch: Arc<Dispatch>, apps: AppsChanged) -> anyhow::Result<()> {
    let (listener_queue, listener_dispatch, listener_apps) = (queue.clone(), dispatch.clone(), apps.clone());
    std::thread::Builder::new()
        .name("redis-events".into())
        .spawn(move || listen(&listener_queue, &listener_dispatch, &listener_apps))?;
    std::thread::Builder::new().name("redis-heartbeat".into()).spawn(move || beat(&queue, &dispatch, &apps))?;
    Ok(())
}

fn listen(queue: &RedisQueue, dispatch: &Dispatch, apps: &AppsChanged) {
    let mut connected_before = false;
    loop {
        match subscribe(queue) {
            Ok(mut conn) => {
                if connected_before {
                    tracing::info!("listening to the other nodes again");
                    dispatch.on_event(Event::Resync);
                    apps(None);
                }
                connected_before = true;
                loop {
                    match conn.read() {
                        Ok(reply) => match message(reply, queue.node()) {
                            Some(Event::AppChanged(name)) => apps(Some(name)),
                            Some(event) => dispatch.on_event(event),
                            None => {}
                        },
                        Err(e) => {
                            tracing::error!("lost the Redis event channel ({e}); reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::error!("failed to listen to the Redis event channel: {e}"),
        }
        std::thread::sleep(RECONNECT);
    }
}

fn subscribe(queue: &RedisQueue) -> Result<Conn, super::RedisError> {
    // No read timeout: the channel is quiet while nothing happens.
    let mut conn = Conn::open(queue.url(), None)?;
    conn.send(&[b"SUBSCRIBE", b"beamlet:events"])?;
    conn.read()?;
    Ok(conn)
}

/// `["message", channel, payload]` as an event.
fn message(reply: Reply, me: &str) -> Option<Event> {
    let mut parts = reply.into_array().into_iter();
    if parts.next()?.into_string()? != "message" {
        return None;
    }
    let payload = parts.nth(1)?.into_string()?;
    Event::parse(&payload, me)
}

fn beat(queue: &RedisQueue, dispatch: &Dispatch, apps: &AppsChanged) {
    let mut failing = false;
    // When Redis last failed to answer: after an outage every node's
    // heartbeat has lapsed, and none is reaped until each had the time to
    // beat again.
    let mut last_failure: Option<Instant> = None;
    let mut beats: u64 = 0;
    loop {
        std::thread::sleep(BEAT);
        beats += 1;
        // A node that left beats no more (nor says Redis answers when it did not ask).
        if queue.has_left() {
            return;
        }
        let result = queue.heartbeat().and_then(|()| {
            for saved in queue.save_unsaved() {
                dispatch.saved_late(saved);
            }
            if beats.is_multiple_of(ORPHAN_CHECK_EVERY) {
                for released in queue.release_orphans(ORPHAN_AFTER)? {
                    dispatch.saved_late(Saved::Released(released));
                }
            }
            if last_failure.is_some_and(|at| at.elapsed() < NODE_TTL) {
                return Ok(Reaped::default());
            }
            queue.reap_dead(now_ms())
        });
        match result {
            Ok(reaped) => {
                if failing {
                    tracing::info!("Redis answers again");
                    failing = false;
                }
                dispatch.took_over(reaped.ended, reaped.callbacks);
            }
            Err(e) => {
                last_failure = Some(Instant::now());
                if !failing {
                    tracing::error!("failed to beat this node's heartbeat in Redis: {e}");
                    failing = true;
                }
            }
        }
        dispatch.on_event(Event::Resync);
        apps(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let parse = |message| Event::parse(message, "me");
        assert_eq!(parse("a hello other"), Some(Event::Arrival("hello".into())));
        assert_eq!(parse("a hello "), Some(Event::Arrival("hello".into())));
        assert_eq!(parse("a hello me"), None, "this node woke its replicas itself");
        assert_eq!(parse("e 0190-ab"), Some(Event::Ended("0190-ab".into())));
        assert_eq!(parse("c x"), Some(Event::Cancel("x".into())));
        assert_eq!(parse("d hello"), Some(Event::AppChanged("hello".into())));
        assert_eq!(parse("z x"), None);
        assert_eq!(parse("nospace"), None);
    }
}
