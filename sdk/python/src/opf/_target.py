"""Targets (spec 14.1): the accepted forms, and their resolution to addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

FORMS = (
    "unix:///ABSOLUTE/PATH, unix:/ABSOLUTE/PATH, dns:///HOST:PORT, HOST:PORT, "
    "tcp://HOST:PORT, ipv4:ADDR:PORT[,ADDR:PORT]..., ipv6:[ADDR]:PORT[,[ADDR]:PORT]..."
)

MAX_UNIX_PATH = 107  # sun_path less its final NUL

_HOSTNAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")


class TargetError(ValueError):
    """A target the SDK refuses, with the accepted forms in its message."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"invalid target {target!r}: {reason}; accepted forms: {FORMS}")
        self.target = target


@dataclass(frozen=True, order=True)
class Address:
    """One address a slot dials, as a gRPC target naming exactly it."""

    grpc_target: str  # "unix:/p", "ipv4:1.2.3.4:5", "ipv6:[::1]:5"
    loopback: bool  # a unix socket or a loopback IP


@dataclass(frozen=True)
class Target:
    """A parsed target.

    kind is "unix", "dns" or "ip". For "dns", host and port are what to
    resolve; for "ip" and "unix", addresses is the fixed list.
    """

    text: str
    kind: str
    host: str = ""
    port: int = 0
    addresses: tuple[Address, ...] = ()

    @property
    def local(self) -> bool:
        """A unix socket or loopback address, where a plaintext token may go."""
        if self.kind == "dns":
            if self.host.lower() == "localhost":
                return True
            ip = _ip(self.host)
            return ip is not None and ip.is_loopback
        return all(a.loopback for a in self.addresses)

    @property
    def tls_host(self) -> str:
        """The name TLS verifies when none is configured: the target's HOST."""
        return self.host if self.kind == "dns" else ""

    @property
    def authority(self) -> str:
        if self.kind == "dns":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{host}:{self.port}"
        return ""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _port(target: str, text: str) -> int:
    if not text.isdigit() or not text.isascii() or not 1 <= int(text) <= 65535:
        raise TargetError(target, f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def _host_port(target: str, hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1 :].startswith(":"):
            raise TargetError(target, "an IPv6 address needs the form [ADDR]:PORT")
        host = hostport[1:end]
        ip = _ip(host)
        if ip is None or ip.version != 6:
            raise TargetError(target, f"{host!r} is not an IPv6 address")
        return host, _port(target, hostport[end + 2 :])
    host, sep, port = hostport.rpartition(":")
    if not sep:
        raise TargetError(target, "the port is missing (HOST:PORT)")
    if not host:
        raise TargetError(target, "the host is empty")
    if ":" in host:
        raise TargetError(target, "an IPv6 address must be in brackets: [ADDR]:PORT")
    if not _HOSTNAME.match(host):
        raise TargetError(target, f"{host!r} is not a host name or address")
    return host, _port(target, port)


def _ip_address(host: str, port: int) -> Address:
    ip = ipaddress.ip_address(host)
    if ip.version == 6:
        return Address(f"ipv6:[{ip.compressed}]:{port}", ip.is_loopback)
    return Address(f"ipv4:{ip.compressed}:{port}", ip.is_loopback)


def parse(target: str) -> Target:
    """Parses a target, refusing every form spec 14.1 does not list."""
    if not target:
        raise TargetError(target, "the target is empty")
    if target.strip() != target or any(c.isspace() for c in target):
        raise TargetError(target, "the target contains white space")
    if target.startswith("unix:"):
        rest = target[len("unix:") :]
        if rest.startswith("//"):
            path = rest[2:]
            if not path.startswith("/"):
                raise TargetError(
                    target,
                    f"a unix socket path must be absolute, as in unix:///{path.lstrip('/')}",
                )
        else:
            path = rest
            if not path.startswith("/"):
                raise TargetError(
                    target, f"a unix socket path must be absolute, as in unix:///{path}"
                )
        if len(path.encode()) > MAX_UNIX_PATH:
            raise TargetError(
                target,
                f"the unix socket path is {len(path.encode())} bytes long, "
                f"more than the limit of {MAX_UNIX_PATH}",
            )
        return Target(target, "unix", addresses=(Address(f"unix:{path}", True),))
    if target.startswith("dns:"):
        rest = target[len("dns:") :]
        if not rest.startswith("///"):
            raise TargetError(target, "only dns:///HOST:PORT is accepted (no DNS authority)")
        host, port = _host_port(target, rest[3:])
        return Target(target, "dns", host=host, port=port)
    if target.startswith("tcp://"):
        host, port = _host_port(target, target[len("tcp://") :])
        return Target(target, "dns", host=host, port=port)
    for scheme, version in (("ipv4:", 4), ("ipv6:", 6)):
        if target.startswith(scheme):
            addresses = []
            for item in target[len(scheme) :].split(","):
                if not item:
                    raise TargetError(target, "an address of the list is empty")
                host, port = _host_port(target, item)
                ip = _ip(host)
                if ip is None or ip.version != version:
                    raise TargetError(target, f"{host!r} is not an IPv{version} address")
                addresses.append(_ip_address(host, port))
            return Target(target, "ip", addresses=tuple(sorted(set(addresses))))
    if "://" in target or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:[^0-9\[]", target):
        raise TargetError(target, "this scheme is not accepted")
    host, port = _host_port(target, target)
    return Target(target, "dns", host=host, port=port)


LookupHost = Callable[[str], Awaitable[Sequence[str]]]


async def resolve(target: Target, lookup: LookupHost | None = None) -> list[Address]:
    """The target's addresses, deduplicated and sorted (14.2).

    lookup, when given, resolves a host name to IP addresses instead of the
    system's resolver. Raises OSError when a DNS name does not resolve.
    """
    if target.kind != "dns":
        return list(target.addresses)
    if _ip(target.host) is not None:
        return [_ip_address(target.host, target.port)]
    if lookup is not None:
        ips = [ip for ip in await lookup(target.host) if _ip(ip) is not None]
        if not ips:
            raise OSError(f"{target.host} resolves to no IPv4 or IPv6 address")
        return sorted({_ip_address(ip, target.port) for ip in ips})
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    found = {
        _ip_address(str(info[4][0]).split("%")[0], target.port)
        for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6)
    }
    if not found:
        raise OSError(f"{target.host} resolves to no IPv4 or IPv6 address")
    return sorted(found)
