"""The Redis engine: sessions in hash-tagged keys that Lua scripts change, on a server or Cluster.

Keys (``P`` is the URL's ``prefix=``, default ``sk:``). Every key of one session shares the
hash tag ``{tenant/session_id}`` (``/`` is not allowed in ids, so no two sessions share a
tag), so one script changes a session atomically, on Cluster too:

    P{t/s}:meta     hash: the session's fields (absent field = None)
    P{t/s}:state    string: the state, JSON text
    P{t/s}:msgs     sorted set: one member per message, scored by seq (pop leaves a gap)

Cross-session indexes live under the tenant's own hash tag ``{t}``, one slot per tenant:

    P{t}:by-created          zset id -> created_at, every session of the tenant
    P{t}:by-updated          zset id -> updated_at
    P{t}:by-expiry           zset id -> a lower bound of expires_at (purge's candidates)
    P{t}:by-owner:-|=<o>     zset id -> created_at, per owner (``-`` for None)
    P{t}:by-folder:-|=<f>    zset id -> created_at, per folder (``-`` for no folder)
    P{t}:by-status:<s>       zset id -> created_at, per status
    P{t}:entries             hash id -> the session's owner, folder and status: where its
                             entries are, even after Redis dropped the session itself
    P{t}:folder:<f>          hash: a folder's owner, name, created_at
    P{t}:folders             set of folder ids
    P{t}:folder-names        hash "<owner><name>" -> folder id: names unique per owner
    Ptenants                 zset of every tenant that has had a session or a folder, for
                             purging every tenant and listing them

Every key of a session carries PEXPIREAT = ``expires_at``, set by every write and idle
renewal, so Redis drops expired sessions by itself; reads still judge expiry by the ``now``
the store passes in.

Indexes are candidates, never the truth: listings and counts read each candidate's meta
(pipelined, grouped per node on Cluster) and return only live sessions that match.

- Adds. On one server a write's script adds its index entries itself (only Cluster confines
  a script to one slot), so they land with the write or not at all. On Cluster the tenant's
  slot is on another node: the adds go there in the same round trip, whatever the script
  does, so each is harmless if the write fails (NX keeps a live session's entries, XX never
  brings back a deleted one, an extra member is dropped later), and a write that changed
  nothing puts the by-updated score it sent back.
- Removals wait until a script says the session no longer belongs there: delete and purge
  remove what their script reports; a listing removes the stale entries it meets, checks
  them again and puts back any that a write made right meanwhile, and fixes wrong scores.
- by-expiry scores only lag (idle renewal never writes them); purge moves them up.

So on one server an index never misses a session that belongs in it, and its scores are
exact; it may hold extra entries (a deleted session before its cleanup, a session a change
moved to another owner, folder or status), which cost a read and are then dropped. On
Cluster, an index node that fails while a write's script succeeds leaves that entry out
(the caller sees BackendUnavailable) and listings cannot see what is missing: the
session's next change re-adds all of its entries.

On one server the hot calls are batched: the appends that arrive in one event-loop turn
go out as one EVALSHA, which applies them one after the other (each with its own checks
and reply), and so do the message reads. A script may touch any key there; on Cluster,
where the sessions of a turn live in different slots, each call has its own script.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from .. import rules
from ..errors import AlreadyExists, BackendUnavailable, InvalidInput, NotFound, VersionConflict
from ..models import (
    DAILY_COUNTERS,
    Change,
    CheckReport,
    DailyRecord,
    DoctorReport,
    FolderRecord,
    GuardRecord,
    GuardUpdate,
    MessageDraft,
    MessageRecord,
    OwnerCost,
    OwnerCount,
    SessionQuery,
    SessionRecord,
    Stats,
)
from ..settings import Settings
from .base import Engine, Tally, has_gap, tally_differs
from .memory import MemoryEngine
from .turns import Turns, Waiting

__all__ = ["RedisEngine"]

P = ParamSpec("P")
T = TypeVar("T")
_Pipe = Pipeline | ClusterPipeline
# An index entry a write adds: the key, how ("NX", "XX" or "" for ZADD with a float score;
# "HSET" or "HSETNX" for a hash field with a text value), the score or value, the member.
_Add = tuple[str, str, float | str, str]

_log = logging.getLogger("sessionkeeper")

_PREFIX = re.compile(r"[A-Za-z0-9_:.\-]{1,64}")
_OPTIONS = ("prefix", "cluster", "fallback", "durable")
_BATCH = 500  # index entries read, and metas fetched, per round trip
# Separators: between the fields of a stored message, and between messages in a reply.
# JSON text never holds either raw, and the store allows no control characters in roles.
_SEP = "\x1f"
_EPOCH = date(1970, 1, 1)
_RS = "\x1e"

# The meta hash's fields, in the order scripts return them and _record reads them.
_FIELDS = (
    "owner",
    "folder",
    "title",
    "status",
    "step",
    "metadata",
    "version",
    "created_at",
    "updated_at",
    "expires_at",
    "idle_ttl",
    "deadline",
    "message_count",
    "last_seq",
    "input_tokens",
    "output_tokens",
    "cost",
)
_NULLABLE = tuple(
    i
    for i, f in enumerate(_FIELDS)
    if f in ("owner", "folder", "step", "expires_at", "idle_ttl", "deadline")
)
# What a change may move (expires_at is renewed by the script itself, from what is stored).
_CHANGED = tuple(
    f for f in _FIELDS if f not in ("created_at", "expires_at", "idle_ttl", "deadline")
)

# --- Lua --------------------------------------------------------------------------------
# Session scripts take KEYS = meta, state, msgs of one session (one slot) and ARGV[1] = now.
# A writing script may also take index entries to add when it writes: on one server (where
# a script may touch any key) KEYS[4..] are index keys, and the last three ARGV per key are
# how (see _Add), the score or value, and the member. LAST is the script's own last ARGV.

_LUA_SESSION = r"""
local META, STATE, MSGS = KEYS[1], KEYS[2], KEYS[3]
local FIELDS = {__FIELDS__}
local LAST = #ARGV - 3 * math.max(#KEYS - 4, 0)

local function index()
  for i = 5, #KEYS do
    local at = LAST + 3 * (i - 5)
    local how, value, member = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
    if how == 'HSET' or how == 'HSETNX' then
      redis.call(how, KEYS[i], member, value)
    elseif how == '' then
      redis.call('ZADD', KEYS[i], value, member)
    else
      redis.call('ZADD', KEYS[i], how, value, member)
    end
  end
end

