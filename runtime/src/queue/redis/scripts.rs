//! The task lifecycle as Lua scripts: each change is one script, so it is
//! atomic however many nodes share the server.
//!
//! Keys (all under `beamlet:`):
//! - `t:{id}`: a task's hash (the fields of `TaskRow`, plus `durable`,
//!   `origin` (the node that took it), `node` (the node running it) and
//!   `ahead` (sent ahead to a replica, not started yet)).
//! - `q:{app}`: the app's queued task ids, next first.
//! - `tasks:{app}`: every task id of the app, scored by creation.
//! - `running`: hash app -> tasks running, cluster-wide.
//! - `running:{node}`: ids running on a node (a dead node's are retried).
//! - `calls:{node}`: the calls a node took whose callers wait on it.
//! - `expiry`: queued never-run task ids scored by when their ttl ends.
//! - `ended`: ended task ids scored by when their result is forgotten.
//! - `callbacks`: hash id -> node delivering its callback.
//! - `nodes`, `node:{id}`: the nodes, and each live node's heartbeat.
//!
//! Events go out on the channel `beamlet:events`: `a {app} {node}` (the
//! app's queue gained a task; `node` queued it and woke its own replicas), `e {id}` (a task ended), `c {id}` (stop a running
//! task).

use super::resp::Script;

/// Helpers every script starts with.
macro_rules! prelude {
    () => {
        r#"
local P = 'beamlet:'
local FIELDS = {'id', 'app', 'status', 'attempts', 'created_at', 'started_at', 'ended_at',
                'error_code', 'error_message', 'callback_url', 'durable', 'origin', 'callback'}
local function tkey(id) return P .. 't:' .. id end
-- The milliseconds in a UUIDv7 id (its first 48 bits), or nil.
local function id_ms(id) return tonumber(string.sub(id, 1, 8) .. string.sub(id, 10, 13), 16) end
local function record(id) return redis.call('HMGET', tkey(id), unpack(FIELDS)) end
local function terminal(status)
  return status == 'COMPLETE' or status == 'FAILED' or status == 'TIMEOUT'
      or status == 'CANCELLED' or status == 'EXPIRED'
end
-- `me`: the node that queued it, which wakes its own replicas itself (nil
-- for none).
local function arrived(app, me) redis.call('PUBLISH', P .. 'events', 'a ' .. app .. ' ' .. (me or '')) end
-- No longer running on `node`.
local function unrun(app, node, id)
  if node then redis.call('SREM', P .. 'running:' .. node, id) end
  redis.call('HINCRBY', P .. 'running', app, -1)
end
-- Back first in line: a retry, or a task sent ahead that never started.
local function requeue(id, app, status)
  local k = tkey(id)
  redis.call('HSET', k, 'status', status)
  redis.call('HDEL', k, 'node', 'ahead')
  if status == 'PENDING' then
    redis.call('HDEL', k, 'started_at')
    redis.call('ZADD', P .. 'expiry', redis.call('HGET', k, 'expires_at'), id)
  end
  redis.call('LPUSH', P .. 'q:' .. app, id)
  arrived(app)
end
-- Ends a queued or running task; `code` nil for no error. `dequeued`: the
-- caller already took it out of its queue. `me`: the node ending it, which
-- delivers its callback.
local function finish(id, status, code, message, now, me, dequeued)
  local k = tkey(id)
  local t = redis.call('HMGET', k, 'app', 'status', 'node', 'result_ttl_ms', 'callback_url', 'durable')
  if t[2] == 'RUNNING' then
    unrun(t[1], t[3], id)
  elseif not dequeued then
    redis.call('LREM', P .. 'q:' .. t[1], 1, id)
  end
  redis.call('ZREM', P .. 'expiry', id)
  redis.call('HSET', k, 'status', status, 'ended_at', now)
  if code then
    redis.call('HSET', k, 'error_code', code, 'error_message', message)
  else
    redis.call('HDEL', k, 'error_code', 'error_message')
  end
  redis.call('HDEL', k, 'input', 'node', 'ahead')
  if t[5] then
    redis.call('HSET', P .. 'callbacks', id, me)
    redis.call('HSET', k, 'callback', 'pending')
  end
  -- A call is forgotten by its node once its caller has the answer (or by
  -- whoever reaps that node); the sweep only catches what slipped by.
  local keep = tonumber(t[4])
  if t[6] == '0' then keep = math.max(keep, 600000) end
  redis.call('ZADD', P .. 'ended', tonumber(now) + keep, id)
  redis.call('PUBLISH', P .. 'events', 'e ' .. id)
end
-- Drops an ended task for good.
local function drop(id, app, origin)
  redis.call('DEL', tkey(id))
  redis.call('ZREM', P .. 'tasks:' .. app, id)
  redis.call('ZREM', P .. 'ended', id)
  redis.call('HDEL', P .. 'callbacks', id)
  if origin then redis.call('SREM', P .. 'calls:' .. origin, id) end
end
"#
    };
}

