"""What every tunnel of a plugin shares: its settings, frames and handlers."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import duration_pb2

from opf import _wire
from opf._defaults import PROTOCOL_VERSION
from opf._handlers import Handlers
from opf._proto.pluginframework.v1 import tunnel_pb2 as pb


@dataclass(frozen=True)
class Settings:
    """The limits this side imposes on what it receives (spec 4.3)."""

    max_message_size: int
    initial_window_size: int
    max_concurrent_streams: int
    max_batch_size: int


class Core:
    def __init__(
        self,
        *,
        settings: Settings,
        heartbeat_interval: float | None,
        max_heartbeat_interval: float | None,
        handlers: Handlers,
    ) -> None:
        self.settings = settings
        self.heartbeat_interval = heartbeat_interval or 0.0
        self.max_heartbeat_interval = max_heartbeat_interval or 0.0
        self.handlers = handlers
        hs = pb.Settings(
            max_message_size=settings.max_message_size,
            initial_window_size=settings.initial_window_size,
            max_concurrent_streams=settings.max_concurrent_streams,
            max_batch_size=settings.max_batch_size,
        )
        if heartbeat_interval:
            hs.heartbeat_interval.CopyFrom(_duration(heartbeat_interval))
        self.hello_frame = _wire.hello(
            pb.Hello(
                min_version=PROTOCOL_VERSION, max_version=PROTOCOL_VERSION, settings=hs
            ).SerializeToString()
        )
        self.register_frame = b""

    def set_registration(self, name: str, version: str, labels: dict[str, str]) -> None:
        self.register_frame = _wire.register(
            pb.Register(
                name=name, version=version, services=self.handlers.services, labels=labels
            ).SerializeToString()
        )


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d
