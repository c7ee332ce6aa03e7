"""Rate buckets, dedupe and concurrency leases: one interface (:class:`Store`), a
per-process backend (:class:`MemoryStore`) and a shared one
(``relay.store.redis.RedisStore``, imported on demand because coredis is
the optional ``redis`` extra)."""

from relay.store.base import ALLOWED, Lease, Store, Verdict
from relay.store.memory import MemoryStore
from relay.store.select import create_store

__all__ = ["ALLOWED", "Lease", "MemoryStore", "Store", "Verdict", "create_store"]