macro_rules! script {
    ($name:ident, $body:literal) => {
        pub(crate) static $name: Script = Script::new(concat!(prelude!(), $body));
    };
    // A script that ends or leases runs (see `runs!`).
    ($name:ident, runs, $body:literal) => {
        pub(crate) static $name: Script = Script::new(concat!(prelude!(), runs!(), $body));
    };
}

/// Ending a run and leasing the next, as functions: scripts that do one,
/// and one that does both in a single round trip.
macro_rules! runs {
    () => {
        r#"
-- Leases the app's oldest queued task to `node`; `ahead` ('1' or '0'): for
-- a replica whose workers are all busy. {id, input, attempt, timeout_ms,
-- max_result_size}, or false.
local function lease_next(app, now, node, ahead)
  local id = redis.call('LPOP', P .. 'q:' .. app)
  if not id then return false end
  local k = tkey(id)
  local attempt = redis.call('HINCRBY', k, 'attempts', 1)
  redis.call('HSET', k, 'status', 'RUNNING', 'started_at', now, 'node', node)
  if ahead == '1' then redis.call('HSET', k, 'ahead', '1') end
  redis.call('SADD', P .. 'running:' .. node, id)
  redis.call('HINCRBY', P .. 'running', app, 1)
  redis.call('ZREM', P .. 'expiry', id)
  local t = redis.call('HMGET', k, 'input', 'timeout_ms', 'max_result_size')
  return {id, t[1] or '', attempt, t[2], t[3]}
end
-- Records how run `id` ended: `kind` complete (`a` the output), rejected
-- or retryable (`a`, `b` the error code and message), cancelled. {record,
-- output}; false when the task is not running (cancelled, say); {'stale',
-- status, node} when `me` was taken for dead meanwhile (its runs were
-- queued again, or failed: a run of a node taken for dead ends nothing);
-- {'gone'} when there is no such task (this end, sent before, was taken
-- late and dropped the call; or Redis lost it).
-- A call `me` took that ended is dropped: this answer is its caller's.
local function end_run(id, kind, now, me, a, b)
  local k = tkey(id)
  local t = redis.call('HMGET', k, 'status', 'attempts', 'retries', 'app', 'node')
  if not t[1] then return {'gone'} end
  if t[1] ~= 'RUNNING' or t[5] ~= me then
    local reaped = t[1] == 'FAILED' and redis.call('HGET', k, 'error_code') == 'REPLICA_LOST'
    if t[1] == 'RUNNING' or t[1] == 'PENDING' or t[1] == 'RETRY' or reaped then
      return {'stale', t[1], t[5] or ''}
    end
    return false
  end
  if kind == 'complete' then
    redis.call('HSET', k, 'output', a)
    finish(id, 'COMPLETE', nil, nil, now, me)
  elseif kind == 'cancelled' then
    finish(id, 'CANCELLED', 'CANCELLED', 'the task was cancelled', now, me)
  elseif kind == 'rejected' then
    finish(id, 'FAILED', a, b, now, me)
  elseif tonumber(t[2]) > tonumber(t[3]) then
    finish(id, a == 'TIMEOUT' and 'TIMEOUT' or 'FAILED', a, b, now, me)
  else
    unrun(t[4], t[5], id)
    redis.call('HSET', k, 'error_code', a, 'error_message', b)
    requeue(id, t[4], 'RETRY')
  end
  local r = record(id)
  local output = redis.call('HGET', k, 'output') or false
  if terminal(r[3]) and r[11] == '0' and r[12] == me then drop(id, r[2], me) end
  return {r, output}
end
"#
    };
}

