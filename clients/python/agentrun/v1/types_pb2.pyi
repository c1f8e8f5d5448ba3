import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_PENDING: _ClassVar[RunStatus]
    RUN_STATUS_CLAIMED: _ClassVar[RunStatus]
    RUN_STATUS_RUNNING: _ClassVar[RunStatus]
    RUN_STATUS_WAITING: _ClassVar[RunStatus]
    RUN_STATUS_COMPLETED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_CANCELLED: _ClassVar[RunStatus]
    RUN_STATUS_BLOCKED: _ClassVar[RunStatus]
    RUN_STATUS_EXPIRED: _ClassVar[RunStatus]

class CommandKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_KIND_UNSPECIFIED: _ClassVar[CommandKind]
    COMMAND_KIND_TURN: _ClassVar[CommandKind]
    COMMAND_KIND_STEER: _ClassVar[CommandKind]
    COMMAND_KIND_INTERRUPT: _ClassVar[CommandKind]
    COMMAND_KIND_CANCEL: _ClassVar[CommandKind]
    COMMAND_KIND_RESOLVE: _ClassVar[CommandKind]
    COMMAND_KIND_RESUME: _ClassVar[CommandKind]

class CommandStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_STATUS_UNSPECIFIED: _ClassVar[CommandStatus]
    COMMAND_STATUS_PENDING: _ClassVar[CommandStatus]
    COMMAND_STATUS_DELIVERED: _ClassVar[CommandStatus]
    COMMAND_STATUS_ACKNOWLEDGED: _ClassVar[CommandStatus]
    COMMAND_STATUS_COMPLETED: _ClassVar[CommandStatus]
    COMMAND_STATUS_FAILED: _ClassVar[CommandStatus]
    COMMAND_STATUS_CANCELLED: _ClassVar[CommandStatus]

class TurnDeliveryPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_DELIVERY_POLICY_UNSPECIFIED: _ClassVar[TurnDeliveryPolicy]
    TURN_DELIVERY_POLICY_QUEUE: _ClassVar[TurnDeliveryPolicy]
    TURN_DELIVERY_POLICY_INTERRUPT: _ClassVar[TurnDeliveryPolicy]
    TURN_DELIVERY_POLICY_STEER: _ClassVar[TurnDeliveryPolicy]
    TURN_DELIVERY_POLICY_REJECT: _ClassVar[TurnDeliveryPolicy]

class StreamMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_MODE_UNSPECIFIED: _ClassVar[StreamMode]
    STREAM_MODE_DELTAS: _ClassVar[StreamMode]
    STREAM_MODE_COALESCED: _ClassVar[StreamMode]
    STREAM_MODE_FINAL: _ClassVar[StreamMode]

class Producer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRODUCER_UNSPECIFIED: _ClassVar[Producer]
    PRODUCER_MANAGER: _ClassVar[Producer]
    PRODUCER_RUNNER: _ClassVar[Producer]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_PENDING: RunStatus
RUN_STATUS_CLAIMED: RunStatus
RUN_STATUS_RUNNING: RunStatus
RUN_STATUS_WAITING: RunStatus
RUN_STATUS_COMPLETED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_CANCELLED: RunStatus
RUN_STATUS_BLOCKED: RunStatus
RUN_STATUS_EXPIRED: RunStatus
COMMAND_KIND_UNSPECIFIED: CommandKind
COMMAND_KIND_TURN: CommandKind
COMMAND_KIND_STEER: CommandKind
COMMAND_KIND_INTERRUPT: CommandKind
COMMAND_KIND_CANCEL: CommandKind
COMMAND_KIND_RESOLVE: CommandKind
COMMAND_KIND_RESUME: CommandKind
COMMAND_STATUS_UNSPECIFIED: CommandStatus
COMMAND_STATUS_PENDING: CommandStatus
COMMAND_STATUS_DELIVERED: CommandStatus
COMMAND_STATUS_ACKNOWLEDGED: CommandStatus
COMMAND_STATUS_COMPLETED: CommandStatus
COMMAND_STATUS_FAILED: CommandStatus
COMMAND_STATUS_CANCELLED: CommandStatus
TURN_DELIVERY_POLICY_UNSPECIFIED: TurnDeliveryPolicy
TURN_DELIVERY_POLICY_QUEUE: TurnDeliveryPolicy
TURN_DELIVERY_POLICY_INTERRUPT: TurnDeliveryPolicy
TURN_DELIVERY_POLICY_STEER: TurnDeliveryPolicy
TURN_DELIVERY_POLICY_REJECT: TurnDeliveryPolicy
STREAM_MODE_UNSPECIFIED: StreamMode
STREAM_MODE_DELTAS: StreamMode
STREAM_MODE_COALESCED: StreamMode
STREAM_MODE_FINAL: StreamMode
PRODUCER_UNSPECIFIED: Producer
PRODUCER_MANAGER: Producer
PRODUCER_RUNNER: Producer

