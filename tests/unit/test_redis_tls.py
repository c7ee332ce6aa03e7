"""``rediss://`` verifies the server's certificate and host name (docs/contract.md §10
"Secrets"), against a real redis-server speaking TLS on 127.0.0.1.

The test makes its own CA and two server certificates with ``cryptography``: one
for 127.0.0.1, one for another name, both signed by that CA. The store trusts
the CA (``ssl_ca_certs`` in the URL), so only the host name tells them apart.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import coredis
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.store.redis import RedisStore, tls_context
from relay.testing.redis_server import REDIS_SERVER, free_port
from tests.conftest import needs_redis

pytestmark = needs_redis


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_pki(workdir: Path) -> dict[str, Path]:
    """A CA, and server certificates it signed for 127.0.0.1 and for wrong.example."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("relay test CA"))
        .issuer_name(_name("relay test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": workdir / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    names: dict[str, list[x509.GeneralName]] = {
        "right": [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        "wrong": [x509.DNSName("wrong.example")],
    }
    for label, alt in names.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"redis {label}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        paths[f"{label}.pem"] = workdir / f"{label}.pem"
        paths[f"{label}.key"] = workdir / f"{label}.key"
        paths[f"{label}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, paths[f"{label}.key"])
    return paths


@asynccontextmanager
async def tls_redis(pki: dict[str, Path], label: str, workdir: Path) -> AsyncIterator[int]:
    """redis-server with TLS only, presenting the ``label`` certificate; yields its port."""
    assert REDIS_SERVER is not None
    port = free_port()
    proc = await trio.lowlevel.open_process(
        [
            REDIS_SERVER,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(pki[f"{label}.pem"]),
            "--tls-key-file",
            str(pki[f"{label}.key"]),
            "--tls-ca-cert-file",
            str(pki["ca"]),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(10):
            while True:
                assert proc.returncode is None, "redis-server exited (no TLS support?)"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                break
        yield port
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


async def store_connects(url: str) -> bool:
    """Whether a RedisStore on ``url`` gets shared limits (not degraded) at start."""
    store = RedisStore(url, probe_timeout=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        connected = not store.degraded
        nursery.cancel_scope.cancel()
    return connected


async def test_rediss_accepts_the_right_host_and_refuses_a_wrong_one(
    pki: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "relay.store")
    with trio.fail_after(30):
        async with tls_redis(pki, "right", tmp_path) as port:
            url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki['ca']}"
            assert await store_connects(url)
        async with tls_redis(pki, "wrong", tmp_path) as port:
            url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki['ca']}"
            assert not await store_connects(url)
    refused = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(refused) == 1
    assert "IP address mismatch" in refused[0] or "hostname mismatch" in refused[0], refused


async def test_coredis_alone_would_take_the_wrong_host(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    """Why the store builds its own TLS context: coredis's checks the chain only."""
    with trio.fail_after(30):
        async with tls_redis(pki, "wrong", tmp_path) as port:
            url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki['ca']}"
            client: coredis.Redis[bytes] = coredis.Redis.from_url(url, connect_timeout=3)
            async with client:
                assert await client.ping() == b"PONG"


def test_tls_context_checks_everything_and_refuses_to_weaken(pki: dict[str, Path]) -> None:
    import ssl

    context = tls_context(f"rediss://h:6380/0?ssl_ca_certs={pki['ca']}")
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert tls_context("rediss://h/0?ssl_cert_reqs=required&ssl_check_hostname=true")
    for weak in ("ssl_cert_reqs=none", "ssl_cert_reqs=optional", "ssl_check_hostname=false"):
        with pytest.raises(ValueError, match="always verifies"):
            tls_context(f"rediss://:s3cret@h/0?{weak}")
    with pytest.raises(ValueError, match="cannot load") as info:
        tls_context("rediss://:s3cret@h/0?ssl_ca_certs=/nonexistent/ca.pem")
    assert "s3cret" not in str(info.value)
