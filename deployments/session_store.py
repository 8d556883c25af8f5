"""Durable session state over the Redis protocol (DESIGN.md §3): what must survive the ingress.

One implementation for every deployment: the embedded `valkey-server` (deployments/embedded_store.py), a
local `redis-server`, or an external Redis (`redis://`, `rediss://` with TLS, passwords via the URL), all
through `redis.asyncio` with a `BlockingConnectionPool` (a plain `max_connections` pool raises
`MaxConnectionsError` under many concurrent coroutines instead of waiting; see the reference notes §6.1).

Key layout (namespace `ns`, default "qwen3stream"; the `{sid}` hash tag keeps a session's keys in one
Cluster slot so one Lua script may touch them all):

| key                    | type   | TTL                  | content                                                        |
|------------------------|--------|----------------------|----------------------------------------------------------------|
| `ns:{sid}:meta`        | HASH   | ttl_s, every write   | `config` (StreamConfig bytes / options, opaque), `token` (sha256 hex of the resume token), `created_ms` |
| `ns:{sid}:state`       | HASH   | ttl_s, every write   | `segment_index`, `sample_offset`, `emitted_words`, `checkpoint` (absent before the first roll) |
| `ns:{sid}:words`       | LIST   | ttl_s, every write   | committed word texts (UTF-8), appended at rolls (absent while empty) |
| `ns:{sid}:fence`       | STRING | ttl_s, every write   | fencing counter: 1 at create, +1 at every resume               |
| `ns:{sid}:lease`       | STRING | lease_ms (PX)        | `owner:fence` of the connection that holds the stream          |

Every key has a TTL, refreshed by every write (create, resume, save_roll, renew, release); a session
whose client never comes back disappears after `ttl_s` of silence.

Ownership: the fence is the truth. `create` sets it to 1, `resume` increments it, and every write
(`save_roll`, `renew`, `finish`) runs in one Lua script that first checks that the caller's fence is
still the current one (and that the session is the same incarnation: its token hash matches), else
raises `StaleOwner`. A reconnecting client takes the session over at once, even while the old owner's
lease is still alive: the old owner's next write is refused. The lease key only says who is serving
the stream right now (and until when); it does not gate writes.

`finish` deletes the session's keys (a normally ended stream cannot be resumed, and nothing lingers);
`release` (connection dropped) deletes only the lease and refreshes the other keys' TTLs, so the client
has a full `ttl_s` from the drop to come back.

Round trips: create 1, save_roll 1, renew 1, release 1, finish 1, resume 2 (read the token hash,
compare in Python, then one takeover script that also returns the durable state). The first call of
each script on a server that does not have it cached costs 2 more (EVALSHA -> NOSCRIPT -> SCRIPT LOAD
-> EVALSHA); `connect` preloads all scripts in one pipeline, so that happens only after a server
restart. `SessionStore.round_trips` counts every command / script / pipeline sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "DurableState",
    "Lease",
    "SessionExists",
    "SessionStore",
    "StaleOwner",
    "StoreUnavailable",
    "redact_url",
]


class StaleOwner(RuntimeError):
    """The caller's lease was fenced out by a newer connection, or the session is gone (expired, finished)."""


class StoreUnavailable(RuntimeError):
    """The Redis server cannot be reached (connection refused, timeout, pool exhausted)."""


class SessionExists(ValueError):
    """`create` with a session id that already has durable state."""


@dataclass
class Lease:
    """Proof of ownership of a session for one connection; pass it to every write."""

    session_id: str
    owner: str
    fence: int
    resume_token: str | None = None  # only on `create`: hand it to the client, it is stored only as a hash
    # The session incarnation (sha256 of the resume token): a session finished and re-created under the
    # same id starts again at fence 1, and must not accept the old incarnation's writes.
    token_hash: str = field(default="", repr=False)
    # How many committed words this lease's session already has in the store (save_roll appends the rest).
    words_stored: int = field(default=0, repr=False)


