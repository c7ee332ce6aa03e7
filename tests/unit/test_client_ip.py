"""The one client-IP rule (docs/contract.md §10): examples, then properties over
hop lists, ports, IPv6, IPv4-mapped spellings and garbage."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.admission.client_ip import (
    IPAddress,
    client_ip,
    forwarded_lines,
    ip_allowed,
    ip_key,
    parse_hop,
    unmapped_networks,
)

TRUSTED = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("2001:db8:ff::/48"),
    # Written IPv4-mapped in the config: still matches the IPv4 peers it names.
    ipaddress.ip_network("::ffff:192.168.0.0/112"),
)


@pytest.mark.parametrize(
    ("peer", "lines", "expected"),
    [
        ("1.2.3.4", ["9.9.9.9"], "1.2.3.4"),  # untrusted peer: header ignored
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", ["9.9.9.9"], "9.9.9.9"),
        ("10.0.0.1", ["6.6.6.6, 9.9.9.9"], "9.9.9.9"),  # a client's lies are on the left
        ("10.0.0.1", ["6.6.6.6", "9.9.9.9"], "9.9.9.9"),  # ... also as a leading line
        ("10.0.0.1", ["9.9.9.9, 10.0.0.7"], "9.9.9.9"),  # chain of trusted proxies
        ("10.0.0.1", ["9.9.9.9", "10.0.0.7"], "9.9.9.9"),  # ... one line per proxy
        ("10.0.0.1", ["garbage"], "10.0.0.1"),
        ("10.0.0.1", ["6.6.6.6, garbage, 10.0.0.7"], "10.0.0.7"),  # nearest parsed to its right
        ("10.0.0.1", ["9.9.9.9:5123, 10.0.0.7:443"], "9.9.9.9"),  # ports do not stop the walk
        ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("10.0.0.1", ["[2001:db8::1]"], "2001:db8::1"),
        ("10.0.0.1", ["2001:db8::1"], "2001:db8::1"),
        ("10.0.0.1", ["::ffff:9.9.9.9"], "9.9.9.9"),
        ("10.0.0.1", ["[::ffff:9.9.9.9]:80"], "9.9.9.9"),
        ("10.0.0.1", ["9.9.9.9, ::ffff:10.0.0.7"], "9.9.9.9"),  # mapped proxy hop is trusted
        ("::ffff:10.0.0.1", ["9.9.9.9"], "9.9.9.9"),  # dual-stack peer matches IPv4 entry
        ("::ffff:192.168.3.4", ["9.9.9.9"], "9.9.9.9"),  # mapped config entry
        ("192.168.3.4", ["9.9.9.9"], "9.9.9.9"),
        ("::ffff:1.2.3.4", ["9.9.9.9"], "1.2.3.4"),  # logged as IPv4 too
        ("2001:db8:ff::1", ["9.9.9.9,", ""], "9.9.9.9"),  # empty hops are not hops
        ("10.0.0.1", ["10.0.0.9, 10.0.0.8"], "10.0.0.9"),  # all trusted: the leftmost
        ("", ["9.9.9.9"], ""),  # no IP peer (a Unix socket): nothing to resolve
    ],
)
def test_client_ip(peer: str, lines: list[str], expected: str) -> None:
    assert client_ip(peer, lines, TRUSTED) == expected


def test_no_trusted_proxies_means_peer() -> None:
    assert client_ip("10.0.0.1", ["9.9.9.9"], ()) == "10.0.0.1"


@pytest.mark.parametrize(
    "hop",
    [
        "unknown",
        "_hidden",
        "1.2.3.4:99999",
        "1.2.3.4:",
        "1.2.3.4:x",
        "[::1",
        "::1]:80",
        "[::1]80",
        "1.2.3",
        "01.2.3.4",
        "2001:db8::1:80:",
        "1.2.3.4:٨٠",
        "x" * 200,
        # a zone names another host's interface, and could carry any text
        "fe80::1%eth0",
        "[fe80::1%eth0]:443",
        "fe80::1%anything at all",
    ],
)
def test_garbage_hops_do_not_parse(hop: str) -> None:
    assert parse_hop(hop) is None


def test_ip_allowed_compares_mapped_addresses_as_ipv4() -> None:
    allow = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert ip_allowed("127.0.0.1", allow)
    assert ip_allowed("::ffff:127.0.0.1", allow)
    assert ip_allowed("::1", allow)
    assert not ip_allowed("127.0.0.2", allow)
    assert not ip_allowed("garbage", allow)
    mapped_allow = (ipaddress.ip_network("::ffff:127.0.0.0/104"),)
    assert ip_allowed("127.9.9.9", mapped_allow)


def test_everything_network_covers_mapped_too() -> None:
    nets = unmapped_networks((ipaddress.ip_network("::/0"),))
    assert ip_allowed("1.2.3.4", nets) and ip_allowed("2001:db8::1", nets)


def test_ip_key_counts_ipv6_per_prefix() -> None:
    assert ip_key("2001:db8:1:2:aaaa::1", 64) == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:2:ffff::9", 64) == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1", 64) == "2001:db8:1:3::/64"
    assert ip_key("2001:db8:1:2::1", 128) == "2001:db8:1:2::1/128"
    assert ip_key("2001:db8:1:2::1", 48) == "2001:db8:1::/48"
    assert ip_key("1.2.3.4", 64) == "1.2.3.4"
    assert ip_key("::ffff:1.2.3.4", 64) == "1.2.3.4"
    assert ip_key("", 64) == ""


def test_forwarded_lines_keeps_every_line_in_order() -> None:
    headers = [(b"host", b"x"), (b"x-forwarded-for", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2")]
    assert forwarded_lines(headers) == ["1.1.1.1", "2.2.2.2"]


# -- properties -----------------------------------------------------------------

TRUSTED_UNMAPPED = unmapped_networks(TRUSTED)


def _trusted(addr: IPAddress) -> bool:
    return any(addr in net for net in TRUSTED_UNMAPPED)


v4 = st.ip_addresses(v=4)


def _not_mapped(addr: ipaddress.IPv6Address) -> bool:
    return addr.ipv4_mapped is None


v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(_not_mapped)
untrusted = st.one_of(v4, v6).filter(lambda a: not _trusted(a))
trusted_v4 = st.integers(0, 2**24 - 1).map(lambda n: ipaddress.IPv4Address((10 << 24) + n))
trusted_v6 = st.integers(0, 2**80 - 1).map(
    lambda n: ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8:ff::")) + n)
)
trusted_mapped_cfg = st.integers(0, 2**16 - 1).map(
    lambda n: ipaddress.IPv4Address((192 << 24) + (168 << 16) + n)
)
trusted = st.one_of(trusted_v4, trusted_v6, trusted_mapped_cfg)
port = st.integers(1, 65535)
space = st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def spelled(draw: st.DrawFn, addr: IPAddress) -> str:
    """One hop as a proxy may write it: ip, ip:port, [v6], [v6]:port, IPv4-mapped."""
    if isinstance(addr, ipaddress.IPv4Address):
        text = draw(st.sampled_from([str(addr), f"::ffff:{addr}", f"[::ffff:{addr}]"]))
    else:
        text = draw(st.sampled_from([str(addr), f"[{addr}]", str(addr).upper()]))
    portable = text.startswith("[") or ":" not in text  # bare IPv6 cannot carry a port
    if portable and draw(st.booleans()):
        text = f"{text}:{draw(port)}"
    return draw(space) + text + draw(space)


def peer_spelling(addr: IPAddress) -> st.SearchStrategy[str]:
    if isinstance(addr, ipaddress.IPv4Address):
        return st.sampled_from([str(addr), f"::ffff:{addr}"])
    return st.just(str(addr))


GARBAGE = st.one_of(
    st.sampled_from(["unknown", "_hidden", "1.2.3.4:99999", "[::1", "1.2.3", "::1]:80", "a:b"]),
    st.text(st.characters(blacklist_characters=","), min_size=1, max_size=20).filter(
        lambda t: t.strip() != "" and parse_hop(t) is None
    ),
)
# Whatever a client writes on the left: any text, commas and lines included.
ATTACKER = st.lists(st.text(max_size=30), max_size=4)


@st.composite
def lines_of(draw: st.DrawFn, hops: list[str]) -> list[str]:
    """The hops cut into header lines at random places (proxies add lines or append)."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(hops) - 1)), max_size=len(hops))))
    out, start = [], 0
    for cut in [*cuts, len(hops)]:
        if cut > start:
            out.append(",".join(hops[start:cut]))
            start = cut
    return out


