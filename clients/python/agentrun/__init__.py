"""The Python SDK of agentrun: a thin, typed client of the manager's RunService.

    import agentrun

    client = agentrun.Client("127.0.0.1:7400")
    run = client.create_run("scripted", {"prompt": "hello"})
    for event in client.watch_run(run.run_id):
        print(event.seq, event.type, event.payload)

`agentrun.aio.Client` is the asyncio flavour. Calls return the agentrun.v1 protobuf
messages (`Run`, `Command`, `Request`); watches and event lists yield `agentrun.Event`.
Failures raise `agentrun.AgentrunError` subclasses. The generated stubs are importable
as `agentrun.v1.*_pb2` / `*_pb2_grpc` for everything the SDK does not wrap.
"""

from agentrun._client import Client
from agentrun._common import Event
from agentrun._errors import (
    REASON_METADATA_KEY,
    AgentrunError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from agentrun.v1.types_pb2 import (
    Command,
    CommandKind,
    Request,
    Run,
    RunStatus,
    StreamMode,
    TurnDeliveryPolicy,
)

from agentrun import aio  # noqa: E402  (agentrun.aio.Client after `import agentrun`)

__version__ = "0.1.0"

__all__ = [
    "REASON_METADATA_KEY",
    "AgentrunError",
    "AlreadyExists",
    "Client",
    "Command",
    "CommandKind",
    "DeadlineExceeded",
    "Event",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Request",
    "ResourceExhausted",
    "Run",
    "RunStatus",
    "StreamMode",
    "TurnDeliveryPolicy",
    "Unauthenticated",
    "Unavailable",
    "aio",
]