// ARGV: app, id, max_queued, created_at, expires_at, origin, durable, then
// field/value pairs. 0 when the queue is full.
script!(
    ENQUEUE,
    r#"
local app, id = ARGV[1], ARGV[2]
local q = P .. 'q:' .. app
if redis.call('LLEN', q) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', tkey(id), unpack(ARGV, 8))
redis.call('RPUSH', q, id)
redis.call('ZADD', P .. 'expiry', ARGV[5], id)
-- Scored by the time in the id (a UUIDv7), so that listing by score is
-- listing by id, as the embedded store does.
redis.call('ZADD', P .. 'tasks:' .. app, id_ms(id) or ARGV[4], id)
if ARGV[7] == '0' then redis.call('SADD', P .. 'calls:' .. ARGV[6], id) end
arrived(app, ARGV[6])
return 1
"#
);

// ARGV: app, now, node, ahead ('1' or '0'). {id, input, attempt,
// timeout_ms, max_result_size}, or nil.
script!(
    LEASE,
    runs,
    r#"
return lease_next(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"#
);

// ARGV: id, now, node: only the node the task runs on marks it.
script!(
    STARTED,
    r#"
local k = tkey(ARGV[1])
local t = redis.call('HMGET', k, 'status', 'node')
if t[1] == 'RUNNING' and t[2] == ARGV[3] then
  redis.call('HSET', k, 'started_at', ARGV[2])
  redis.call('HDEL', k, 'ahead')
end
return 1
"#
);

// ARGV: id, me, held ('1': `me` holds a lease of it). A task whose enqueue
// its node gave up on (Redis did not answer in time; its caller was
// refused), should Redis have taken it after all: dropped unless it ended
// already, and stopped where it runs (a lease made meanwhile, by a node
// that also gave up waiting or one that did not). Its status before (nil if
// unknown).
script!(
    ABANDON,
    r#"
local id, me, held = ARGV[1], ARGV[2], ARGV[3]
local t = redis.call('HMGET', tkey(id), 'status', 'app', 'origin', 'node')
if not t[1] or terminal(t[1]) then return t[1] end
if t[1] == 'RUNNING' then
  unrun(t[2], t[4], id)
  -- On a replica (not a lease whose answer this node lost): stop it there;
  -- its end then finds no task.
  if t[4] ~= me or held == '1' then redis.call('PUBLISH', P .. 'events', 'c ' .. id) end
else
  redis.call('LREM', P .. 'q:' .. t[2], 1, id)
end
redis.call('ZREM', P .. 'expiry', id)
drop(id, t[2], t[3])
return t[1]
"#
);

// ARGV: id, node. The record, or nil when it is not running on `node`.
script!(
    RELEASE,
    r#"
local id = ARGV[1]
local k = tkey(id)
local t = redis.call('HMGET', k, 'status', 'app', 'node', 'error_code')
if t[1] ~= 'RUNNING' or t[3] ~= ARGV[2] then return false end
redis.call('HINCRBY', k, 'attempts', -1)
redis.call('HDEL', k, 'started_at')
unrun(t[2], t[3], id)
requeue(id, t[2], t[4] and 'RETRY' or 'PENDING')
return record(id)
"#
);

// ARGV: id, kind (complete, rejected, retryable, cancelled), now, me, then
// the output (complete) or error code and message. {record, output}, or nil
// when the task is not running. A call `me` took that ended is dropped: this
// answer is its caller's.
script!(
    FINISH,
    runs,
    r#"
return end_run(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"#
);

// ARGV: app, now, me, then FINISH's id, kind and output or error code and
// message. {FINISH's answer, LEASE's answer}: the end of a run and the next
// for the worker it freed, in one round trip.
script!(
    FINISH_LEASE,
    runs,
    r#"
return {end_run(ARGV[4], ARGV[5], ARGV[2], ARGV[3], ARGV[6], ARGV[7]), lease_next(ARGV[1], ARGV[2], ARGV[3], '0')}
"#
);

// ARGV: id, why, now, me. {'unknown'}, {'ended', status}, or
// {'queued' | 'running', record}.
script!(
    CANCEL,
    r#"
local id = ARGV[1]
local status = redis.call('HGET', tkey(id), 'status')
if not status then return {'unknown'} end
if terminal(status) then return {'ended', status} end
if status == 'RUNNING' and redis.call('HEXISTS', tkey(id), 'ahead') == 1 then
  -- Waiting in a replica for a worker: it never started, no attempt spent.
  redis.call('HINCRBY', tkey(id), 'attempts', -1)
  redis.call('HDEL', tkey(id), 'started_at')
end
finish(id, 'CANCELLED', 'CANCELLED', ARGV[2], ARGV[3], ARGV[4])
if status == 'RUNNING' then
  redis.call('PUBLISH', P .. 'events', 'c ' .. id)
  return {'running', record(id)}
end
return {'queued', record(id)}
"#
);

// ARGV: id, me. Drops an ended call; only the node that took it does.
script!(
    FORGET,
    r#"
local id, me = ARGV[1], ARGV[2]
local t = redis.call('HMGET', tkey(id), 'status', 'app', 'origin')
if not t[1] or not terminal(t[1]) or t[3] ~= me then return 0 end
drop(id, t[2], me)
return 1
"#
);

// ARGV: now, me. Forgets results past their result ttl (a result whose
// callback is still pending is looked at again in a minute), expires queued
// never-run tasks past their ttl, cancels tasks queued for deleted apps;
// returns the records it ended.
script!(
    SWEEP,
    r#"
local now, me = ARGV[1], ARGV[2]
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'ended', '-inf', now, 'LIMIT', 0, 1000)) do
  if redis.call('HEXISTS', P .. 'callbacks', id) == 1 then
    redis.call('ZADD', P .. 'ended', tonumber(now) + 60000, id)
  else
    local t = redis.call('HMGET', tkey(id), 'app', 'origin')
    if t[1] then drop(id, t[1], t[2]) else redis.call('ZREM', P .. 'ended', id) end
  end
end
local expired = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', now, 'LIMIT', 0, 1000)) do
  if redis.call('HGET', tkey(id), 'status') == 'PENDING' then
    finish(id, 'EXPIRED', 'EXPIRED', 'the task waited in the queue past its ttl', now, me)
    table.insert(expired, record(id))
  else
    redis.call('ZREM', P .. 'expiry', id)
  end
end
-- Tasks queued for an app deleted from the cluster: its delete was cut
-- short (the node died), a node that had not heard of it took them, or a
-- dead node's runs were queued again for it.
for _, app in ipairs(redis.call('HKEYS', P .. 'deleted')) do
  local q = P .. 'q:' .. app
  if redis.call('HEXISTS', P .. 'apps', app) == 0 and redis.call('LLEN', q) > 0 then
    for _, id in ipairs(redis.call('LRANGE', q, 0, 999)) do
      finish(id, 'CANCELLED', 'CANCELLED', 'app "' .. app .. '" was removed', now, me, true)
      table.insert(expired, record(id))
    end
    redis.call('LTRIM', q, 1000, -1)
  end
end
return expired
"#
);

