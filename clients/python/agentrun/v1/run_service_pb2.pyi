import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from agentrun.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateRunRequest(_message.Message):
    __slots__ = ("project_id", "backend_profile", "input_json", "queue", "priority", "labels", "max_attempts", "queue_timeout_ms", "run_timeout_ms", "metadata_json", "session_id", "idempotency_key", "scheduled_at", "stream_mode", "concurrency_key")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILE_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RUN_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_AT_FIELD_NUMBER: _ClassVar[int]
    STREAM_MODE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    backend_profile: str
    input_json: str
    queue: str
    priority: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    max_attempts: int
    queue_timeout_ms: int
    run_timeout_ms: int
    metadata_json: str
    session_id: str
    idempotency_key: str
    scheduled_at: _timestamp_pb2.Timestamp
    stream_mode: _types_pb2.StreamMode
    concurrency_key: str
    def __init__(self, project_id: _Optional[str] = ..., backend_profile: _Optional[str] = ..., input_json: _Optional[str] = ..., queue: _Optional[str] = ..., priority: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., max_attempts: _Optional[int] = ..., queue_timeout_ms: _Optional[int] = ..., run_timeout_ms: _Optional[int] = ..., metadata_json: _Optional[str] = ..., session_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., scheduled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stream_mode: _Optional[_Union[_types_pb2.StreamMode, str]] = ..., concurrency_key: _Optional[str] = ...) -> None: ...