class Run(_message.Message):
    __slots__ = ("run_id", "project_id", "session_id", "backend_profile", "queue", "priority", "labels", "status", "attempt", "max_attempts", "input_json", "metadata_json", "queue_timeout_ms", "run_timeout_ms", "idempotency_key", "lease_runner_id", "lease_epoch", "lease_expires_at", "failure_kind", "failure_message", "last_event_seq", "cancel_requested", "created_at", "updated_at", "claimed_at", "finished_at", "scheduled_at", "active_turn_id", "stream_mode", "events_compacted_at", "concurrency_key", "waiting_reason", "rerun_of_run_id", "forked_from_run_id", "forked_from_turn_id", "schedule_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RUN_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_MODE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_COMPACTED_AT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    RERUN_OF_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FORKED_FROM_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FORKED_FROM_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    project_id: str
    session_id: str
    backend_profile: str
    queue: str
    priority: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    status: RunStatus
    attempt: int
    max_attempts: int
    input_json: str
    metadata_json: str
    queue_timeout_ms: int
    run_timeout_ms: int
    idempotency_key: str
    lease_runner_id: str
    lease_epoch: int
    lease_expires_at: _timestamp_pb2.Timestamp
    failure_kind: str
    failure_message: str
    last_event_seq: int
    cancel_requested: bool
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    claimed_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    scheduled_at: _timestamp_pb2.Timestamp
    active_turn_id: str
    stream_mode: StreamMode
    events_compacted_at: _timestamp_pb2.Timestamp
    concurrency_key: str
    waiting_reason: str
    rerun_of_run_id: str
    forked_from_run_id: str
    forked_from_turn_id: str
    schedule_id: str
    def __init__(self, run_id: _Optional[str] = ..., project_id: _Optional[str] = ..., session_id: _Optional[str] = ..., backend_profile: _Optional[str] = ..., queue: _Optional[str] = ..., priority: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., status: _Optional[_Union[RunStatus, str]] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., input_json: _Optional[str] = ..., metadata_json: _Optional[str] = ..., queue_timeout_ms: _Optional[int] = ..., run_timeout_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., lease_runner_id: _Optional[str] = ..., lease_epoch: _Optional[int] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failure_kind: _Optional[str] = ..., failure_message: _Optional[str] = ..., last_event_seq: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., claimed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scheduled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_turn_id: _Optional[str] = ..., stream_mode: _Optional[_Union[StreamMode, str]] = ..., events_compacted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., concurrency_key: _Optional[str] = ..., waiting_reason: _Optional[str] = ..., rerun_of_run_id: _Optional[str] = ..., forked_from_run_id: _Optional[str] = ..., forked_from_turn_id: _Optional[str] = ..., schedule_id: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "run_id", "seq", "kind", "payload_json", "status", "delivery_policy", "idempotency_key", "error", "created_at", "updated_at")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_POLICY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    run_id: str
    seq: int
    kind: CommandKind
    payload_json: str
    status: CommandStatus
    delivery_policy: TurnDeliveryPolicy
    idempotency_key: str
    error: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, command_id: _Optional[str] = ..., run_id: _Optional[str] = ..., seq: _Optional[int] = ..., kind: _Optional[_Union[CommandKind, str]] = ..., payload_json: _Optional[str] = ..., status: _Optional[_Union[CommandStatus, str]] = ..., delivery_policy: _Optional[_Union[TurnDeliveryPolicy, str]] = ..., idempotency_key: _Optional[str] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("run_id", "seq", "type", "payload_json", "producer", "runner_id", "epoch", "created_at", "ephemeral")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    type: str
    payload_json: str
    producer: Producer
    runner_id: str
    epoch: int
    created_at: _timestamp_pb2.Timestamp
    ephemeral: bool
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., type: _Optional[str] = ..., payload_json: _Optional[str] = ..., producer: _Optional[_Union[Producer, str]] = ..., runner_id: _Optional[str] = ..., epoch: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ephemeral: _Optional[bool] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "project_id", "backend_profile", "title", "provider_thread_id", "last_run_id", "version", "created_at", "updated_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    project_id: str
    backend_profile: str
    title: str
    provider_thread_id: str
    last_run_id: str
    version: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., project_id: _Optional[str] = ..., backend_profile: _Optional[str] = ..., title: _Optional[str] = ..., provider_thread_id: _Optional[str] = ..., last_run_id: _Optional[str] = ..., version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("request_id", "run_id", "turn_id", "kind", "detail_json", "options", "status", "resolution_json", "deadline", "created_at", "resolved_at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    turn_id: str
    kind: str
    detail_json: str
    options: _containers.RepeatedScalarFieldContainer[str]
    status: str
    resolution_json: str
    deadline: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    resolved_at: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., kind: _Optional[str] = ..., detail_json: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., resolution_json: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