// ARGV: app, which (all, calls, own: calls `me` took), status, code,
// message, now, me. The records it ended.
script!(
    END_QUEUED,
    r#"
local q = P .. 'q:' .. ARGV[1]
local ids = redis.call('LRANGE', q, 0, -1)
redis.call('DEL', q)
local ended = {}
for _, id in ipairs(ids) do
  local t = redis.call('HMGET', tkey(id), 'durable', 'origin')
  if ARGV[2] ~= 'all' and (t[1] == '1' or (ARGV[2] == 'own' and t[2] ~= ARGV[7])) then
    redis.call('RPUSH', q, id)
  else
    finish(id, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], true)
    table.insert(ended, record(id))
  end
end
return ended
"#
);

// ARGV: node, now, me, force ('1': reap even if it looks alive, a node
// recovering its own tasks at start). Retries the tasks the node was running
// (or ends them when their retries are spent), cancels the calls it took
// (their callers are gone), and hands its undelivered callbacks to `me`.
// {ended records, adopted callback ids, tasks queued again}; nil if the
// node is alive.
script!(
    REAP,
    r#"
local node, now, me = ARGV[1], ARGV[2], ARGV[3]
if ARGV[4] ~= '1' and redis.call('EXISTS', P .. 'node:' .. node) == 1 then return false end
local ended, retried = {}, 0
local rk = P .. 'running:' .. node
for _, id in ipairs(redis.call('SMEMBERS', rk)) do
  local k = tkey(id)
  local t = redis.call('HMGET', k, 'status', 'app', 'ahead', 'attempts', 'retries', 'error_code')
  if t[1] == 'RUNNING' then
    if t[3] then
      redis.call('HINCRBY', k, 'attempts', -1)
      unrun(t[2], node, id)
      requeue(id, t[2], t[6] and 'RETRY' or 'PENDING')
      retried = retried + 1
    elseif tonumber(t[4]) > tonumber(t[5]) then
      finish(id, 'FAILED', 'REPLICA_LOST', 'the node running the task stopped', now, me)
      table.insert(ended, record(id))
    else
      unrun(t[2], node, id)
      redis.call('HSET', k, 'error_code', 'REPLICA_LOST', 'error_message', 'the node running the task stopped')
      requeue(id, t[2], 'RETRY')
      retried = retried + 1
    end
  end
end
redis.call('DEL', rk)
local ck = P .. 'calls:' .. node
for _, id in ipairs(redis.call('SMEMBERS', ck)) do
  local status = redis.call('HGET', tkey(id), 'status')
  if status and not terminal(status) then
    finish(id, 'CANCELLED', 'CANCELLED', 'the node that took the call stopped before it ended', now, me)
    -- Running on another node: stop it there.
    if status == 'RUNNING' then redis.call('PUBLISH', P .. 'events', 'c ' .. id) end
  end
  redis.call('DEL', tkey(id))
  redis.call('ZREM', P .. 'ended', id)
  redis.call('HDEL', P .. 'callbacks', id)
end
redis.call('DEL', ck)
local adopted = {}
local callbacks = redis.call('HGETALL', P .. 'callbacks')
for i = 1, #callbacks, 2 do
  if callbacks[i + 1] == node then
    redis.call('HSET', P .. 'callbacks', callbacks[i], me)
    table.insert(adopted, callbacks[i])
  end
end
for _, app in ipairs(redis.call('HKEYS', P .. 'apps')) do
  redis.call('HDEL', P .. 'replicas:' .. app, node)
end
if node ~= me then
  redis.call('SREM', P .. 'nodes', node)
  redis.call('HDEL', P .. 'node-info', node)
end
return {ended, adopted, retried}
"#
);

