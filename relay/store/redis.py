"""Rate buckets and dedupe shared through Redis, with a per-process fallback.

Every process and host that points ``store.redis_url`` at one Redis enforces
one limit and one dedupe window together (docs/contract.md §8):

- a bucket check is one Lua script, run atomically by Redis: no
  read-modify-write race between processes, and Redis's own clock (``TIME``)
  is the clock, so hosts whose clocks disagree still share one bucket;
- dedupe is ``SET key 1 NX PX ttl``: exactly one caller sees it first;
- a record (:meth:`RedisStore.put`) is ``SET key value PX ttl``, and a copy
  is kept in this process's memory, so what was written here is found here
  through a later outage too;
- a lease (a concurrent slot, e.g. a session of one client token) is a member
  of a sorted set scored by its expiry, taken by one Lua script (drop expired
  members, count, add) and refreshed by :meth:`RedisStore.run` while held, so
  the slots of a process that died free themselves within :data:`LEASE_TTL`;
- every key starts with ``relay:`` and expires (a bucket once it would be
  full again, a dedupe key after its window), so Redis memory stays bounded
  by the keys that are really live.

No request waits on Redis longer than :data:`CALL_TIMEOUT`: a call that fails
or times out is answered by a per-process :class:`MemoryStore` instead. A
failed connection (or a health probe that gets no answer within
:data:`PROBE_TIMEOUT`) turns the store *degraded*: later calls go straight to
memory, one warning is logged, ``relay_store_degraded`` reads 1, and
:meth:`RedisStore.run` probes Redis with backoff until it answers again (one
info line, shared limits again). Sessions never touch the store after their
upgrade, so an outage cannot affect them.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

import coredis
import trio
from coredis.commands.script import Script
from coredis.tokens import PureToken

from relay.store.base import ALLOWED, Lease, Verdict
from relay.store.memory import MemoryStore

log = logging.getLogger("relay.store")

PREFIX = "relay:"
# The longest a request waits on Redis. A local or same-zone Redis answers in
# well under a millisecond; 200 ms means it is down, blackholed or swamped.
CALL_TIMEOUT = 0.2
# The health probe is off the request path, so it may wait longer: a Redis
# that just came back may take a moment to accept and handshake.
PROBE_TIMEOUT = 1.0
# While Redis answers, probe it this often so /metrics tells the truth even
# when no request has come along to find out.
HEALTH_INTERVAL = 5.0
# While it does not: first retry soon, then back off, but never wait so long
# that recovery goes unnoticed for more than a few seconds.
RETRY_MIN = 0.5
RETRY_MAX = 5.0
# A lease nobody refreshes (its process died or lost Redis) lapses this long
# after its last refresh; run() refreshes the held ones every third of it.
LEASE_TTL = 30.0
# Leases refreshed per script call: bounds the time one call holds Redis.
REFRESH_BATCH = 500
# Leases whose acquire failed midway, remembered for a best-effort ZREM; past
# this many (a long stretch of failures) the rest just lapse with their TTL.
MAX_ORPHANS = 1000

# KEYS[1] the bucket; ARGV[1] capacity; ARGV[2] window in ms.
# Returns {1, "0.000"} when a token was taken, else {0, "<ms until one is free>"}.
# The wait is returned as a string: Redis turns a Lua number reply into an integer.
# HSET arguments keep full precision (Redis formats Lua numbers with %.17g).
TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = capacity / tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
else
  -- max(0, ...): after a failover the new primary's clock may be behind.
  tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
end
local allowed, wait = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'stamp', now)
-- A bucket that would be full again is the same as no bucket: let it go then.
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((capacity - tokens) / rate)))
return {allowed, string.format('%.3f', wait)}
"""

# KEYS[1] the lease set; ARGV[1] limit; ARGV[2] holder; ARGV[3] ttl in ms.
# Members are holders scored by when they lapse (Redis's clock, ms).
ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# KEYS the lease sets; ARGV[1] ttl in ms, ARGV[i + 1] the holder in KEYS[i].
# A lease that lapsed meanwhile (Redis was away) is put back: it is still held.
REFRESH = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


