"""What the sync and asyncio clients share: the URL and TLS rules, request building from
keyword options, the `Event` wrapper and the watch's resume rules. No I/O here."""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import urlsplit

import grpc
from google.protobuf import timestamp_pb2

from agentrun.v1 import run_service_pb2 as run_pb
from agentrun.v1 import types_pb2

#: What `tls=` accepts: None (decided by the URL's scheme), True/False, a path to a CA
#: PEM file, or the PEM bytes themselves.
TlsOption = Union[None, bool, str, "os.PathLike[str]", bytes]

#: Sent on every call so the manager can tell SDK traffic apart.
USER_AGENT = "agentrun-python"

_CHANNEL_OPTIONS: List[Tuple[str, Any]] = [
    # A restarted manager is found again within about two seconds instead of gRPC's
    # default reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A watch over a connection that silently died is noticed and resumed.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.primary_user_agent", USER_AGENT),
]


@dataclass(frozen=True)
class Target:
    """Where to connect and how: `address` is gRPC's `host:port`, `credentials` is None
    for plaintext."""

    address: str
    root_certificates: Optional[bytes]
    secure: bool

    def credentials(self) -> Optional[grpc.ChannelCredentials]:
        if not self.secure:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)


def parse_target(url: str, tls: TlsOption = None) -> Target:
    """Reads `host:port`, `http://host:port` (plaintext) or `https://host:port` (TLS).

    `tls` overrides or refines the scheme: True uses the system roots, a path or PEM bytes
    trusts that CA instead, False forces plaintext. A contradiction (`https://` with
    `tls=False`, `http://` with a CA) is a ValueError.
    """
    text = url.strip()
    if not text:
        raise ValueError("url is empty: expected host:port, http://host:port or https://host:port")
    scheme = None
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"url {url!r}: the scheme must be http or https")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"url {url!r}: expected no path, only scheme://host:port")
        address = parts.netloc
        if not address:
            raise ValueError(f"url {url!r} has no host")
        if parts.port is None:
            address += ":443" if scheme == "https" else ":80"
    else:
        address = text.rstrip("/")

    roots: Optional[bytes] = None
    if tls is None:
        secure = scheme == "https"
    elif tls is True:
        secure = True
    elif tls is False:
        secure = False
    elif isinstance(tls, bytes):
        secure, roots = True, tls
    elif isinstance(tls, (str, os.PathLike)):
        with open(tls, "rb") as pem:
            secure, roots = True, pem.read()
    else:
        raise TypeError(f"tls must be None, a bool, a path or PEM bytes, not {type(tls).__name__}")
    if scheme == "https" and not secure:
        raise ValueError(f"url {url!r} is https:// but tls=False")
    if scheme == "http" and secure:
        raise ValueError(f"url {url!r} is http:// (plaintext) but tls was given; use https://")
    return Target(address=address, root_certificates=roots, secure=secure)


def settings_from_env(environ: Mapping[str, str] = os.environ) -> Dict[str, Any]:
    """The constructor arguments the `agentrun` CLI reads from the same variables:
    AGENTRUN_MANAGER_URL (default http://127.0.0.1:7400), AGENTRUN_API_KEY,
    AGENTRUN_TENANT and AGENTRUN_TLS_CA (a CA PEM file)."""
    return {
        "url": environ.get("AGENTRUN_MANAGER_URL") or "http://127.0.0.1:7400",
        "api_key": environ.get("AGENTRUN_API_KEY") or None,
        "tenant": environ.get("AGENTRUN_TENANT") or None,
        "tls": environ.get("AGENTRUN_TLS_CA") or None,
    }


def channel_options(extra: Optional[Sequence[Tuple[str, Any]]]) -> List[Tuple[str, Any]]:
    """The SDK's channel options, overridden by the caller's."""
    merged = dict(_CHANNEL_OPTIONS)
    merged.update(dict(extra or ()))
    return list(merged.items())


