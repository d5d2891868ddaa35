//! The apps every node of a cluster serves, kept beside the queue: the
//! version records in the hash `beamlet:apps` (name -> JSON) and the
//! uploaded components in `beamlet:component:{digest}` (listed in the set
//! `beamlet:components`, and deleted once no app's record names them). A
//! change is announced on the event channel as `d {name}`.

use super::RedisQueue;
use super::resp::{RedisError, Script};

/// What came of [`RedisQueue::publish_app`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Published {
    /// The version is the cluster's current one.
    Current,
    /// Not recorded: the app changed since it was read (deployed or deleted
    /// through another node meanwhile); the number of its version now, if
    /// it has one.
    Superseded(Option<u32>),
}

// ARGV: name, record, the record read before ('' for none), the component's
// digest, its bytes. 0 when recorded (with its component); else the app
// changed since: the number of its version now, or -1 when it has none
// (deleted). Publishing the current record again is no change (a retried
// call).
static PUBLISH_APP: Script = Script::new(
    r#"
local current = redis.call('HGET', 'beamlet:apps', ARGV[1])
if current ~= ARGV[2] and (current or '') ~= ARGV[3] then
  local ok, decoded = pcall(cjson.decode, current or 'null')
  if ok and type(decoded) == 'table' and type(decoded.version) == 'number' then return decoded.version end
  return -1
end
redis.call('SET', 'beamlet:component:' .. ARGV[4], ARGV[5])
redis.call('SADD', 'beamlet:components', ARGV[4])
redis.call('HSET', 'beamlet:apps', ARGV[1], ARGV[2])
redis.call('HDEL', 'beamlet:deleted', ARGV[1])
redis.call('PUBLISH', 'beamlet:events', 'd ' .. ARGV[1])
return 0
"#,
);

// Deletes the components (of those `beamlet:components` lists) that no
// app's current record names; the number deleted. Atomic with publishes,
// which store a record and its component together.
static COLLECT_COMPONENTS: Script = Script::new(
    r#"
local used = {}
for _, record in ipairs(redis.call('HVALS', 'beamlet:apps')) do
  local ok, decoded = pcall(cjson.decode, record)
  if ok and type(decoded) == 'table' and type(decoded.digest) == 'string' then used[decoded.digest] = true end
end
local deleted = 0
for _, digest in ipairs(redis.call('SMEMBERS', 'beamlet:components')) do
  if not used[digest] then
    redis.call('DEL', 'beamlet:component:' .. digest)
    redis.call('SREM', 'beamlet:components', digest)
    deleted = deleted + 1
  end
end
return deleted
"#,
);

// ARGV: app, replica, desired, now (ms). Counts one more replica of the
// app, unless the cluster's nodes run `desired` or more already (as each
// last said, and those counted in the last two seconds, which a node may not
// have said yet): -1 when counted, else how many they run.
static CLAIM_REPLICA: Script = Script::new(
    r#"
local claims = 'beamlet:claims:' .. ARGV[1]
local now = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', claims, '-inf', now - 2000)
local total = redis.call('ZCARD', claims)
local counts = redis.call('HGETALL', 'beamlet:replicas:' .. ARGV[1])
for i = 2, #counts, 2 do total = total + (tonumber(counts[i]) or 0) end
if total >= tonumber(ARGV[3]) then return total end
redis.call('ZADD', claims, now, ARGV[2])
redis.call('PEXPIRE', claims, 10000)
return -1
"#,
);

impl RedisQueue {
    /// Records a new version of an app (its record as JSON) and its
    /// component, unless the app's record is no longer `read` (`None`: no
    /// record): two nodes deploying at once must not both make theirs the
    /// current version, nor a deploy undo a delete and redeploy meanwhile.
    pub(crate) fn publish_app(
        &self,
        name: &str,
        record: &[u8],
        read: Option<&[u8]>,
        digest: &str,
        wasm: &[u8],
    ) -> Result<Published, RedisError> {
        let args = [name.as_bytes(), record, read.unwrap_or_default(), digest.as_bytes(), wasm];
        let reply = self.client.eval(&PUBLISH_APP, &args)?;
        let published = match reply.as_int() {
            Some(0) => Published::Current,
            Some(now) => Published::Superseded(u32::try_from(now).ok()),
            None => return Err(RedisError::Protocol(format!("publishing an app gave {reply:?}"))),
        };
        self.collect_components();
        Ok(published)
    }

