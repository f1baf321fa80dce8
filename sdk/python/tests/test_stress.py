"""A payload-verifying stress run through the real Go server.

Random sizes from 0 B to 3 MiB, weighted towards the chunk, window and
batch boundaries; random request content; all four RPC kinds at once.
Every byte is checked: responses against the seeded generator of
conformance.proto, requests through the SHA-256 digest the plugin reports.
The plugin runs in its own process, as an operator's plugins do.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conformance.v1 import conformance_pb2 as cpb
from conformance_plugin import payload
from harness import Operator, start_plugin_process

KiB, MiB = 1024, 1024 * 1024
MAX = 3 * MiB
BOUNDARIES = [
    0, 1, 63, 64, 65, 511, 512, 513, 1023, 1024, 16 * KiB - 1, 16 * KiB + 1,
    64 * KiB - 65, 64 * KiB - 64, 64 * KiB, 64 * KiB + 1,
    512 * KiB - 64, 512 * KiB, 512 * KiB + 1,
    MiB - 1, MiB, MiB + 1,
    2 * MiB - 65, 2 * MiB - 64, 2 * MiB - 63, 2 * MiB, 2 * MiB + 1,
    MAX - 1, MAX,
]  # fmt: skip
WORKERS = 8
BUDGET = 14.0  # seconds of calls
MIN_CALLS = 4 * WORKERS  # each worker runs every kind once, then at random


def size(rng: random.Random) -> int:
    if rng.random() < 0.5:
        return rng.choice(BOUNDARIES)
    # Mostly small, sometimes large: uniform in a random power-of-two range.
    return rng.randint(0, 1 << rng.randint(4, 21)) if rng.random() < 0.7 else rng.randint(0, MAX)


def digest(payloads: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for p in payloads:
        h.update(struct.pack(">I", len(p)) + p)
    return h.digest()


class Tally:
    def __init__(self) -> None:
        self.calls = {"unary": 0, "server": 0, "client": 0, "bidi": 0}
        self.bytes_checked = 0


async def unary(stub: object, rng: random.Random, t: Tally) -> None:
    req = rng.randbytes(size(rng))
    rsize, seed = size(rng), rng.getrandbits(64) or 1
    r = await stub.Unary(  # type: ignore[attr-defined]
        cpb.UnaryRequest(
            payload=req, action=cpb.Action(response_sizes=[rsize], seed=seed, observe=True)
        ),
        timeout=30,
    )
    assert r.payload == payload(rsize, seed, 0), "unary response bytes"
    assert r.observation.request_digest == digest([req]), "unary request bytes"
    t.calls["unary"] += 1
    t.bytes_checked += len(req) + rsize


async def server_stream(stub: object, rng: random.Random, t: Tally) -> None:
    req = rng.randbytes(size(rng) // 4)
    sizes = [size(rng) for _ in range(rng.randint(1, 4))]
    seed = rng.getrandbits(64) or 1
    call = stub.ServerStream(  # type: ignore[attr-defined]
        cpb.ServerStreamRequest(
            payload=req, action=cpb.Action(response_sizes=sizes, seed=seed, observe=True)
        ),
        timeout=30,
    )
    i = 0
    async for m in call:
        assert m.index == i
        assert m.payload == payload(sizes[i], seed, i), f"server stream message {i}"
        if i == 0:
            assert m.observation.request_digest == digest([req])
        i += 1
    assert i == len(sizes)
    t.calls["server"] += 1
    t.bytes_checked += len(req) + sum(sizes)


async def client_stream(stub: object, rng: random.Random, t: Tally) -> None:
    reqs = [rng.randbytes(size(rng)) for _ in range(rng.randint(0, 4))]
    rsize, seed = size(rng), rng.getrandbits(64) or 1

    async def requests() -> AsyncIterator[cpb.ClientStreamRequest]:
        for i, p in enumerate(reqs):
            a = cpb.Action(response_sizes=[rsize], seed=seed) if i == 0 else cpb.Action()
            yield cpb.ClientStreamRequest(payload=p, action=a)

    r = await stub.ClientStream(requests(), timeout=30)  # type: ignore[attr-defined]
    want = payload(rsize, seed, 0) if reqs else b""
    assert r.payload == want, "client stream response bytes"
    assert r.request_count == len(reqs)
    assert r.request_digest == digest(reqs)  # of nothing when no request came
    t.calls["client"] += 1
    t.bytes_checked += sum(map(len, reqs)) + len(want)


async def bidi(stub: object, rng: random.Random, t: Tally) -> None:
    n = rng.randint(1, 4)
    reqs = [rng.randbytes(size(rng) // 2) for _ in range(n)]
    plans = [
        (
            [size(rng) // 2 for _ in range(rng.randint(0 if i < n - 1 else 1, 2))],
            rng.getrandbits(64) or 1,
        )
        for i in range(n)
    ]
    expected: list[bytes] = []
    for sizes, seed in plans:
        expected += [payload(s, seed, len(expected) + j) for j, s in enumerate(sizes)]

    async def requests() -> AsyncIterator[cpb.BidiStreamRequest]:
        for i, p in enumerate(reqs):
            sizes, seed = plans[i]
            yield cpb.BidiStreamRequest(
                payload=p, action=cpb.Action(response_sizes=sizes, seed=seed, observe=i == n - 1)
            )

    got: list[cpb.BidiStreamResponse] = []
    async for m in stub.BidiStream(requests(), timeout=30):  # type: ignore[attr-defined]
        assert m.index == len(got)
        assert m.payload == expected[m.index], f"bidi message {m.index}"
        if m.HasField("observation"):
            assert m.observation.request_digest == digest(reqs)
        got.append(m)
    assert len(got) == len(expected)
    t.calls["bidi"] += 1
    t.bytes_checked += sum(map(len, reqs)) + sum(map(len, expected))


@pytest.mark.timeout(90)
async def test_stress_every_byte_checked(operator: Operator, workdir: Path) -> None:
    proc = await start_plugin_process(operator.target, workdir / "plugin.log")
    try:
        await operator.registered(1)
        stub = operator.stub()
        tally = Tally()
        seed = random.randrange(1 << 32)
        kinds = [unary, server_stream, client_stream, bidi]
        deadline = time.monotonic() + BUDGET

        async def worker(w: int) -> None:
            rng = random.Random(seed * 100 + w)
            i = 0
            while time.monotonic() < deadline:
                # Every worker runs every kind, in a random order.
                await kinds[(i + w) % 4](stub, rng, tally) if i < 4 else await rng.choice(kinds)(
                    stub, rng, tally
                )
                i += 1

        start = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(WORKERS)))
        took = time.monotonic() - start
        total = sum(tally.calls.values())
        print(
            f"\nstress (seed {seed}): {total} calls {tally.calls}, "
            f"{tally.bytes_checked / MiB:.1f} MiB checked in {took:.1f}s"
        )
        assert total >= MIN_CALLS
        assert all(n >= WORKERS for n in tally.calls.values())
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