// ARGV: app, status ('' for any), limit, before (the id the list goes on
// after; '' for none). Records, newest first.
script!(
    LIST,
    r#"
local out = {}
local limit, before = tonumber(ARGV[3]), ARGV[4]
local key, from, chunk = P .. 'tasks:' .. ARGV[1], 0, 500
if before ~= '' then
  local rank = redis.call('ZREVRANK', key, before)
  if rank then
    from, before = rank + 1, ''
  else
    -- Forgotten since: start at its time (ids are scored by theirs) and
    -- skip the ids of that millisecond not older than it.
    local ms = id_ms(before)
    if ms then from = redis.call('ZCOUNT', key, '(' .. ms, '+inf') end
  end
end
while #out < limit do
  local ids = redis.call('ZREVRANGE', key, from, from + chunk - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if #out >= limit then break end
    if before == '' or id < before then
      local r = record(id)
      if r[1] and (ARGV[2] == '' or r[3] == ARGV[2]) then table.insert(out, r) end
    end
  end
  from = from + chunk
end
return out
"#
);

// ARGV: app. {queued, running}.
script!(
    COUNTS,
    r#"
local running = tonumber(redis.call('HGET', P .. 'running', ARGV[1]) or '0')
return {redis.call('LLEN', P .. 'q:' .. ARGV[1]), math.max(running, 0)}
"#
);

// ARGV: id, state (delivered or failed). The task's callback went, or was
// given up on; a task already forgotten is not brought back.
script!(
    SETTLE_CALLBACK,
    r#"
local k = tkey(ARGV[1])
if redis.call('EXISTS', k) == 1 then redis.call('HSET', k, 'callback', ARGV[2]) end
redis.call('HDEL', P .. 'callbacks', ARGV[1])
return 1
"#
);

// ARGV: me. The ids of ended tasks whose callbacks `me` delivers, with
// their records and outputs, oldest end first.
script!(
    PENDING_CALLBACKS,
    r#"
local out = {}
local callbacks = redis.call('HGETALL', P .. 'callbacks')
for i = 1, #callbacks, 2 do
  if callbacks[i + 1] == ARGV[1] then
    table.insert(out, {record(callbacks[i]), redis.call('HGET', tkey(callbacks[i]), 'output') or false})
  end
end
return out
"#
);