@dataclass
class DurableState:
    """What survives the ingress: the last segment boundary of a stream.

    `checkpoint` is `StreamingSession.checkpoint()` at a roll (None before the first roll);
    `sample_offset` is the stream sample at that boundary (`checkpoint_offset(checkpoint)`): a resumed
    client replays audio from there. `committed_words` is the full list of committed word texts so far
    (save_roll sends only the words past those already stored). `config` is read-only after `create`
    (save_roll ignores it)."""

    checkpoint: bytes | None
    segment_index: int
    sample_offset: int
    emitted_words: int
    committed_words: list[str] = field(default_factory=list)
    config: bytes = b""


def redact_url(url: str) -> str:
    """`url` with its password (and a bare-token username) replaced by '***'."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None and not parts.username:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    userinfo = f"{user}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A fixed hash to compare against for unknown sessions, so they cost the same as a wrong token.
_DUMMY_HASH = _hash_token("qwen3stream: no such session")


# --------------------------------------------------------------------------------------------- Lua
# Common shape: KEYS = meta, state, words, fence, lease (in that order). Scripts that check ownership take
# ARGV[1] = fence, ARGV[2] = token hash and return {status, current_fence} with status 'ok' | 'stale' |
# 'gone' ('gone': no fence key, or another incarnation under the same id).

_CHECK = """
local cur = redis.call('GET', KEYS[4])
if not cur then return {'gone', 0} end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return {'gone', 0} end
if tonumber(cur) ~= tonumber(ARGV[1]) then return {'stale', tonumber(cur)} end
"""

_TOUCH = """
local function touch(ttl)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
"""

# create: ARGV = token_hash, config, owner, ttl_ms, lease_ms, now_ms.
# Fails ({'exists', fence}) if the session exists; succeeds idempotently if it exists with the same token
# hash (a retried create whose first reply was lost).
_CREATE = (
    _TOUCH
    + """
local existing = redis.call('HGET', KEYS[1], 'token')
if existing or redis.call('EXISTS', KEYS[4]) == 1 then
  local cur = tonumber(redis.call('GET', KEYS[4]) or '0')
  if existing == ARGV[1] then return {'ok', cur} end
  return {'exists', cur}
end
redis.call('HSET', KEYS[1], 'config', ARGV[2], 'token', ARGV[1], 'created_ms', ARGV[6])
redis.call('HSET', KEYS[2], 'segment_index', 0, 'sample_offset', 0, 'emitted_words', 0)
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[4], 1)
redis.call('SET', KEYS[5], ARGV[3] .. ':1', 'PX', ARGV[5])
touch(ARGV[4])
return {'ok', 1}
"""
)

# takeover (the second half of resume): ARGV = token_hash, owner, ttl_ms, lease_ms.
# Re-checks the token hash (the session may have expired or been re-created since the read), INCRs the
# fence, sets the lease, refreshes the TTLs and returns the durable state in the same atomic step:
# {'ok', fence, config, segment_index, sample_offset, emitted_words, checkpoint|false, words...}.
_TAKEOVER = (
    _TOUCH
    + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('EXISTS', KEYS[4]) == 0 then
  return {'gone'}
end
local fence = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[5], ARGV[2] .. ':' .. fence, 'PX', ARGV[4])
touch(ARGV[3])
local st = redis.call('HMGET', KEYS[2], 'segment_index', 'sample_offset', 'emitted_words', 'checkpoint')
local out = {'ok', fence, redis.call('HGET', KEYS[1], 'config'), st[1] or '0', st[2] or '0', st[3] or '0', st[4]}
local words = redis.call('LRANGE', KEYS[3], 0, -1)
for i = 1, #words do out[#out + 1] = words[i] end
return out
"""
)