local function num(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end

-- The named fields (plus version and expires_at) by name, false where unset; nil if the
-- session is absent or expired at now.
local function live(now, names)
  local v = redis.call('HMGET', META, 'version', 'expires_at', unpack(names))
  if not v[1] or (v[2] and tonumber(v[2]) <= now) then return nil end
  local m = {version = v[1], expires_at = v[2]}
  for i, name in ipairs(names) do m[name] = v[i + 2] end
  return m
end

-- live(), also checking the expected version ('' for any); else nil and the reply why.
local function writable(now, expected, names)
  local m = live(now, names)
  if not m then return nil, {'missing'} end
  if expected ~= '' and tonumber(expected) ~= tonumber(m.version) then
    return nil, {'conflict', m.version, m.updated_at}
  end
  return m
end

-- The fields in FIELDS order as one string ('' for unset), which is cheaper to send and to
-- parse than an array; _unpack splits it.
local function record(m)
  local out = {}
  for i, name in ipairs(FIELDS) do out[i] = m[name] or '' end
  return table.concat(out, '\031')
end

-- rules.renewed_expiry, the same arithmetic on the same doubles: an idle session's expiry
-- moves to now + idle_ttl, never back and never past its deadline; others keep theirs.
local function renewed(expires, idle, deadline, now)
  if not idle then return expires end
  local r = now + idle
  if expires and expires > r then r = expires end
  if deadline and deadline < r then r = deadline end
  return r
end

-- Native TTL: every key of the session goes at `expires` (Unix seconds), set only when that
-- is ahead of the server's clock; a time already past would delete the keys now, and
-- purge_expired removes such a session along with its index entries.
local function expire_at(expires)
  if not expires then return end
  local ms = math.ceil(expires * 1000)
  local t = redis.call('TIME')
  if ms <= t[1] * 1000 + math.floor(t[2] / 1000) then return end
  ms = string.format('%.0f', ms)
  redis.call('PEXPIREAT', META, ms)
  redis.call('PEXPIREAT', STATE, ms)
  redis.call('PEXPIREAT', MSGS, ms)
end

-- An access at now: renew the idle expiry in the hash, in m and in the native TTL.
local function touch(m, now)
  local old = tonumber(m.expires_at)
  local new = renewed(old, tonumber(m.idle_ttl), tonumber(m.deadline), now)
  if new ~= old then
    m.expires_at = num(new)
    redis.call('HSET', META, 'expires_at', m.expires_at)
    expire_at(new)
  end
end

-- rules.remove_messages: the aggregates after `count` messages with these sums went.
local function remove(m, count, tokens_in, tokens_out, cost)
  local left = tonumber(m.message_count) - count
  if left <= 0 then
    m.message_count, m.input_tokens, m.output_tokens, m.cost = '0', '0', '0', num(0)
  else
    m.message_count = int(left)
    m.input_tokens = int(tonumber(m.input_tokens) - tokens_in)
    m.output_tokens = int(tonumber(m.output_tokens) - tokens_out)
    m.cost = num(math.max(tonumber(m.cost) - cost, 0))
  end
end

-- Save a change to the messages: new version, updated_at = now, idle expiry renewed.
local function save(m, now)
  local old = tonumber(m.expires_at)
  local expires = renewed(old, tonumber(m.idle_ttl), tonumber(m.deadline), now)
  m.version = int(tonumber(m.version) + 1)
  m.updated_at = ARGV[1]
  local set = {'version', m.version, 'updated_at', m.updated_at, 'message_count',
    m.message_count, 'input_tokens', m.input_tokens, 'output_tokens', m.output_tokens,
    'cost', m.cost}
  if expires ~= old then
    m.expires_at = num(expires)
    set[#set + 1] = 'expires_at'
    set[#set + 1] = m.expires_at
  end
  redis.call('HSET', META, unpack(set))
  expire_at(expires)
end

local now = tonumber(ARGV[1])
"""

# The tenant's stats, kept by the scripts that write sessions (on one server) or by the
# tenant's own script after them (on Cluster): TALLIES holds the figures each counted
# session adds to COUNTERS, which sums them per status and owner (fields n, m, i, o and c,
# then \031status\031owner: sessions, messages, input and output tokens, cost in
# nano-units, so that sums never drift); COUNTERS's field v marks a tenant whose every
# session is counted. A session's figures: version, created_at, owner ('-' for None, else
# '=' and the owner), status, message_count, input_tokens, output_tokens, cost, joined by
# \031.
_LUA_TALLY = r"""
local TALLIES, COUNTERS, CREATED, UPDATED
local METRICS = {'m', 'i', 'o'}

local function tenant_keys(tag)
  TALLIES, COUNTERS = tag .. ':tallies', tag .. ':counters'
  CREATED, UPDATED = tag .. ':by-created', tag .. ':by-updated'
end

local function figures(text)
  return {string.match(text, '^([^\031]*)\031([^\031]*)\031([^\031]*)\031([^\031]*)\031'
    .. '([^\031]*)\031([^\031]*)\031([^\031]*)\031([^\031]*)$')}
end

local function nano(cost) return math.floor(tonumber(cost) * 1e9 + 0.5) end

-- Add (sign 1) or take away (-1) a session's figures in its group; a group that counts no
-- session any more goes.
local function count(f, sign)
  local group = '\031' .. f[4] .. '\031' .. f[3]
  local n = redis.call('HINCRBY', COUNTERS, 'n' .. group, sign)
  for k = 5, 7 do
    if f[k] ~= '0' then
      local by = f[k]
      if sign < 0 then by = '-' .. by end
      redis.call('HINCRBY', COUNTERS, METRICS[k - 4] .. group, by)
    end
  end
  local c = nano(f[8])
  if c ~= 0 then redis.call('HINCRBY', COUNTERS, 'c' .. group, string.format('%d', sign * c)) end
  if n <= 0 then
    redis.call('HDEL', COUNTERS, 'n' .. group, 'm' .. group, 'i' .. group, 'o' .. group,
      'c' .. group)
  end
end

-- An integer counter from a to b (decimal text; beyond what a double holds, two steps).
local function shift(field, a, b)
  if a == b then return end
  if #a < 16 and #b < 16 then
    redis.call('HINCRBY', COUNTERS, field, string.format('%d', tonumber(b) - tonumber(a)))
  else
    if a ~= '0' then redis.call('HINCRBY', COUNTERS, field, '-' .. a) end
    redis.call('HINCRBY', COUNTERS, field, b)
  end
end

-- Count session `id` with figures `new` (false: not at all) in place of `old` (its tally).
local function tally(id, old, new)
  if old == new then return end
  local o, n = old and figures(old), new and figures(new)
  if o and n and o[3] == n[3] and o[4] == n[4] then
    local group = '\031' .. o[4] .. '\031' .. o[3]
    for k = 5, 7 do shift(METRICS[k - 4] .. group, o[k], n[k]) end
    local c = nano(n[8]) - nano(o[8])
    if c ~= 0 then redis.call('HINCRBY', COUNTERS, 'c' .. group, string.format('%d', c)) end
  else
    if o then count(o, -1) end
    if n then count(n, 1) end
  end
  if n then
    redis.call('HSET', TALLIES, id, new)
    if not o and redis.call('HEXISTS', COUNTERS, 'v') == 0 then
      -- The tenant's first session is counted from the start; the sessions of a tenant
      -- written before the counters existed are counted by one walk (RedisEngine._count_all).
      local size = redis.call('ZCARD', CREATED)
      if size == 0 or (size == 1 and redis.call('ZSCORE', CREATED, id)) then
        redis.call('HSET', COUNTERS, 'v', '1')
      end
    end
  else
    redis.call('HDEL', TALLIES, id)
    redis.call('ZREM', UPDATED, id)
    -- Counters of no session hold only the marker: they go, and the next first session
    -- marks them again.
    if redis.call('HLEN', COUNTERS) == 1 and redis.call('HEXISTS', COUNTERS, 'v') == 1 then
      redis.call('DEL', COUNTERS)
    end
  end
end
"""

# Session scripts on one server count the session themselves: KEYS[4] is then the tenant's
# tallies key, and the others are named after it.
_LUA_RECOUNT = r"""
if #KEYS >= 4 then tenant_keys(string.sub(KEYS[4], 1, -9)) end

-- The session's figures as stored now, or false if it is gone.
local function stored_figures()
  local v = redis.call('HMGET', META, 'version', 'created_at', 'owner', 'status',
    'message_count', 'input_tokens', 'output_tokens', 'cost')
  if not v[1] then return false end
  if v[3] then v[3] = '=' .. v[3] else v[3] = '-' end
  return table.concat(v, '\031')
end

-- Count the session as it is stored now (on one server; on Cluster the engine does it).
local function recount()
  if not TALLIES then return end
  local id = string.match(META, '/([^/]*)}:meta$')
  tally(id, redis.call('HGET', TALLIES, id), stored_figures())
end
"""

_LUA_REST = (
    "local REST = {"
    + ", ".join(f"'{f}'" for f in _FIELDS if f not in ("version", "expires_at"))
    + "}\n"
)

# ARGV: now, expires_at or '', state, then field/value pairs. Replies 0 if a live session
# has the id, 1 if stored, 2 if stored over an expired one.
_INSERT = r"""
local old = redis.call('HMGET', META, 'version', 'expires_at')
if old[1] and not (old[2] and tonumber(old[2]) <= now) then return 0 end
redis.call('DEL', META, STATE, MSGS)
redis.call('HSET', META, unpack(ARGV, 4, LAST))
redis.call('SET', STATE, ARGV[3])
expire_at(tonumber(ARGV[2]))
index()
recount()
if old[1] then return 2 end
return 1
"""

# ARGV: now, '1' to return the state, '1' to renew idle expiry (a read before a write
# leaves that to the write). Replies nil, or {fields, state}.
_GET = (
    _LUA_REST
    + r"""
local m = live(now, REST)
if not m then return false end
if ARGV[3] == '1' then touch(m, now) end
if ARGV[2] == '1' then return {record(m), redis.call('GET', STATE)} end
return {record(m)}
"""
)

# Reads of one or more sessions (all that arrived in one event-loop turn, on one server;
# always one on Cluster). KEYS = the meta key of each job's session; ARGV, three per job:
# now, after_seq ('' for the newest), limit. Replies one reply per job: nil, or the stored
# messages joined by \030 (one string: cheaper to parse than an array).
_MESSAGES = r"""
local function read(after, limit)
  local m = live(now, {'idle_ttl', 'deadline'})
  if not m then return false end
  touch(m, now)
  local found
  if after == '' then
    found = redis.call('ZRANGE', MSGS, -tonumber(limit), -1)
  else
    found = redis.call('ZRANGE', MSGS, '(' .. after, '+inf', 'BYSCORE', 'LIMIT', 0, limit)
  end
  return table.concat(found, '\030')
end

local replies = {}
for j = 1, #KEYS do
  META = KEYS[j]
  local base = string.sub(META, 1, -5)
  STATE, MSGS = base .. 'state', base .. 'msgs'
  now = tonumber(ARGV[3 * j - 2])
  replies[j] = alone(read, ARGV[3 * j - 1], ARGV[3 * j])
end
return replies
"""

# The hot path: appends to one or more sessions (all that arrived in one event-loop turn,
# on one server; always one on Cluster), packed so that redis-py has little to encode.
# KEYS = the meta key of each job's session (the script derives the session's other keys,
# all in its slot, and on one server the tenant's by-updated key and the session id). ARGV,
# per job in KEYS order: now, expected version or '', '1' to update by-updated itself (one
# server) and the job's message count, joined by \031; then per message its stored text
# without the seq, whose leading tokens and cost the script reads. Each job numbers its
# messages after last_seq, moves the aggregates (cost added one message at a time, as
# rules.apply_append does), version and updated_at in one HSET, renews idle expiry and the
# native TTL (when the expiry stays, only that of the msgs key this append created); a
# later job for the same session sees the earlier one's writes. Replies one reply per job:
# last_seq before (an integer), {'missing'} or {'conflict', version, updated_at}.
_TURN_KEYS = r"""
local META, STATE, MSGS
"""
_TURN_NOW = r"""
local now

-- One job of several: an error in it (a key of the wrong type under the prefix, say)
-- becomes its reply, {'error', message}, and the jobs after it still run.
local function alone(job, ...)
  local ok, reply = pcall(job, ...)
  if ok then return reply end
  if type(reply) == 'table' and reply.err then reply = reply.err end
  return {'error', tostring(reply)}
end
"""
_APPEND = r"""
local function append(NOW, EXPECTED, INDEXED, first, n)
  local m, why = writable(now, EXPECTED, {'idle_ttl', 'deadline', 'last_seq', 'cost',
    'updated_at', 'message_count', 'input_tokens', 'output_tokens', 'created_at', 'owner',
    'status'})
  if not m then return why end
  local last = tonumber(m.last_seq)
  local cost = tonumber(m.cost)
  local tokens_in, tokens_out = tonumber(m.input_tokens), tonumber(m.output_tokens)
  -- Token sums beyond what a double holds exactly go to HINCRBY, one message at a time.
  local exact = #m.input_tokens < 16 and #m.output_tokens < 16
  local batch = {}
  for i = 1, n do
    local text = ARGV[first + i - 1]
    local a, b, c = string.match(text, '^(%d+)\031(%d+)\031([^\031]+)')
    if #a > 15 or #b > 15 then exact = false end
    tokens_in = tokens_in + tonumber(a)
    tokens_out = tokens_out + tonumber(b)
    cost = cost + tonumber(c)
    batch[#batch + 1] = last + i
    batch[#batch + 1] = int(last + i) .. '\031' .. text
    if #batch >= 1000 or i == n then
      redis.call('ZADD', MSGS, unpack(batch))
      batch = {}
    end
  end
  if tokens_in >= 2^52 or tokens_out >= 2^52 then exact = false end
  local old = tonumber(m.expires_at)
  local expires = renewed(old, tonumber(m.idle_ttl), tonumber(m.deadline), now)
  local set = {'version', int(tonumber(m.version) + 1), 'updated_at', NOW, 'last_seq',
    int(last + n), 'cost', num(cost), 'message_count', int(tonumber(m.message_count) + n)}
  if exact then
    set[#set + 1] = 'input_tokens'
    set[#set + 1] = int(tokens_in)
    set[#set + 1] = 'output_tokens'
    set[#set + 1] = int(tokens_out)
  end
  if expires ~= old then
    set[#set + 1] = 'expires_at'
    set[#set + 1] = num(expires)
  end
  redis.call('HSET', META, unpack(set))
  if not exact then
    for i = first, first + n - 1 do
      local a, b = string.match(ARGV[i], '^(%d+)\031(%d+)\031')
      redis.call('HINCRBY', META, 'input_tokens', a)
      redis.call('HINCRBY', META, 'output_tokens', b)
    end
  end
  if expires ~= old then
    expire_at(expires)
  elseif expires and tonumber(m.message_count) == 0 then
    -- META and STATE carry the expiry already, and so does MSGS if it held messages; an
    -- empty history has no MSGS key, which this append just created.
    local ms = math.ceil(expires * 1000)
    local t = redis.call('TIME')
    if ms > t[1] * 1000 + math.floor(t[2] / 1000) then
      redis.call('PEXPIREAT', MSGS, string.format('%.0f', ms))
    end
  end
  -- The session's figures now, which on one server it counts here and on Cluster the
  -- engine counts on the tenant's node.
  local tokens_in_text, tokens_out_text = int(tokens_in), int(tokens_out)
  if not exact then
    local t = redis.call('HMGET', META, 'input_tokens', 'output_tokens')
    tokens_in_text, tokens_out_text = t[1], t[2]
  end
  local owner = '-'
  if m.owner then owner = '=' .. m.owner end
  local new = table.concat({set[2], m.created_at, owner, m.status, set[10], tokens_in_text,
    tokens_out_text, set[8]}, '\031')
  if INDEXED == '1' then
    local tag = string.match(META, '^([^{]*{[^/]*)/') .. '}'
    local id = string.match(META, '/([^/]*)}:meta$')
    redis.call('ZADD', tag .. ':by-updated', 'XX', NOW, id)
    tenant_keys(tag)
    tally(id, redis.call('HGET', TALLIES, id), new)
    return last
  end
  return {'ok', last, new, NOW, expires and num(expires) or ''}
end

local replies = {}
local at = 1
for j = 1, #KEYS do
  META = KEYS[j]
  local base = string.sub(META, 1, -5)
  STATE, MSGS = base .. 'state', base .. 'msgs'
  local NOW, EXPECTED, INDEXED, COUNT =
    string.match(ARGV[at], '^([^\031]*)\031([^\031]*)\031([^\031]*)\031(.*)$')
  now = tonumber(NOW)
  local n = tonumber(COUNT)
  replies[j] = alone(append, NOW, EXPECTED, INDEXED, at + 1, n)
  at = at + 1 + n
end
return replies
"""

# ARGV: now, expected version or ''. Replies {'ok', fields, popped or nil}; on an empty
# history nothing changes.
_POP = (
    _LUA_REST
    + r"""
local m, why = writable(now, ARGV[2], REST)
if not m then return why end
local top = redis.call('ZRANGE', MSGS, -1, -1)
if #top == 0 then return {'ok', record(m), false} end
local tokens_in, tokens_out, cost = string.match(top[1], '^%d+\031(%d+)\031(%d+)\031([^\031]+)')
redis.call('ZREMRANGEBYRANK', MSGS, -1, -1)
remove(m, 1, tonumber(tokens_in), tonumber(tokens_out), tonumber(cost))
save(m, now)
index()
recount()
return {'ok', record(m), top[1]}
"""
)

# ARGV: now, expected version or ''. Replies {'ok', fields, how many went}.
_CLEAR = (
    _LUA_REST
    + r"""
local m, why = writable(now, ARGV[2], REST)
if not m then return why end
local removed = redis.call('ZCARD', MSGS)
redis.call('DEL', MSGS)
remove(m, removed, tonumber(m.input_tokens), tonumber(m.output_tokens), tonumber(m.cost))
save(m, now)
index()
recount()
return {'ok', record(m), removed}
"""
)

# ARGV: now, expected version or ''. Replies {'ok', owner, folder, status, version,
# created_at}.
_DELETE = r"""
local m, why = writable(now, ARGV[2], {'owner', 'folder', 'status', 'updated_at', 'created_at'})
if not m then return why end
redis.call('DEL', META, STATE, MSGS)
recount()
return {'ok', m.owner, m.folder, m.status, m.version, m.created_at}
"""

# A change computed by rules.apply_change from a read at version ARGV[2], written only if
# the session is still at that version (compare-and-set). ARGV: now, version read, new
# state or '' (unchanged), count of fields to set, count to unset, the field/value pairs,
# the unset names, then (seq, stored text) per appended message. The idle expiry is
# renewed from what is stored now. Replies {'ok', expires_at}, {'missing'} or {'conflict',
# version, updated_at}.
_CHANGE = r"""
local m, why = writable(now, ARGV[2], {'idle_ttl', 'deadline', 'updated_at'})
if not m then return why end
local set, unset = tonumber(ARGV[4]), tonumber(ARGV[5])
local i = 6
if set > 0 then redis.call('HSET', META, unpack(ARGV, i, i + 2 * set - 1)) end
i = i + 2 * set
if unset > 0 then redis.call('HDEL', META, unpack(ARGV, i, i + unset - 1)) end
i = i + unset
if ARGV[3] ~= '' then redis.call('SET', STATE, ARGV[3]) end
for j = i, LAST, 1000 do redis.call('ZADD', MSGS, unpack(ARGV, j, math.min(j + 999, LAST))) end
local old = tonumber(m.expires_at)
local expires = renewed(old, tonumber(m.idle_ttl), tonumber(m.deadline), now)
if expires ~= old then redis.call('HSET', META, 'expires_at', num(expires)) end
expire_at(expires)
index()
recount()
if expires then return {'ok', num(expires)} end
return {'ok'}
"""

# ARGV: now. Deletes the session if it has expired. Replies {'deleted', owner, folder,
# status, version, created_at}, {'gone'} (no such session) or {'live', expires_at} (on one
# server, its by-expiry score moved up to expires_at).
_PURGE = r"""
local m = redis.call('HMGET', META, 'version', 'expires_at', 'owner', 'folder', 'status',
  'created_at')
if not m[1] then
  recount()  -- Redis dropped it: it counts no more
  return {'gone'}
end
if m[2] and tonumber(m[2]) <= now then
  redis.call('DEL', META, STATE, MSGS)
  recount()
  return {'deleted', m[3], m[4], m[5], m[1], m[6]}
end
if TALLIES then
  -- One server: its by-expiry score moves up to its expiry here, where no deletion and
  -- creation again of the id can come between the read and the write.
  local id = string.match(META, '/([^/]*)}:meta$')
  local expiry = string.sub(KEYS[4], 1, -9) .. ':by-expiry'
  if m[2] then redis.call('ZADD', expiry, 'XX', m[2], id) else redis.call('ZREM', expiry, id) end
end
return {'live', m[2]}
"""

# A member of a deleted folder. ARGV: now, the folder, the folder to move to ('' for none),
# '1' to delete the session instead. Replies nil if the session is not in that folder, else
# {'moved', 1 if live, created_at, owner, status} or {'deleted', 1 if live, owner, status,
# version, created_at}.
_LEAVE_FOLDER = r"""
local m = redis.call('HMGET', META, 'version', 'folder', 'expires_at', 'owner', 'status',
  'created_at')
if not m[1] or m[2] ~= ARGV[2] then return false end
local alive = 0
if not m[3] or tonumber(m[3]) > now then alive = 1 end
if ARGV[4] == '1' then
  redis.call('DEL', META, STATE, MSGS)
  recount()
  return {'deleted', alive, m[4], m[5], m[1], m[6]}
end
if ARGV[3] == '' then
  redis.call('HDEL', META, 'folder')
else
  redis.call('HSET', META, 'folder', ARGV[3])
end
redis.call('HSET', META, 'version', int(tonumber(m[1]) + 1), 'updated_at', ARGV[1])
return {'moved', alive, m[6], m[4], m[5]}
"""

# ARGV: now. Replies nil, or {fields, state, every message joined by \030}, all read at
# once; renews nothing (an export never changes its source).
_EXPORT = (
    _LUA_REST
    + r"""
local m = live(now, REST)
if not m then return false end
local found = redis.call('ZRANGE', MSGS, 0, -1)
return {record(m), redis.call('GET', STATE), table.concat(found, '\030')}
"""
)

# A session written exactly as given. ARGV: now, '1' to replace a live session, expires_at
# or '', state, how many field/value ARGV follow, the field/value pairs, then (seq, stored
# text) per message. Replies 0 if a live session has the id and is kept, 1 if stored, 2 if
# stored over an expired one, 3 over a live one.
_LOAD = r"""
local old = redis.call('HMGET', META, 'version', 'expires_at')
local alive = old[1] and not (old[2] and tonumber(old[2]) <= now)
if alive and ARGV[2] ~= '1' then return 0 end
redis.call('DEL', META, STATE, MSGS)
local fields = 5 + tonumber(ARGV[5])
redis.call('HSET', META, unpack(ARGV, 6, fields))
redis.call('SET', STATE, ARGV[4])
for j = fields + 1, LAST, 1000 do
  redis.call('ZADD', MSGS, unpack(ARGV, j, math.min(j + 999, LAST)))
end
expire_at(tonumber(ARGV[3]))
index()
recount()
if alive then return 3 end
if old[1] then return 2 end
return 1
"""

# One server: put back every index entry of the session, from its meta, if it exists (a
# deletion's clean-up that came after it was created again may have taken them).
_INDEX_AGAIN = r"""
local v = redis.call('HMGET', META, 'version', 'owner', 'folder', 'status', 'created_at',
  'updated_at', 'expires_at')
if not v[1] then return 0 end
local tag = string.match(META, '^([^{]*{[^/]*)/') .. '}'
local id = string.match(META, '/([^/]*)}:meta$')
local function member_key(x)
  if x then return '=' .. x end
  return '-'
end
local owner, folder, status, created = member_key(v[2]), member_key(v[3]), v[4], v[5]
redis.call('ZADD', tag .. ':by-created', created, id)
redis.call('ZADD', tag .. ':by-updated', v[6], id)
redis.call('ZADD', tag .. ':by-owner:' .. owner, created, id)
redis.call('ZADD', tag .. ':by-folder:' .. folder, created, id)
redis.call('ZADD', tag .. ':by-status:' .. status, created, id)
redis.call('HSET', tag .. ':entries', id, owner .. '\031' .. folder .. '\031' .. status)
if v[7] then redis.call('ZADD', tag .. ':by-expiry', v[7], id) end
return 1
"""

# Tenant scripts: every key under the tenant's hash tag. A folder name's key in
# folder-names is the owner, length-prefixed ('-' for None), then the name.
_LUA_TENANT = r"""
local function name_key(owner, name)
  if owner then return #owner .. ':' .. owner .. name end
  return '-' .. name
end
"""

# KEYS: folder, folders, folder-names. ARGV: id, name, created_at, owner ('' with no
# owner flag), '1' if it has an owner. Replies 'ok', 'name' or 'id' (taken).
_INSERT_FOLDER = r"""
local owner = false
if ARGV[5] == '1' then owner = ARGV[4] end
local key = name_key(owner, ARGV[2])
if redis.call('HEXISTS', KEYS[3], key) == 1 then return 'name' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'id' end
redis.call('HSET', KEYS[3], key, ARGV[1])
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'created_at', ARGV[3])
if owner then redis.call('HSET', KEYS[1], 'owner', owner) end
redis.call('SADD', KEYS[2], ARGV[1])
return 'ok'
"""

# KEYS: folder, folders, folder-names. ARGV: id, name, created_at, owner ('' with no owner
# flag), '1' if it has an owner, '1' to overwrite a folder with the id. Replies 'ok', 'kept'
# (the id is taken and kept) or 'name' (another folder of the owner has the name).
_LOAD_FOLDER = r"""
local owner = false
if ARGV[5] == '1' then owner = ARGV[4] end
local f = redis.call('HMGET', KEYS[1], 'name', 'owner')
if f[1] and ARGV[6] ~= '1' then return 'kept' end
local key = name_key(owner, ARGV[2])
local holder = redis.call('HGET', KEYS[3], key)
if holder and holder ~= ARGV[1] then return 'name' end
if f[1] then
  redis.call('HDEL', KEYS[3], name_key(f[2], f[1]))
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[3], key, ARGV[1])
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'created_at', ARGV[3])
if owner then redis.call('HSET', KEYS[1], 'owner', owner) end
redis.call('SADD', KEYS[2], ARGV[1])
return 'ok'
"""

# KEYS: folder, folder-names. ARGV: id, new name. Replies nil, {'taken', owner} or
# {'ok', owner, created_at}.
_RENAME_FOLDER = r"""
local f = redis.call('HMGET', KEYS[1], 'name', 'owner', 'created_at')
if not f[1] then return false end
if f[1] ~= ARGV[2] then
  if redis.call('HSETNX', KEYS[2], name_key(f[2], ARGV[2]), ARGV[1]) == 0 then
    return {'taken', f[2]}
  end
  redis.call('HDEL', KEYS[2], name_key(f[2], f[1]))
  redis.call('HSET', KEYS[1], 'name', ARGV[2])
end
return {'ok', f[2], f[3]}
"""

# KEYS: folder, folders, folder-names, its by-folder index, the folder to move to (or the
# folder again). ARGV: id, '1' if moving to KEYS[5]. Deletes the folder and hands back its
# index. Replies {'missing'}, {'target', owner} or {'ok', member ids}.
_DELETE_FOLDER = r"""
local f = redis.call('HMGET', KEYS[1], 'name', 'owner')
if not f[1] then return {'missing'} end
if ARGV[2] == '1' then
  local to = redis.call('HMGET', KEYS[5], 'name', 'owner')
  if not to[1] or to[2] ~= f[2] then return {'target', f[2]} end
end
redis.call('HDEL', KEYS[3], name_key(f[2], f[1]))
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
local members = redis.call('ZRANGE', KEYS[4], 0, -1)
redis.call('DEL', KEYS[4])
return {'ok', members}
"""

# KEYS: by-updated. ARGV: id, the score a failed write put there, the session's real
# updated_at. Puts the real one back unless another write has moved the score since.
_RESTORE_UPDATED = r"""
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
end
return 0
"""

# --- stats: the tenant's counters ---------------------------------------------------------

# On Cluster, the figures of sessions that scripts on other nodes wrote, which may arrive
# late, twice, or after the session went. KEYS: tallies, counters, by-created, by-updated,
# gone (a hash: id -> created_at and version, joined by \031, of a copy that went) and
# gone-at (a zset: when, on the server's clock; entries go after 10 minutes, a few per
# call). ARGV, three per session: id, then
# - 'set' (a write or create) and its figures: counted unless a later write of it is
#   (later: by created_at, then version), or that copy or a later one of it went (so a
#   session deleted and created again at the very same created_at, which only a frozen
#   clock makes, is not counted until check --repair); 'put' (a load, which may write an
#   older copy) and its figures: counted;
# ('set' and 'put' may carry the write's updated_at and expires_at, each after \030: its
# by-updated and by-expiry entries are then put back too);
# - 'drop' and the created_at and version of the copy that went, or '' (whatever is
#   counted went): no longer counted, unless what is counted is later.
_TALLY = r"""
tenant_keys(string.sub(KEYS[1], 1, -9))
local GONE, GONE_AT = KEYS[5], KEYS[6]
local clock = tonumber(redis.call('TIME')[1])
local stale = redis.call('ZRANGEBYSCORE', GONE_AT, '-inf', clock - 600, 'LIMIT', 0, 16)
if #stale > 0 then
  redis.call('HDEL', GONE, unpack(stale))
  redis.call('ZREM', GONE_AT, unpack(stale))
end

local function later(created, version, than_created, than_version)
  created, than_created = tonumber(created), tonumber(than_created)
  if created ~= than_created then return created > than_created end
  return tonumber(version) >= tonumber(than_version)
end

local function bury(id, created, version)
  local was = redis.call('HGET', GONE, id)
  if was then
    local c, v = string.match(was, '^([^\031]*)\031(.*)$')
    if later(c, v, created, version) then return end
  end
  redis.call('HSET', GONE, id, created .. '\031' .. version)
  redis.call('ZADD', GONE_AT, clock, id)
end

-- A write's by-updated and by-expiry entries, which a racing deletion of the same id may
-- have taken (stats read them): put back with the figures that count.
local function index(id, updated, expires)
  if updated ~= '' then redis.call('ZADD', UPDATED, updated, id) end
  if expires ~= '' then
    redis.call('ZADD', string.sub(KEYS[1], 1, -9) .. ':by-expiry', expires, id)
  end
end

for j = 1, #ARGV, 3 do
  local id, text = ARGV[j], ARGV[j + 2]
  local how, updated, expires = string.match(ARGV[j + 1], '^([^\030]*)\030?([^\030]*)\030?(.*)$')
  local old = redis.call('HGET', TALLIES, id)
  local o = old and figures(old)
  if how == 'drop' then
    local created, version = string.match(text, '^([^\031]*)\031(.*)$')
    if text == '' and o then created, version = o[2], o[1] end
    if o and later(created, version, o[2], o[1]) then tally(id, old, false) end
    if created then bury(id, created, version) end
  elseif how == 'put' then
    redis.call('HDEL', GONE, id)
    redis.call('ZREM', GONE_AT, id)
    tally(id, old, text)
    index(id, updated, expires)
  else
    local n = figures(text)
    local was = redis.call('HGET', GONE, id)
    local buried = false
    if was then
      local c, v = string.match(was, '^([^\031]*)\031(.*)$')
      buried = later(c, v, n[2], n[1])
    end
    if not buried and (not o or later(n[2], n[1], o[2], o[1])) then
      tally(id, old, text)
      index(id, updated, expires)
    end
  end
end
return 0
"""

# The stored part of the stats. KEYS: counters, by-expiry, tallies, by-updated. ARGV: now,
# since. Replies {1 if every session is counted, the counters as field/value pairs, the
# counted sessions among the expiry candidates at now, their figures, their by-updated
# scores ('' if none), how many counted sessions by-updated has at or after since}: its
# entries there, read a thousand at a time, as it may hold some of sessions that went.
_STATS = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local ids, found, scores = {}, {}, {}
for _, id in ipairs(due) do
  local f = redis.call('HGET', KEYS[3], id)
  if f then
    ids[#ids + 1] = id
    found[#found + 1] = f
    scores[#scores + 1] = redis.call('ZSCORE', KEYS[4], id) or ''
  end
end
local recent = 0
local since = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[2], '+inf')
for i = 1, #since, 1000 do
  local tallied = redis.call('HMGET', KEYS[3], unpack(since, i, math.min(i + 999, #since)))
  for _, f in ipairs(tallied) do
    if f then recent = recent + 1 end
  end
end
return {redis.call('HEXISTS', KEYS[1], 'v'), redis.call('HGETALL', KEYS[1]), ids, found,
  scores, recent}
"""

# check: whether the counters are the sums of the tallies, and with ARGV[1] = '1' make them
# so. KEYS: tallies, counters. Replies the groups (\031status\031owner) that were not.
_CHECK_COUNTERS = r"""
local sums = {}
local function add(field, by) sums[field] = (sums[field] or 0) + by end
local all = redis.call('HGETALL', KEYS[1])
for i = 2, #all, 2 do
  local f = figures(all[i])
  local group = '\031' .. f[4] .. '\031' .. f[3]
  add('n' .. group, 1)
  for k = 5, 7 do add(METRICS[k - 4] .. group, tonumber(f[k])) end
  add('c' .. group, nano(f[8]))
end
local stored = redis.call('HGETALL', KEYS[2])
local seen, wrong, groups = {}, false, {}
local function differs(field)
  wrong = true
  groups[string.sub(field, 2)] = true
end
for i = 1, #stored, 2 do
  if stored[i] ~= 'v' then
    seen[stored[i]] = true
    if tonumber(stored[i + 1]) ~= (sums[stored[i]] or 0) then differs(stored[i]) end
  end
end
for field, value in pairs(sums) do
  if not seen[field] and value ~= 0 then differs(field) end
end
if wrong and ARGV[1] == '1' then
  local marker = redis.call('HGET', KEYS[2], 'v')
  redis.call('DEL', KEYS[2])
  for field, value in pairs(sums) do
    if value ~= 0 then redis.call('HSET', KEYS[2], field, string.format('%d', value)) end
  end
  if marker then redis.call('HSET', KEYS[2], 'v', marker) end
end
local reply = {}
for group in pairs(groups) do reply[#reply + 1] = group end
return reply
"""

# --- guards: small values under the tenant's hash tag, changed by compare-and-set ---------

# Native TTL for a guard key: set only when ahead of the server's clock (the store's clock
# decides what is expired; a time already past would delete the key at once).
_LUA_GUARD = r"""
local function expire_at(key, expires)
  if expires == '' then return end
  local ms = math.ceil(tonumber(expires) * 1000)
  local t = redis.call('TIME')
  if ms <= t[1] * 1000 + math.floor(t[2] / 1000) then return end
  redis.call('PEXPIREAT', key, string.format('%.0f', ms))
end
"""

# KEYS: the guard (a hash: v the value, e its expiry or ''), the tenant's guard index.
# ARGV: the value the caller read ('' if none), '1' if it read one, the new value, '1' to
# store it ('0' deletes), its expiry or '', the guard's key as the index member.
# Writes only if the stored value is still the one read. Replies 1 if it wrote, else 0.
_GUARD_SET = r"""
local current = redis.call('HGET', KEYS[1], 'v')
if ARGV[2] == '1' then
  if current ~= ARGV[1] then return 0 end
elseif current then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'v', ARGV[3], 'e', ARGV[5])
  expire_at(KEYS[1], ARGV[5])
  redis.call('ZADD', KEYS[2], 0, ARGV[6])
else
  redis.call('ZREM', KEYS[2], ARGV[6])
end
return 1
"""

# The sliding-window log of rules.rate_hit as a list, newest time first, at most `limit`
# long. rate_hit(log, limit, window, cost, now) replies one string (one reply to parse):
# "<admitted 1/0> <hits in the window after the hit> <seconds until it would be admitted>
# <seconds until the window is empty>". `window` and `now` come as text, kept as given.
_LUA_RATE = r"""
local function rate_hit(log, limit, window_text, cost, now_text)
  local window, now = tonumber(window_text), tonumber(now_text)
  local cutoff = now - window
  -- The times in the window are a prefix of the log: find its length by bisection.
  local lo, hi = 0, math.min(redis.call('LLEN', log), limit)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if tonumber(redis.call('LINDEX', log, mid)) > cutoff then lo = mid + 1 else hi = mid end
  end
  local n = lo
  if n + cost <= limit then
    local pushed = {}
    for i = 1, cost do pushed[i] = now_text end
    redis.call('LPUSH', log, unpack(pushed))
    redis.call('LTRIM', log, 0, limit - 1)
    expire_at(log, tostring(now + window))
    return '1 ' .. (n + cost) .. ' 0 ' .. window_text
  end
  -- Admitted once the oldest n + cost - limit times have left the window.
  local oldest = tonumber(redis.call('LINDEX', log, limit - cost))
  local retry = oldest + window - now
  if retry < 1e-6 then retry = 1e-6 end  -- a refused hit always waits a little
  local reset = tonumber(redis.call('LINDEX', log, 0)) + window - now
  return string.format('0 %d %.17g %.17g', n, retry, reset)
end
"""

# KEYS: the log. ARGV: limit, window, cost, now.
_RATE_HIT = r"""
return rate_hit(KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4])
"""

# The hits of one event-loop turn (one server only: the logs may lie in any slot), in
# order. KEYS: each hit's log. ARGV: limit, window, cost, now of each hit. One reply each;
# a hit that fails (its key holds another type, say) replies "error <message>" alone.
_RATE_HIT_TURN = r"""
local replies = {}
for j = 1, #KEYS do
  local a = (j - 1) * 4
  local ok, reply = pcall(rate_hit, KEYS[j], tonumber(ARGV[a + 1]), ARGV[a + 2],
    tonumber(ARGV[a + 3]), ARGV[a + 4])
  if not ok then
    if type(reply) == 'table' and reply.err then reply = reply.err end
    reply = 'error ' .. tostring(reply)
  end
  replies[j] = reply
end
return replies
"""


@dataclass(frozen=True, slots=True)
class _Script:
    """A Lua script, run by its SHA1 (EVALSHA) and loaded again if the server lost it."""

    source: str
    sha: str

    @classmethod
    def of(cls, *parts: str) -> _Script:
        source = "".join(parts)
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


_SESSION = _LUA_SESSION.replace("__FIELDS__", ", ".join(f"'{f}'" for f in _FIELDS))
_SESSION_KEYS = "\nlocal META, STATE, MSGS = KEYS[1], KEYS[2], KEYS[3]\n"
_SESSION_NOW = "\nlocal now = tonumber(ARGV[1])\n"
assert _SESSION_KEYS in _SESSION
assert _SESSION_NOW in _SESSION
_COUNTED = _SESSION + _LUA_TALLY + _LUA_RECOUNT  # a session script that counts the session
# Analytics: add to a tenant's daily counters, one hash per month under the tenant's tag
# (so one script on one node), fields "<day>\x1f<counter>\x1f<owner>". ARGV holds 'add'
# or 'set', then (key number, field, value) triples; the cost is a float, the other
# counters integers.
_ADD_DAILY = """
local set = ARGV[1] == 'set'
for i = 2, #ARGV, 3 do
    local key, field, by = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
    if set then
        redis.call('HSET', key, field, by)
    elseif string.find(field, '\\031cost\\031', 1, true) then
        redis.call('HINCRBYFLOAT', key, field, by)
    else
        redis.call('HINCRBY', key, field, by)
    end
end
return 0
"""

_SCRIPTS = {
    "insert": _Script.of(_COUNTED, _INSERT),
    "get": _Script.of(_SESSION, _GET),
    "messages": _Script.of(
        _SESSION.replace(_SESSION_KEYS, _TURN_KEYS).replace(_SESSION_NOW, _TURN_NOW), _MESSAGES
    ),
    "append": _Script.of(
        _SESSION.replace(_SESSION_KEYS, _TURN_KEYS).replace(_SESSION_NOW, _TURN_NOW),
        _LUA_TALLY,
        _APPEND,
    ),
    "pop": _Script.of(_COUNTED, _POP),
    "clear": _Script.of(_COUNTED, _CLEAR),
    "delete": _Script.of(_COUNTED, _DELETE),
    "change": _Script.of(_COUNTED, _CHANGE),
    "purge": _Script.of(_COUNTED, _PURGE),
    "leave_folder": _Script.of(_COUNTED, _LEAVE_FOLDER),
    "export": _Script.of(_SESSION, _EXPORT),
    "load": _Script.of(_COUNTED, _LOAD),
    "index_again": _Script.of(_SESSION, _INDEX_AGAIN),
    # One server: count a session as stored now. Cluster: its figures, for "tally".
    "recount": _Script.of(_COUNTED, "\nrecount()\nreturn 0\n"),
    "figures": _Script.of(_COUNTED, "\nreturn stored_figures()\n"),
    "tally": _Script.of(_LUA_TALLY, _TALLY),
    "stats": _Script.of(_STATS),
    "check_counters": _Script.of(_LUA_TALLY, _CHECK_COUNTERS),
    "insert_folder": _Script.of(_LUA_TENANT, _INSERT_FOLDER),
    "load_folder": _Script.of(_LUA_TENANT, _LOAD_FOLDER),
    "rename_folder": _Script.of(_LUA_TENANT, _RENAME_FOLDER),
    "delete_folder": _Script.of(_LUA_TENANT, _DELETE_FOLDER),
    "restore_updated": _Script.of(_RESTORE_UPDATED),
    "guard_set": _Script.of(_LUA_GUARD, _GUARD_SET),
    "rate_hit": _Script.of(_LUA_GUARD, _LUA_RATE, _RATE_HIT),
    "rate_hit_turn": _Script.of(_LUA_GUARD, _LUA_RATE, _RATE_HIT_TURN),
    "add_daily": _Script.of(_ADD_DAILY),
}


# --- URLs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Options:
    """A redis:// URL split into what redis-py gets and the engine's own options."""

    url: str
    where: str  # host:port, for messages (never the password)
    prefix: str = "sk:"
    cluster: bool = False
    fallback: bool = False
    durable: bool = False


def _flag(name: str, value: str) -> bool:
    if value not in ("true", "false"):
        raise InvalidInput("url", f"{name}= must be true or false, not {value!r}")
    return value == "true"


def _parse_url(url: str) -> _Options:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    unknown = sorted({n for n in names if n not in _OPTIONS})
    if unknown:
        raise InvalidInput(
            "url",
            f"unknown option {', '.join(unknown)}: a redis URL takes {', '.join(_OPTIONS)}",
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput("url", f"option {', '.join(repeated)} is given twice")
    given = dict(pairs)
    prefix = given.get("prefix", "sk:")
    if _PREFIX.fullmatch(prefix) is None:
        raise InvalidInput("url", "prefix= must be 1-64 letters, digits and _:.- characters")
    fallback = given.get("fallback")
    if fallback not in (None, "memory"):
        raise InvalidInput("url", f"fallback= can only be memory, not {fallback!r}")
    cluster = _flag("cluster", given.get("cluster", "false"))
    if cluster and parts.path.strip("/") not in ("", "0"):
        raise InvalidInput("url", "Redis Cluster has only database 0")
    return _Options(
        url=parts._replace(query="").geturl(),
        where=f"{parts.hostname or 'localhost'}:{parts.port or 6379}",
        prefix=prefix,
        cluster=cluster,
        fallback=fallback == "memory",
        durable=_flag("durable", given.get("durable", "false")),
    )


# --- records ----------------------------------------------------------------------------


def _text(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _unpack(text: str) -> list[str | None]:
    """The fields a script's record() joined. Only the nullable ones are ever empty (the
    title may be "" but is never None); none holds the separator, as the store allows no
    control characters in titles, owners and steps, and JSON text escapes them."""
    values: list[str | None] = list(text.split(_SEP))
    for i in _NULLABLE:
        if values[i] == "":
            values[i] = None
    return values


def _record(tenant: str, session_id: str, v: Sequence[Any], state: str | None) -> SessionRecord:
    """A record from the meta fields in _FIELDS order."""
    return SessionRecord(
        tenant,
        session_id,
        v[0],
        v[1],
        v[2],
        v[3],
        v[4],
        v[5],
        state,
        int(v[6]),
        float(v[7]),
        float(v[8]),
        _float(v[9]),
        _float(v[10]),
        _float(v[11]),
        int(v[12]),
        int(v[13]),
        int(v[14]),
        int(v[15]),
        float(v[16]),
    )


def _stored(
    role: str,
    content: str,
    input_tokens: int,
    output_tokens: int,
    cost: float,
    metadata: str,
    created_at: float,
) -> str:
    """A message as stored after its seq: numbers first, so Lua can read them back."""
    return _SEP.join(
        (
            str(input_tokens),
            str(output_tokens),
            repr(cost),
            repr(created_at),
            role,
            metadata,
            content,
        )
    )


def _message(session_id: str, member: str) -> MessageRecord:
    seq, tokens_in, tokens_out, cost, created_at, role, metadata, content = member.split(_SEP, 7)
    return MessageRecord(
        session_id,
        int(seq),
        role,
        content,
        int(tokens_in),
        int(tokens_out),
        float(cost),
        metadata,
        float(created_at),
    )


# --- keys -------------------------------------------------------------------------------


def _queue_hexists(key: str, fields: list[str], pipe: _Pipe) -> None:
    for name in fields:
        pipe.hexists(key, name)


def _queue_indexed(t: _Tenant, ids: list[str], pipe: _Pipe) -> None:
    """Whether the entries hash, then by-created, names each of these sessions."""
    for sid in ids:
        pipe.hexists(t.entries, sid)
        pipe.zscore(t.created, sid)


def _member_key(value: str | None) -> str:
    return "-" if value is None else f"={value}"


def _entry(owner: str | None, folder: str | None, status: str) -> str:
    """What the entries hash records of a session: where its index entries are."""
    return _SEP.join((_member_key(owner), _member_key(folder), status))


def _from_entry(text: str) -> tuple[str | None, str | None, str]:
    owner, folder, status = text.split(_SEP)
    return (None if owner == "-" else owner[1:]), (None if folder == "-" else folder[1:]), status


class _Tenant:
    """The keys of one tenant's indexes and folders, all in the tenant's slot."""

    __slots__ = (
        "counters",
        "created",
        "entries",
        "expiry",
        "folders",
        "name",
        "names",
        "tag",
        "tallies",
        "updated",
    )

    def __init__(self, prefix: str, tenant: str) -> None:
        self.name = tenant
        self.tag = f"{prefix}{{{tenant}}}"
        self.created = f"{self.tag}:by-created"
        self.updated = f"{self.tag}:by-updated"
        self.expiry = f"{self.tag}:by-expiry"
        self.entries = f"{self.tag}:entries"
        self.folders = f"{self.tag}:folders"
        self.names = f"{self.tag}:folder-names"
        self.tallies = f"{self.tag}:tallies"
        self.counters = f"{self.tag}:counters"

    def queue_tally(self, pipe: _Pipe, changes: Sequence[tuple[str, str, str]]) -> None:
        """Queue the tenant's script that counts sessions other nodes wrote (on Cluster):
        (id, "set" or "put", figures) or (id, "drop", "" or the created_at and version that
        went)."""
        args = [x for change in changes for x in change]
        gone = f"{self.tag}:tallies-gone"
        keys = (self.tallies, self.counters, self.created, self.updated, gone, f"{gone}-at")
        pipe.execute_command("EVALSHA", _SCRIPTS["tally"].sha, len(keys), *keys, *args)

    def owner(self, owner: str | None) -> str:
        return f"{self.tag}:by-owner:{_member_key(owner)}"

    def in_folder(self, folder: str | None) -> str:
        return f"{self.tag}:by-folder:{_member_key(folder)}"

    def status(self, status: str) -> str:
        return f"{self.tag}:by-status:{status}"

    def folder(self, folder_id: str) -> str:
        return f"{self.tag}:folder:{folder_id}"


@dataclass(frozen=True, slots=True)
class _Index:
    """One index zset: scored by ``score`` (a record field); with ``field`` set, it holds
    the sessions whose ``field`` is ``value``."""

    key: str
    score: Literal["created_at", "updated_at"]
    field: str | None = None
    value: str | None = None

    def holds(self, record: SessionRecord) -> bool:
        return self.field is None or getattr(record, self.field) == self.value


def _sort_out(
    index: _Index,
    entries: Sequence[tuple[str, float]],
    records: Sequence[SessionRecord | None],
    query: SessionQuery,
    now: float,
    stale: dict[str, None],
    moved: dict[str, float],
) -> list[SessionRecord]:
    """The live sessions among an index's ``entries`` that match ``query``. Entries of
    sessions that are gone or no longer belong go to ``stale``, wrong scores to ``moved``."""
    found: list[SessionRecord] = []
    for (sid, score), record in zip(entries, records, strict=True):
        if record is None or not index.holds(record):
            stale[sid] = None
            continue
        actual: float = getattr(record, index.score)
        if actual != score:
            moved[sid] = actual
        if rules.matches(record, query, now):
            found.append(record)
    return found


def _figures(r: SessionRecord) -> str:
    """What a session adds to its tenant's stats counters (see _LUA_TALLY)."""
    return _SEP.join(
        (
            str(r.version),
            repr(r.created_at),
            _member_key(r.owner),
            r.status,
            str(r.message_count),
            str(r.input_tokens),
            str(r.output_tokens),
            repr(r.cost),
        )
    )


def _set(r: SessionRecord, how: str = "set") -> tuple[str, str, str]:
    """A tally change for a write on Cluster: its figures, updated_at and expires_at."""
    expires = "" if r.expires_at is None else repr(r.expires_at)
    return r.id, _RS.join((how, repr(r.updated_at), expires)), _figures(r)


def _gone(version: str, created_at: str) -> str:
    """A tally drop's guard: the copy of a session that went."""
    return f"{created_at}{_SEP}{version}"


def _nano(cost: str) -> int:
    """A cost in nano-units, as the counters sum it (the same arithmetic as Lua's nano)."""
    return math.floor(float(cost) * 1e9 + 0.5)


def _stats(groups: dict[tuple[str, str], list[int]], recent: int, top: int) -> Stats:
    """Stats from the live sessions' figures per (status, owner key): sessions, messages,
    input and output tokens, cost in nano-units; as rules.stats_of ranks owners."""
    statuses: dict[str, int] = {}
    owners: dict[str | None, int] = {}
    costs: dict[str | None, int] = {}
    sums = [0, 0, 0, 0, 0]
    for (status, key), figures in groups.items():
        if figures[0] <= 0:
            continue
        owner = None if key == "-" else key[1:]
        statuses[status] = statuses.get(status, 0) + figures[0]
        owners[owner] = owners.get(owner, 0) + figures[0]
        costs[owner] = costs.get(owner, 0) + figures[4]
        sums = [a + b for a, b in zip(sums, figures, strict=True)]
    total, messages, input_tokens, output_tokens, cost = sums
    ranked = sorted(owners.items(), key=lambda item: (-item[1], item[0] or ""))
    by_cost = sorted(costs.items(), key=lambda item: (-item[1], item[0] or ""))
    return Stats(
        total=total,
        active=statuses.get("active", 0),
        completed=statuses.get("completed", 0),
        archived=statuses.get("archived", 0),
        recently_active=recent,
        completion_rate=statuses.get("completed", 0) / total if total else 0.0,
        messages=messages,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost / 1e9,
        top_owners=[OwnerCount(owner=o, sessions=n) for o, n in ranked[:top]],
        top_owners_by_cost=[OwnerCost(owner=o, cost=c / 1e9) for o, c in by_cost[:top]],
    )


def _queue_adds(adds: Sequence[_Add], pipe: _Pipe) -> None:
    for key, how, value, member in adds:
        if how == "HSET":
            pipe.hset(key, member, str(value))
        elif how == "HSETNX":
            pipe.hsetnx(key, member, str(value))
        else:
            pipe.zadd(key, {member: float(value)}, nx=how == "NX", xx=how == "XX")


def _queue_members(keys: list[str], pipe: _Pipe) -> None:
    for key in keys:
        pipe.zrange(key, 0, -1, withscores=True)


# --- the engine -------------------------------------------------------------------------


class _Connection(Connection):
    """redis-py's TCP connection, but each write waits under asyncio.timeout rather than
    asyncio.wait_for, which costs a task per command (some 10 us, a tenth of an append).

    The socket timeout still bounds the write; if it passes, the write is cancelled and
    redis-py drops the connection, as it does on its own timeout. (A redis:// URL only:
    redis-py picks its own connection class for rediss:// and unix://.)"""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout, self.socket_timeout = self.socket_timeout, None
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        finally:
            self.socket_timeout = timeout


# OSError covers socket errors and TimeoutError; RedisClusterException is not a RedisError.
_DRIVER_ERRORS = (RedisError, RedisClusterException, OSError)

# check's repairs, each guarded by what it saw, so a write that came between is never
# undone: the aggregates by the version they were counted at; the others by the session
# still being absent (orphans) or its folder still missing.
_FIX_AGGREGATES = """
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'message_count', ARGV[2], 'input_tokens', ARGV[3],
  'output_tokens', ARGV[4], 'cost', ARGV[5], 'version', tonumber(ARGV[1]) + 1)
if tonumber(ARGV[6]) > tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0') then
  redis.call('HSET', KEYS[1], 'last_seq', ARGV[6])
end
return 1
"""
_FIX_FOLDER = """
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'folder')
redis.call('HSET', KEYS[1], 'version', tonumber(ARGV[1]) + 1)
return 1
"""
_DROP_ORPHANS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""
# Eviction policies that never drop a key: any other one drops sessions when memory fills.
_SAFE_POLICIES = frozenset({"noeviction"})
_CHECK_ATTEMPTS = 3  # counts of one session's messages before check leaves it be
_GUARD_ATTEMPTS = 10_000  # compare-and-set rounds before a guard update gives up


def _hook(
    method: Callable[Concatenate[RedisEngine, P], Awaitable[T]],
) -> Callable[Concatenate[RedisEngine, P], Coroutine[Any, Any, T]]:
    """Run a hook on the memory fallback if the engine fell back, else on Redis, within the
    connection limit, with every driver error raised as BackendUnavailable."""
    name = method.__name__

    @functools.wraps(method)
    async def hook(self: RedisEngine, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._fallback is not None:
            result: T = await getattr(self._fallback, name)(*args, **kwargs)
            return result
        self._check_usable()
        try:
            async with self._slots:
                return await method(self, *args, **kwargs)
        except _DRIVER_ERRORS as exc:
            raise self._unavailable(exc) from exc

    return hook


class _Job(Waiting):
    """A call waiting for its turn's script: ``future`` gets the script's reply for it.
    ``args`` are its ARGV, ``size`` how many messages it writes or reads at most."""

    __slots__ = ("args", "meta", "size")

    def __init__(self, meta: str, args: list[str], size: int) -> None:
        super().__init__()
        self.meta = meta
        self.args = args
        self.size = size


class RedisEngine(Engine):
    """Sessions in Redis or Redis Cluster: one script per session write, sorted-set indexes."""

    __slots__ = (
        "_appends",
        "_client",
        "_fallback",
        "_hits",
        "_options",
        "_reads",
        "_slots",
        "settings",
    )
    name = "redis"

    def __init__(self, url: str, settings: Settings) -> None:
        self._options = _parse_url(url)
        self.settings = settings
        self._client: Redis | RedisCluster | None = None
        self._fallback: MemoryEngine | None = None
        # At most pool_size operations at once, so no node is asked for more connections
        # (a pipeline to several nodes takes one connection on each).
        self._slots = asyncio.Semaphore(settings.pool_size)
        # On one server, the appends of one event-loop turn share one script call, and so
        # do its message reads.
        self._appends = Turns[_Job](functools.partial(self._run_turn, "append"), settings.pool_size)
        self._reads = Turns[_Job](functools.partial(self._run_turn, "messages"), settings.pool_size)
        self._hits = Turns[_Job](
            functools.partial(self._run_turn, "rate_hit_turn"), settings.pool_size
        )

    # --- plumbing ----------------------------------------------------------------------

    def _connect(self) -> Redis | RedisCluster:
        timeout = self.settings.server_timeout
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
            # No retries: a failure reaches the caller within server_timeout.
            "retry": Retry(NoBackoff(), 0),
        }
        # _hook lets at most pool_size operations run at once, so a pool never runs dry.
        if self._options.cluster:
            return RedisCluster.from_url(
                self._options.url, max_connections=self.settings.pool_size, **common
            )
        return Redis.from_url(
            self._options.url,
            max_connections=self.settings.pool_size,
            connection_class=_Connection,
            **common,
        )

    async def open(self) -> None:
        if self._client is not None or self._fallback is not None:
            return
        client = self._connect()
        try:
            if isinstance(client, RedisCluster):
                await client.initialize()
            else:
                await client.ping()
            self._client = client
            await self._load_scripts()
            if self._options.durable:
                await self._check_durability(client)
        except _DRIVER_ERRORS as exc:
            self._client = None
            await client.aclose()
            if not self._options.fallback:
                raise BackendUnavailable(
                    f"redis: cannot reach {self._options.where}: {exc}"
                ) from exc
            _log.warning(
                "redis: cannot reach %s (%s); running on memory, as fallback=memory asks: "
                "sessions, messages and folders now live in this process only, other "
                "processes do not see them, and all of them are lost when it exits",
                self._options.where,
                exc,
            )
            self._fallback = MemoryEngine()
            return
        self._opened()

    async def close(self) -> None:
        client, self._client = self._client, None
        self._fallback = None
        self._closed()
        if client is not None and not self._forked:
            await client.aclose()

    async def _load_scripts(self) -> None:
        """Load every script (on every primary of a Cluster), so EVALSHA finds them."""
        assert self._client is not None
        for script in _SCRIPTS.values():
            await self._client.script_load(script.source)

    async def _check_durability(self, client: Redis | RedisCluster) -> None:
        """Warn when an acknowledged write would not survive a crash of the server."""
        try:
            if isinstance(client, RedisCluster):
                nodes = client.get_primaries()
                configs = [await client.config_get("append*", target_nodes=n) for n in nodes]
                where = [node.name for node in nodes]
            else:
                configs, where = [await client.config_get("append*")], [self._options.where]
        except ResponseError as exc:  # managed services often refuse CONFIG
            _log.warning(
                "redis at %s: durable=true, but its persistence settings cannot be read "
                "(%s): check that appendonly is yes and appendfsync always",
                self._options.where,
                exc,
            )
            return
        for node, config in zip(where, configs, strict=True):
            if config.get("appendonly") != "yes":
                _log.warning(
                    "redis at %s: appendonly is off, so acknowledged writes are lost when the "
                    "server crashes or restarts; durable=true needs appendonly yes and "
                    "appendfsync always",
                    node,
                )
            elif config.get("appendfsync") != "always":
                _log.warning(
                    "redis at %s: appendfsync is %s, so acknowledged writes survive a crash "
                    "of Redis but up to a second of them is lost on power loss or an OS "
                    "crash; durable=true needs appendfsync always",
                    node,
                    config.get("appendfsync"),
                )

    def _check_usable(self) -> None:
        if self._forked:
            raise BackendUnavailable(
                "this Redis store was opened before fork(); open a new one in the child"
            )
        if self._client is None:
            raise BackendUnavailable("the Redis engine is closed")

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"redis at {self._options.where}: {exc}")

    @property
    def _redis(self) -> Redis | RedisCluster:
        assert self._client is not None  # _hook checked it
        return self._client

    def _meta(self, tenant: str, session_id: str) -> str:
        return f"{self._options.prefix}{{{tenant}/{session_id}}}:meta"

    def _session_keys(self, tenant: str, session_id: str) -> list[str]:
        tag = f"{self._options.prefix}{{{tenant}/{session_id}}}"
        return [f"{tag}:meta", f"{tag}:state", f"{tag}:msgs"]

    def _counted_keys(self, tenant: str, session_id: str) -> list[str]:
        """The keys of a script that writes a session: on one server, where it keeps the
        tenant's stats counters itself, its tallies key after the session's keys."""
        keys = self._session_keys(tenant, session_id)
        if not self._options.cluster:
            keys.append(self._tenant(tenant).tallies)
        return keys

    @property
    def _registry(self) -> str:
        """The zset of every tenant that has had a session or a folder."""
        return f"{self._options.prefix}tenants"

    def _tenant(self, tenant: str) -> _Tenant:
        return _Tenant(self._options.prefix, tenant)

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script by its SHA1, loading the scripts again if the server lost them."""
        script = _SCRIPTS[name]
        try:
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._load_scripts()
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)

    async def _run(self, queue: Callable[[_Pipe], object]) -> list[Any]:
        """Send what ``queue`` puts in a pipeline in one round trip (on Cluster, redis-py
        sends each node its part at once), loading the scripts again if the server lost
        them."""
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            queue(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                await self._load_scripts()  # the server restarted: run it all again
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results
        raise AssertionError("unreachable")

    async def _write(
        self, name: str, keys: Sequence[str], args: Sequence[str], adds: Sequence[_Add]
    ) -> Any:
        """Run a writing session script with the index entries it adds when it writes.

        On one server the script adds them itself, so they land with the write or not at
        all. On Cluster they live on another node: they go there in the same round trip,
        whatever the script does, so each add must be harmless if the write fails.
        """
        if not self._options.cluster:
            tail = [x for _, how, value, member in adds for x in (how, _text(value), member)]
            return await self._eval(name, [*keys, *(add[0] for add in adds)], [*args, *tail])

        def queue(pipe: _Pipe) -> None:
            self._queue_eval(pipe, name, keys, args)
            _queue_adds(adds, pipe)

        return (await self._run(queue))[0]

    def _queue_each(
        self, name: str, tenant: str, ids: Sequence[str], args: Sequence[str], pipe: _Pipe
    ) -> None:
        """Queue script ``name`` once for each of these sessions."""
        for sid in ids:
            self._queue_eval(pipe, name, self._counted_keys(tenant, sid), args)

    @staticmethod
    def _queue_eval(pipe: _Pipe, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        # A raw command: redis-py's cluster pipeline refuses its evalsha() method (lest the
        # script be missing on a node) but routes EVALSHA by its keys; _run reloads scripts.
        pipe.execute_command("EVALSHA", _SCRIPTS[name].sha, len(keys), *keys, *args)

    async def _load(self, tenant: str, ids: Sequence[str]) -> list[SessionRecord | None]:
        """The records (without state) of these sessions, live or not; None where absent."""
        results: list[Any] = []
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            results += await self._run(functools.partial(self._queue_load, tenant, chunk))
        return [
            None if values[6] is None else _record(tenant, sid, values, None)
            for sid, values in zip(ids, results, strict=True)
        ]

    def _queue_load(self, tenant: str, ids: Sequence[str], pipe: _Pipe) -> None:
        for sid in ids:
            pipe.hmget(self._session_keys(tenant, sid)[0], _FIELDS)

    async def _check_folder(self, tenant: str, folder_id: str | None, owner: str | None) -> None:
        if folder_id is None:
            return
        name, folder_owner = await self._redis.hmget(
            self._tenant(tenant).folder(folder_id), ["name", "owner"]
        )
        if name is None or folder_owner != owner:
            raise NotFound(f"no folder {folder_id!r} of owner {owner!r}")

    async def _restore_updated(
        self, tenant: str, session_id: str, written: float, actual: str
    ) -> None:
        """On Cluster, undo the by-updated score that a write which changed nothing sent
        beside its script."""
        if self._options.cluster:
            keys = [self._tenant(tenant).updated]
            await self._eval("restore_updated", keys, [session_id, repr(written), actual])

    # --- sessions ----------------------------------------------------------------------

    @_hook
    async def insert_session(self, record: SessionRecord, now: float) -> None:
        r = record
        assert r.state is not None  # the store always gives a new session its state
        await self._check_folder(r.tenant, r.folder, r.owner)
        pairs: list[str] = []
        for name in _FIELDS:
            value = getattr(r, name)
            if value is not None:
                pairs += [name, _text(value)]
        expires = "" if r.expires_at is None else repr(r.expires_at)
        args = [repr(now), expires, r.state, *pairs]
        keys = self._counted_keys(r.tenant, r.id)
        # On Cluster the adds land even if a live session has the id: NX keeps its entries.
        adds = self._insert_adds(r, "NX" if self._options.cluster else "")
        stored = await self._write("insert", keys, args, adds)
        if stored == 0:
            raise AlreadyExists(f"session {r.id!r} already exists")
        if self._options.cluster:
            await self._run(functools.partial(self._queue_stored, r, stored, "set"))

    def _queue_stored(self, r: SessionRecord, stored: int, how: str, pipe: _Pipe) -> None:
        """On Cluster, after an insert ("set") or load ("put") wrote ``r``: its counts and,
        over a session that was there (whose scores NX kept), its index scores."""
        if stored != 1:
            _queue_adds(self._insert_adds(r, ""), pipe)
        self._tenant(r.tenant).queue_tally(pipe, [_set(r, how)])

    def _insert_adds(self, r: SessionRecord, flag: str) -> list[_Add]:
        t = self._tenant(r.tenant)
        adds: list[_Add] = [
            (t.created, flag, r.created_at, r.id),
            (t.updated, flag, r.updated_at, r.id),
            (t.owner(r.owner), flag, r.created_at, r.id),
            (t.in_folder(r.folder), flag, r.created_at, r.id),
            (t.status(r.status), flag, r.created_at, r.id),
            (t.entries, f"HSET{flag}", _entry(r.owner, r.folder, r.status), r.id),
            (self._registry, "NX", 0.0, r.tenant),
        ]
        if r.expires_at is not None:
            adds.append((t.expiry, flag, r.expires_at, r.id))
        return adds

    @_hook
    async def get_session(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        keys = self._session_keys(tenant, session_id)
        found = await self._eval("get", keys, [repr(now), "1", "1"])
        return None if found is None else _record(tenant, session_id, _unpack(found[0]), found[1])

    @_hook
    async def delete_session(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> None:
        keys = self._counted_keys(tenant, session_id)
        reply = await self._eval("delete", keys, [repr(now), _version(expected_version)])
        self._raise_for(reply, session_id, expected_version)
        _, owner, folder, status, version, created = reply
        t = self._tenant(tenant)

        def queue(pipe: _Pipe) -> None:
            self._unindex(pipe, t, session_id, owner, folder, status)
            if self._options.cluster:
                t.queue_tally(pipe, [(session_id, "drop", _gone(version, created))])
            else:
                self._queue_each("index_again", tenant, [session_id], [], pipe)

        await self._run(queue)
        await self._index_again(tenant, [session_id])

    async def _index_again(self, tenant: str, ids: list[str]) -> None:
        """On Cluster, put back the index entries of these sessions, whose removal came
        after their deletion, if a session was created again under the id meanwhile (the
        removal may have taken its entries; its expiry and by-updated entries are what stats
        read). On one server the removal's pipeline runs script index_again after it."""
        if not self._options.cluster:
            return
        back = [r for r in await self._load(tenant, ids) if r is not None]
        if back:
            adds = [add for r in back for add in self._insert_adds(r, "")]
            await self._run(functools.partial(_queue_adds, adds))

    @staticmethod
    def _unindex(
        pipe: _Pipe, t: _Tenant, session_id: str, owner: str | None, folder: str | None, status: str
    ) -> int:
        """Queue the removal of every index entry of a session that is gone; returns the
        position in ``pipe`` of the HDEL from the entries hash (1 if it was there)."""
        for key in (
            t.created,
            t.updated,
            t.expiry,
            t.owner(owner),
            t.in_folder(folder),
            t.status(status),
        ):
            pipe.zrem(key, session_id)
        pipe.hdel(t.entries, session_id)
        return len(pipe) - 1

    def _raise_for(self, reply: list[Any], session_id: str, expected_version: int | None) -> None:
        if reply[0] == "error":  # a job of a turn's script failed on its own
            raise BackendUnavailable(f"redis at {self._options.where}: {reply[1]}")
        if reply[0] == "missing":
            raise NotFound(f"no session {session_id!r}")
        if reply[0] == "conflict":
            assert expected_version is not None
            raise VersionConflict(session_id, expected_version, int(reply[1]))

    @_hook
    async def change_session(
        self, tenant: str, session_id: str, change: Change, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        # A read, rules.apply_change in Python (a merge patch must not run in Lua, whose
        # cjson loses {} versus [] and big integers), then a compare-and-set on the version.
        keys = self._counted_keys(tenant, session_id)
        with_state = change.has_state_patch or (change.want_state and change.state is None)
        while True:
            found = await self._eval("get", keys, [repr(now), "1" if with_state else "0", "0"])
            if found is None:
                raise NotFound(f"no session {session_id!r}")
            state = found[1] if with_state else None
            current = _record(tenant, session_id, _unpack(found[0]), state)
            new, appended = rules.apply_change(current, change, now)
            if "owner" in change.fields or "folder" in change.fields:
                await self._check_folder(tenant, new.folder, new.owner)
            args, adds = self._change_args(current, new, appended, now)
            reply = await self._write("change", keys, args, adds)
            if reply[0] == "ok":
                new.expires_at = _float(reply[1]) if len(reply) > 1 else None
                if self._options.cluster:
                    await self._count_on_cluster(tenant, [_set(new)])
                return new, appended
            if reply[0] == "conflict":
                await self._restore_updated(tenant, session_id, now, reply[2])
                if change.expected_version is None:
                    continue  # another write got in between: read again
            self._raise_for(reply, session_id, change.expected_version)

    def _change_args(
        self, current: SessionRecord, new: SessionRecord, appended: list[MessageRecord], now: float
    ) -> tuple[list[str], list[_Add]]:
        """The change script's ARGV (the fields that differ, the state if it changed, the
        appended messages with their seqs) and the index entries the change adds."""
        set_pairs: list[str] = []
        unset: list[str] = []
        for name in _CHANGED:
            value = getattr(new, name)
            if value != getattr(current, name):
                if value is None:
                    unset.append(name)
                else:
                    set_pairs += [name, _text(value)]
        state = "" if new.state is current.state or new.state is None else new.state
        args = [repr(now), str(current.version), state, str(len(set_pairs) // 2), str(len(unset))]
        args += set_pairs + unset
        for m in appended:
            text = _stored(
                m.role, m.content, m.input_tokens, m.output_tokens, m.cost, m.metadata, m.created_at
            )
            args += [str(m.seq), f"{m.seq}{_SEP}{text}"]
        # Every entry the session belongs in, whether it moved or not: re-adding is free,
        # and it puts back one that a failure on Cluster left out.
        t = self._tenant(current.tenant)
        sid, created = current.id, current.created_at
        adds: list[_Add] = [
            (t.created, "", created, sid),
            (t.updated, "", now, sid),
            (t.owner(new.owner), "", created, sid),
            (t.in_folder(new.folder), "", created, sid),
            (t.status(new.status), "", created, sid),
            (t.entries, "HSET", _entry(new.owner, new.folder, new.status), sid),
        ]
        if new.expires_at is not None:  # at most the expiry the script renews to
            adds.append((t.expiry, "", new.expires_at, sid))
        return args, adds

    # --- messages ----------------------------------------------------------------------

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageDraft],
        now: float,
        expected_version: int | None,
    ) -> list[MessageRecord]:
        if self._fallback is not None:
            return await self._fallback.append_messages(
                tenant, session_id, messages, now, expected_version
            )
        self._check_usable()
        cluster = self._options.cluster
        # On one server the script updates by-updated itself; on Cluster that goes to the
        # tenant's node beside it (XX: harmless if the write fails; see _restore_updated).
        head = _SEP.join(
            (repr(now), _version(expected_version), "0" if cluster else "1", str(len(messages)))
        )
        texts = [
            _stored(d.role, d.content, d.input_tokens, d.output_tokens, d.cost, d.metadata, now)
            for d in messages
        ]
        job = _Job(self._meta(tenant, session_id), [head, *texts], len(texts))
        if cluster:
            reply = await self._append_on_cluster(tenant, session_id, now, job)
        else:
            # Waits for its turn's script without holding a connection slot: the script's
            # task takes one.
            self._appends.add(job)
            reply = await job.future
        if not isinstance(reply, int):
            self._raise_for(reply, session_id, expected_version)
        return rules.number_messages(session_id, reply, messages, now)

    @_hook
    async def _append_on_cluster(self, tenant: str, session_id: str, now: float, job: _Job) -> Any:
        """One append, its script beside the by-updated entry on the tenant's node."""
        updated = self._tenant(tenant).updated
        sha = _SCRIPTS["append"].sha

        def queue(pipe: _Pipe) -> None:
            pipe.execute_command("EVALSHA", sha, 1, job.meta, *job.args)
            pipe.zadd(updated, {session_id: now}, xx=True)

        [reply] = (await self._run(queue))[0]
        if reply[0] == "ok":
            how = _RS.join(("set", reply[3], reply[4] or ""))
            await self._count_on_cluster(tenant, [(session_id, how, reply[2])])
            return int(reply[1])
        if reply[0] == "conflict":
            await self._restore_updated(tenant, session_id, now, reply[2])
        return reply

    async def _count_on_cluster(self, tenant: str, changes: Sequence[tuple[str, str, str]]) -> None:
        """On Cluster, count what a session script on another node wrote."""
        await self._run(lambda pipe: self._tenant(tenant).queue_tally(pipe, changes))

    async def _run_turn(self, script: str, jobs: list[_Job]) -> None:
        """One call of ``script`` for the jobs of a turn (on one server): one reply each."""
        keys = [job.meta for job in jobs]
        args: list[str] = []
        for job in jobs:
            args += job.args
        command: tuple[str | int, ...] = (
            "EVALSHA",
            _SCRIPTS[script].sha,
            len(keys),
            *keys,
            *args,
        )
        try:
            async with self._slots:
                client = self._redis
                try:
                    replies = await client.execute_command(*command)
                except NoScriptError:
                    await self._load_scripts()
                    replies = await client.execute_command(*command)
        except _DRIVER_ERRORS as exc:
            for job in jobs:
                error = self._unavailable(exc)
                error.__cause__ = exc
                job.fail(error)
        except BaseException as exc:
            for job in jobs:
                job.fail(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for job, reply in zip(jobs, replies, strict=True):
                job.settle(reply)

    async def _messages(
        self, tenant: str, session_id: str, now: float, after: str, limit: int
    ) -> list[MessageRecord] | None:
        job = _Job(self._meta(tenant, session_id), [repr(now), after, str(limit)], limit)
        if self._options.cluster:
            [found] = await self._read_on_cluster(job)
        else:
            self._reads.add(job)  # as an append: no connection slot held while it waits
            found = await job.future
        if found is None:
            return None
        if isinstance(found, list):
            self._raise_for(found, session_id, None)
        return [_message(session_id, m) for m in found.split(_RS)] if found else []

    @_hook
    async def _read_on_cluster(self, job: _Job) -> Any:
        return await self._eval("messages", [job.meta], job.args)

    async def read_messages(
        self, tenant: str, session_id: str, now: float, after_seq: int, limit: int
    ) -> list[MessageRecord] | None:
        if self._fallback is not None:
            return await self._fallback.read_messages(tenant, session_id, now, after_seq, limit)
        self._check_usable()
        return await self._messages(tenant, session_id, now, str(after_seq), limit)

    async def last_messages(
        self, tenant: str, session_id: str, now: float, limit: int
    ) -> list[MessageRecord] | None:
        if self._fallback is not None:
            return await self._fallback.last_messages(tenant, session_id, now, limit)
        self._check_usable()
        return await self._messages(tenant, session_id, now, "", limit)

    async def _trim(
        self, name: str, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, Any]:
        """Run the pop or clear script; returns the record after it and its last reply."""
        keys = self._counted_keys(tenant, session_id)
        args = [repr(now), _version(expected_version)]
        adds: list[_Add] = [(self._tenant(tenant).updated, "XX", now, session_id)]
        reply = await self._write(name, keys, args, adds)
        if reply[0] == "conflict":
            await self._restore_updated(tenant, session_id, now, reply[2])
        self._raise_for(reply, session_id, expected_version)
        record = _record(tenant, session_id, _unpack(reply[1]), None)
        if self._options.cluster:
            await self._count_on_cluster(tenant, [_set(record)])
        if record.updated_at != now:  # a pop of an empty history changed nothing
            await self._restore_updated(tenant, session_id, now, _text(record.updated_at))
        return record, reply[2]

    @_hook
    async def pop_message(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, MessageRecord | None]:
        record, popped = await self._trim("pop", tenant, session_id, now, expected_version)
        return record, None if popped is None else _message(session_id, popped)

    @_hook
    async def clear_messages(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, int]:
        record, removed = await self._trim("clear", tenant, session_id, now, expected_version)
        return record, int(removed)

    # --- queries -----------------------------------------------------------------------

    def _index(self, tenant: str, query: SessionQuery, counting: bool) -> _Index:
        """The index a listing or count walks: the narrowest one its filters allow."""
        t = self._tenant(tenant)
        if query.folder_set:
            return _Index(t.in_folder(query.folder), "created_at", "folder", query.folder)
        if query.owner_set:
            return _Index(t.owner(query.owner), "created_at", "owner", query.owner)
        if query.status is not None and (counting or query.order_by == "created_at"):
            return _Index(t.status(query.status), "created_at", "status", query.status)
        by_updated = query.order_by == "updated_at" and not counting
        if by_updated or (
            counting
            and query.created_since is None
            and query.created_before is None
            and (query.updated_since is not None or query.updated_before is not None)
        ):
            return _Index(t.updated, "updated_at")
        return _Index(t.created, "created_at")

    @staticmethod
    def _bounds(index: _Index, query: SessionQuery) -> tuple[str, str]:
        """The score range of ``index`` that the query's time filters leave."""
        if index.score == "created_at":
            since, before = query.created_since, query.created_before
        else:
            since, before = query.updated_since, query.updated_before
        low = "-inf" if since is None else repr(since)
        high = "+inf" if before is None else f"({before!r}"
        if query.after_key is not None and index.score == query.order_by:
            key = query.after_key  # ties with the cursor's key are skipped one by one
            if query.descending and (before is None or key < before):
                high = repr(key)
            elif not query.descending and (since is None or key > since):
                low = repr(key)
        return low, high

    async def _pages(
        self, key: str, low: str, high: str, descending: bool
    ) -> AsyncGenerator[list[tuple[str, float]], None]:
        """The entries of ``key`` within the score range, page by page, in score order.

        Each page resumes at the last score seen, skipping the entries tied with it that
        were already seen, so entries removed meanwhile never make it skip others."""
        start, end = (high, low) if descending else (low, high)
        skip, anchor = 0, None
        while True:
            page = cast(
                "list[tuple[str, float]]",
                await self._redis.zrange(
                    key,
                    start,
                    end,
                    desc=descending,
                    byscore=True,
                    offset=skip,
                    num=_BATCH,
                    withscores=True,
                ),
            )
            if page:
                yield page
            if len(page) < _BATCH:
                return
            last = page[-1][1]
            tied = sum(1 for _, score in page if score == last)
            skip = tied + (skip if anchor == last else 0)
            start, anchor = repr(last), last

    async def _check(
        self,
        tenant: str,
        index: _Index,
        entries: Sequence[tuple[str, float]],
        query: SessionQuery,
        now: float,
        stale: dict[str, None],
        moved: dict[str, float],
    ) -> list[SessionRecord]:
        """The live sessions among ``entries`` that match ``query``; see _sort_out."""
        records = await self._load(tenant, [sid for sid, _ in entries])
        return _sort_out(index, entries, records, query, now, stale, moved)

    async def _repair(
        self, tenant: str, index: _Index, stale: dict[str, None], moved: dict[str, float]
    ) -> None:
        """Fix what a walk found wrong in ``index``. A stale entry is removed, then checked
        again, and put back if a write made it right meanwhile."""
        if not stale and not moved:
            return

        def queue(pipe: _Pipe) -> None:
            if moved:
                pipe.zadd(index.key, moved, xx=True)
            if stale:
                pipe.zrem(index.key, *stale)

        await self._run(queue)
        if stale:
            ids = list(stale)
            back = {
                r.id: getattr(r, index.score)
                for r in await self._load(tenant, ids)
                if r is not None and index.holds(r)
            }
            if back:
                await self._redis.zadd(index.key, back)

    async def _matching(
        self, tenant: str, index: _Index, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        """Every live session in ``index`` (within the query's time range) that matches."""
        low, high = self._bounds(index, query)
        found: list[SessionRecord] = []
        stale: dict[str, None] = {}
        moved: dict[str, float] = {}
        async with contextlib.aclosing(self._pages(index.key, low, high, False)) as pages:
            async for page in pages:
                found += await self._check(tenant, index, page, query, now, stale, moved)
        await self._repair(tenant, index, stale, moved)
        return found

    @_hook
    async def list_sessions(
        self, tenant: str, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        index = self._index(tenant, query, counting=False)
        if index.score != query.order_by:  # an owner's or folder's sessions, by updated_at
            found = [
                r
                for r in await self._matching(tenant, index, query, now)
                if rules.is_after_cursor(r, query)
            ]
        else:
            found = await self._walk(tenant, index, query, now)
        found.sort(key=lambda r: rules.sort_key(r, query), reverse=query.descending)
        return found[: query.limit]

    async def _walk(
        self, tenant: str, index: _Index, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        """Walk an index scored by the listing's order until a page is full."""
        low, high = self._bounds(index, query)
        position = (
            None
            if query.after_key is None or query.after_id is None
            else (query.after_key, query.after_id)
        )
        found: dict[str, SessionRecord] = {}
        stale: dict[str, None] = {}
        moved: dict[str, float] = {}
        async with contextlib.aclosing(
            self._pages(index.key, low, high, query.descending)
        ) as pages:
            async for page in pages:
                if position is not None:  # skip what comes before the cursor, by the index
                    page = [
                        (sid, score)
                        for sid, score in page
                        if (
                            (score, sid) < position if query.descending else (score, sid) > position
                        )
                    ]
                for r in await self._check(tenant, index, page, query, now, stale, moved):
                    if rules.is_after_cursor(r, query):
                        found[r.id] = r
                if len(found) >= query.limit:
                    break
        await self._repair(tenant, index, stale, moved)
        return list(found.values())

    @_hook
    async def count_sessions(self, tenant: str, query: SessionQuery, now: float) -> int:
        index = self._index(tenant, query, counting=True)
        return len(await self._matching(tenant, index, query, now))

    @_hook
    async def stats(self, tenant: str, now: float, since: float, top: int) -> Stats:
        # The counters, less the sessions they count that are expired at now (by-expiry's
        # candidates, whose scores may lag, checked against their meta); never a walk of
        # the sessions, but once for a tenant written before the counters existed.
        t = self._tenant(tenant)
        keys = [t.counters, t.expiry, t.tallies, t.updated]
        reply = await self._eval("stats", keys, [repr(now), repr(since)])
        if not reply[0] and await self._count_all(tenant):
            reply = await self._eval("stats", keys, [repr(now), repr(since)])
        _, pairs, due, found, scores, recent = reply
        groups: dict[tuple[str, str], list[int]] = {}
        for i in range(0, len(pairs), 2):
            field, value = pairs[i], int(pairs[i + 1])
            if field != "v":
                metric, status, owner = field.split(_SEP)
                figures = groups.setdefault((status, owner), [0, 0, 0, 0, 0])
                figures["nmioc".index(metric)] += value
        metas = await self._run(
            lambda pipe: [
                pipe.hmget(self._meta(tenant, sid), ["version", "expires_at"]) for sid in due
            ]
        )
        for text, score, (version, expires) in zip(found, scores, metas, strict=True):
            if version is not None and not rules.is_expired(_float(expires), now):
                continue  # renewed since its by-expiry entry was written
            _, _, owner, status, messages, tokens_in, tokens_out, cost = text.split(_SEP)
            figures = groups.setdefault((status, owner), [0, 0, 0, 0, 0])
            for i, value in enumerate((1, int(messages), int(tokens_in), int(tokens_out))):
                figures[i] -= value
            figures[4] -= _nano(cost)
            if score and float(score) >= since:
                recent -= 1
        return _stats(groups, recent, top)

    async def _count_all(self, tenant: str) -> bool:
        """Count every session of a tenant written before the counters existed, one walk
        of by-created, and mark its counters as complete. False if it has no session."""
        t = self._tenant(tenant)
        walked = False
        async with contextlib.aclosing(self._pages(t.created, "-inf", "+inf", False)) as pages:
            async for page in pages:
                await self._recount(tenant, [sid for sid, _ in page])
                walked = True
        if walked:
            await self._redis.hset(t.counters, "v", "1")
        return walked

    async def _recount(self, tenant: str, ids: Sequence[str]) -> None:
        """Count these sessions as they are stored now; those that are gone no more. On one
        server one script each does it; on Cluster their figures are read, then counted on
        the tenant's node (where a write that came between is never undone, as later)."""
        if not ids:
            return
        if not self._options.cluster:
            await self._run(functools.partial(self._queue_each, "recount", tenant, ids, ["0"]))
            return
        found = await self._run(functools.partial(self._queue_each, "figures", tenant, ids, ["0"]))
        await self._count_on_cluster(
            tenant,
            [
                (sid, "drop", "") if figures is None else (sid, "set", figures)
                for sid, figures in zip(ids, found, strict=True)
            ],
        )

    # --- folders -----------------------------------------------------------------------

    async def _counted(
        self, tenant: str, folders: list[FolderRecord], now: float
    ) -> list[FolderRecord]:
        """The folders with their counts of live sessions, from their by-folder indexes."""
        t = self._tenant(tenant)
        indexes = [_Index(t.in_folder(f.id), "created_at", "folder", f.id) for f in folders]
        members: list[list[tuple[str, float]]] = await self._run(
            functools.partial(_queue_members, [index.key for index in indexes])
        )
        ids = list(dict.fromkeys(sid for entries in members for sid, _ in entries))
        records = dict(zip(ids, await self._load(tenant, ids), strict=True))
        everything = SessionQuery()
        for folder, index, entries in zip(folders, indexes, members, strict=True):
            stale: dict[str, None] = {}
            moved: dict[str, float] = {}
            found = [records[sid] for sid, _ in entries]
            live = _sort_out(index, entries, found, everything, now, stale, moved)
            await self._repair(tenant, index, stale, moved)
            folder.session_count = len(live)
        return folders

    @_hook
    async def insert_folder(self, record: FolderRecord) -> None:
        t = self._tenant(record.tenant)
        keys = [t.folder(record.id), t.folders, t.names]
        has_owner = record.owner is not None
        args = [
            record.id,
            record.name,
            repr(record.created_at),
            record.owner or "",
            "1" if has_owner else "0",
        ]
        taken = await self._folder_script("insert_folder", record.tenant, keys, args)
        if taken == "name":
            raise AlreadyExists(f"owner {record.owner!r} already has a folder {record.name!r}")
        if taken == "id":
            raise AlreadyExists(f"folder {record.id!r} already exists")

    async def _folder_script(
        self, name: str, tenant: str, keys: Sequence[str], args: Sequence[str]
    ) -> Any:
        """Run a script that writes a folder, adding its tenant to the registry first (on
        one server; on Cluster beside it): an extra registry entry is harmless."""

        def queue(pipe: _Pipe) -> None:
            pipe.zadd(self._registry, {tenant: 0.0}, nx=True)
            self._queue_eval(pipe, name, keys, args)

        return (await self._run(queue))[1]

    @_hook
    async def get_folder(self, tenant: str, folder_id: str, now: float) -> FolderRecord | None:
        found = cast(
            "dict[str, str]", await self._redis.hgetall(self._tenant(tenant).folder(folder_id))
        )
        if not found:
            return None
        record = FolderRecord(
            tenant, folder_id, found.get("owner"), found["name"], float(found["created_at"])
        )
        return (await self._counted(tenant, [record], now))[0]

    @_hook
    async def rename_folder(
        self, tenant: str, folder_id: str, name: str, now: float
    ) -> FolderRecord:
        t = self._tenant(tenant)
        reply = await self._eval("rename_folder", [t.folder(folder_id), t.names], [folder_id, name])
        if reply is None:
            raise NotFound(f"no folder {folder_id!r}")
        if reply[0] == "taken":
            raise AlreadyExists(f"owner {reply[1]!r} already has a folder {name!r}")
        record = FolderRecord(tenant, folder_id, reply[1], name, float(reply[2]))
        return (await self._counted(tenant, [record], now))[0]

    @_hook
    async def list_folders(
        self, tenant: str, owner: str | None, owner_set: bool, now: float
    ) -> list[FolderRecord]:
        t = self._tenant(tenant)
        ids = sorted(cast("set[str]", await self._redis.smembers(t.folders)))
        found: list[dict[str, str]] = await self._run(
            lambda pipe: [pipe.hgetall(t.folder(i)) for i in ids]
        )
        folders = [
            FolderRecord(tenant, i, f.get("owner"), f["name"], float(f["created_at"]))
            for i, f in zip(ids, found, strict=True)
            if f and (not owner_set or f.get("owner") == owner)
        ]
        folders.sort(key=lambda f: (f.owner or "", f.name, f.id))
        return await self._counted(tenant, folders, now)

    @_hook
    async def delete_folder(
        self,
        tenant: str,
        folder_id: str,
        now: float,
        reassign_to: str | None,
        cascade: bool,
    ) -> int:
        t = self._tenant(tenant)
        keys = [t.folder(folder_id), t.folders, t.names, t.in_folder(folder_id)]
        keys.append(t.folder(reassign_to if reassign_to is not None else folder_id))
        reply = await self._eval(
            "delete_folder", keys, [folder_id, "0" if reassign_to is None else "1"]
        )
        if reply[0] == "missing":
            raise NotFound(f"no folder {folder_id!r}")
        if reply[0] == "target":
            raise NotFound(f"no folder {reassign_to!r} of owner {reply[1]!r}")
        members: list[str] = reply[1]
        args = [repr(now), folder_id, reassign_to or "", "1" if cascade else "0"]
        left: list[Any] = []
        for start in range(0, len(members), _BATCH):
            chunk = members[start : start + _BATCH]
            left += await self._run(
                functools.partial(self._queue_each, "leave_folder", tenant, chunk, args)
            )

        def queue(pipe: _Pipe) -> None:
            for sid, reply in zip(members, left, strict=True):
                if reply is None:
                    continue
                if reply[0] == "deleted":
                    self._unindex(pipe, t, sid, reply[2], folder_id, reply[3])
                    if self._options.cluster:
                        t.queue_tally(pipe, [(sid, "drop", _gone(reply[4], reply[5]))])
                    else:
                        self._queue_each("index_again", tenant, [sid], [], pipe)
                else:
                    _, _, created, owner, status = reply
                    pipe.zadd(t.in_folder(reassign_to), {sid: float(created)})
                    pipe.zadd(t.updated, {sid: now}, xx=True)
                    pipe.hset(t.entries, sid, _entry(owner, reassign_to, status))

        if any(reply is not None for reply in left):
            await self._run(queue)
        deleted = [
            sid for sid, reply in zip(members, left, strict=True) if reply and reply[0] == "deleted"
        ]
        for start in range(0, len(deleted), _BATCH):
            await self._index_again(tenant, deleted[start : start + _BATCH])
        return sum(reply[1] for reply in left if reply is not None)

    # --- expiry ------------------------------------------------------------------------

    @_hook
    async def purge_expired(
        self, tenant: str | None, now: float, limit: int
    ) -> list[tuple[str, str]]:
        # Candidates come from by-expiry, whose scores may lag: a session renewed since is
        # only moved up. A session Redis already dropped at its TTL counts as purged by
        # the one call whose clean-up of its entries removed them (HDEL or ZREM said 1),
        # so its expiry is announced once however many purgers run.
        if tenant is None:
            tenants = cast("list[str]", await self._redis.zrange(self._registry, 0, -1))
        else:
            tenants = [tenant]
        purged: list[tuple[str, str]] = []
        for name in tenants:
            t = self._tenant(name)
            while len(purged) < limit:
                due = cast(
                    "list[str]",
                    await self._redis.zrange(
                        t.expiry,
                        "-inf",
                        repr(now),
                        byscore=True,
                        offset=0,
                        num=min(limit - len(purged), _BATCH),
                    ),
                )
                if not due:
                    break
                *replies, entries = await self._run(
                    functools.partial(self._queue_purge, name, t, due, now)
                )
                purged += [
                    (name, sid)
                    for sid, reply in zip(due, replies, strict=True)
                    if reply[0] == "deleted"
                ]
                dropped: list[tuple[str, int]] = []
                done = await self._run(
                    functools.partial(self._queue_purged, t, due, replies, entries, dropped)
                )
                purged += [(name, sid) for sid, at in dropped if done[at] == 1]
        return purged

    def _queue_purge(
        self, tenant: str, t: _Tenant, due: list[str], now: float, pipe: _Pipe
    ) -> None:
        """The purge script for each candidate, and what the entries hash knows of them."""
        self._queue_each("purge", tenant, due, [repr(now)], pipe)
        pipe.hmget(t.entries, due)

    def _queue_purged(
        self,
        t: _Tenant,
        due: list[str],
        replies: list[Any],
        entries: list[str | None],
        dropped: list[tuple[str, int]],
        pipe: _Pipe,
    ) -> None:
        """Index changes after a purge: every entry of a deleted session goes (found through
        the entries hash if Redis dropped it first), and the by-expiry score of a session
        renewed since its entry was written moves up. ``dropped`` gets each session Redis
        dropped with the position of the reply that says whether this call cleared it."""
        went = [
            (sid, "drop", "" if reply[0] == "gone" else _gone(reply[4], reply[5]))
            for sid, reply in zip(due, replies, strict=True)
            if reply[0] != "live"
        ]
        if went and self._options.cluster:  # on one server the purge script counted them
            t.queue_tally(pipe, went)
        for sid, reply, entry in zip(due, replies, entries, strict=True):
            if reply[0] == "deleted":
                self._unindex(pipe, t, sid, reply[1], reply[2], reply[3])
            elif reply[0] == "gone" and entry is not None:
                dropped.append((sid, self._unindex(pipe, t, sid, *_from_entry(entry))))
            elif reply[0] == "gone":  # no record of where its entries are
                for key in (t.expiry, t.created, t.updated):
                    pipe.zrem(key, sid)
                dropped.append((sid, len(pipe) - 3))  # its ZREM from by-expiry
            elif not self._options.cluster:
                pass  # the purge script moved its by-expiry score itself
            elif reply[1] is None:
                pipe.zrem(t.expiry, sid)
            else:
                pipe.zadd(t.expiry, {sid: float(reply[1])}, xx=True)
        if went and not self._options.cluster:  # after the removals: of one created again
            self._queue_each("index_again", t.name, [sid for sid, _, _ in went], [], pipe)

    # --- check and doctor --------------------------------------------------------------

    @_hook
    async def check(self, tenant: str | None, now: float, repair: bool) -> CheckReport:
        names = (
            [tenant]
            if tenant is not None
            else cast("list[str]", await self._redis.zrange(self._registry, 0, -1))
        )
        report = CheckReport()
        for name in names:
            counted = await self._check_counted(name, repair, report)
            await self._check_entries(name, repair, report, counted)
            await self._check_created(name, repair, report)
            await self._check_orphans(name, repair, report)
            await self._check_tallies(name, repair, report)
            await self._check_counters(name, repair, report)
        return report

    async def _check_counted(self, tenant: str, repair: bool, report: CheckReport) -> bool:
        """Whether the tenant's counters count every session (not so for a tenant written
        before they existed, until its first stats or this repair counts them all)."""
        t = self._tenant(tenant)
        marked, size = await self._run(
            lambda pipe: [pipe.hexists(t.counters, "v"), pipe.zcard(t.created)]
        )
        if marked or not size:
            return True
        counted = repair and await self._count_all(tenant)
        report.found("totals", f"{tenant}/(not counted yet)", counted)
        return counted

    async def _check_figures(
        self, r: SessionRecord, tally: Tally, repair: bool, report: CheckReport
    ) -> None:
        """Whether the session's tally (what the counters count of it) holds its owner,
        status and what its messages add up to; repair counts it again."""
        count, input_tokens, output_tokens, cost, _, _ = tally
        expected = (_member_key(r.owner), r.status, count, input_tokens, output_tokens)
        tallies = self._tenant(r.tenant).tallies
        for attempt in (1, 2):
            stored = cast("str | None", await self._redis.hget(tallies, r.id))
            if stored is not None:
                _, _, owner, status, messages, tokens_in, tokens_out, counted = stored.split(_SEP)
                found = (owner, status, int(messages), int(tokens_in), int(tokens_out))
                # The two sums add the same costs, maybe in another order: a nano-unit apart.
                if found == expected and abs(_nano(counted) - _nano(repr(cost))) <= 1:
                    if attempt == 2:
                        report.found("totals", f"{r.tenant}/{r.id}", True)
                    return
            if attempt == 2 or not repair:
                break
            await self._recount(r.tenant, [r.id])
        report.found("totals", f"{r.tenant}/{r.id}")

    async def _check_tallies(self, tenant: str, repair: bool, report: CheckReport) -> None:
        """Tallies of sessions that are gone and that no index names (those it names are
        dangling entries, which purge or repair clear with their tallies)."""
        t = self._tenant(tenant)
        cursor = 0
        while True:
            cursor, found = await self._redis.hscan(t.tallies, cursor, count=_BATCH)
            ids = list(cast("dict[str, str]", found))
            records = await self._load(tenant, ids)
            gone = [sid for sid, r in zip(ids, records, strict=True) if r is None]
            known = await self._run(functools.partial(_queue_indexed, t, gone))
            for i, sid in enumerate(gone):
                if not known[2 * i] and known[2 * i + 1] is None:
                    if repair:
                        await self._recount(tenant, [sid])
                    report.found("totals", f"{tenant}/{sid}", repair)
            if not cursor:
                return

    async def _check_counters(self, tenant: str, repair: bool, report: CheckReport) -> None:
        """Counters that are not the sums of the tallies; repair sums them again (one script
        on the tenant's node, which reads every tally)."""
        t = self._tenant(tenant)
        wrong = cast(
            "list[str]",
            await self._eval("check_counters", [t.tallies, t.counters], ["1" if repair else "0"]),
        )
        for group in sorted(wrong):
            _, status, key = group.split(_SEP)
            owner = "(no owner)" if key == "-" else key[1:]
            report.found("totals", f"{tenant}/{owner}/{status}", repair)

    async def _check_entries(
        self, tenant: str, repair: bool, report: CheckReport, counted: bool
    ) -> None:
        """Every session the entries hash names: dangling entries, aggregates, folders."""
        t = self._tenant(tenant)
        cursor = 0
        while True:
            cursor, found = await self._redis.hscan(t.entries, cursor, count=_BATCH)
            batch = cast("dict[str, str]", found)
            ids = list(batch)
            records = await self._load(tenant, ids)
            for sid, record in zip(ids, records, strict=True):
                subject = f"{tenant}/{sid}"
                if record is None:
                    fixed = repair and await self._drop_dangling(tenant, sid, batch[sid])
                    report.found("dangling_index", subject, fixed)
                    continue
                await self._check_session(record, repair, report, counted)
            if not cursor:
                return

    async def _check_created(self, tenant: str, repair: bool, report: CheckReport) -> None:
        """Entries of by-created whose session is gone and that the entries hash lost."""
        t = self._tenant(tenant)
        cursor = 0
        while True:
            cursor, page = await self._redis.zscan(t.created, cursor, count=_BATCH)
            ids = [cast("str", sid) for sid, _ in page]
            records = await self._load(tenant, ids)
            gone = [sid for sid, r in zip(ids, records, strict=True) if r is None]
            known = await self._run(functools.partial(_queue_hexists, t.entries, gone))
            for sid, in_entries in zip(gone, known, strict=True):
                if not in_entries:
                    fixed = repair and await self._drop_dangling(tenant, sid, None)
                    report.found("dangling_index", f"{tenant}/{sid}", fixed)
            if not cursor:
                return

    async def _drop_dangling(self, tenant: str, session_id: str, entry: str | None) -> bool:
        """Remove a gone session's index entries; put them back if it came back meanwhile."""
        t = self._tenant(tenant)
        owner, folder, status = (None, None, "") if entry is None else _from_entry(entry)
        await self._run(lambda pipe: self._unindex(pipe, t, session_id, owner, folder, status))
        await self._recount(tenant, [session_id])  # counted no more, unless it came back
        [record] = await self._load(tenant, [session_id])
        if record is not None:
            await self._run(lambda pipe: _queue_adds(self._insert_adds(record, ""), pipe))
            return False
        return True

    async def _tally(self, session_id: str, msgs: str) -> Tally:
        """What a session's messages add up to, read a page at a time."""
        count = input_tokens = output_tokens = low = high = 0
        cost = 0.0
        start = 0
        while chunk := cast("list[str]", await self._redis.zrange(msgs, start, start + _BATCH - 1)):
            for member in chunk:
                m = _message(session_id, member)
                count += 1
                input_tokens += m.input_tokens
                output_tokens += m.output_tokens
                cost += m.cost
                low = low or m.seq
                high = m.seq
            start += len(chunk)
        return count, input_tokens, output_tokens, cost, low, high

    async def _check_session(
        self, r: SessionRecord, repair: bool, report: CheckReport, counted: bool
    ) -> None:
        subject = f"{r.tenant}/{r.id}"
        meta, _, msgs = self._session_keys(r.tenant, r.id)
        # The pages are read apart: count again if a write moved the version meanwhile.
        for _ in range(_CHECK_ATTEMPTS):
            tally = await self._tally(r.id, msgs)
            if await self._redis.hget(meta, "version") == str(r.version):
                break
            [found] = await self._load(r.tenant, [r.id])
            if found is None:
                return
            r = found
        else:
            return  # too busy to count now: the next check will
        count, input_tokens, output_tokens, cost, _, high = tally
        if has_gap(tally):
            report.found("seq_gaps", subject)
        stored = (r.message_count, r.input_tokens, r.output_tokens, r.cost, r.last_seq)
        if tally_differs(stored, tally):
            fixed = repair and bool(
                await self._redis.eval(
                    _FIX_AGGREGATES,
                    1,
                    meta,
                    str(r.version),
                    str(count),
                    str(input_tokens),
                    str(output_tokens),
                    repr(cost),
                    str(high),
                )
            )
            report.found("aggregates", subject, fixed)
            r.version += fixed
        if counted:
            await self._check_figures(r, tally, repair, report)
        t = self._tenant(r.tenant)
        if r.folder is not None and not await self._redis.exists(t.folder(r.folder)):
            fixed = repair and bool(await self._redis.eval(_FIX_FOLDER, 1, meta, str(r.version)))
            if fixed:
                entry = _entry(r.owner, None, r.status)

                def queue(pipe: _Pipe) -> None:
                    pipe.zrem(t.in_folder(r.folder), r.id)
                    pipe.zadd(t.in_folder(None), {r.id: r.created_at})
                    pipe.hset(t.entries, r.id, entry)

                await self._run(queue)
            report.found("missing_folder", subject, fixed)

    async def _check_orphans(self, tenant: str, repair: bool, report: CheckReport) -> None:
        """Message sets whose session's meta is gone (a scan of the tenant's keys)."""
        pattern = f"{self._options.prefix}{{{tenant}/*}}:msgs"
        async for key in self._redis.scan_iter(match=pattern, count=1000):
            meta, state = f"{key[:-5]}:meta", f"{key[:-5]}:state"
            if await self._redis.exists(meta):
                continue
            count = await self._redis.zcard(key)
            fixed = repair and bool(await self._redis.eval(_DROP_ORPHANS, 3, meta, key, state))
            session_id = key[key.index("/") + 1 : -6]
            report.found("orphan_messages", f"{tenant}/{session_id}", fixed, count)

    @_hook
    async def doctor(self, now: float) -> DoctorReport:
        client = self._redis
        nodes = client.get_primaries() if isinstance(client, RedisCluster) else [None]
        report = DoctorReport(engine=self.name, server_version="")
        versions, used, keys = set(), 0, 0
        for node in nodes:
            where = {} if node is None else {"target_nodes": node}
            info = await client.info("server", **where)
            memory = await client.info("memory", **where)
            versions.add(f"Redis {info['redis_version']}")
            used += int(memory["used_memory"])
            keys += int(await client.dbsize(**where))
            try:
                config = await client.config_get("*", **where)
            except ResponseError as exc:  # managed services often refuse CONFIG
                report.warnings.append(
                    f"the server's settings cannot be read ({exc}): check by hand that "
                    "maxmemory-policy is noeviction and appendonly is yes"
                )
                continue
            for name in ("appendonly", "appendfsync", "save", "maxmemory", "maxmemory-policy"):
                report.settings[name] = str(config.get(name, ""))
        report.server_version = ", ".join(sorted(versions))
        report.sizes["used_memory"] = used
        tenants = cast("list[str]", await client.zrange(self._registry, 0, -1))
        sessions = await self._run(
            lambda pipe: [pipe.zcard(self._tenant(name).created) for name in tenants]
        )
        folders = await self._run(
            lambda pipe: [pipe.scard(self._tenant(name).folders) for name in tenants]
        )
        report.counts = {
            "tenants": len(tenants),
            "sessions": sum(sessions),
            "folders": sum(folders),
            "keys_in_database": keys,
        }
        settings = report.settings
        policy = settings.get("maxmemory-policy")
        if policy is not None and policy not in _SAFE_POLICIES:
            report.warnings.append(
                f"maxmemory-policy is {policy}: when memory fills up Redis evicts keys, and "
                "here every key is part of a session; set maxmemory-policy noeviction"
            )
        if settings.get("appendonly") == "no":
            report.warnings.append(
                "appendonly is no: a restart loses every write since the last snapshot"
                + ("" if settings.get("save") else " (and snapshots are off: everything)")
                + "; set appendonly yes"
            )
        return report

    # --- transfer ----------------------------------------------------------------------

    @_hook
    async def list_tenants(self, now: float) -> list[str]:
        # The registry holds every tenant that ever had a session or a folder: keep those
        # that have a folder, or a live session among their by-created candidates.
        names = cast("list[str]", await self._redis.zrange(self._registry, 0, -1))
        folders: list[int] = await self._run(
            lambda pipe: [pipe.scard(self._tenant(name).folders) for name in names]
        )
        found = [name for name, count in zip(names, folders, strict=True) if count]
        for name in names:
            if name not in found and await self._has_live(name, now):
                found.append(name)
        return sorted(found)

    async def _has_live(self, tenant: str, now: float) -> bool:
        """Whether any session of ``tenant`` is live at ``now``."""
        created = self._tenant(tenant).created
        async with contextlib.aclosing(self._pages(created, "-inf", "+inf", False)) as pages:
            async for page in pages:
                records = await self._load(tenant, [sid for sid, _ in page])
                if any(r is not None and not rules.is_expired(r.expires_at, now) for r in records):
                    return True
        return False

    @_hook
    async def export_session(
        self, tenant: str, session_id: str, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]] | None:
        keys = self._session_keys(tenant, session_id)
        found = await self._eval("export", keys, [repr(now)])
        if found is None:
            return None
        fields, state, joined = found
        record = _record(tenant, session_id, _unpack(fields), state)
        return record, [_message(session_id, m) for m in joined.split(_RS)] if joined else []

    @_hook
    async def load_session(
        self, record: SessionRecord, messages: list[MessageRecord], now: float, replace: bool
    ) -> bool:
        r = record
        assert r.state is not None  # an exported session always has its state
        keys = self._counted_keys(r.tenant, r.id)
        try:
            await self._check_folder(r.tenant, r.folder, r.owner)
        except NotFound:
            # A live session that is kept comes first, as on the other engines.
            if not replace and await self._eval("get", keys, [repr(now), "0", "0"]) is not None:
                return False
            raise
        pairs: list[str] = []
        for name in _FIELDS:
            value = getattr(r, name)
            if value is not None:
                pairs += [name, _text(value)]
        expires = "" if r.expires_at is None else repr(r.expires_at)
        args = [repr(now), "1" if replace else "0", expires, r.state, str(len(pairs)), *pairs]
        for m in messages:
            text = _stored(
                m.role, m.content, m.input_tokens, m.output_tokens, m.cost, m.metadata, m.created_at
            )
            args += [str(m.seq), f"{m.seq}{_SEP}{text}"]
        # As insert_session: on Cluster NX keeps a kept session's entries, and the scores of
        # a session written over another are set once the script has replaced it.
        cluster = self._options.cluster
        adds = self._insert_adds(r, "NX" if cluster else "")
        stored = await self._write("load", keys, args, adds)
        if stored == 0:
            return False
        if cluster:
            await self._run(functools.partial(self._queue_stored, r, stored, "put"))
        return True

    # --- analytics -----------------------------------------------------------------------

    def _daily_key(self, tenant: str, day: int) -> str:
        month = _EPOCH + timedelta(days=day)
        return f"{self._tenant(tenant).tag}:daily:{month.year:04d}{month.month:02d}"

    @_hook
    async def add_daily(self, tenant: str, rows: list[DailyRecord], replace: bool = False) -> None:
        keys: dict[str, int] = {}
        args: list[str] = ["set" if replace else "add"]
        for row in rows:
            number = keys.setdefault(self._daily_key(tenant, row.day), len(keys) + 1)
            owner = row.owner or ""
            for name in DAILY_COUNTERS:
                value = getattr(row, name)
                if value or replace:
                    args += [str(number), _SEP.join((str(row.day), name, owner)), repr(value)]
        if len(args) > 1:
            await self._eval("add_daily", list(keys), args)

    @_hook
    async def read_daily(
        self,
        tenant: str,
        first: int,
        last: int,
        owner: str | None,
        owner_set: bool,
        group_by: str = "day",
    ) -> list[DailyRecord]:
        months = list(dict.fromkeys(self._daily_key(tenant, day) for day in range(first, last + 1)))
        hashes: list[dict[str, str]] = await self._run(
            lambda pipe: [pipe.hgetall(key) for key in months]
        )
        wanted = owner or ""
        rows: dict[tuple[int, str], DailyRecord] = {}
        for found in hashes:
            for field, value in found.items():
                day_text, name, who = field.split(_SEP, 2)
                day = int(day_text)
                if not first <= day <= last or (owner_set and who != wanted):
                    continue
                row = rows.get((day, who))
                if row is None:
                    row = rows[day, who] = DailyRecord(day, who or None)
                setattr(row, name, float(value) if name == "cost" else int(value))
        return list(rows.values())

    @_hook
    async def session_owners(self, tenant: str, session_ids: list[str]) -> dict[str, str | None]:
        metas = [self._meta(tenant, sid) for sid in session_ids]
        found: list[list[str | None]] = await self._run(
            lambda pipe: [pipe.hmget(meta, ["version", "owner"]) for meta in metas]
        )
        return {
            sid: owner or None
            for sid, (version, owner) in zip(session_ids, found, strict=True)
            if version is not None
        }

    @_hook
    async def load_folder(self, record: FolderRecord, replace: bool) -> bool:
        r = record
        t = self._tenant(r.tenant)
        args = [
            r.id,
            r.name,
            repr(r.created_at),
            r.owner or "",
            "0" if r.owner is None else "1",
            "1" if replace else "0",
        ]
        reply = await self._folder_script(
            "load_folder", r.tenant, [t.folder(r.id), t.folders, t.names], args
        )
        if reply == "name":
            raise AlreadyExists(f"owner {r.owner!r} already has a folder {r.name!r}")
        return bool(reply == "ok")

    # --- guards ------------------------------------------------------------------------

    def _guard_keys(self, tenant: str, key: str) -> list[str]:
        tag = self._tenant(tenant).tag
        return [f"{tag}:guard:{key}", f"{tag}:guards"]

    @_hook
    async def update_guard(self, tenant: str, key: str, update: GuardUpdate[T], now: float) -> T:
        keys = self._guard_keys(tenant, key)
        for _ in range(_GUARD_ATTEMPTS):
            reply = await self._redis.hmget(keys[0], ["v", "e"])
            stored, expires = cast("list[str | None]", reply)
            live = stored is not None and not rules.is_expired(_float(expires or None), now)
            value, expires_at, result = update(stored if live else None)
            if value is not None and rules.is_expired(expires_at, now):
                value = None
            args = [
                stored or "",
                "0" if stored is None else "1",
                value or "",
                "0" if value is None else "1",
                "" if expires_at is None else repr(expires_at),
                key,
            ]
            if await self._eval("guard_set", keys, args) == 1:
                return result
            await asyncio.sleep(0)  # another writer changed it first: read it again
        raise BackendUnavailable(
            f"redis: guard {key!r} kept changing under {_GUARD_ATTEMPTS} tries"
        )

    @_hook
    async def get_guard(self, tenant: str, key: str, now: float) -> str | None:
        reply = await self._redis.hmget(self._guard_keys(tenant, key)[0], ["v", "e"])
        stored, expires = cast("list[str | None]", reply)
        if stored is None or rules.is_expired(_float(expires or None), now):
            return None
        return stored

    @_hook
    async def list_guards(self, tenant: str, prefix: str, now: float) -> list[GuardRecord]:
        index = self._guard_keys(tenant, "")[1]
        members = cast(
            "list[str]",
            await self._redis.zrangebylex(index, f"[{prefix}", f"[{prefix}\U0010ffff"),
        )
        values = await self._run(
            lambda pipe: [pipe.hmget(self._guard_keys(tenant, m)[0], ["v", "e"]) for m in members]
        )
        found = []
        for member, (stored, expires) in zip(members, values, strict=True):
            expires_at = _float(expires or None)
            if stored is not None and not rules.is_expired(expires_at, now):
                found.append(GuardRecord(member, stored, expires_at))
        return found

    async def rate_hit(
        self, tenant: str, key: str, limit: int, window: float, cost: int, now: float
    ) -> tuple[bool, int, float, float]:
        if self._fallback is not None:
            return await self._fallback.rate_hit(tenant, key, limit, window, cost, now)
        self._check_usable()
        log = f"{self._tenant(tenant).tag}:log:{key}"
        args = [str(limit), repr(window), str(cost), repr(now)]
        if self._options.cluster:
            reply = await self._rate_hit_on_cluster(log, args)
        else:  # the hits of one turn share one script call, as appends do
            job = _Job(log, args, 1)
            self._hits.add(job)
            reply = await job.future
        text = cast("str", reply)
        if text.startswith("error "):
            raise self._unavailable(RuntimeError(text.removeprefix("error ")))
        admitted, count, retry_after, reset_after = text.split()
        return admitted == "1", int(count), float(retry_after), float(reset_after)

    @_hook
    async def _rate_hit_on_cluster(self, log: str, args: list[str]) -> Any:
        return await self._eval("rate_hit", [log], args)


def _version(expected_version: int | None) -> str:
    return "" if expected_version is None else str(expected_version)
