import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("stream_id", "hello", "register", "register_ack", "register_reject", "ping", "pong", "go_away", "open", "headers", "message", "half_close", "cancel", "close", "window_update")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    REGISTER_ACK_FIELD_NUMBER: _ClassVar[int]
    REGISTER_REJECT_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    GO_AWAY_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HALF_CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_UPDATE_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    hello: Hello
    register: Register
    register_ack: RegisterAck
    register_reject: RegisterReject
    ping: Ping
    pong: Pong
    go_away: GoAway
    open: StreamOpen
    headers: StreamHeaders
    message: StreamMessage
    half_close: StreamHalfClose
    cancel: StreamCancel
    close: StreamClose
    window_update: WindowUpdate
    def __init__(self, stream_id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., register: _Optional[_Union[Register, _Mapping]] = ..., register_ack: _Optional[_Union[RegisterAck, _Mapping]] = ..., register_reject: _Optional[_Union[RegisterReject, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., go_away: _Optional[_Union[GoAway, _Mapping]] = ..., open: _Optional[_Union[StreamOpen, _Mapping]] = ..., headers: _Optional[_Union[StreamHeaders, _Mapping]] = ..., message: _Optional[_Union[StreamMessage, _Mapping]] = ..., half_close: _Optional[_Union[StreamHalfClose, _Mapping]] = ..., cancel: _Optional[_Union[StreamCancel, _Mapping]] = ..., close: _Optional[_Union[StreamClose, _Mapping]] = ..., window_update: _Optional[_Union[WindowUpdate, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("min_version", "max_version", "settings", "replica_id", "replica_count")
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_COUNT_FIELD_NUMBER: _ClassVar[int]
    min_version: int
    max_version: int
    settings: Settings
    replica_id: str
    replica_count: int
    def __init__(self, min_version: _Optional[int] = ..., max_version: _Optional[int] = ..., settings: _Optional[_Union[Settings, _Mapping]] = ..., replica_id: _Optional[str] = ..., replica_count: _Optional[int] = ...) -> None: ...

class Settings(_message.Message):
    __slots__ = ("max_message_size", "initial_window_size", "max_concurrent_streams", "heartbeat_interval", "max_batch_size")
    MAX_MESSAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_message_size: int
    initial_window_size: int
    max_concurrent_streams: int
    heartbeat_interval: _duration_pb2.Duration
    max_batch_size: int
    def __init__(self, max_message_size: _Optional[int] = ..., initial_window_size: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("name", "version", "services", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    services: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., services: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterAck(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class RegisterReject(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class GoAway(_message.Message):
    __slots__ = ("reason", "last_stream_id")
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    reason: _status_pb2.Status
    last_stream_id: int
    def __init__(self, reason: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., last_stream_id: _Optional[int] = ...) -> None: ...

class StreamOpen(_message.Message):
    __slots__ = ("method", "metadata", "timeout")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    method: str
    metadata: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    timeout: _duration_pb2.Duration
    def __init__(self, method: _Optional[str] = ..., metadata: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class MetadataEntry(_message.Message):
    __slots__ = ("key", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StreamHeaders(_message.Message):
    __slots__ = ("metadata",)
    METADATA_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    def __init__(self, metadata: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ...) -> None: ...

class StreamMessage(_message.Message):
    __slots__ = ("size", "data")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    size: int
    data: bytes
    def __init__(self, size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamHalfClose(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamCancel(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class StreamClose(_message.Message):
    __slots__ = ("status", "trailers")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRAILERS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    trailers: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., trailers: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ...) -> None: ...

class WindowUpdate(_message.Message):
    __slots__ = ("increment",)
    INCREMENT_FIELD_NUMBER: _ClassVar[int]
    increment: int
    def __init__(self, increment: _Optional[int] = ...) -> None: ...
