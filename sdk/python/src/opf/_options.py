"""Options that need more than a number: backoff, TLS and tokens."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Where Kubernetes mounts a pod's ServiceAccount token.
SERVICE_ACCOUNT_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True)
class Backoff:
    """Reconnection delays (spec 14.2), the Go client's defaults.

    The n-th attempt since the last registration waits
    ``min(base * factor**n, max) * (1 + jitter * r)``, r uniform in [-1, 1).
    """

    base: float = 0.25
    factor: float = 1.6
    jitter: float = 0.2
    max: float = 30.0

    def __post_init__(self) -> None:
        if self.base < 0 or self.max < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(
                f"invalid backoff {self}: need base, max >= 0, factor >= 1, 0 <= jitter <= 1"
            )

    def delay(self, attempt: int) -> float:
        d = self.base
        for _ in range(attempt):
            if d >= self.max:
                break
            d *= self.factor
        d = min(d, self.max)
        return max(d * (1 + self.jitter * (random.random() * 2 - 1)), 0.0)


@dataclass(frozen=True)
class TLS:
    """Connect to the operator over TLS.

    ca_file is a PEM bundle of the certificate authorities to trust, read
    again at every connection, so that a CA rotated in place is trusted from
    the next tunnel on; None trusts gRPC's default roots. server_name is the
    name the operator's certificate must carry; None takes the target's host
    (set it for unix and IP targets).
    """

    ca_file: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def read_ca(self) -> bytes | None:
        """The CA bundle now, or None for the default roots."""
        if self.ca_file is None:
            return None
        pem = Path(self.ca_file).read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ValueError(f"CA bundle {os.fspath(self.ca_file)} holds no PEM certificate")
        return pem


class TokenSource:
    """Where the bearer token comes from; called at every connection."""

    def __init__(self, read: Callable[[], str], description: str, path: Path | None = None) -> None:
        self._read = read
        self.description = description
        self.path = path

    def __call__(self) -> str:
        token = self._read().strip()
        if not token:
            raise ValueError(f"the token from {self.description} is empty")
        return token

    def __repr__(self) -> str:
        return f"TokenSource({self.description})"


def token_file(path: str | os.PathLike[str]) -> TokenSource:
    """A bearer token read from a file at every (re)connection.

    A token the kubelet rotated is used from the next tunnel on (the operator
    drains tunnels before their token expires). Surrounding white space is
    ignored. The token goes only over TLS, unless plaintext_token=True allows
    a unix socket or loopback target.
    """
    p = Path(path)
    return TokenSource(p.read_text, f"token file {os.fspath(path)}", p)


def service_account_token() -> TokenSource:
    """The pod's ServiceAccount token (token_file of the standard path).

    It must be issued for an audience the operator accepts: mount a projected
    token with that audience there, or elsewhere and use token_file
    (docs/security.md).
    """
    return token_file(SERVICE_ACCOUNT_TOKEN_PATH)


def static_token(token: str) -> TokenSource:
    """A fixed bearer token, for tests and tools."""
    return TokenSource(lambda: token, "a static token")
