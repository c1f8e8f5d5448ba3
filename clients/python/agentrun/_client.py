"""The blocking client: one gRPC channel, RunService's verbs as methods, errors raised
as `AgentrunError`s, and a `watch_run` that resumes by itself."""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import grpc

from agentrun import _common
from agentrun._common import UNSET, Backoff, Cursor, Event, TlsOption
from agentrun._errors import DeadlineExceeded, from_rpc_error
from agentrun.v1 import run_service_pb2 as run_pb
from agentrun.v1 import run_service_pb2_grpc as run_grpc
from agentrun.v1 import types_pb2


class Client:
    """A connection to an agentrun manager.

    Args:
        url: ``host:port``, ``http://host:port`` (plaintext) or ``https://host:port``
            (TLS with the system's roots).
        api_key: sent as ``authorization: Bearer <key>`` when the manager requires keys.
        tls: None (the scheme decides), True, False, or a CA to trust instead of the
            system roots (path to a PEM file, or the PEM bytes).
        tenant: the ``agentrun-tenant`` header: whom to act for when the manager runs
            without authentication (``agentrun dev``); ignored when keys are checked.
        timeout: seconds each unary call may take (None: no limit). Watches have their
            own ``deadline``.
        options: extra gRPC channel options, overriding the SDK's.

    Use it as a context manager, or call `close()`.
    """

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
            self._channel = grpc.insecure_channel(target.address, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target.address, credentials, options=channel_options)
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
    def channel(self) -> grpc.Channel:
        """The gRPC channel, e.g. for `agentrun.v1.session_service_pb2_grpc` stubs."""
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    # ---- runs -----------------------------------------------------------------------

    def create_run(
        self, backend_profile: str, input: Mapping[str, Any], **options: Any
    ) -> types_pb2.Run:
        """Creates a run and returns it (``.run_id``, ``.status``, ...).

        `input` is the run's input object; its "prompt" starts the first turn. Options
        are CreateRunRequest's fields: project_id, queue, priority, labels (list),
        max_attempts, queue_timeout_ms / run_timeout_ms (int or timedelta), metadata
        (dict), session_id, idempotency_key, scheduled_at (aware datetime), stream_mode
        ("deltas", "coalesced", "final"). Any other name is a TypeError.
        """
        request = _common.create_run_request(backend_profile, input, options)
        response: run_pb.CreateRunResponse = self._call(self.runs.CreateRun, request)
        return response.run

    def get_run(self, run_id: str) -> types_pb2.Run:
        response: run_pb.GetRunResponse = self._call(
            self.runs.GetRun, run_pb.GetRunRequest(run_id=run_id)
        )
        return response.run

    def list_runs(self, **filters: Any) -> Iterator[types_pb2.Run]:
        """Every run matching the filters, newest first, fetching pages as you iterate.

        Filters: statuses (names like "completed" or RunStatus values), queue,
        session_id, project_id, backend_profile, labels, created_after / created_before
        (aware datetimes), page_size. Any other name is a TypeError (raised at once).
        """
        request = _common.list_runs_request(filters)
        return self._pages(self.runs.ListRuns, request, "runs")

    def cancel(self, run_id: str, reason: str = "") -> types_pb2.Run:
        """Cancels a run (idempotent while it is being cancelled); returns it."""
        request = run_pb.CancelRunRequest(run_id=run_id, reason=reason)
        response: run_pb.CancelRunResponse = self._call(self.runs.CancelRun, request)
        return response.run

    def send(
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
        """Appends a command: kind "turn" (text = the prompt), "steer" (text), "interrupt",
        "resume" or "cancel"; `payload` adds fields. delivery_policy ("queue",
        "interrupt", "steer", "reject") applies to turns. Returns the Command."""
        request = _common.send_command_request(
            run_id, kind, text, payload, delivery_policy, idempotency_key, expected_turn_id
        )
        response: run_pb.SendCommandResponse = self._call(self.runs.SendCommand, request)
        return response.command

    # ---- requests (approvals, user input) ---------------------------------------------

    def resolve(
        self,
        run_id: str,
        request_id: str,
        decision: str,
        answers: Optional[Mapping[str, Any]] = None,
        *,
        value: Any = UNSET,
        error: Optional[str] = None,
    ) -> run_pb.ResolveRequestResponse:
        """Answers an open request: decision "accept", "accept_for_session", "decline" or
        "cancel"; `answers` for user input; `value` / `error` for an external tool's
        result. The first answer wins: check ``.resolved_now`` and ``.resolution_json``."""
        request = _common.resolve_request(run_id, request_id, decision, answers, value, error)
        response: run_pb.ResolveRequestResponse = self._call(self.runs.ResolveRequest, request)
        return response

    def list_requests(
        self,
        run_id: Optional[str] = None,
        statuses: Optional[Iterable[str]] = None,
        *,
        page_size: Optional[int] = None,
    ) -> Iterator[types_pb2.Request]:
        """Requests newest first, all pages: of one run or of every run; by default only
        the open ones (statuses: "open", "resolved", "cancelled", "expired")."""
        request = _common.list_requests_request(run_id, statuses, page_size)
        return self._pages(self.runs.ListRequests, request, "requests")

    def _pages(self, method: Any, request: Any, field: str) -> Iterator[Any]:
        def pages() -> Iterator[Any]:
            while True:
                response = self._call(method, request)
                yield from getattr(response, field)
                if not response.next_page_token:
                    return
                request.page_token = response.next_page_token

        return pages()

    # ---- events -------------------------------------------------------------------------

    def list_events(self, run_id: str, after_seq: int = 0, *, limit: int = 500) -> Iterator[Event]:
        """The run's stored events with seq > after_seq, oldest first, page by page, up to
        the last one stored when the final page was read."""
        cursor = after_seq
        while True:
            request = run_pb.ListEventsRequest(run_id=run_id, after_seq=cursor, limit=limit)
            response = self._call(self.runs.ListEvents, request)
            for event in response.events:
                cursor = event.seq
                yield Event.from_proto(event)
            if not response.events or cursor >= response.last_seq:
                return

    def watch_run(
        self,
        run_id: str,
        after_seq: int = 0,
        *,
        deadline: Optional[float] = None,
        max_backoff: float = 5.0,
    ) -> Iterator[Event]:
        """Follows a run: its stored events with seq > after_seq, then live ones, ending
        after ``run.terminal``.

        Resumes by itself when the stream breaks (manager restart or replica loss,
        proxy or network cut: UNAVAILABLE or a reset connection, or a stream that ends
        before run.terminal): it reconnects from the last stored seq it yielded, waiting
        between attempts with exponential backoff capped at `max_backoff` seconds. It never
        yields a stored seq twice and skips none. Ephemeral events (live deltas of a
        ``final``-mode run) are yielded but do not move the resume point, and those sent
        while disconnected are lost (their text is in the stored item.completed).

        `deadline` bounds the whole watch in seconds (None: no bound); when it passes,
        DeadlineExceeded is raised. Other errors (NotFound, ...) are raised at once.
        Closing the iterator (``break``) cancels the stream.
        """
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
                for message in call:
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
            time.sleep(delay)
