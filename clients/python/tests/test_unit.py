"""The SDK's pure parts, no server: URLs and TLS, option mapping, the watch cursor and
the error conversion."""

from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest

import agentrun
from agentrun import _common
from agentrun._errors import from_rpc_error
from agentrun.v1 import types_pb2


def test_the_package_is_the_installed_one_and_typed() -> None:
    import pathlib

    package = pathlib.Path(agentrun.__file__).parent
    assert "site-packages" in str(package), f"tests must import the installed package, not {package}"
    assert (package / "py.typed").is_file()
    assert (package / "v1" / "types_pb2.pyi").is_file()


@pytest.mark.parametrize(
    "url, tls, address, secure",
    [
        ("127.0.0.1:7400", None, "127.0.0.1:7400", False),
        ("http://127.0.0.1:7400", None, "127.0.0.1:7400", False),
        ("http://127.0.0.1:7400/", None, "127.0.0.1:7400", False),
        ("https://agentrun.example.com", None, "agentrun.example.com:443", True),
        ("https://agentrun.example.com:8443", None, "agentrun.example.com:8443", True),
        ("manager:7400", True, "manager:7400", True),
        ("manager:7400", b"---PEM---", "manager:7400", True),
    ],
)
def test_urls(url: str, tls: object, address: str, secure: bool) -> None:
    target = _common.parse_target(url, tls)  # type: ignore[arg-type]
    assert (target.address, target.secure) == (address, secure)


def test_tls_path_is_read_as_the_trusted_ca(tmp_path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    target = _common.parse_target("https://m:1", str(pem))
    assert target.root_certificates == b"-----BEGIN CERTIFICATE-----\n"


@pytest.mark.parametrize(
    "url, tls", [("https://m:1", False), ("http://m:1", True), ("ftp://m:1", None), ("http://m:1/x", None), ("", None)]
)
def test_contradictory_urls_are_refused(url: str, tls: object) -> None:
    with pytest.raises(ValueError):
        _common.parse_target(url, tls)  # type: ignore[arg-type]


def test_create_run_options_map_to_fields() -> None:
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    request = _common.create_run_request(
        "scripted",
        {"prompt": "hi"},
        dict(
            queue="q",
            labels=["gpu"],
            priority=7,
            session_id="s",
            stream_mode="final",
            metadata={"team": "a"},
            run_timeout_ms=dt.timedelta(seconds=2),
            scheduled_at=when,
            idempotency_key="k",
        ),
    )
    assert json.loads(request.input_json) == {"prompt": "hi"}
    assert request.queue == "q" and list(request.labels) == ["gpu"] and request.priority == 7
    assert request.stream_mode == types_pb2.STREAM_MODE_FINAL
    assert json.loads(request.metadata_json) == {"team": "a"}
    assert request.run_timeout_ms == 2000
    assert request.scheduled_at.ToDatetime(tzinfo=dt.timezone.utc) == when
    assert request.idempotency_key == "k"


def test_unknown_options_are_type_errors() -> None:
    client = agentrun.Client("127.0.0.1:1")
    with pytest.raises(TypeError, match="quue"):
        client.create_run("scripted", {"prompt": "x"}, quue="typo")
    with pytest.raises(TypeError, match="stauses"):
        client.list_runs(stauses=["completed"])
    with pytest.raises(ValueError, match="final"):
        client.create_run("scripted", {}, stream_mode="fastest")
    client.close()


def test_send_puts_text_where_the_kind_expects_it() -> None:
    turn = _common.send_command_request("r", "turn", "go", None, "interrupt", None, None)
    assert turn.kind == types_pb2.COMMAND_KIND_TURN
    assert json.loads(turn.payload_json) == {"prompt": "go"}
    assert turn.delivery_policy == types_pb2.TURN_DELIVERY_POLICY_INTERRUPT
    steer = _common.send_command_request("r", types_pb2.COMMAND_KIND_STEER, "left", None, None, None, None)
    assert json.loads(steer.payload_json) == {"text": "left"}
    with pytest.raises(TypeError):
        _common.send_command_request("r", "interrupt", "no text here", None, None, None, None)


def test_cursor_never_admits_a_seq_twice_and_ephemerals_do_not_move_it() -> None:
    cursor = _common.Cursor(after_seq=3)
    stored = lambda seq: types_pb2.Event(seq=seq, type="x")  # noqa: E731
    live = types_pb2.Event(seq=4, type="content.delta", ephemeral=True)
    assert not cursor.admit(stored(2)) and not cursor.admit(stored(3))
    assert cursor.admit(stored(4)) and cursor.seq == 4
    assert cursor.admit(live) and cursor.seq == 4
    assert not cursor.admit(stored(4))
    assert cursor.admit(stored(5)) and cursor.seq == 5


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()


def test_errors_carry_code_reason_and_details() -> None:
    err = from_rpc_error(
        FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "run is terminal", (("agentrun-error", "run_terminal"),))
    )
    assert isinstance(err, agentrun.FailedPrecondition) and isinstance(err, agentrun.AgentrunError)
    assert (err.code, err.reason, err.details) == (grpc.StatusCode.FAILED_PRECONDITION, "run_terminal", "run is terminal")
    plain = from_rpc_error(FakeRpcError(grpc.StatusCode.DATA_LOSS, "?"))
    assert type(plain) is agentrun.AgentrunError and plain.reason is None


@pytest.mark.parametrize(
    "code, details, transient",
    [
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", True),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
        (grpc.StatusCode.UNKNOWN, "Stream removed", True),
        (grpc.StatusCode.NOT_FOUND, "run not found", False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),
        (grpc.StatusCode.INTERNAL, "invariant broken", False),
    ],
)
def test_which_watch_errors_are_resumed(code: grpc.StatusCode, details: str, transient: bool) -> None:
    assert _common.is_transient(FakeRpcError(code, details)) is transient
