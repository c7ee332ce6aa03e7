"""Who the client is: one rule for every path (docs/contract.md §10).

The HTTP routes, the webhooks, both upgrade paths, the logs and the
``/metrics`` allowlist all call :func:`client_ip`; the per-IP buckets and caps
count by :func:`ip_key`. Reading ``X-Forwarded-For`` in one place is the
point: when one path took the first header line and another the last, a
client could pick which address a limit saw.

The rule: the peer address, unless the peer is a trusted proxy; then every
``X-Forwarded-For`` line, joined in order by ``,``, is walked from the right
past trusted proxies, and the first hop that is not one is the client. An
IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, what a dual-stack socket reports
for an IPv4 peer) is that IPv4 address wherever an address is compared.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ::ffff:0:0/96, the IPv4-mapped block.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# The longest hop worth parsing: "[" + a full IPv6 with a zone + "]:65535" is far shorter.
_MAX_HOP = 100


def parse_address(text: str) -> IPAddress | None:
    """An address as a peer or a proxy writes it, IPv4-mapped ones as IPv4; else None."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmapped(addr)


def _unmapped(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_hop(hop: str) -> IPAddress | None:
    """One ``X-Forwarded-For`` hop: ``ip``, ``ip:port``, ``[v6]`` or ``[v6]:port``."""
    hop = hop.strip()
    # A zone ("fe80::1%eth0") names an interface of the host that wrote it: it means
    # nothing here, and would let any text after the "%" become a client's key.
    if not hop or len(hop) > _MAX_HOP or "%" in hop:
        return None
    if hop.startswith("["):
        end = hop.find("]")
        if end < 0 or not _port_or_nothing(hop[end + 1 :]):
            return None
        return parse_address(hop[1:end])
    if hop.count(":") == 1:  # IPv4 with a port; a bare IPv6 has two colons or more
        host, _, port = hop.partition(":")
        if not _port_or_nothing(":" + port):
            return None
        addr = parse_address(host)
        return addr if isinstance(addr, ipaddress.IPv4Address) else None
    return parse_address(hop)


def _port_or_nothing(rest: str) -> bool:
    if not rest:
        return True
    port = rest[1:]
    return (
        rest[0] == ":"
        and 0 < len(port) <= 5
        and port.isascii()
        and port.isdigit()
        and int(port) <= 65535
    )


@lru_cache(maxsize=64)
def unmapped_networks(networks: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """``networks`` with IPv4-mapped IPv6 blocks (``::ffff:10.0.0.0/104``) written as IPv4,
    so that they match the unmapped addresses :func:`parse_address` returns.

    Cached: the settings hold one tuple per list, so this runs once per list.
    """
    out: list[IPNetwork] = []
    for net in networks:
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
            mapped = net.network_address.ipv4_mapped
            assert mapped is not None  # inside ::ffff:0:0/96
            out.append(ipaddress.IPv4Network((mapped, net.prefixlen - 96)))
        elif isinstance(net, ipaddress.IPv6Network) and _MAPPED.subnet_of(net):
            out.extend((net, ipaddress.IPv4Network("0.0.0.0/0")))  # ::/0 and the like
        else:
            out.append(net)
    return tuple(out)


def _inside(addr: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    # ``in`` across versions is False, never an error.
    return any(addr in net for net in networks)


def client_ip(peer: str, forwarded_for: Sequence[str], trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address, as text (IPv4-mapped peers and hops written as IPv4).

    ``forwarded_for`` is every ``X-Forwarded-For`` header line of the request,
    in the order received (an empty sequence when there is none): all of them,
    so that no caller can pick one. When the first hop that is not a trusted
    proxy cannot be parsed, the client is the nearest parsed hop to its right
    (the last address a trusted proxy vouched for). Empty hops (a trailing
    comma, an empty line) are not hops and are skipped.
    """
    addr = parse_address(peer)
    if addr is None:
        return peer  # not an IP peer (a Unix socket): nothing to compare
    networks = unmapped_networks(trusted)
    if not forwarded_for or not _inside(addr, networks):
        return str(addr)
    hops = ",".join(forwarded_for).split(",")
    for hop in reversed(hops):
        if not hop.strip():
            continue
        parsed = parse_hop(hop)
        if parsed is None:
            break
        addr = parsed
        if not _inside(addr, networks):
            break
    return str(addr)


def ip_allowed(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Is ``ip`` (a :func:`client_ip` answer) inside one of ``networks``?"""
    addr = parse_address(ip)
    return addr is not None and _inside(addr, unmapped_networks(networks))


def ip_key(ip: str, ipv6_prefix: int) -> str:
    """What per-IP buckets and caps count by: an IPv4 address, or an IPv6 client's
    ``/ipv6_prefix`` network (one host usually holds a whole /64, so counting
    per /128 would give it 2**64 buckets). Logs keep the full address."""
    addr = parse_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        net = ipaddress.IPv6Network((addr, ipv6_prefix), strict=False)
        return f"{net.network_address}/{ipv6_prefix}"
    return ip if addr is None else str(addr)


def forwarded_lines(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Every ``X-Forwarded-For`` line of raw ASGI headers, in order."""
    return [v.decode("latin-1") for k, v in headers if k.lower() == b"x-forwarded-for"]