class CreateRunResponse(_message.Message):
    __slots__ = ("run", "created")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    run: _types_pb2.Run
    created: bool
    def __init__(self, run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class CreateRunsRequest(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[CreateRunRequest]
    def __init__(self, runs: _Optional[_Iterable[_Union[CreateRunRequest, _Mapping]]] = ...) -> None: ...

class CreateRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[CreateRunResponse]
    def __init__(self, runs: _Optional[_Iterable[_Union[CreateRunResponse, _Mapping]]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _types_pb2.Run
    def __init__(self, run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("statuses", "queue", "session_id", "project_id", "page_size", "page_token", "backend_profile", "labels", "created_after", "created_before")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[_types_pb2.RunStatus]
    queue: str
    session_id: str
    project_id: str
    page_size: int
    page_token: str
    backend_profile: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    def __init__(self, statuses: _Optional[_Iterable[_Union[_types_pb2.RunStatus, str]]] = ..., queue: _Optional[str] = ..., session_id: _Optional[str] = ..., project_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., backend_profile: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_types_pb2.Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[_types_pb2.Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _types_pb2.Run
    def __init__(self, run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ...) -> None: ...

class SendCommandRequest(_message.Message):
    __slots__ = ("run_id", "kind", "payload_json", "delivery_policy", "idempotency_key", "expected_turn_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_POLICY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    kind: _types_pb2.CommandKind
    payload_json: str
    delivery_policy: _types_pb2.TurnDeliveryPolicy
    idempotency_key: str
    expected_turn_id: str
    def __init__(self, run_id: _Optional[str] = ..., kind: _Optional[_Union[_types_pb2.CommandKind, str]] = ..., payload_json: _Optional[str] = ..., delivery_policy: _Optional[_Union[_types_pb2.TurnDeliveryPolicy, str]] = ..., idempotency_key: _Optional[str] = ..., expected_turn_id: _Optional[str] = ...) -> None: ...

class SendCommandResponse(_message.Message):
    __slots__ = ("command", "created")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    command: _types_pb2.Command
    created: bool
    def __init__(self, command: _Optional[_Union[_types_pb2.Command, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListCommandsRequest(_message.Message):
    __slots__ = ("run_id", "after_seq", "limit")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    limit: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListCommandsResponse(_message.Message):
    __slots__ = ("commands",)
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[_types_pb2.Command]
    def __init__(self, commands: _Optional[_Iterable[_Union[_types_pb2.Command, _Mapping]]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("run_id", "after_seq", "limit")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    limit: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "last_seq", "end_of_run")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    END_OF_RUN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    last_seq: int
    end_of_run: bool
    def __init__(self, events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ..., last_seq: _Optional[int] = ..., end_of_run: _Optional[bool] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class ResolveRequestRequest(_message.Message):
    __slots__ = ("run_id", "request_id", "decision", "answers_json", "value_json", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_JSON_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    request_id: str
    decision: str
    answers_json: str
    value_json: str
    error: str
    def __init__(self, run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., decision: _Optional[str] = ..., answers_json: _Optional[str] = ..., value_json: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ResolveRequestResponse(_message.Message):
    __slots__ = ("resolution_json", "resolved_now", "request")
    RESOLUTION_JSON_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_NOW_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    resolution_json: str
    resolved_now: bool
    request: _types_pb2.Request
    def __init__(self, resolution_json: _Optional[str] = ..., resolved_now: _Optional[bool] = ..., request: _Optional[_Union[_types_pb2.Request, _Mapping]] = ...) -> None: ...

class CancelCommandRequest(_message.Message):
    __slots__ = ("run_id", "command_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    command_id: str
    def __init__(self, run_id: _Optional[str] = ..., command_id: _Optional[str] = ...) -> None: ...

class CancelCommandResponse(_message.Message):
    __slots__ = ("command", "cancelled_now")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_NOW_FIELD_NUMBER: _ClassVar[int]
    command: _types_pb2.Command
    cancelled_now: bool
    def __init__(self, command: _Optional[_Union[_types_pb2.Command, _Mapping]] = ..., cancelled_now: _Optional[bool] = ...) -> None: ...

class GetCommandRequest(_message.Message):
    __slots__ = ("run_id", "command_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    command_id: str
    def __init__(self, run_id: _Optional[str] = ..., command_id: _Optional[str] = ...) -> None: ...

class GetCommandResponse(_message.Message):
    __slots__ = ("command",)
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    command: _types_pb2.Command
    def __init__(self, command: _Optional[_Union[_types_pb2.Command, _Mapping]] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("run_id", "statuses", "page_size", "page_token")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    statuses: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, run_id: _Optional[str] = ..., statuses: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests", "next_page_token")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[_types_pb2.Request]
    next_page_token: str
    def __init__(self, requests: _Optional[_Iterable[_Union[_types_pb2.Request, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RerunRunRequest(_message.Message):
    __slots__ = ("run_id", "idempotency_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    idempotency_key: str
    def __init__(self, run_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RerunRunResponse(_message.Message):
    __slots__ = ("run", "created")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    run: _types_pb2.Run
    created: bool
    def __init__(self, run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ForkRunRequest(_message.Message):
    __slots__ = ("run_id", "turn_id", "input_json", "idempotency_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    turn_id: str
    input_json: str
    idempotency_key: str
    def __init__(self, run_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., input_json: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ForkRunResponse(_message.Message):
    __slots__ = ("run", "created")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    run: _types_pb2.Run
    created: bool
    def __init__(self, run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class CancelRunsRequest(_message.Message):
    __slots__ = ("statuses", "queue", "session_id", "project_id", "backend_profile", "labels", "concurrency_key", "created_after", "created_before", "reason", "all")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[_types_pb2.RunStatus]
    queue: str
    session_id: str
    project_id: str
    backend_profile: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    concurrency_key: str
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    reason: str
    all: bool
    def __init__(self, statuses: _Optional[_Iterable[_Union[_types_pb2.RunStatus, str]]] = ..., queue: _Optional[str] = ..., session_id: _Optional[str] = ..., project_id: _Optional[str] = ..., backend_profile: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., concurrency_key: _Optional[str] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class CancelRunsResponse(_message.Message):
    __slots__ = ("cancelled", "more", "run_ids")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    cancelled: int
    more: bool
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cancelled: _Optional[int] = ..., more: _Optional[bool] = ..., run_ids: _Optional[_Iterable[str]] = ...) -> None: ...
