"""The front door's session caps in one process: what an upgrade takes is given
back on every way out, a runner that fails included (the e2e tests in
tests/attacks/test_client_ip.py cover the ways a session normally ends)."""

from __future__ import annotations

import pytest

from relay.admission.tokens import mint
from relay.config import decode_encryption_key, load_secrets, parse_settings
from relay.daemon.state import DaemonState
from relay.edge.front_door import FrontDoor
from relay.store.memory import MemoryStore
from relay.testing.daemon import daemon_env
from relay.ws.peer import PeerSocket


class Peer:
    """Just enough of a socket for the checks before accept."""

    def __init__(self, path: str, peer: str = "203.0.113.5") -> None:
        self.headers = {"origin": "http://localhost:5173"}
        self.query: dict[str, str] = {}
        self.path = path
        self.raw_query = ""
        self.peer = peer
        self.subprotocols: list[str] = []
        self.refused: tuple[int, str] | None = None

    async def wait_connect(self) -> bool:
        return True

    async def reject(
        self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.refused = (status, reason)


class Boom(Exception):
    pass


async def test_a_failing_session_gives_back_its_seats_and_lease() -> None:
    env = daemon_env()
    settings = parse_settings(
        {"auth": {"sessions_per_token": 1}, "limits": {"sessions_per_ip": 1, "max_sessions": 1}},
        load_secrets(env),
    )
    store = MemoryStore()
    rt = DaemonState(settings, store)
    token = mint(decode_encryption_key(env["ENCRYPTION_KEY"]), 60)
    runs = []

    async def client(
        rt: DaemonState, ws: PeerSocket, ip: str, model: str, voice: str | None
    ) -> None:
        runs.append(ip)
        assert rt.seats.taken == 1 and rt.seats.taken_by_ip == {ip: 1}
        assert store.leases(next(iter(store._leases))) == 1
        raise Boom

    async def twilio(rt: DaemonState, ws: PeerSocket, ip: str, call: str | None) -> None:
        raise AssertionError("not a Twilio upgrade")

    door = FrontDoor(rt, client, twilio)
    for _ in range(3):  # were anything kept, the second would be refused
        with pytest.raises(Boom):
            await door.serve(Peer(f"/token/{token}"))  # type: ignore[arg-type]
        assert rt.seats.taken == 0 and rt.seats.taken_by_ip == {} and store._leases == {}
    assert len(runs) == 3
    # A refusal after seats were taken (a bad model) gives them back as well.
    bad = Peer(f"/token/{token}")
    bad.query["model"] = "gpt-9"
    await door.serve(bad)  # type: ignore[arg-type]
    assert bad.refused == (400, "model not allowed")
    assert rt.seats.taken == 0 and rt.seats.taken_by_ip == {} and store._leases == {}
