"""Errors: every failed call raises an `AgentrunError` carrying the gRPC status code, the
server's message and the machine-readable reason from the `agentrun-error` metadata."""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

import grpc

#: Response metadata key carrying a machine-readable reason (e.g. ``run_terminal``).
REASON_METADATA_KEY = "agentrun-error"


class AgentrunError(Exception):
    """A call to the manager failed.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``).
        reason: the ``agentrun-error`` response metadata (``lease_lost``,
            ``run_terminal``, ``illegal_transition``, ``turn_not_active``,
            ``idempotency_conflict``, ...) or None when the server sent none.
        details: the server's message (for INVALID_ARGUMENT it names the field).
    """

    def __init__(
        self, code: grpc.StatusCode, details: str, reason: Optional[str] = None
    ) -> None:
        self.code = code
        self.details = details
        self.reason = reason
        text = f"{code.name}: {details}"
        if reason:
            text += f" (reason: {reason})"
        super().__init__(text)


class NotFound(AgentrunError):
    """NOT_FOUND: no such object for the caller's tenant (another tenant's id included)."""


class InvalidArgument(AgentrunError):
    """INVALID_ARGUMENT: a request field is wrong; the message names it."""


class FailedPrecondition(AgentrunError):
    """FAILED_PRECONDITION: not allowed in the object's current state (see `.reason`)."""


class AlreadyExists(AgentrunError):
    """ALREADY_EXISTS: an idempotency key was reused with a different request."""


class Unauthenticated(AgentrunError):
    """UNAUTHENTICATED: no API key, or an unknown or revoked one."""


class PermissionDenied(AgentrunError):
    """PERMISSION_DENIED: the key's role may not call this service."""


class ResourceExhausted(AgentrunError):
    """RESOURCE_EXHAUSTED: a tenant limit or quota was reached."""


class Unavailable(AgentrunError):
    """UNAVAILABLE: the manager cannot be reached (or is shutting down)."""


class DeadlineExceeded(AgentrunError):
    """DEADLINE_EXCEEDED: the call (or a watch's overall deadline) ran out of time."""


_BY_CODE: Dict[grpc.StatusCode, Type[AgentrunError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_for(
    code: grpc.StatusCode, details: str, reason: Optional[str] = None
) -> AgentrunError:
    """The most specific `AgentrunError` subclass for `code`."""
    return _BY_CODE.get(code, AgentrunError)(code, details, reason)


def _reason_in(metadata: object) -> Optional[str]:
    items: Any = metadata or ()
    for item in items:
        key, value = item
        if key == REASON_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def from_rpc_error(err: grpc.RpcError) -> AgentrunError:
    """Converts a failed call of either grpc flavour (sync or grpc.aio)."""
    # Both flavours' call errors have code()/details(); a bare RpcError may not.
    call: Any = err
    code = call.code() if callable(getattr(call, "code", None)) else grpc.StatusCode.UNKNOWN
    details = call.details() if callable(getattr(call, "details", None)) else str(err)
    reason = None
    # tonic sends an error's metadata in the trailers; look in the headers too.
    for getter in ("trailing_metadata", "initial_metadata"):
        method = getattr(err, getter, None)
        if callable(method):
            try:
                reason = _reason_in(method())
            except Exception:  # a call that never got headers has none to read
                reason = None
            if reason:
                break
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "", reason)