    /// Deletes the components no app uses any more (a redeploy replaced,
    /// a delete removed): each may be tens of MiB of Redis memory. A failure
    /// is logged; the next deploy or delete collects them.
    fn collect_components(&self) {
        match self.client.eval(&COLLECT_COMPONENTS, &[]) {
            Ok(reply) if reply.as_int().is_some_and(|n| n > 0) => {
                tracing::debug!("deleted {:?} components no app uses from Redis", reply.as_int());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("failed to delete the components no app uses from Redis: {e}"),
        }
    }

    /// The cluster's current record of `name`, as JSON.
    pub(crate) fn app(&self, name: &str) -> Result<Option<Vec<u8>>, RedisError> {
        Ok(self.client.call(&[b"HGET", b"beamlet:apps", name.as_bytes()])?.into_bytes())
    }

    /// Removes an app for every node; `record`: the version removed, kept so
    /// that a node that was down meanwhile drops its copy rather than share
    /// it again (see [`RedisQueue::deleted_app`]).
    pub(crate) fn unpublish_app(&self, name: &str, record: &[u8]) -> Result<(), RedisError> {
        self.client.call(&[b"HSET", b"beamlet:deleted", name.as_bytes(), record])?;
        self.client.call(&[b"HDEL", b"beamlet:apps", name.as_bytes()])?;
        self.client.call(&[b"DEL", format!("beamlet:replicas:{name}").as_bytes()])?;
        self.collect_components();
        self.announce(name)
    }

    fn announce(&self, name: &str) -> Result<(), RedisError> {
        self.client.call(&[b"PUBLISH", b"beamlet:events", format!("d {name}").as_bytes()])?;
        Ok(())
    }

    /// Whether Redis still holds the cluster's data: the mark set when the
    /// first node joined is gone after a restart that lost it.
    pub(crate) fn holds_cluster(&self) -> Result<bool, RedisError> {
        Ok(self.client.call(&[b"EXISTS", b"beamlet:cluster"])?.as_int() == Some(1))
    }

    pub(crate) fn mark_cluster(&self) -> Result<(), RedisError> {
        self.client.call(&[b"SET", b"beamlet:cluster", b"1"])?;
        Ok(())
    }

    /// The record of the last version of `name` deleted from the cluster
    /// (and not deployed again since), as JSON.
    pub(crate) fn deleted_app(&self, name: &str) -> Result<Option<Vec<u8>>, RedisError> {
        Ok(self.client.call(&[b"HGET", b"beamlet:deleted", name.as_bytes()])?.into_bytes())
    }

    /// Every app's current record, as JSON.
    pub(crate) fn apps(&self) -> Result<Vec<(String, Vec<u8>)>, RedisError> {
        self.hash(b"beamlet:apps")
    }

    /// A hash's fields and values.
    fn hash(&self, key: &[u8]) -> Result<Vec<(String, Vec<u8>)>, RedisError> {
        let mut fields = self.client.call(&[b"HGETALL", key])?.into_array().into_iter();
        let mut pairs = Vec::new();
        while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
            if let (Some(field), Some(value)) = (field.into_string(), value.into_bytes()) {
                pairs.push((field, value));
            }
        }
        Ok(pairs)
    }

    /// The uploaded component with this digest.
    pub(crate) fn component(&self, digest: &str) -> Result<Option<Vec<u8>>, RedisError> {
        let key = format!("beamlet:component:{digest}");
        Ok(self.client.call(&[b"GET", key.as_bytes()])?.into_bytes())
    }

    /// What the other live nodes run of `app`.
    pub(crate) fn elsewhere(&self, app: &str) -> Result<Elsewhere, RedisError> {
        // Not asked again until it answers the heartbeat (within a second).
        if !crate::queue::Queue::is_available(self) {
            let error = std::io::Error::other("it did not answer the last call");
            return Err(RedisError::Io { addr: self.url().addr.clone(), error });
        }
        let key = format!("beamlet:replicas:{app}");
        let mut elsewhere = Elsewhere::default();
        for (node, count) in self.hash(key.as_bytes())? {
            if node == self.node() {
                continue;
            }
            let count = std::str::from_utf8(&count).ok().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
            elsewhere.all = elsewhere.all.saturating_add(count);
            elsewhere.nodes += 1;
            if node.as_str() < self.node() {
                elsewhere.senior = elsewhere.senior.saturating_add(count);
                elsewhere.senior_nodes += 1;
            }
        }
        Ok(elsewhere)
    }

    /// Every node's description (`advertise`), as JSON, by node id.
    pub(crate) fn node_infos(&self) -> Result<Vec<(String, Vec<u8>)>, RedisError> {
        self.hash(b"beamlet:node-info")
    }

    /// Says how many replicas of `app` this node runs (starting or ready;
    /// 0 still says it runs the app).
    pub(crate) fn set_replicas(&self, app: &str, count: u64) -> Result<(), RedisError> {
        let key = format!("beamlet:replicas:{app}");
        self.client.call(&[b"HSET", key.as_bytes(), self.node().as_bytes(), count.to_string().as_bytes()])?;
        Ok(())
    }

    /// Counts one more replica of `app` (`replica` on this node), unless the
    /// cluster runs `desired` already: then `Ok(Some(n))`, the number it runs. A
    /// replica that waited for room asks before it starts: nodes that all
    /// held pending replicas would otherwise start them all once room frees.
    pub(crate) fn claim_replica(&self, app: &str, replica: &str, desired: u32) -> Result<Option<u64>, RedisError> {
        let (desired, now) = (desired.to_string(), crate::queue::now_ms().to_string());
        let args = [app.as_bytes(), replica.as_bytes(), desired.as_bytes(), now.as_bytes()];
        let reply = self.client.eval(&CLAIM_REPLICA, &args)?;
        match reply.as_int() {
            Some(-1) => Ok(None),
            Some(running) => Ok(Some(u64::try_from(running).unwrap_or_default())),
            None => Err(RedisError::Protocol(format!("counting a replica gave {reply:?}"))),
        }
    }

    /// This node no longer runs `app`.
    pub(crate) fn clear_replicas(&self, app: &str) -> Result<(), RedisError> {
        let key = format!("beamlet:replicas:{app}");
        self.client.call(&[b"HDEL", key.as_bytes(), self.node().as_bytes()])?;
        Ok(())
    }
}

/// What other nodes of a cluster run of one app.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elsewhere {
    /// Replicas (starting, ready or restarting after a crash) on nodes
    /// senior to this one (whose ids sort first).
    pub senior: u32,
    /// Replicas on every other node.
    pub all: u32,
    /// Senior nodes that run the app at all (with replicas or none now).
    pub senior_nodes: u32,
    /// Other nodes that run the app at all.
    pub nodes: u32,
}