class RedisStore:
    """The shared store. Answers every call, from Redis when it can, else from memory.

    :meth:`run` must be running (in the server's root nursery) for Redis to be
    used at all: it holds coredis's connection pool, whose connection tasks
    live in it, and it watches Redis's health. Until it has started, and
    whenever Redis is unreachable, the store is :attr:`degraded`.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = PREFIX,
        call_timeout: float = CALL_TIMEOUT,
        probe_timeout: float = PROBE_TIMEOUT,
        health_interval: float = HEALTH_INTERVAL,
        retry_min: float = RETRY_MIN,
        retry_max: float = RETRY_MAX,
        lease_ttl: float = LEASE_TTL,
        fallback: MemoryStore | None = None,
    ) -> None:
        self.where = redis_location(url)
        self._url = url
        self._prefix = prefix
        self._call_timeout = call_timeout
        self._probe_timeout = probe_timeout
        self._health_interval = health_interval
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._lease_ms = max(1, math.ceil(lease_ttl * 1000))
        self._fallback = fallback if fallback is not None else MemoryStore()
        self._up = False
        self._down_since: float | None = None
        # Set by a call that found Redis gone or slow, so the watcher probes
        # (or starts retrying) now rather than at its next periodic probe.
        self._check_now = trio.Event()
        self._tls = tls_context(url) if urlsplit(url).scheme == "rediss" else None
        # This process's name in lease sets, and its shared leases (holder -> lease).
        self._me = secrets.token_hex(8)
        self._serial = 0
        self._held: dict[str, Lease] = {}
        # Leases whose acquire failed midway: maybe taken in Redis, never used.
        self._orphans: list[Lease] = []
        self._new_client()

    def _new_client(self) -> None:
        # coredis's default is no retries, as wanted: a failed call falls back
        # to memory at once instead of trying again on the request's time.
        tls: dict[str, Any] = {} if self._tls is None else {"ssl_context": self._tls}
        client = coredis.Redis.from_url(self._url, connect_timeout=self._probe_timeout, **tls)
        self._client: coredis.Redis[bytes] = client
        self._bucket: Script[bytes] = client.register_script(TOKEN_BUCKET)
        self._acquire: Script[bytes] = client.register_script(ACQUIRE)
        self._refresh: Script[bytes] = client.register_script(REFRESH)

    # -- the Store interface ---------------------------------------------------
    @property
    def degraded(self) -> bool:
        return not self._up

    async def take(self, key: str, capacity: int, window_seconds: float) -> Verdict:
        if self._up:
            try:
                with trio.fail_after(self._call_timeout):
                    reply: Any = await self._bucket(
                        keys=[self._prefix + key],
                        args=[capacity, max(1, math.ceil(window_seconds * 1000))],
                    )
                return _verdict(reply)
            except Exception as exc:  # whatever went wrong, the request must not fail
                self._failed(exc)
        return await self._fallback.take(key, capacity, window_seconds)

    async def first_seen(self, key: str, ttl_seconds: float) -> bool:
        # Seen here during an outage: Redis never heard of it, but it is a repeat.
        if self._up and not self._fallback.remembers(key):
            try:
                with trio.fail_after(self._call_timeout):
                    return bool(
                        await self._client.set(
                            self._prefix + key,
                            b"1",
                            condition=PureToken.NX,
                            px=max(1, math.ceil(ttl_seconds * 1000)),
                        )
                    )
            except Exception as exc:  # whatever went wrong, the request must not fail
                self._failed(exc)
        return await self._fallback.first_seen(key, ttl_seconds)

    async def put(self, key: str, value: str, ttl_seconds: float) -> None:
        # The local copy first: whatever Redis does, this process will find it.
        await self._fallback.put(key, value, ttl_seconds)
        if self._up:
            try:
                with trio.fail_after(self._call_timeout):
                    await self._client.set(
                        self._prefix + key,
                        value.encode(),
                        px=max(1, math.ceil(ttl_seconds * 1000)),
                    )
            except Exception as exc:  # whatever went wrong, the request must not fail
                self._failed(exc)

    async def get(self, key: str) -> str | None:
        if self._up:
            try:
                with trio.fail_after(self._call_timeout):
                    raw: Any = await self._client.get(self._prefix + key)
                if isinstance(raw, bytes):
                    return raw.decode("utf-8", "replace")
            except Exception as exc:  # whatever went wrong, the request must not fail
                self._failed(exc)
        # Not in Redis (written here during an outage), or Redis is away.
        return await self._fallback.get(key)

    async def acquire(self, key: str, limit: int) -> Lease | None:
        if self._up:
            self._serial += 1
            lease = Lease(key, f"{self._me}:{self._serial}", shared=True)
            try:
                with trio.fail_after(self._call_timeout):
                    taken: Any = await self._acquire(
                        keys=[self._prefix + key], args=[limit, lease.holder, self._lease_ms]
                    )
                if taken != 1:
                    return None
                self._held[lease.holder] = lease
                return lease
            except Exception as exc:  # whatever went wrong, the request must not fail
                # The script may have run all the same: that slot is given back
                # (or lapses) off the request path.
                if len(self._orphans) < MAX_ORPHANS:
                    self._orphans.append(lease)
                self._failed(exc)
        return await self._fallback.acquire(key, limit)

    async def release(self, lease: Lease) -> None:
        if not lease.shared:
            await self._fallback.release(lease)
            return
        if self._held.pop(lease.holder, None) is None:
            return
        # Released on a session's way out, often inside a cancelled scope (a
        # drain): shielded, but bounded. If Redis cannot take it now, the lease
        # is no longer refreshed and lapses within the lease TTL.
        with trio.CancelScope(shield=True), trio.move_on_after(self._call_timeout):
            try:
                await self._client.zrem(self._prefix + lease.key, [lease.holder])
            except Exception as exc:
                self._failed(exc)

    async def _refresh_leases(self) -> None:
        """Keep this process's shared leases alive while they are held; drop orphans."""
        while True:
            await trio.sleep(self._lease_ms / 3000)
            if not self._up:
                continue
            while self._orphans:
                orphan = self._orphans.pop()
                try:
                    with trio.fail_after(self._probe_timeout):
                        await self._client.zrem(self._prefix + orphan.key, [orphan.holder])
                except Exception:
                    break  # it lapses by itself within the lease TTL
            held = list(self._held.values())
            for start in range(0, len(held), REFRESH_BATCH):
                batch = held[start : start + REFRESH_BATCH]
                try:
                    with trio.fail_after(self._probe_timeout):
                        await self._refresh(
                            keys=[self._prefix + lease.key for lease in batch],
                            args=[self._lease_ms, *(lease.holder for lease in batch)],
                        )
                except Exception as exc:
                    self._failed(exc)
                    break

    def prune(self) -> int:
        """Redis expires its own keys; only the fallback's need pruning."""
        return self._fallback.prune()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connection pool, prune the fallback, watch Redis; never returns.

        ``started()`` comes after the first probe (at most ``probe_timeout``),
        connected or not: an unreachable Redis never holds up the server.
        """
        # The store logs each outage once, with its cause. coredis would log a
        # traceback for every failed connection attempt, i.e. every probe.
        logging.getLogger("coredis").setLevel(logging.CRITICAL)
        started = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fallback.run)
            while True:
                try:
                    async with self._client:
                        if not started:
                            await self._first_probe()
                            task_status.started()
                            started = True
                        async with trio.open_nursery() as inner:
                            inner.start_soon(self._refresh_leases)
                            await self._watch()
                except Exception:
                    # coredis runs its connections as tasks under this one: an
                    # error escaping them (a bug) lands here, and must not end
                    # the server and every call in progress. Start afresh.
                    self._up = False
                    self._down_since = trio.current_time()
                    log.exception(
                        "redis client for %s failed: rate limits and dedupe are per process "
                        "until a new one connects",
                        self.where,
                    )
                    if not started:
                        task_status.started()
                        started = True
                    await trio.sleep(self._retry_max)
                    self._new_client()

    async def _first_probe(self) -> None:
        error = await self._probe()
        if error is None:
            self._came_up(first=True)
            return
        self._down_since = trio.current_time()
        log.warning(
            "redis at %s is unreachable (%s): rate limits and dedupe are per process "
            "until it answers again",
            self.where,
            error,
        )

    # -- health ----------------------------------------------------------------
    async def _watch(self) -> None:
        backoff = self._retry_min
        while True:
            if self._up:
                with trio.move_on_after(self._health_interval):
                    await self._check_now.wait()
                self._check_now = trio.Event()
                if self._up:
                    error = await self._probe()
                    if error is not None:
                        self._went_down(error)
                    else:
                        # A burst of slow calls asks for a probe each; one per
                        # retry_min is plenty.
                        await trio.sleep(self._retry_min)
                backoff = self._retry_min
            else:
                await trio.sleep(backoff)
                if await self._probe() is None:
                    self._came_up(first=False)
                else:
                    backoff = min(2 * backoff, self._retry_max)

    async def _probe(self) -> str | None:
        """None when Redis accepts a write now, else why not.

        A write, not a PING: a Redis that answers but refuses writes (out of
        memory, a read-only replica after a failover) cannot hold buckets.
        """
        try:
            with trio.fail_after(self._probe_timeout):
                await self._client.set(self._prefix + "probe", b"1", px=60_000)
        except trio.TooSlowError as exc:
            # A connection whose peer vanished without a reset (a partition, a
            # host gone) stays "open" until TCP gives up, many minutes later.
            # Drop it, so the next probe dials afresh and sees Redis come back.
            self._client.connection_pool.disconnect()
            return _describe(exc)
        except Exception as exc:
            return _describe(exc)
        return None

    def _failed(self, exc: Exception) -> None:
        """A call could not use Redis; it was answered from memory instead.

        A refused or lost connection (or an error reply) is an outage. A slow
        answer is not proof of one: the timer also runs while this process's
        own tasks hold the CPU, and declaring an outage for every busy moment
        would flap. So it only asks the watcher for a probe now, whose longer
        timeout decides.
        """
        if isinstance(exc, trio.TooSlowError):
            self._check_now.set()
        else:
            self._went_down(exc)

    def _went_down(self, exc: BaseException | str) -> None:
        if not self._up:
            return
        self._up = False
        self._down_since = trio.current_time()
        self._check_now.set()
        reason = exc if isinstance(exc, str) else _describe(exc)
        log.warning(
            "redis at %s is unreachable (%s): rate limits and dedupe are per process "
            "until it answers again",
            self.where,
            reason,
        )

    def _came_up(self, *, first: bool) -> None:
        self._up = True
        self._check_now = trio.Event()
        if first or self._down_since is None:
            log.info("rate limits and dedupe are shared through redis at %s", self.where)
        else:
            log.info(
                "redis at %s is back after %.1fs: rate limits and dedupe are shared again",
                self.where,
                trio.current_time() - self._down_since,
            )


def _verdict(reply: Any) -> Verdict:
    allowed, wait_ms = reply
    if allowed == 1:
        return ALLOWED
    return Verdict(False, float(wait_ms) / 1000)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    text = str(exc)
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    # coredis reports a failed TLS handshake as a plain ConnectionError; the
    # operator needs the certificate's complaint (e.g. a host name mismatch).
    cause = exc.__cause__ or exc.__context__
    for _ in range(8):  # a short chain; never trust one not to loop
        if cause is None or isinstance(cause, ssl.SSLError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLError):
        out += f" ({type(cause).__name__}: {cause})"
    return out


def tls_context(url: str) -> ssl.SSLContext:
    """The TLS context for a ``rediss://`` URL: the server's certificate and its
    host name are both verified (docs/contract.md §10 "Secrets").

    coredis's own context for such a URL checks the certificate but not the host
    name (``ssl_check_hostname`` defaults to false), so any certificate from a
    trusted CA, issued for any name, would pass for Redis's. This one is Python's
    default client context. The URL's ``ssl_ca_certs`` (a private CA: then the
    only one trusted), ``ssl_certfile`` and ``ssl_keyfile`` (a client
    certificate) are honoured; ``ssl_cert_reqs`` or ``ssl_check_hostname`` that
    would weaken the check are refused, not silently ignored.

    Raises ValueError, whose message never repeats the URL.
    """
    query = {name: values[-1] for name, values in parse_qs(urlsplit(url).query).items()}
    reqs = query.get("ssl_cert_reqs")
    if reqs is not None and reqs.lower() != "required":
        raise ValueError("rediss:// always verifies the server's certificate (ssl_cert_reqs)")
    check = query.get("ssl_check_hostname")
    if check is not None and check.lower() not in ("true", "1", "yes"):
        raise ValueError("rediss:// always verifies the server's host name (ssl_check_hostname)")
    ca = query.get("ssl_ca_certs")
    certfile = query.get("ssl_certfile")
    try:
        if ca and os.path.isdir(ca):
            context = ssl.create_default_context(capath=ca)
        else:
            context = ssl.create_default_context(cafile=ca or None)
        if certfile:
            context.load_cert_chain(certfile, query.get("ssl_keyfile") or None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ValueError(f"cannot load the TLS files the URL names: {reason}") from None
    return context


def redis_location(url: str) -> str:
    """Where the URL points, for logs: scheme, host, port and database, never a password.

    Raises ValueError for a URL coredis would misread: another scheme, no host,
    a database that is not a number. The message never repeats the URL, which
    may hold a password.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("no socket path (unix:///path/to/redis.sock)")
        return f"unix:{parts.path}"
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("not a redis://, rediss:// or unix:// URL")
    host = parts.hostname
    if not host:
        raise ValueError("no host (redis://host:6379/0)")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the port is not a number") from None
    db = parts.path.lstrip("/") or "0"
    if not db.isdigit():
        raise ValueError("the database (the path after host:port) is not a number")
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}/{db}"