def call_metadata(api_key: Optional[str], tenant: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """`authorization: Bearer <key>` with auth, `agentrun-tenant` without (the manager
    ignores the tenant header when it checks keys)."""
    metadata: List[Tuple[str, str]] = []
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    if tenant:
        metadata.append(("agentrun-tenant", tenant))
    return tuple(metadata)


# ---- enums given as names -----------------------------------------------------------


def enum_value(wrapper: Any, prefix: str, value: Union[str, int], option: str) -> int:
    """`"final"`, `"STREAM_MODE_FINAL"` or `3` -> 3 for `wrapper` (a proto enum)."""
    if isinstance(value, bool):
        raise TypeError(f"{option} must be a name or an int, not a bool")
    if isinstance(value, int):
        if value not in wrapper.values():
            raise ValueError(f"{option}={value} is not a {prefix.rstrip('_')} value")
        return value
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith(prefix):
            name = prefix + name
        try:
            return int(wrapper.Value(name))
        except ValueError:
            names = ", ".join(n[len(prefix):].lower() for n in wrapper.keys() if not n.endswith("UNSPECIFIED"))
            raise ValueError(f"{option}={value!r}: expected one of {names}") from None
    raise TypeError(f"{option} must be a name or an int, not {type(value).__name__}")


def _timestamp(value: Any, option: str) -> timestamp_pb2.Timestamp:
    if not isinstance(value, _dt.datetime):
        raise TypeError(f"{option} must be a datetime, not {type(value).__name__}")
    stamp = timestamp_pb2.Timestamp()
    if value.tzinfo is None:
        raise ValueError(f"{option} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    stamp.FromDatetime(value.astimezone(_dt.timezone.utc).replace(tzinfo=None))
    return stamp


def _millis(value: Any, option: str) -> int:
    if isinstance(value, _dt.timedelta):
        return int(value.total_seconds() * 1000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"{option} must be an int of milliseconds or a timedelta")


def _json_object(value: Any, option: str) -> str:
    if not isinstance(value, Mapping):
        raise TypeError(f"{option} must be a dict (a JSON object), not {type(value).__name__}")
    return json.dumps(dict(value))


def _strings(value: Any, option: str) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{option} must be a list of strings")
    return [str(item) for item in value]


def _check_options(given: Mapping[str, Any], known: Iterable[str], verb: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(
            f"{verb}() got unexpected option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )


# ---- request builders -----------------------------------------------------------------

CREATE_RUN_OPTIONS = (
    "project_id",
    "queue",
    "priority",
    "labels",
    "max_attempts",
    "queue_timeout_ms",
    "run_timeout_ms",
    "metadata",
    "session_id",
    "idempotency_key",
    "scheduled_at",
    "stream_mode",
)


def create_run_request(
    backend_profile: str, input: Mapping[str, Any], options: Mapping[str, Any]
) -> run_pb.CreateRunRequest:
    _check_options(options, CREATE_RUN_OPTIONS, "create_run")
    request = run_pb.CreateRunRequest(
        backend_profile=backend_profile, input_json=_json_object(input, "input")
    )
    for name, value in options.items():
        if value is None:
            continue
        if name in ("project_id", "queue", "session_id", "idempotency_key"):
            setattr(request, name, str(value))
        elif name in ("priority", "max_attempts"):
            setattr(request, name, int(value))
        elif name in ("queue_timeout_ms", "run_timeout_ms"):
            setattr(request, name, _millis(value, name))
        elif name == "labels":
            request.labels.extend(_strings(value, name))
        elif name == "metadata":
            request.metadata_json = _json_object(value, name)
        elif name == "scheduled_at":
            request.scheduled_at.CopyFrom(_timestamp(value, name))
        elif name == "stream_mode":
            request.stream_mode = enum_value(types_pb2.StreamMode, "STREAM_MODE_", value, name)  # type: ignore[assignment]
    return request


LIST_RUNS_FILTERS = (
    "statuses",
    "queue",
    "session_id",
    "project_id",
    "backend_profile",
    "labels",
    "created_after",
    "created_before",
    "page_size",
)


def list_runs_request(filters: Mapping[str, Any]) -> run_pb.ListRunsRequest:
    _check_options(filters, LIST_RUNS_FILTERS, "list_runs")
    request = run_pb.ListRunsRequest()
    for name, value in filters.items():
        if value is None:
            continue
        if name == "statuses":
            statuses: List[Any] = [
                enum_value(types_pb2.RunStatus, "RUN_STATUS_", s, "statuses")
                for s in ([value] if isinstance(value, (str, int)) else value)
            ]
            request.statuses.extend(statuses)
        elif name == "labels":
            request.labels.extend(_strings(value, name))
        elif name in ("created_after", "created_before"):
            getattr(request, name).CopyFrom(_timestamp(value, name))
        elif name == "page_size":
            request.page_size = int(value)
        else:
            setattr(request, name, str(value))
    return request


def send_command_request(
    run_id: str,
    kind: Union[str, int],
    text: Optional[str],
    payload: Optional[Mapping[str, Any]],
    delivery_policy: Union[None, str, int],
    idempotency_key: Optional[str],
    expected_turn_id: Optional[str],
) -> run_pb.SendCommandRequest:
    """`text` goes where the kind expects it: a turn's "prompt", a steer's "text"."""
    kind_value = enum_value(types_pb2.CommandKind, "COMMAND_KIND_", kind, "kind")
    body: Dict[str, Any] = dict(payload or {})
    if text is not None:
        if kind_value == types_pb2.COMMAND_KIND_TURN:
            body["prompt"] = text
        elif kind_value == types_pb2.COMMAND_KIND_STEER:
            body["text"] = text
        else:
            raise TypeError("text= applies to `turn` (the prompt) and `steer` only; use payload=")
    request = run_pb.SendCommandRequest(
        run_id=run_id, kind=kind_value, payload_json=json.dumps(body)  # type: ignore[arg-type]
    )
    if delivery_policy is not None:
        request.delivery_policy = enum_value(  # type: ignore[assignment]
            types_pb2.TurnDeliveryPolicy, "TURN_DELIVERY_POLICY_", delivery_policy, "delivery_policy"
        )
    if idempotency_key:
        request.idempotency_key = idempotency_key
    if expected_turn_id:
        request.expected_turn_id = expected_turn_id
    return request


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: "Not given", for arguments where None is a meaningful value (JSON null).
UNSET: Any = _Unset()


def resolve_request(
    run_id: str,
    request_id: str,
    decision: str,
    answers: Optional[Mapping[str, Any]],
    value: Any,
    error: Optional[str],
) -> run_pb.ResolveRequestRequest:
    request = run_pb.ResolveRequestRequest(run_id=run_id, request_id=request_id, decision=decision)
    if answers is not None:
        request.answers_json = _json_object(answers, "answers")
    if value is not UNSET:
        request.value_json = json.dumps(value)
    if error:
        request.error = error
    return request


def list_requests_request(
    run_id: Optional[str], statuses: Optional[Iterable[str]], page_size: Optional[int]
) -> run_pb.ListRequestsRequest:
    request = run_pb.ListRequestsRequest(run_id=run_id or "")
    if statuses is not None:
        request.statuses.extend([statuses] if isinstance(statuses, str) else list(statuses))
    if page_size:
        request.page_size = page_size
    return request


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event of a run's log, as `watch_run` and `list_events` yield it.

    `payload` is `payload_json` parsed. An `ephemeral` event (a live `content.delta` of a
    `final`-mode run, never stored) carries the seq of the stored event it follows, so it
    is not unique. `raw` is the `agentrun.v1.Event` message itself.
    """

    run_id: str
    seq: int
    type: str
    payload: Dict[str, Any]
    ephemeral: bool
    producer: str
    runner_id: str
    epoch: int
    created_at: Optional[_dt.datetime]
    raw: types_pb2.Event = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, event: types_pb2.Event) -> "Event":
        payload = json.loads(event.payload_json) if event.payload_json else {}
        created = (
            event.created_at.ToDatetime(tzinfo=_dt.timezone.utc)
            if event.HasField("created_at")
            else None
        )
        try:
            producer = types_pb2.Producer.Name(event.producer)[len("PRODUCER_"):].lower()
        except ValueError:  # a producer added to the proto after these stubs
            producer = str(event.producer)
        return cls(
            run_id=event.run_id,
            seq=event.seq,
            type=event.type,
            payload=payload if isinstance(payload, dict) else {"value": payload},
            ephemeral=event.ephemeral,
            producer=producer,
            runner_id=event.runner_id,
            epoch=event.epoch,
            created_at=created,
            raw=event,
        )


TERMINAL_EVENT = "run.terminal"


class Cursor:
    """The watch's resume point: the last stored seq handed out. Ephemeral events never
    move it; a stored event at or below it (a replay) is dropped, so no seq is yielded
    twice."""

    def __init__(self, after_seq: int) -> None:
        self.seq = after_seq

    def admit(self, event: types_pb2.Event) -> bool:
        if event.ephemeral:
            return True
        if event.seq <= self.seq:
            return False
        self.seq = event.seq
        return True


def is_transient(err: grpc.RpcError) -> bool:
    """Whether a broken watch should be resumed: the manager went away (UNAVAILABLE), or
    the connection was reset under the stream (how gRPC reports a proxy or replica that
    vanished mid-stream)."""
    call: Any = err
    code = call.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = (call.details() or "").lower()
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return any(
            marker in details
            for marker in ("rst_stream", "stream removed", "socket closed", "connection reset", "goaway")
        )
    return False


class Backoff:
    """Capped exponential backoff with jitter; reset once the stream delivers again."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0) -> None:
        self.initial = initial
        self.cap = cap
        self.current = initial

    def reset(self) -> None:
        self.current = self.initial

    def next_delay(self) -> float:
        delay = self.current
        self.current = min(self.cap, self.current * 2)
        return delay * random.uniform(0.5, 1.0)
