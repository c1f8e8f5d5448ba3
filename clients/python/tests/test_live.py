"""The SDK against a live `agentrun dev` (see conftest.py): runs end to end, watches
that survive cuts and a manager restart, typed errors, pagination."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import List

import grpc
import pytest

import agentrun
import agentrun.aio
from conftest import RUN_DEADLINE_S, TcpProxy, assert_gapless, wait_until

COMPLETED = agentrun.RunStatus.Value("RUN_STATUS_COMPLETED")
# A run that streams for a few seconds (the script sets the per-token delay), so a cut
# lands mid-run.
LONG_PROMPT = "[tokens:120] stream for a while"


def stored(events: List[agentrun.Event]) -> List[int]:
    return [e.seq for e in events if not e.ephemeral]


def reply_text(events: List[agentrun.Event]) -> str:
    return "".join(
        e.payload.get("delta", "")
        for e in events
        if e.type == "content.delta" and e.payload.get("kind") == "assistant_text"
    )


def test_create_watch_approve_complete(client: agentrun.Client) -> None:
    run = client.create_run("scripted", {"prompt": "[approval] deploy the site"}, labels=[])
    assert run.run_id and run.backend_profile == "scripted"
    events: List[agentrun.Event] = []
    answered = []
    for event in client.watch_run(run.run_id, deadline=RUN_DEADLINE_S):
        events.append(event)
        if event.type == "request.opened":
            request_id = event.payload["request_id"]
            # The approvals inbox shows it, open, before anyone answers.
            open_requests = list(client.list_requests(run_id=run.run_id))
            assert [r.request_id for r in open_requests] == [request_id]
            assert agentrun.RunStatus.Name(client.get_run(run.run_id).status) == "RUN_STATUS_WAITING"
            resolved = client.resolve(run.run_id, request_id, "accept")
            assert resolved.resolved_now and resolved.request.status == "resolved"
            answered.append(request_id)
            # Answering twice returns the first answer, not an error.
            again = client.resolve(run.run_id, request_id, "decline")
            assert not again.resolved_now and '"accept"' in again.resolution_json
    assert answered, "no request.opened event"
    assert events[-1].type == "run.terminal" and events[-1].payload["status"] == "completed"
    assert_gapless(stored(events))
    assert "Approval: accept" in reply_text(events)
    final = client.get_run(run.run_id)
    assert final.status == COMPLETED and final.last_event_seq == events[-1].seq
    assert list(client.list_requests(run_id=run.run_id)) == []
    assert [r.request_id for r in client.list_requests(run_id=run.run_id, statuses=["resolved"])] == answered
    # The stored log, read by pages, is the watch's stored events.
    assert [e.seq for e in client.list_events(run.run_id, limit=3)] == stored(events)


def test_watch_resumes_after_the_connection_is_cut(manager_url: str, tenant: str, proxy: TcpProxy) -> None:
    with agentrun.Client(manager_url, tenant=tenant) as direct, agentrun.Client(
        proxy.address, tenant=tenant
    ) as via_proxy:
        run = direct.create_run("scripted", {"prompt": LONG_PROMPT})
        events: List[agentrun.Event] = []
        cut_at: List[int] = []
        for event in via_proxy.watch_run(run.run_id, deadline=RUN_DEADLINE_S, max_backoff=0.5):
            events.append(event)
            deltas = sum(1 for e in events if e.type == "content.delta")
            # Cut twice mid-stream, each time while the run is still going.
            if deltas in (5, 40) and len(cut_at) < (1 if deltas == 5 else 2):
                assert direct.get_run(run.run_id).status != COMPLETED
                proxy.cut()
                cut_at.append(event.seq)
        assert len(cut_at) == 2, f"the run ended before both cuts: {cut_at}"
        assert proxy.accepted >= 3, f"the watch did not reconnect after each cut ({proxy.accepted} connections)"
        assert events[-1].type == "run.terminal"
        assert_gapless(stored(events))
        assert events[-1].seq > cut_at[-1]
        assert reply_text(events).split() == [f"token{i}" for i in range(1, 121)]
        assert direct.get_run(run.run_id).last_event_seq == events[-1].seq


def test_watch_resumes_across_a_manager_restart(client: agentrun.Client) -> None:
    pidfile = os.environ.get("AGENTRUN_TEST_DEV_PIDFILE")
    if not pidfile:
        pytest.fail("AGENTRUN_TEST_DEV_PIDFILE is not set: run scripts/python-client-test.sh")

    def dev_pid() -> int:
        with open(pidfile) as f:
            text = f.read().strip()
        return int(text) if text else 0

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    run = client.create_run("scripted", {"prompt": LONG_PROMPT})
    events: List[agentrun.Event] = []
    killed = 0
    for event in client.watch_run(run.run_id, deadline=RUN_DEADLINE_S, max_backoff=1.0):
        events.append(event)
        if not killed and sum(1 for e in events if e.type == "content.delta") == 5:
            killed = dev_pid()
            assert killed and alive(killed)
            # The whole stack goes: runners drain (released back to the queue after the
            # short drain grace the script sets), then the manager; the script restarts it
            # on the same database and port.
            os.kill(killed, signal.SIGTERM)
    assert killed, "the run ended before the manager could be killed"
    assert not alive(killed), "the terminal event came from the manager that was told to stop"
    assert dev_pid() != killed
    assert events[-1].type == "run.terminal" and events[-1].payload["status"] == "completed"
    assert_gapless(stored(events))
    kinds = [e.type for e in events]
    assert "run.requeued" in kinds, f"the run was not interrupted by the restart: {kinds}"
    assert client.get_run(run.run_id).last_event_seq == events[-1].seq


def test_another_tenants_run_is_not_found_like_an_unknown_one(manager_url: str, client: agentrun.Client) -> None:
    run = client.create_run("scripted", {"prompt": "hello"}, queue=f"unserved-{uuid.uuid4().hex[:8]}")
    with agentrun.Client(manager_url, tenant=f"other-{uuid.uuid4().hex[:8]}") as other:
        with pytest.raises(agentrun.NotFound) as theirs:
            other.get_run(run.run_id)
        unknown_id = str(uuid.uuid4())
        with pytest.raises(agentrun.NotFound) as unknown:
            other.get_run(unknown_id)
        for verb in (lambda: other.cancel(run.run_id), lambda: list(other.list_requests(run_id=run.run_id))):
            with pytest.raises(agentrun.NotFound):
                verb()
        with pytest.raises(agentrun.NotFound):
            next(iter(other.watch_run(run.run_id, deadline=10)))
    assert theirs.value.code == unknown.value.code == grpc.StatusCode.NOT_FOUND
    assert theirs.value.reason == unknown.value.reason
    assert theirs.value.details.replace(run.run_id, "ID") == unknown.value.details.replace(unknown_id, "ID")
    assert client.cancel(run.run_id).run_id == run.run_id


def test_invalid_argument_names_the_field(client: agentrun.Client) -> None:
    with pytest.raises(agentrun.InvalidArgument) as bad_priority:
        client.create_run("scripted", {"prompt": "x"}, priority=5000)
    assert "priority" in bad_priority.value.details
    assert bad_priority.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(agentrun.InvalidArgument) as bad_id:
        client.get_run("not-a-uuid")
    assert "run_id" in str(bad_id.value)


def test_failed_precondition_carries_the_reason(client: agentrun.Client) -> None:
    run = client.create_run("scripted", {"prompt": "[tokens:2]"})
    for _ in client.watch_run(run.run_id, deadline=RUN_DEADLINE_S):
        pass
    with pytest.raises(agentrun.FailedPrecondition) as err:
        client.cancel(run.run_id, reason="too late")
    assert err.value.reason == "run_terminal", err.value


def test_list_runs_walks_every_page(client: agentrun.Client) -> None:
    queue = f"unserved-{uuid.uuid4().hex[:8]}"  # no runner serves it: the runs stay pending
    created = [client.create_run("scripted", {"prompt": f"p{i}"}, queue=queue).run_id for i in range(5)]
    listed = [r.run_id for r in client.list_runs(queue=queue, page_size=2)]
    assert listed == list(reversed(created)), "newest first, all three pages"
    assert [r.run_id for r in client.list_runs(queue=queue, statuses=["pending"], page_size=500)] == listed
    assert list(client.list_runs(queue=queue, statuses=["completed"])) == []
    command = client.send(created[0], "turn", "and then this", delivery_policy="queue")
    assert agentrun.CommandKind.Name(command.kind) == "COMMAND_KIND_TURN" and command.run_id == created[0]
    for run_id in created:
        assert agentrun.RunStatus.Name(client.cancel(run_id, reason="test").status) == "RUN_STATUS_CANCELLED"
    assert len(list(client.list_runs(queue=queue, statuses=["cancelled"], page_size=1))) == 5


def test_final_mode_live_deltas_are_yielded_without_moving_the_cursor(client: agentrun.Client) -> None:
    run = client.create_run("scripted", {"prompt": "[tokens:30]"}, stream_mode="final")
    events = list(client.watch_run(run.run_id, deadline=RUN_DEADLINE_S))
    assert_gapless(stored(events))
    live = [e for e in events if e.ephemeral]
    assert all(e.type == "content.delta" for e in live)
    completed = [e for e in events if e.type == "item.completed" and e.payload.get("kind") == "assistant_message"]
    assert completed and completed[-1].payload["text"].split() == [f"token{i}" for i in range(1, 31)]
    assert not any(e.type == "content.delta" for e in events if not e.ephemeral)


def test_asyncio_client_watch_approve_and_resume_after_a_cut(manager_url: str, tenant: str, proxy: TcpProxy) -> None:
    async def scenario() -> None:
        async with agentrun.aio.Client(manager_url, tenant=tenant) as direct, agentrun.aio.Client(
            proxy.address, tenant=tenant
        ) as via_proxy:
            run = await direct.create_run("scripted", {"prompt": "[approval] ship it"})
            events: List[agentrun.Event] = []
            async for event in via_proxy.watch_run(run.run_id, deadline=RUN_DEADLINE_S, max_backoff=0.5):
                events.append(event)
                if event.type == "request.opened":
                    # The run now waits for us: cut the stream, then answer.
                    proxy.cut()
                    resolved = await direct.resolve(run.run_id, event.payload["request_id"], "accept")
                    assert resolved.resolved_now
            assert proxy.cuts == 1 and proxy.accepted >= 2
            assert events[-1].type == "run.terminal" and events[-1].payload["status"] == "completed"
            assert_gapless(stored(events))
            assert "Approval: accept" in reply_text(events)
            assert (await direct.get_run(run.run_id)).status == COMPLETED
            listed = [r.run_id async for r in direct.list_runs(page_size=1)]
            assert listed == [run.run_id]
            with pytest.raises(agentrun.NotFound):
                await direct.get_run(str(uuid.uuid4()))

    asyncio.run(asyncio.wait_for(scenario(), RUN_DEADLINE_S + 30))


def test_the_watch_deadline_is_enforced(client: agentrun.Client) -> None:
    run = client.create_run("scripted", {"prompt": "[stall]"})
    seen: List[int] = []
    with pytest.raises(agentrun.DeadlineExceeded):
        for event in client.watch_run(run.run_id, deadline=2):
            seen.append(event.seq)
    assert seen, "the stalled run's first events were not yielded before the deadline"
    client.cancel(run.run_id, reason="test over")
    wait_until(
        lambda: agentrun.RunStatus.Name(client.get_run(run.run_id).status) == "RUN_STATUS_CANCELLED",
        30,
        "the stalled run to be cancelled",
    )