# save_roll: ARGV = fence, token_hash, owner, ttl_ms, lease_ms, segment_index, sample_offset, emitted_words,
# has_checkpoint ('1'|'0'), checkpoint, words_base, new words...
# Trims the word list to words_base first (a retried save_roll whose first reply was lost appended once
# already), then appends; returns {'ok', fence, list length}.
_SAVE_ROLL = (
    _TOUCH
    + _CHECK
    + """
redis.call('HSET', KEYS[2], 'segment_index', ARGV[6], 'sample_offset', ARGV[7], 'emitted_words', ARGV[8])
if ARGV[9] == '1' then redis.call('HSET', KEYS[2], 'checkpoint', ARGV[10]) end
local base = tonumber(ARGV[11])
local have = redis.call('LLEN', KEYS[3])
if have > base then
  if base == 0 then redis.call('DEL', KEYS[3]) else redis.call('LTRIM', KEYS[3], 0, base - 1) end
elseif have < base then
  return {'gone', 0}
end
if #ARGV > 11 then redis.call('RPUSH', KEYS[3], unpack(ARGV, 12)) end
redis.call('SET', KEYS[5], ARGV[3] .. ':' .. ARGV[1], 'PX', ARGV[5])
touch(ARGV[4])
return {'ok', tonumber(ARGV[1]), redis.call('LLEN', KEYS[3])}
"""
)

# renew: ARGV = fence, token_hash, owner, ttl_ms, lease_ms. Re-sets the lease (also after it lapsed, as
# long as nobody took over) and refreshes the TTLs.
_RENEW = (
    _TOUCH
    + _CHECK
    + """
redis.call('SET', KEYS[5], ARGV[3] .. ':' .. ARGV[1], 'PX', ARGV[5])
touch(ARGV[4])
return {'ok', tonumber(ARGV[1])}
"""
)

# release: ARGV = owner:fence, ttl_ms. Deletes the lease only if it still holds that value, and then
# refreshes the TTLs of the other keys (the client gets a full ttl_s from the drop to resume).
# A fenced-out owner's release changes nothing. Returns 1 if it released, 0 if not.
_RELEASE = (
    _TOUCH
    + """
if redis.call('GET', KEYS[5]) == ARGV[1] then
  redis.call('DEL', KEYS[5])
  touch(ARGV[2])
  return 1
end
return 0
"""
)

# finish: ARGV = fence, token_hash. Deletes all of the session's keys if the caller is the current owner.
# finish: ARGV = fence, token_hash, keep_ms. keep_ms 0 deletes every key; otherwise the lease goes and the
# other keys expire after keep_ms (a client whose drop looked like an end can still resume meanwhile).
_FINISH = (
    _TOUCH
    + _CHECK
    + """
if tonumber(ARGV[3]) > 0 then
  redis.call('DEL', KEYS[5])
  touch(ARGV[3])
else
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
end
return {'ok', tonumber(ARGV[1])}
"""
)


class _CountingRedis(aioredis.Redis):
    """`redis.asyncio.Redis` that counts the commands it sends (each one is a round trip; script calls
    go through here too, including the NOSCRIPT -> SCRIPT LOAD -> EVALSHA fallback)."""

    round_trips: int = 0

    async def execute_command(self, *args, **options):
        self.round_trips += 1
        return await super().execute_command(*args, **options)


