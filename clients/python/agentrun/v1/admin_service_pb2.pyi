import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from agentrun.v1 import runner_service_pb2 as _runner_service_pb2
from agentrun.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RateLimitScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RATE_LIMIT_SCOPE_UNSPECIFIED: _ClassVar[RateLimitScope]
    RATE_LIMIT_SCOPE_TENANT: _ClassVar[RateLimitScope]
    RATE_LIMIT_SCOPE_QUEUE: _ClassVar[RateLimitScope]
    RATE_LIMIT_SCOPE_CONCURRENCY_KEY: _ClassVar[RateLimitScope]

class ApiKeyRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_KEY_ROLE_UNSPECIFIED: _ClassVar[ApiKeyRole]
    API_KEY_ROLE_CLIENT: _ClassVar[ApiKeyRole]
    API_KEY_ROLE_RUNNER: _ClassVar[ApiKeyRole]
    API_KEY_ROLE_ADMIN: _ClassVar[ApiKeyRole]
RATE_LIMIT_SCOPE_UNSPECIFIED: RateLimitScope
RATE_LIMIT_SCOPE_TENANT: RateLimitScope
RATE_LIMIT_SCOPE_QUEUE: RateLimitScope
RATE_LIMIT_SCOPE_CONCURRENCY_KEY: RateLimitScope
API_KEY_ROLE_UNSPECIFIED: ApiKeyRole
API_KEY_ROLE_CLIENT: ApiKeyRole
API_KEY_ROLE_RUNNER: ApiKeyRole
API_KEY_ROLE_ADMIN: ApiKeyRole

class RateLimit(_message.Message):
    __slots__ = ("tenant_id", "scope", "key", "runs", "period_ms", "burst", "tokens", "waiting_runs")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_MS_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    WAITING_RUNS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    scope: RateLimitScope
    key: str
    runs: int
    period_ms: int
    burst: int
    tokens: float
    waiting_runs: int
    def __init__(self, tenant_id: _Optional[str] = ..., scope: _Optional[_Union[RateLimitScope, str]] = ..., key: _Optional[str] = ..., runs: _Optional[int] = ..., period_ms: _Optional[int] = ..., burst: _Optional[int] = ..., tokens: _Optional[float] = ..., waiting_runs: _Optional[int] = ...) -> None: ...

class SetRateLimitRequest(_message.Message):
    __slots__ = ("rate_limit",)
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    rate_limit: RateLimit
    def __init__(self, rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ...) -> None: ...

class SetRateLimitResponse(_message.Message):
    __slots__ = ("rate_limit",)
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    rate_limit: RateLimit
    def __init__(self, rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ...) -> None: ...

class ListRateLimitsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ListRateLimitsResponse(_message.Message):
    __slots__ = ("rate_limits",)
    RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    rate_limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    def __init__(self, rate_limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ...) -> None: ...

class ConcurrencyLimit(_message.Message):
    __slots__ = ("tenant_id", "concurrency_key", "max_active", "active_runs", "waiting_runs")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    WAITING_RUNS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    concurrency_key: str
    max_active: int
    active_runs: int
    waiting_runs: int
    def __init__(self, tenant_id: _Optional[str] = ..., concurrency_key: _Optional[str] = ..., max_active: _Optional[int] = ..., active_runs: _Optional[int] = ..., waiting_runs: _Optional[int] = ...) -> None: ...

class SetConcurrencyLimitRequest(_message.Message):
    __slots__ = ("tenant_id", "concurrency_key", "max_active")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    concurrency_key: str
    max_active: int
    def __init__(self, tenant_id: _Optional[str] = ..., concurrency_key: _Optional[str] = ..., max_active: _Optional[int] = ...) -> None: ...

class SetConcurrencyLimitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConcurrencyLimitsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ListConcurrencyLimitsResponse(_message.Message):
    __slots__ = ("concurrency_limits",)
    CONCURRENCY_LIMITS_FIELD_NUMBER: _ClassVar[int]
    concurrency_limits: _containers.RepeatedCompositeFieldContainer[ConcurrencyLimit]
    def __init__(self, concurrency_limits: _Optional[_Iterable[_Union[ConcurrencyLimit, _Mapping]]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_id", "tenant_id", "project_ids", "role", "name", "created_at", "revoked_at", "expires_at", "last_used_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_IDS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant_id: str
    project_ids: _containers.RepeatedScalarFieldContainer[str]
    role: ApiKeyRole
    name: str
    created_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., project_ids: _Optional[_Iterable[str]] = ..., role: _Optional[_Union[ApiKeyRole, str]] = ..., name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant_id", "role", "project_ids", "name", "expires_at")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PROJECT_IDS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    role: ApiKeyRole
    project_ids: _containers.RepeatedScalarFieldContainer[str]
    name: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., role: _Optional[_Union[ApiKeyRole, str]] = ..., project_ids: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "key")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    key: str
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys",)
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class SetTenantLimitRequest(_message.Message):
    __slots__ = ("tenant_id", "max_active_runs")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    max_active_runs: int
    def __init__(self, tenant_id: _Optional[str] = ..., max_active_runs: _Optional[int] = ...) -> None: ...

class SetTenantLimitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetTenantRetentionRequest(_message.Message):
    __slots__ = ("tenant_id", "event_retention_ms")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_RETENTION_MS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    event_retention_ms: int
    def __init__(self, tenant_id: _Optional[str] = ..., event_retention_ms: _Optional[int] = ...) -> None: ...

class SetTenantRetentionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetQueueStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueDepth(_message.Message):
    __slots__ = ("queue", "status", "runs")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    status: _types_pb2.RunStatus
    runs: int
    def __init__(self, queue: _Optional[str] = ..., status: _Optional[_Union[_types_pb2.RunStatus, str]] = ..., runs: _Optional[int] = ...) -> None: ...

class QueueAge(_message.Message):
    __slots__ = ("queue", "oldest_pending_age_ms")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    oldest_pending_age_ms: int
    def __init__(self, queue: _Optional[str] = ..., oldest_pending_age_ms: _Optional[int] = ...) -> None: ...

class TenantStats(_message.Message):
    __slots__ = ("tenant_id", "pending_runs", "active_runs", "max_active_runs", "event_retention_ms")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_RUNS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    EVENT_RETENTION_MS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    pending_runs: int
    active_runs: int
    max_active_runs: int
    event_retention_ms: int
    def __init__(self, tenant_id: _Optional[str] = ..., pending_runs: _Optional[int] = ..., active_runs: _Optional[int] = ..., max_active_runs: _Optional[int] = ..., event_retention_ms: _Optional[int] = ...) -> None: ...

class GetQueueStatsResponse(_message.Message):
    __slots__ = ("depths", "ages", "tenants", "waiting")
    DEPTHS_FIELD_NUMBER: _ClassVar[int]
    AGES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    depths: _containers.RepeatedCompositeFieldContainer[QueueDepth]
    ages: _containers.RepeatedCompositeFieldContainer[QueueAge]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantStats]
    waiting: _containers.RepeatedCompositeFieldContainer[WaitingRuns]
    def __init__(self, depths: _Optional[_Iterable[_Union[QueueDepth, _Mapping]]] = ..., ages: _Optional[_Iterable[_Union[QueueAge, _Mapping]]] = ..., tenants: _Optional[_Iterable[_Union[TenantStats, _Mapping]]] = ..., waiting: _Optional[_Iterable[_Union[WaitingRuns, _Mapping]]] = ...) -> None: ...

class WaitingRuns(_message.Message):
    __slots__ = ("tenant_id", "queue", "reason", "runs")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    queue: str
    reason: str
    runs: int
    def __init__(self, tenant_id: _Optional[str] = ..., queue: _Optional[str] = ..., reason: _Optional[str] = ..., runs: _Optional[int] = ...) -> None: ...

class ListRunnersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunnerInfo(_message.Message):
    __slots__ = ("runner_id", "name", "labels", "backend_profiles", "max_concurrency", "version", "last_heartbeat_at", "draining", "leases", "tenant_id", "replica_id")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    name: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    backend_profiles: _containers.RepeatedScalarFieldContainer[str]
    max_concurrency: int
    version: str
    last_heartbeat_at: _timestamp_pb2.Timestamp
    draining: bool
    leases: _containers.RepeatedCompositeFieldContainer[_runner_service_pb2.LeaseRef]
    tenant_id: str
    replica_id: str
    def __init__(self, runner_id: _Optional[str] = ..., name: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., backend_profiles: _Optional[_Iterable[str]] = ..., max_concurrency: _Optional[int] = ..., version: _Optional[str] = ..., last_heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., draining: _Optional[bool] = ..., leases: _Optional[_Iterable[_Union[_runner_service_pb2.LeaseRef, _Mapping]]] = ..., tenant_id: _Optional[str] = ..., replica_id: _Optional[str] = ...) -> None: ...

class ListRunnersResponse(_message.Message):
    __slots__ = ("runners",)
    RUNNERS_FIELD_NUMBER: _ClassVar[int]
    runners: _containers.RepeatedCompositeFieldContainer[RunnerInfo]
    def __init__(self, runners: _Optional[_Iterable[_Union[RunnerInfo, _Mapping]]] = ...) -> None: ...

class DrainRunnerRequest(_message.Message):
    __slots__ = ("runner_id",)
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    def __init__(self, runner_id: _Optional[str] = ...) -> None: ...

class DrainRunnerResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
