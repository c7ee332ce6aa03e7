"""A Redis URL's password is never shown, and the REDIS_URL secret wins over
``store.redis_url`` (docs/contract.md §2 and §10 "Secrets")."""

from __future__ import annotations

import pytest

from relay.config import (
    ConfigError,
    Secrets,
    StoreSettings,
    describe,
    mask_password,
    parse_settings,
    url_password,
)
from relay.store import create_store
from relay.store.redis import RedisStore


@pytest.mark.parametrize(
    ("url", "shown", "password"),
    [
        ("redis://:s3cret-pw@cache:6379/0", "redis://:***@cache:6379/0", "s3cret-pw"),
        ("rediss://relay:pa:ss@cache/1", "rediss://relay:***@cache/1", "pa:ss"),
        ("redis://u:p@ss@cache/0", "redis://u:***@cache/0", "p@ss"),
        ("redis://bare-password@cache/0", "redis://***@cache/0", "bare-password"),
        (
            "redis://cache:6379/0?password=qs-secret&db=2",
            "redis://cache:6379/0?password=***&db=2",
            "qs-secret",
        ),
        ("unix:///run/redis.sock?password=x", "unix:///run/redis.sock?password=***", "x"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", None),
        ("redis://[::1:6379", "(not shown: not a URL)", None),
    ],
)
def test_mask_password(url: str, shown: str, password: str | None) -> None:
    assert mask_password(url) == shown
    assert url_password(url) == password


def test_describe_shows_the_effective_url_masked() -> None:
    data = {"store": {"backend": "redis", "redis_url": "redis://:file-secret@a:6379/0"}}
    text = describe(parse_settings(data))
    assert 'redis_url = "redis://:***@a:6379/0"\n' in text
    assert "file-secret" not in text
    assert "REDIS_URL unset" in text
    text = describe(parse_settings(data, Secrets(redis_url="rediss://u:env-secret@b:6380/1")))
    assert 'redis_url = "rediss://u:***@b:6380/1"  # from REDIS_URL' in text
    assert "env-secret" not in text and "file-secret" not in text
    assert "REDIS_URL set" in text


def test_the_secret_wins_over_the_config_file() -> None:
    settings = StoreSettings(backend="redis", redis_url="redis://file-host:6379/0")
    store = create_store(settings, "redis://:pw@secret-host:6390/3")
    assert isinstance(store, RedisStore)
    assert store.where == "redis://secret-host:6390/3"
    assert isinstance(create_store(settings, None), RedisStore)
    assert create_store(settings, None).where == "redis://file-host:6379/0"  # type: ignore[attr-defined]
    # The memory backend ignores both.
    assert create_store(StoreSettings(), "redis://x/0").backend == "memory"


def test_a_bad_secret_url_names_the_secret_not_its_password() -> None:
    settings = StoreSettings(backend="redis")
    with pytest.raises(ConfigError) as info:
        create_store(settings, "redis://:hunter2-pw@h:notaport/0")
    assert str(info.value).startswith("REDIS_URL: ")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^REDIS_URL: rediss:// always verifies"):
        create_store(settings, "rediss://:hunter2-pw@h/0?ssl_check_hostname=false")