class SessionStore:
    """Durable per-session state and ownership; see the module docstring for keys and contracts."""

    def __init__(self, client: _CountingRedis, url: str, namespace: str, ttl_s: float, lease_ms: int):
        self._redis = client
        self._url = redact_url(url)
        self.namespace = namespace
        self.ttl_ms = max(1, int(round(ttl_s * 1000)))
        self.lease_ms = int(lease_ms)
        self._extra_round_trips = 0
        self._create = client.register_script(_CREATE)
        self._takeover = client.register_script(_TAKEOVER)
        self._save_roll = client.register_script(_SAVE_ROLL)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._finish = client.register_script(_FINISH)
        self._scripts = (self._create, self._takeover, self._save_roll, self._renew, self._release, self._finish)

    # ------------------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(
        cls,
        url: str,
        namespace: str = "qwen3stream",
        ttl_s: float = 3600,
        lease_ms: int = 15000,
        *,
        max_connections: int = 64,
        pool_timeout_s: float = 10.0,
        socket_timeout_s: float = 5.0,
        retries: int = 2,
    ) -> "SessionStore":
        """Connect (PING) and preload the scripts. `url` follows redis-py's `from_url`: `redis://[user:pass@]host:port/db`,
        `rediss://` for TLS (`?ssl_cert_reqs=...&ssl_ca_certs=...`), `unix://path`. Raises StoreUnavailable."""
        if not namespace or any(ch in namespace for ch in "{}"):
            raise ValueError(f"namespace {namespace!r} must be non-empty and contain no braces (hash tags)")
        if ttl_s <= 0 or lease_ms <= 0:
            raise ValueError(f"ttl_s ({ttl_s}) and lease_ms ({lease_ms}) must be positive")
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=pool_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                socket_timeout=socket_timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
                # A pooled connection idle this long is checked before use: after a server restart the pool
                # holds dead sockets, and a stream's write must not be the one that finds out.
                health_check_interval=1.0,
                decode_responses=False,
            )
        except ValueError as exc:
            raise ValueError(f"bad Redis URL {redact_url(url)}: {exc}") from None
        store = cls(_CountingRedis(connection_pool=pool), url, namespace, ttl_s, lease_ms)
        try:
            async with store._call():
                await store._redis.ping()
                pipe = store._redis.pipeline(transaction=False)
                for script in store._scripts:
                    pipe.script_load(script.script)
                store._extra_round_trips += 1
                await pipe.execute()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    async def __aenter__(self) -> "SessionStore":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def round_trips(self) -> int:
        """Commands, scripts and pipelines sent to the server so far."""
        return self._redis.round_trips + self._extra_round_trips

    # ------------------------------------------------------------------------------ helpers

    def keys(self, session_id: str) -> list[str]:
        """meta, state, words, fence, lease (the order the scripts expect)."""
        if not session_id or any(ch in session_id for ch in "{}"):
            raise ValueError(f"session id {session_id!r} must be non-empty and contain no braces")
        base = f"{self.namespace}:{{{session_id}}}:"
        return [base + name for name in ("meta", "state", "words", "fence", "lease")]

    def _call(self):
        return _Unavailable(self._url)

    def _check(self, reply, lease: Lease) -> None:
        status = _s(reply[0])
        if status == "ok":
            return
        if status == "stale":
            raise StaleOwner(
                f"session {lease.session_id} is owned by a newer connection (fence {int(reply[1])} > {lease.fence})"
            )
        raise StaleOwner(f"session {lease.session_id} is gone (expired, finished or re-created); fence {lease.fence} is void")

    # ------------------------------------------------------------------------------ API

    async def create(self, session_id: str, owner: str, config: bytes) -> Lease:
        """A new session owned by `owner` at fence 1; the Lease carries the resume token (only here).
        Raises SessionExists if the id is taken."""
        token = secrets.token_urlsafe(32)  # 256 random bits
        token_hash = _hash_token(token)
        async with self._call():
            reply = await self._create(
                keys=self.keys(session_id),
                args=[token_hash, bytes(config), owner, self.ttl_ms, self.lease_ms, int(time.time() * 1000)],
            )
        if _s(reply[0]) != "ok":
            raise SessionExists(f"session {session_id} already exists (fence {int(reply[1])})")
        return Lease(session_id, owner, int(reply[1]), resume_token=token, token_hash=token_hash)

    async def resume(self, session_id: str, resume_token: str, owner: str) -> tuple[Lease, DurableState] | None:
        """Take the session over for `owner` with a new fence (the previous owner is fenced out at once).
        None for an unknown session and for a wrong token alike."""
        keys = self.keys(session_id)
        async with self._call():
            stored = await self._redis.hget(keys[0], "token")
        offered = _hash_token(resume_token)
        if stored is None:
            hmac.compare_digest(offered.encode(), _DUMMY_HASH.encode())
            return None
        if not hmac.compare_digest(offered.encode(), stored):
            return None
        async with self._call():
            reply = await self._takeover(keys=keys, args=[offered, owner, self.ttl_ms, self.lease_ms])
        if _s(reply[0]) != "ok":
            return None  # expired (or re-created) between the two round trips
        fence, config, seg, offset, emitted, checkpoint = reply[1:7]
        words = [w.decode() for w in reply[7:]]
        state = DurableState(
            checkpoint=checkpoint if checkpoint else None,  # Lua false -> None
            segment_index=int(seg),
            sample_offset=int(offset),
            emitted_words=int(emitted),
            committed_words=words,
            config=config or b"",
        )
        lease = Lease(session_id, owner, int(fence), token_hash=offered, words_stored=len(words))
        return lease, state

    async def save_roll(self, lease: Lease, state: DurableState) -> None:
        """Record a segment boundary atomically, if `lease` is still the current owner (else StaleOwner)."""
        words = state.committed_words
        if len(words) < lease.words_stored:
            raise ValueError(
                f"committed_words has {len(words)} words but {lease.words_stored} are stored already; "
                "pass the full list of committed words"
            )
        new = [w.encode() for w in words[lease.words_stored :]]
        args = [
            lease.fence, lease.token_hash, lease.owner, self.ttl_ms, self.lease_ms,
            int(state.segment_index), int(state.sample_offset), int(state.emitted_words),
            "1" if state.checkpoint is not None else "0", state.checkpoint or b"",
            lease.words_stored, *new,
        ]  # fmt: skip
        async with self._call():
            reply = await self._save_roll(keys=self.keys(lease.session_id), args=args)
        self._check(reply, lease)
        lease.words_stored = int(reply[2])

    async def renew(self, lease: Lease) -> None:
        """Extend the lease and every key's TTL; StaleOwner if fenced out or gone."""
        async with self._call():
            reply = await self._renew(
                keys=self.keys(lease.session_id),
                args=[lease.fence, lease.token_hash, lease.owner, self.ttl_ms, self.lease_ms],
            )
        self._check(reply, lease)

    async def finish(self, lease: Lease, keep_s: float = 0.0) -> None:
        """The stream ended normally: delete the session's keys, or (`keep_s` > 0) let them expire after `keep_s`
        (still resumable meanwhile). StaleOwner if fenced out."""
        keep_ms = max(0, int(round(keep_s * 1000)))
        async with self._call():
            reply = await self._finish(keys=self.keys(lease.session_id), args=[lease.fence, lease.token_hash, keep_ms])
        self._check(reply, lease)

    async def release(self, lease: Lease) -> bool:
        """The connection dropped: drop the lease (if still ours) and keep the state for a resume within ttl_s.
        Returns whether the lease was ours; never raises StaleOwner."""
        async with self._call():
            released = await self._release(
                keys=self.keys(lease.session_id), args=[f"{lease.owner}:{lease.fence}", self.ttl_ms]
            )
        return bool(released)

    async def count_keys(self) -> int:
        """Keys under the namespace (SCAN; for tests and soak runs, not the hot path)."""
        n = 0
        async with self._call():
            async for _ in self._redis.scan_iter(match=f"{self.namespace}:*", count=1000):
                n += 1
        return n


class _Unavailable:
    """Turns redis-py connection errors and timeouts into a one-line StoreUnavailable naming the redacted URL."""

    def __init__(self, url: str):
        self.url = url

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError)):
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise StoreUnavailable(f"session store at {self.url} unavailable: {detail}") from exc
        return False


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
