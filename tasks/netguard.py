"""Which network addresses a model file may be fetched from (the SSRF guard).

Staging from ``http(s)://`` refuses hosts that are not on the public internet unless
``MODELBAY_ALLOW_PRIVATE_SOURCES`` is set, so a manifest cannot make a worker read from
itself, its private network or a cloud metadata service. Pure and without DNS: the web
checks a URL's literal host with :func:`blocked_host` when a manifest is registered; the
worker resolves every host it connects to (each redirect hop too) and checks each address
with :func:`blocked_address` (``workers/staging/fetch.py``).
"""
from __future__ import annotations

import ipaddress
import re
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = ipaddress.IPv4Address("169.254.169.254")  # AWS, GCP, Azure, ... instance metadata
_SHARED = ipaddress.ip_network("100.64.0.0/10")     # RFC 6598, carrier-grade NAT
_NAT64 = ipaddress.ip_network("64:ff9b::/96")       # RFC 6052, the IPv4 address is the last 32 bits
_LEGACY_IPV4 = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}")


def blocked_address(ip: IPAddress | str) -> str | None:
    """Why ``ip`` may not be a source of model files, or None when it may.

    Refused: unspecified (``0.0.0.0``, ``::``), loopback (``127.0.0.0/8``, ``::1``),
    link-local (``169.254.0.0/16``, which holds the cloud metadata address
    ``169.254.169.254``; ``fe80::/10``), multicast (``224.0.0.0/4``, ``ff00::/8``), shared
    address space (``100.64.0.0/10``), reserved ranges (``240.0.0.0/4``, the broadcast
    address, most of ``::/8``), private and special-purpose ranges (RFC 1918 ``10/8``,
    ``172.16/12``, ``192.168/16``; unique local ``fc00::/7``; ``0.0.0.0/8``, benchmarking,
    documentation, ...: what :mod:`ipaddress` calls ``is_private``), site-local
    ``fec0::/10``, and anything else that is not globally reachable. An IPv6 address that
    carries an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
    ``2002::/16``) is judged by that IPv4 address. Raises ValueError when ``ip`` is a string
    that is not an IP address (an IPv6 zone such as ``%eth0`` is accepted)."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address):
        for kind, inner in (("IPv4-mapped", addr.ipv4_mapped),
                            ("NAT64", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if addr in _NAT64 else None),
                            ("6to4", addr.sixtofour)):
            if inner is not None:
                reason = blocked_address(inner)
                return f"{reason} ({kind} {inner})" if reason else None
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_loopback:
        return "a loopback address"
    if addr == _METADATA:
        return "the cloud metadata address (link-local)"
    if addr.is_link_local:
        return "a link-local address"
    if addr.is_multicast:
        return "a multicast address"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if addr.is_reserved:
        return "a reserved address"
    if addr.is_private:
        return "a private address"
    if isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local:
        return "a site-local address"
    if not addr.is_global:
        return "an address that is not globally reachable"
    return None


def literal_address(host: str) -> IPAddress | None:
    """``host`` (a URL's host name, without brackets) as an IP address when it is one,
    without DNS: dotted quads, IPv6 (with or without a zone), and the legacy IPv4 forms that
    resolvers accept (``127.1``, ``2130706433``, ``0x7f.0.0.1``); else None."""
    name = host.strip().rstrip(".").lower()
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(name):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    return None


def blocked_host(host: str) -> str | None:
    """Why a URL's ``host`` is refused without looking it up (None: DNS decides, at the
    worker): a literal IP address that :func:`blocked_address` refuses, or ``localhost``
    and names under ``.localhost`` (RFC 6761: they always mean this machine)."""
    name = host.strip().rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return "this machine (localhost)"
    addr = literal_address(name)
    return blocked_address(addr) if addr is not None else None
