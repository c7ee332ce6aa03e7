"""relay.ws.connection over real socket pairs, and open_upstream over real TLS."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.sessions.dialect import GA
from relay.sessions.upstream import open_upstream
from relay.ws.connection import CLOSE_TIMEOUT, WebSocket
from relay.ws.errors import Disconnected, UpstreamClosed
from relay.ws.frames import CONTROL_BUDGET, PING, encode
from tests.helpers import closing, pair


async def test_messages_both_ways_in_order_including_empty_and_large() -> None:
    client, server = pair()
    sent: list[str | bytes] = ["a", b"", "", b"\x00" * 300_000, "é" * 10_000, b"end"]
    async with closing(client, server), trio.open_nursery() as n:
        # The large one cannot fit the socket buffers: the sender waits while the
        # receiver reads, and a second task's sends queue behind it, in order.
        n.start_soon(lambda: _send_all(client, sent[:4]))
        got = [await server.receive() for _ in range(4)]
        n.start_soon(lambda: _send_all(client, sent[4:]))
        got += [await server.receive() for _ in range(2)]
        assert got == sent
        await server.send("back")
        assert await client.receive() == "back"
        assert client.buffered_bytes == 0 and server.buffered_bytes == 0


async def _send_all(ws: WebSocket, messages: Sequence[str | bytes]) -> None:
    for m in messages:
        await ws.send(m)


async def test_concurrent_senders_never_interleave_frames() -> None:
    client, server = pair()
    async with closing(client, server), trio.open_nursery() as n:
        for tag in "abcd":
            n.start_soon(_send_all, client, [tag * 50_000] * 5)
        got = [await server.receive() for _ in range(20)]
        assert sorted(got) == sorted(t * 50_000 for t in "abcd" for _ in range(5))


async def test_close_handshake_reports_code_and_reason() -> None:
    client, server = pair()
    async with closing(client, server), trio.open_nursery() as n:
        n.start_soon(client.close, 4001, "done here")
        with pytest.raises(Disconnected) as info:
            await server.receive()
        assert (info.value.code, info.value.reason) == (4001, "done here")
        assert not isinstance(info.value, UpstreamClosed)  # the server side's error
    assert server.closed


async def test_protocol_error_is_local_and_the_close_reaches_the_peer() -> None:
    client, server = pair(max_message=1000)
    async with closing(client, server), trio.open_nursery() as n:
        n.start_soon(client.send, b"x" * 1001)
        with pytest.raises(Disconnected) as info:
            await server.receive()
        assert info.value.local and info.value.code == 1009
        n.start_soon(server.close, 1009, "message too big")
        with pytest.raises(UpstreamClosed) as seen:
            await client.receive()
        assert seen.value.code == 1009


async def answer_close(ws: WebSocket) -> None:
    with pytest.raises(Disconnected):
        await ws.receive()


async def test_close_after_a_protocol_error_ends_at_the_peers_close_not_its_fin() -> None:
    """After our 1009 the server closes the TCP connection once the peer's close
    arrives (RFC 6455 §7.1.1). It used to wait for the peer's FIN, and a client
    that waits for the server's TCP close (trio-websocket) cost CLOSE_TIMEOUT."""
    client, server = pair(max_message=1000)
    async with closing(client, server), trio.open_nursery() as n:
        n.start_soon(client.send, b"x" * 5000)  # refused from its header, then skimmed
        with pytest.raises(Disconnected) as info:
            await server.receive()
        assert info.value.code == 1009
        n.start_soon(answer_close, client)  # it answers the close and keeps its socket
        start = trio.current_time()
        await server.close(1009, "message too big")  # shielded: timed, not cancelled
        assert trio.current_time() - start < CLOSE_TIMEOUT / 4
        n.cancel_scope.cancel()


async def test_a_ping_flood_is_a_local_1008() -> None:
    client, server = pair()
    async with closing(client, server):
        client.transport.write(encode(PING, b"", mask=True) * (CONTROL_BUDGET + 1))
        with pytest.raises(Disconnected) as info, trio.fail_after(5):
            await server.receive()
        assert info.value.local and info.value.code == 1008
        assert info.value.reason == "too many control frames"


async def test_silent_peer_is_pinged_and_a_live_one_answers() -> None:
    client, server = pair(stall=0.2)
    async with closing(client, server), trio.open_nursery() as n:

        async def serve() -> None:
            with pytest.raises(Disconnected):
                while True:
                    await server.receive()  # answers pings while reading

        n.start_soon(serve)
        with trio.move_on_after(1.0):
            await client.receive()  # nothing comes; pings keep it alive
        assert not client.closed
        client.transport.close()


async def test_peer_that_answers_nothing_is_stalled() -> None:
    client, server = pair(stall=0.2)
    async with closing(client, server):
        start = trio.current_time()
        with pytest.raises(UpstreamClosed) as info:
            await client.receive()
        assert info.value.stalled
        assert 0.35 <= trio.current_time() - start < 2
        assert client.transport.closed


async def test_peer_that_reads_nothing_is_stalled_on_send() -> None:
    client, server = pair(stall=0.3)
    async with closing(client, server):
        with pytest.raises(UpstreamClosed) as info:
            for _ in range(1000):
                await client.send(b"x" * 65536)
        assert info.value.stalled
        # Bounded: at most one message was held besides the kernel's buffers.
        assert len(client.transport.out) <= 65536 + 14


async def test_reset_peer_is_code_1006() -> None:
    client, server = pair()
    async with closing(client, server):
        server.transport.close(reset=True)
        with pytest.raises(UpstreamClosed) as info:
            await client.receive()
        assert info.value.code == 1006


# -- TLS upstream ---------------------------------------------------------------------
@pytest.fixture
def tls_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1, trusted through SSL_CERT_FILE (which
    OpenSSL reads when the relay builds its default context)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    yield server


async def test_wss_upstream_relays_over_tls(tls_files: ssl.SSLContext) -> None:
    closed = trio.Event()
    close_codes: list[int] = []

    async def echo(request: trio_websocket.WebSocketRequest) -> None:
        assert request.headers is not None
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            close_codes.append(exc.reason.code if exc.reason else 1005)
            closed.set()

    async with trio.open_nursery() as n:
        servers = await n.start(
            partial(trio_websocket.serve_websocket, echo, "127.0.0.1", 0, ssl_context=tls_files)
        )
        port = servers.port
        async with trio.open_nursery() as conn:
            up = await open_upstream(
                conn,
                realtime_url=f"wss://127.0.0.1:{port}/v1/realtime",
                model="m",
                api_key="k",
                dialect=GA,
                timeout=5,
                max_message_size=1 << 20,
            )
            big = orjson.dumps({"type": "x", "audio": "A" * 200_000}).decode()
            sent: list[str | bytes] = ["hello", b"\x01\x02", big]
            for m in sent:
                await up.send(m)
                assert await up.receive() == m
            await up.close(1000)
            conn.cancel_scope.cancel()
        with trio.fail_after(5):  # the server saw our close handshake, over TLS
            await closed.wait()
        assert close_codes == [1000]
        n.cancel_scope.cancel()
