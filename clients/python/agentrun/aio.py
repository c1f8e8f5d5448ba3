"""The asyncio client (`grpc.aio`): the same verbs as `agentrun.Client`, as coroutines;
`list_runs`, `list_requests`, `list_events` and `watch_run` are async iterators.

    async with agentrun.aio.Client("127.0.0.1:7400") as client:
        run = await client.create_run("scripted", {"prompt": "hello"})
        async for event in client.watch_run(run.run_id):
            print(event.seq, event.type)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio

from agentrun import _common
from agentrun._common import UNSET, Backoff, Cursor, Event, TlsOption
from agentrun._errors import DeadlineExceeded, from_rpc_error
from agentrun.v1 import run_service_pb2 as run_pb
from agentrun.v1 import run_service_pb2_grpc as run_grpc
from agentrun.v1 import types_pb2

__all__ = ["Client"]


class Client:
    """A `grpc.aio` connection to an agentrun manager; see `agentrun.Client` for the
    arguments and each verb's meaning. Create it inside a running event loop."""

    def __init__(
        self,
        url: str,
        api_key: Optional[str] = None,
        tls: TlsOption = None,
        tenant: Optional[str] = None,
        *,
        timeout: Optional[float] = 30.0,
        options: Optional[Sequence[Tuple[str, Any]]] = None,
    ) -> None:
        target = _common.parse_target(url, tls)
        channel_options = _common.channel_options(options)
        credentials = target.credentials()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target.address, options=channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                target.address, credentials, options=channel_options
            )
        self.address = target.address
        self.timeout = timeout
        self.metadata = _common.call_metadata(api_key, tenant)
        #: The raw RunService stub, for calls the SDK does not wrap (pass `metadata=`).
        self.runs: Any = run_grpc.RunServiceStub(self._channel)  # type: ignore[no-untyped-call]

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Client":
        """A client configured like the `agentrun` CLI: AGENTRUN_MANAGER_URL (default
        http://127.0.0.1:7400), AGENTRUN_API_KEY, AGENTRUN_TENANT, AGENTRUN_TLS_CA.
        Keyword arguments override them."""
        settings = _common.settings_from_env()
        settings.update(kwargs)
        return cls(**settings)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    # ---- runs -----------------------------------------------------------------------

    async def create_run(
        self, backend_profile: str, input: Mapping[str, Any], **options: Any
    ) -> types_pb2.Run:
        request = _common.create_run_request(backend_profile, input, options)
        response: run_pb.CreateRunResponse = await self._call(self.runs.CreateRun, request)
        return response.run

    async def get_run(self, run_id: str) -> types_pb2.Run:
        response: run_pb.GetRunResponse = await self._call(
            self.runs.GetRun, run_pb.GetRunRequest(run_id=run_id)
        )
        return response.run

    def list_runs(self, **filters: Any) -> AsyncIterator[types_pb2.Run]:
        request = _common.list_runs_request(filters)
        return self._pages(self.runs.ListRuns, request, "runs")

    async def cancel(self, run_id: str, reason: str = "") -> types_pb2.Run:
        request = run_pb.CancelRunRequest(run_id=run_id, reason=reason)
        response: run_pb.CancelRunResponse = await self._call(self.runs.CancelRun, request)
        return response.run

    async def send(
        self,
        run_id: str,
        kind: Union[str, int],
        text: Optional[str] = None,
        *,
        payload: Optional[Mapping[str, Any]] = None,
        delivery_policy: Union[None, str, int] = None,
        idempotency_key: Optional[str] = None,
        expected_turn_id: Optional[str] = None,
    ) -> types_pb2.Command:
        request = _common.send_command_request(
            run_id, kind, text, payload, delivery_policy, idempotency_key, expected_turn_id
        )
        response: run_pb.SendCommandResponse = await self._call(self.runs.SendCommand, request)
        return response.command

    # ---- requests -----------------------------------------------------------------------

    async def resolve(
        self,
        run_id: str,
        request_id: str,
        decision: str,
        answers: Optional[Mapping[str, Any]] = None,
        *,
        value: Any = UNSET,
        error: Optional[str] = None,
    ) -> run_pb.ResolveRequestResponse:
        request = _common.resolve_request(run_id, request_id, decision, answers, value, error)
        response: run_pb.ResolveRequestResponse = await self._call(self.runs.ResolveRequest, request)
        return response

    def list_requests(
        self,
        run_id: Optional[str] = None,
        statuses: Optional[Iterable[str]] = None,
        *,
        page_size: Optional[int] = None,
    ) -> AsyncIterator[types_pb2.Request]:
        request = _common.list_requests_request(run_id, statuses, page_size)
        return self._pages(self.runs.ListRequests, request, "requests")

    async def _pages(self, method: Any, request: Any, field: str) -> AsyncIterator[Any]:
        while True:
            response = await self._call(method, request)
            for item in getattr(response, field):
                yield item
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    # ---- events -------------------------------------------------------------------------

    async def list_events(
        self, run_id: str, after_seq: int = 0, *, limit: int = 500
    ) -> AsyncIterator[Event]:
        cursor = after_seq
        while True:
            request = run_pb.ListEventsRequest(run_id=run_id, after_seq=cursor, limit=limit)
            response = await self._call(self.runs.ListEvents, request)
            for event in response.events:
                cursor = event.seq
                yield Event.from_proto(event)
            if not response.events or cursor >= response.last_seq:
                return

    async def watch_run(
        self,
        run_id: str,
        after_seq: int = 0,
        *,
        deadline: Optional[float] = None,
        max_backoff: float = 5.0,
    ) -> AsyncIterator[Event]:
        """Same contract as `agentrun.Client.watch_run`, as an async iterator."""
        end = None if deadline is None else time.monotonic() + deadline
        cursor = Cursor(after_seq)
        backoff = Backoff(cap=max_backoff)
        while True:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"watch of run {run_id} did not reach run.terminal within {deadline}s "
                    f"(last seq {cursor.seq})",
                )
            call = self.runs.WatchRun(
                run_pb.WatchRunRequest(run_id=run_id, after_seq=cursor.seq),
                metadata=self.metadata,
                timeout=remaining,
            )
            try:
                async for message in call:
                    backoff.reset()
                    if not cursor.admit(message):
                        continue
                    event = Event.from_proto(message)
                    yield event
                    if event.type == _common.TERMINAL_EVENT and not event.ephemeral:
                        return
            except grpc.RpcError as err:
                if not _common.is_transient(err):
                    raise from_rpc_error(err) from err
            finally:
                call.cancel()
            delay = backoff.next_delay()
            if end is not None:
                delay = max(0.0, min(delay, end - time.monotonic()))
            await asyncio.sleep(delay)
