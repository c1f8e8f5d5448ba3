import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from agentrun.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunnerIdentity(_message.Message):
    __slots__ = ("runner_id", "name", "labels", "backend_profiles", "queues", "max_concurrency", "version")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILES_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    name: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    backend_profiles: _containers.RepeatedScalarFieldContainer[str]
    queues: _containers.RepeatedScalarFieldContainer[str]
    max_concurrency: int
    version: str
    def __init__(self, runner_id: _Optional[str] = ..., name: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., backend_profiles: _Optional[_Iterable[str]] = ..., queues: _Optional[_Iterable[str]] = ..., max_concurrency: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class LeaseRef(_message.Message):
    __slots__ = ("run_id", "epoch")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("run", "epoch", "lease_expires_at", "commands", "context", "provider_thread_id", "trace_parent", "last_turn")
    RUN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_PARENT_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_FIELD_NUMBER: _ClassVar[int]
    run: _types_pb2.Run
    epoch: int
    lease_expires_at: _timestamp_pb2.Timestamp
    commands: _containers.RepeatedCompositeFieldContainer[_types_pb2.Command]
    context: _containers.RepeatedCompositeFieldContainer[ContextTurn]
    provider_thread_id: str
    trace_parent: str
    last_turn: TurnEnding
    def __init__(self, run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ..., epoch: _Optional[int] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., commands: _Optional[_Iterable[_Union[_types_pb2.Command, _Mapping]]] = ..., context: _Optional[_Iterable[_Union[ContextTurn, _Mapping]]] = ..., provider_thread_id: _Optional[str] = ..., trace_parent: _Optional[str] = ..., last_turn: _Optional[_Union[TurnEnding, _Mapping]] = ...) -> None: ...

class TurnEnding(_message.Message):
    __slots__ = ("state", "error_kind", "error_message", "error_retryable")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    state: str
    error_kind: str
    error_message: str
    error_retryable: bool
    def __init__(self, state: _Optional[str] = ..., error_kind: _Optional[str] = ..., error_message: _Optional[str] = ..., error_retryable: _Optional[bool] = ...) -> None: ...

class ContextTurn(_message.Message):
    __slots__ = ("prompt", "reply")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    reply: str
    def __init__(self, prompt: _Optional[str] = ..., reply: _Optional[str] = ...) -> None: ...

class RunnerEvent(_message.Message):
    __slots__ = ("runner_seq", "type", "payload_json")
    RUNNER_SEQ_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    runner_seq: int
    type: str
    payload_json: str
    def __init__(self, runner_seq: _Optional[int] = ..., type: _Optional[str] = ..., payload_json: _Optional[str] = ...) -> None: ...

class CommandUpdate(_message.Message):
    __slots__ = ("command_id", "status", "error")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    status: _types_pb2.CommandStatus
    error: str
    def __init__(self, command_id: _Optional[str] = ..., status: _Optional[_Union[_types_pb2.CommandStatus, str]] = ..., error: _Optional[str] = ...) -> None: ...

class ClaimRunsRequest(_message.Message):
    __slots__ = ("runner", "max_runs")
    RUNNER_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNS_FIELD_NUMBER: _ClassVar[int]
    runner: RunnerIdentity
    max_runs: int
    def __init__(self, runner: _Optional[_Union[RunnerIdentity, _Mapping]] = ..., max_runs: _Optional[int] = ...) -> None: ...

class ClaimRunsResponse(_message.Message):
    __slots__ = ("assignments", "lease_ttl_ms")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    lease_ttl_ms: int
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("runner_id", "leases")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    leases: _containers.RepeatedCompositeFieldContainer[LeaseRef]
    def __init__(self, runner_id: _Optional[str] = ..., leases: _Optional[_Iterable[_Union[LeaseRef, _Mapping]]] = ...) -> None: ...

class LeaseStatus(_message.Message):
    __slots__ = ("run_id", "epoch", "held", "expires_at", "commands", "cancel_requested")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    held: bool
    expires_at: _timestamp_pb2.Timestamp
    commands: _containers.RepeatedCompositeFieldContainer[_types_pb2.Command]
    cancel_requested: bool
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., held: _Optional[bool] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., commands: _Optional[_Iterable[_Union[_types_pb2.Command, _Mapping]]] = ..., cancel_requested: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("leases", "lease_ttl_ms")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseStatus]
    lease_ttl_ms: int
    def __init__(self, leases: _Optional[_Iterable[_Union[LeaseStatus, _Mapping]]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class AppendEventsRequest(_message.Message):
    __slots__ = ("runner_id", "run_id", "epoch", "events", "command_updates")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_UPDATES_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    run_id: str
    epoch: int
    events: _containers.RepeatedCompositeFieldContainer[RunnerEvent]
    command_updates: _containers.RepeatedCompositeFieldContainer[CommandUpdate]
    def __init__(self, runner_id: _Optional[str] = ..., run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., events: _Optional[_Iterable[_Union[RunnerEvent, _Mapping]]] = ..., command_updates: _Optional[_Iterable[_Union[CommandUpdate, _Mapping]]] = ...) -> None: ...

class AppendEventsResponse(_message.Message):
    __slots__ = ("first_seq", "last_seq", "acked_runner_seq", "duplicates")
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    ACKED_RUNNER_SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    first_seq: int
    last_seq: int
    acked_runner_seq: int
    duplicates: int
    def __init__(self, first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., acked_runner_seq: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("runner_id", "run_id", "epoch", "status", "failure_kind", "message", "last_runner_seq")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_RUNNER_SEQ_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    run_id: str
    epoch: int
    status: _types_pb2.RunStatus
    failure_kind: str
    message: str
    last_runner_seq: int
    def __init__(self, runner_id: _Optional[str] = ..., run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., status: _Optional[_Union[_types_pb2.RunStatus, str]] = ..., failure_kind: _Optional[str] = ..., message: _Optional[str] = ..., last_runner_seq: _Optional[int] = ...) -> None: ...

class FinishRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _types_pb2.Run
    def __init__(self, run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ...) -> None: ...

class RunnerMessage(_message.Message):
    __slots__ = ("hello", "credit", "heartbeat", "events", "command_ack", "finish", "release")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ACK_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    credit: Credit
    heartbeat: HeartbeatRequest
    events: AppendEventsRequest
    command_ack: CommandAck
    finish: FinishRunRequest
    release: Release
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ..., events: _Optional[_Union[AppendEventsRequest, _Mapping]] = ..., command_ack: _Optional[_Union[CommandAck, _Mapping]] = ..., finish: _Optional[_Union[FinishRunRequest, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("runner", "held_leases")
    RUNNER_FIELD_NUMBER: _ClassVar[int]
    HELD_LEASES_FIELD_NUMBER: _ClassVar[int]
    runner: RunnerIdentity
    held_leases: _containers.RepeatedCompositeFieldContainer[LeaseRef]
    def __init__(self, runner: _Optional[_Union[RunnerIdentity, _Mapping]] = ..., held_leases: _Optional[_Iterable[_Union[LeaseRef, _Mapping]]] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: int
    def __init__(self, slots: _Optional[int] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("run_id", "epoch", "update")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    update: CommandUpdate
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., update: _Optional[_Union[CommandUpdate, _Mapping]] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("run_id", "epoch", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ManagerMessage(_message.Message):
    __slots__ = ("welcome", "assignment", "heartbeat", "event_ack", "command", "lease_revoked", "drain", "error", "finish_ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    EVENT_ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    LEASE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FINISH_ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assignment: Assignment
    heartbeat: HeartbeatResponse
    event_ack: EventAck
    command: CommandDelivery
    lease_revoked: LeaseRevoked
    drain: Drain
    error: StreamError
    finish_ack: FinishAck
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatResponse, _Mapping]] = ..., event_ack: _Optional[_Union[EventAck, _Mapping]] = ..., command: _Optional[_Union[CommandDelivery, _Mapping]] = ..., lease_revoked: _Optional[_Union[LeaseRevoked, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., finish_ack: _Optional[_Union[FinishAck, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("runner_id", "manager_id", "heartbeat_interval_ms", "lease_ttl_ms", "max_batch_events", "max_batch_bytes", "resumed", "lost", "max_payload_bytes")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    MANAGER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    manager_id: str
    heartbeat_interval_ms: int
    lease_ttl_ms: int
    max_batch_events: int
    max_batch_bytes: int
    resumed: _containers.RepeatedCompositeFieldContainer[ResumedLease]
    lost: _containers.RepeatedCompositeFieldContainer[LeaseRef]
    max_payload_bytes: int
    def __init__(self, runner_id: _Optional[str] = ..., manager_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ..., max_batch_events: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ..., resumed: _Optional[_Iterable[_Union[ResumedLease, _Mapping]]] = ..., lost: _Optional[_Iterable[_Union[LeaseRef, _Mapping]]] = ..., max_payload_bytes: _Optional[int] = ...) -> None: ...

class ResumedLease(_message.Message):
    __slots__ = ("run_id", "epoch", "acked_runner_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACKED_RUNNER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    acked_runner_seq: int
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., acked_runner_seq: _Optional[int] = ...) -> None: ...

class EventAck(_message.Message):
    __slots__ = ("run_id", "epoch", "result")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    result: AppendEventsResponse
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., result: _Optional[_Union[AppendEventsResponse, _Mapping]] = ...) -> None: ...

class CommandDelivery(_message.Message):
    __slots__ = ("run_id", "epoch", "command")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    command: _types_pb2.Command
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., command: _Optional[_Union[_types_pb2.Command, _Mapping]] = ...) -> None: ...

class FinishAck(_message.Message):
    __slots__ = ("run_id", "epoch", "status")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    status: _types_pb2.RunStatus
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., status: _Optional[_Union[_types_pb2.RunStatus, str]] = ...) -> None: ...

class LeaseRevoked(_message.Message):
    __slots__ = ("run_id", "epoch", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("deadline_ms", "reconnect")
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_FIELD_NUMBER: _ClassVar[int]
    deadline_ms: int
    reconnect: bool
    def __init__(self, deadline_ms: _Optional[int] = ..., reconnect: _Optional[bool] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("run_id", "code", "message")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    code: str
    message: str
    def __init__(self, run_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
