"""``store.backend`` → the store the daemon runs with."""

from __future__ import annotations

from relay.config import ConfigError, StoreSettings
from relay.store.base import Store
from relay.store.memory import MemoryStore


def create_store(settings: StoreSettings) -> Store:
    """The configured store, not yet running (start its ``run`` in the root nursery).

    Raises :class:`ConfigError` when the Redis backend is asked for but cannot
    be used at all (the optional dependency is missing, the URL is malformed);
    an unreachable Redis is not an error: the store starts degraded.
    """
    if settings.backend == "memory":
        return MemoryStore()
    try:
        from relay.store.redis import RedisStore
    except ImportError:
        raise ConfigError(
            'store.backend = "redis" needs coredis: pip install "relay[redis]"'
        ) from None
    try:
        return RedisStore(settings.redis_url)
    except ValueError as exc:
        raise ConfigError(f"store.redis_url: {exc}") from None
