"""``store.backend`` → the store the daemon runs with."""

from __future__ import annotations

from relay.config import ConfigError, StoreSettings
from relay.store.base import Store
from relay.store.memory import MemoryStore


def create_store(settings: StoreSettings, redis_url_secret: str | None = None) -> Store:
    """The configured store, not yet running (start its ``run`` in the root nursery).

    ``redis_url_secret`` is the REDIS_URL secret: when set it wins over
    ``store.redis_url`` (a URL with a password belongs in a secret, not in the
    config file).

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
    url, key = (
        (redis_url_secret, "REDIS_URL")
        if redis_url_secret
        else (settings.redis_url, "store.redis_url")
    )
    try:
        return RedisStore(url)
    except ValueError as exc:
        # The message never repeats the URL: it may hold a password.
        raise ConfigError(f"{key}: {exc}") from None
