from agentrun.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionStateFilter(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_FILTER_DEFAULT: _ClassVar[SessionStateFilter]
    SESSION_STATE_FILTER_RUNNING: _ClassVar[SessionStateFilter]
    SESSION_STATE_FILTER_UNREAD: _ClassVar[SessionStateFilter]
    SESSION_STATE_FILTER_TERMINAL: _ClassVar[SessionStateFilter]
    SESSION_STATE_FILTER_IDLE: _ClassVar[SessionStateFilter]
    SESSION_STATE_FILTER_ALL: _ClassVar[SessionStateFilter]

class SessionAttention(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_ATTENTION_UNSPECIFIED: _ClassVar[SessionAttention]
    SESSION_ATTENTION_ACTIVE: _ClassVar[SessionAttention]
    SESSION_ATTENTION_UNREAD: _ClassVar[SessionAttention]
    SESSION_ATTENTION_READ: _ClassVar[SessionAttention]
SESSION_STATE_FILTER_DEFAULT: SessionStateFilter
SESSION_STATE_FILTER_RUNNING: SessionStateFilter
SESSION_STATE_FILTER_UNREAD: SessionStateFilter
SESSION_STATE_FILTER_TERMINAL: SessionStateFilter
SESSION_STATE_FILTER_IDLE: SessionStateFilter
SESSION_STATE_FILTER_ALL: SessionStateFilter
SESSION_ATTENTION_UNSPECIFIED: SessionAttention
SESSION_ATTENTION_ACTIVE: SessionAttention
SESSION_ATTENTION_UNREAD: SessionAttention
SESSION_ATTENTION_READ: SessionAttention

class SessionView(_message.Message):
    __slots__ = ("session", "attention", "last_run_status")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_STATUS_FIELD_NUMBER: _ClassVar[int]
    session: _types_pb2.Session
    attention: SessionAttention
    last_run_status: _types_pb2.RunStatus
    def __init__(self, session: _Optional[_Union[_types_pb2.Session, _Mapping]] = ..., attention: _Optional[_Union[SessionAttention, str]] = ..., last_run_status: _Optional[_Union[_types_pb2.RunStatus, str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "reader")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    READER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reader: str
    def __init__(self, session_id: _Optional[str] = ..., reader: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionView
    def __init__(self, session: _Optional[_Union[SessionView, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("state", "reader", "backend_profile", "project_id", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    READER_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: SessionStateFilter
    reader: str
    backend_profile: str
    project_id: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[SessionStateFilter, str]] = ..., reader: _Optional[str] = ..., backend_profile: _Optional[str] = ..., project_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionView]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionView, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class MarkSessionReadRequest(_message.Message):
    __slots__ = ("session_id", "reader", "version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    READER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reader: str
    version: int
    def __init__(self, session_id: _Optional[str] = ..., reader: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class MarkSessionReadResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionView
    def __init__(self, session: _Optional[_Union[SessionView, _Mapping]] = ...) -> None: ...

class ListSessionEventsRequest(_message.Message):
    __slots__ = ("session_id", "output_only", "after_run_id", "after_seq", "limit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ONLY_FIELD_NUMBER: _ClassVar[int]
    AFTER_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    output_only: bool
    after_run_id: str
    after_seq: int
    limit: int
    def __init__(self, session_id: _Optional[str] = ..., output_only: _Optional[bool] = ..., after_run_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListSessionEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id", "output_only", "after_run_id", "after_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ONLY_FIELD_NUMBER: _ClassVar[int]
    AFTER_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    output_only: bool
    after_run_id: str
    after_seq: int
    def __init__(self, session_id: _Optional[str] = ..., output_only: _Optional[bool] = ..., after_run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("event", "session_version")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    event: _types_pb2.Event
    session_version: int
    def __init__(self, event: _Optional[_Union[_types_pb2.Event, _Mapping]] = ..., session_version: _Optional[int] = ...) -> None: ...

class SetSessionTitleRequest(_message.Message):
    __slots__ = ("session_id", "title", "reader")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    READER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    title: str
    reader: str
    def __init__(self, session_id: _Optional[str] = ..., title: _Optional[str] = ..., reader: _Optional[str] = ...) -> None: ...

class SetSessionTitleResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionView
    def __init__(self, session: _Optional[_Union[SessionView, _Mapping]] = ...) -> None: ...