@given(st.data(), untrusted, st.lists(trusted, min_size=1, max_size=5), ATTACKER)
def test_the_client_is_the_first_untrusted_hop_whatever_is_on_its_left(
    data: st.DataObject, client: IPAddress, proxies: list[IPAddress], lies: list[str]
) -> None:
    hops = [data.draw(spelled(client))] + [data.draw(spelled(p)) for p in proxies[:-1]]
    lines = [*lies, *data.draw(lines_of(hops))]
    peer = data.draw(peer_spelling(proxies[-1]))
    assert client_ip(peer, lines, TRUSTED) == str(client)


@given(st.data(), GARBAGE, st.lists(trusted, min_size=1, max_size=5), ATTACKER)
def test_an_unparsable_client_hop_means_the_nearest_parsed_hop_to_its_right(
    data: st.DataObject, garbage: str, proxies: list[IPAddress], lies: list[str]
) -> None:
    hops = [garbage] + [data.draw(spelled(p)) for p in proxies[:-1]]
    peer = data.draw(peer_spelling(proxies[-1]))
    assert client_ip(peer, [*lies, *data.draw(lines_of(hops))], TRUSTED) == str(proxies[0])


@given(st.data(), untrusted, ATTACKER)
def test_an_untrusted_peer_is_the_client(
    data: st.DataObject, peer: IPAddress, lines: list[str]
) -> None:
    assert client_ip(data.draw(peer_spelling(peer)), lines, TRUSTED) == str(peer)


@given(st.text(max_size=60), st.lists(st.text(max_size=60), max_size=5))
def test_any_input_gives_an_answer(peer: str, lines: list[str]) -> None:
    assert isinstance(client_ip(peer, lines, TRUSTED), str)
    assert isinstance(ip_key(peer, 64), str)


@given(v6, st.integers(0, 2**64 - 1), st.integers(1, 128))
def test_addresses_of_one_prefix_share_a_key(base: ipaddress.IPv6Address, low: int, n: int) -> None:
    prefix = min(n, 64)
    other = ipaddress.IPv6Address((int(base) >> 64 << 64) + low)
    assume(other.ipv4_mapped is None)  # that one is an IPv4 client
    assert ip_key(str(base), prefix) == ip_key(str(other), prefix)


@given(v6, v6, st.integers(1, 128))
def test_addresses_of_different_prefixes_have_different_keys(
    a: ipaddress.IPv6Address, b: ipaddress.IPv6Address, prefix: int
) -> None:
    same = int(a) >> (128 - prefix) == int(b) >> (128 - prefix)
    assert (ip_key(str(a), prefix) == ip_key(str(b), prefix)) == same
