"""Shared fixtures for the SDK's tests against a live `agentrun dev`.

scripts/python-client-test.sh starts the stack and sets:
  AGENTRUN_MANAGER_URL        the dev manager (auth disabled: tenants by header)
  AGENTRUN_TEST_DEV_PIDFILE   the file holding the current `agentrun dev` pid; the script
                              restarts dev (same DATABASE_URL) whenever that process exits,
                              so a test can kill it to simulate losing the manager.
Tests that need neither (tests/test_unit.py) run anywhere.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from typing import Callable, Iterator, List, Optional, TypeVar

import pytest

import agentrun

T = TypeVar("T")

#: How long one run (of the tests' scripted prompts) may take end to end.
RUN_DEADLINE_S = 90.0


def wait_until(check: Callable[[], Optional[T]], timeout: float, what: str) -> T:
    """Polls `check` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def assert_gapless(seqs: List[int], first: int = 1) -> None:
    """Stored seqs strictly increasing by one from `first`."""
    assert seqs, "no stored events"
    assert seqs == list(range(first, first + len(seqs))), f"seqs not gapless: {seqs}"


@pytest.fixture(scope="session")
def manager_url() -> str:
    url = os.environ.get("AGENTRUN_MANAGER_URL")
    if not url:
        pytest.fail("AGENTRUN_MANAGER_URL is not set: run scripts/python-client-test.sh")
    return url


@pytest.fixture
def tenant() -> str:
    """A fresh tenant per test (dev runs without auth, so the header picks it)."""
    return f"py-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(manager_url: str, tenant: str) -> Iterator[agentrun.Client]:
    with agentrun.Client(manager_url, tenant=tenant) as c:
        yield c


class TcpProxy:
    """A loopback TCP relay in front of the manager whose connections the test can cut
    (`cut`) as a network or load balancer would."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.cuts = 0
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            downstream.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._sockets += [downstream, upstream]
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Resets every live connection through the proxy; new ones are still accepted."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
            self.cuts += 1
        for s in sockets:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(manager_url: str) -> Iterator[TcpProxy]:
    target = manager_url.split("://", 1)[-1].rstrip("/")
    relay = TcpProxy(target)
    yield relay
    relay.close()
