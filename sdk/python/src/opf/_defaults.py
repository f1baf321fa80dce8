"""Protocol numbers (docs/tunnel-spec.md, Appendix A) and local tuning choices."""

from __future__ import annotations

from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

# The one protocol version this SDK speaks (spec 4.2): min = max = 2.
PROTOCOL_VERSION: Final = 2

# Normative numbers.
CHUNK_COST: Final = 64  # credit a StreamMessage costs besides its data (8.1)
MAX_FRAMES_PER_BATCH: Final = 4096  # (3.1)
UNREGISTERED_BATCH_LIMIT: Final = 64 * KiB  # batches sent before registration (3.3)
MAX_SETTING: Final = 2**31 - 1
MIN_WINDOW: Final = 1024
MIN_MAX_BATCH_SIZE: Final = 64 * KiB
MIN_HEARTBEAT_INTERVAL: Final = 0.1
HEARTBEAT_TIMEOUT_FACTOR: Final = 1.5
MAX_DURATION_SECONDS: Final = 315_576_000_000
MAX_REPLICA_ID: Final = 253
MAX_SLOTS: Final = 64

# Defaults of the settings (4.3); a zero or unset field means these.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * MiB
DEFAULT_INITIAL_WINDOW_SIZE: Final = 2 * MiB
DEFAULT_MAX_CONCURRENT_STREAMS: Final = 100
DEFAULT_MAX_BATCH_SIZE: Final = 4 * MiB
DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0  # when neither side has a preference

# Plugin defaults, the same as the Go client's.
DEFAULT_DRAIN_TIMEOUT: Final = 10.0
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_RESOLVE_INTERVAL: Final = 30.0

# Registration limits the operator enforces (4.4), checked here first.
MAX_NAME: Final = 253
MAX_VERSION: Final = 128
MAX_SERVICES: Final = 64
MAX_SERVICE_NAME: Final = 253
MAX_LABELS: Final = 32
MAX_LABEL_KEY: Final = 128
MAX_LABEL_VALUE: Final = 256

# Local choices, as the Go implementation makes them.
MAX_CHUNK: Final = 2 * MiB  # data per StreamMessage, at most
BATCH_RESERVE: Final = KiB  # batches are filled to the peer's limit less this
CONTROL_QUEUE_LIMIT: Final = 16 * KiB  # frames; overflow is a tunnel error (3.4)
LIVENESS_CHECKS_PER_INTERVAL: Final = 4
CLOSE_WAIT: Final = 1.0  # for the operator to end the Connect call after our half-close
# grpc.http2.write_buffer_size of the tunnel's channel: how much of the
# writer's hinted batches grpcio may hold before a write waits (_writer).
WRITE_BUFFER_SIZE: Final = MiB

CONNECT_METHOD: Final = "/pluginframework.v1.PluginFrameworkService/Connect"
