import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(_message.Message):
    __slots__ = ("response_size", "response_count", "message_interval", "sleep", "wait_for_cancel", "fail", "headers", "trailers", "panic", "record_key", "observe", "response_sizes", "seed")
    RESPONSE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SLEEP_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_CANCEL_FIELD_NUMBER: _ClassVar[int]
    FAIL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TRAILERS_FIELD_NUMBER: _ClassVar[int]
    PANIC_FIELD_NUMBER: _ClassVar[int]
    RECORD_KEY_FIELD_NUMBER: _ClassVar[int]
    OBSERVE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SIZES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    response_size: int
    response_count: int
    message_interval: _duration_pb2.Duration
    sleep: _duration_pb2.Duration
    wait_for_cancel: bool
    fail: _status_pb2.Status
    headers: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    trailers: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    panic: bool
    record_key: str
    observe: bool
    response_sizes: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    def __init__(self, response_size: _Optional[int] = ..., response_count: _Optional[int] = ..., message_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., sleep: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., wait_for_cancel: _Optional[bool] = ..., fail: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., headers: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ..., trailers: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ..., panic: _Optional[bool] = ..., record_key: _Optional[str] = ..., observe: _Optional[bool] = ..., response_sizes: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ...) -> None: ...

class MetadataEntry(_message.Message):
    __slots__ = ("key", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("method", "deadline_left", "metadata", "cancelled", "request_count", "request_bytes", "process_id", "request_digest")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_LEFT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    method: str
    deadline_left: _duration_pb2.Duration
    metadata: _containers.RepeatedCompositeFieldContainer[MetadataEntry]
    cancelled: bool
    request_count: int
    request_bytes: int
    process_id: int
    request_digest: bytes
    def __init__(self, method: _Optional[str] = ..., deadline_left: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., metadata: _Optional[_Iterable[_Union[MetadataEntry, _Mapping]]] = ..., cancelled: _Optional[bool] = ..., request_count: _Optional[int] = ..., request_bytes: _Optional[int] = ..., process_id: _Optional[int] = ..., request_digest: _Optional[bytes] = ...) -> None: ...

class UnaryRequest(_message.Message):
    __slots__ = ("payload", "action")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    action: Action
    def __init__(self, payload: _Optional[bytes] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class UnaryResponse(_message.Message):
    __slots__ = ("payload", "observation")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    observation: Observation
    def __init__(self, payload: _Optional[bytes] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...

class ServerStreamRequest(_message.Message):
    __slots__ = ("payload", "action")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    action: Action
    def __init__(self, payload: _Optional[bytes] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class ServerStreamResponse(_message.Message):
    __slots__ = ("payload", "index", "observation")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    index: int
    observation: Observation
    def __init__(self, payload: _Optional[bytes] = ..., index: _Optional[int] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...

class ClientStreamRequest(_message.Message):
    __slots__ = ("payload", "action")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    action: Action
    def __init__(self, payload: _Optional[bytes] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class ClientStreamResponse(_message.Message):
    __slots__ = ("payload", "request_count", "request_bytes", "observation", "request_digest")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    request_count: int
    request_bytes: int
    observation: Observation
    request_digest: bytes
    def __init__(self, payload: _Optional[bytes] = ..., request_count: _Optional[int] = ..., request_bytes: _Optional[int] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ..., request_digest: _Optional[bytes] = ...) -> None: ...

class BidiStreamRequest(_message.Message):
    __slots__ = ("payload", "action")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    action: Action
    def __init__(self, payload: _Optional[bytes] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class BidiStreamResponse(_message.Message):
    __slots__ = ("payload", "index", "observation")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    index: int
    observation: Observation
    def __init__(self, payload: _Optional[bytes] = ..., index: _Optional[int] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...

class GetObservationRequest(_message.Message):
    __slots__ = ("key", "wait")
    KEY_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    key: str
    wait: _duration_pb2.Duration
    def __init__(self, key: _Optional[str] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetObservationResponse(_message.Message):
    __slots__ = ("observation",)
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    observation: Observation
    def __init__(self, observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...
