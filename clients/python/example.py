#!/usr/bin/env python3
"""A run from Python, end to end: create it, follow its events, answer its approval.

Creates a run on the `scripted` profile with the prompt "[approval] deploy the site",
follows `WatchRun` from the start (resuming from the last seq seen if the stream
breaks), answers the `request.opened` approval with `accept`, and reads on until
`run.terminal`. Exits 0 if the run completed and its reply says "Approval: accept",
else 1.

Environment:
  AGENTRUN_MANAGER_URL  the manager, host:port (an http:// or https:// prefix is
                        accepted); default 127.0.0.1:7400
  AGENTRUN_API_KEY      optional; sent as `authorization: Bearer <key>`
  AGENTRUN_TIMEOUT_S    how long the whole run may take; default 120

Run ./generate.sh first (it writes the stubs into ./gen).
"""

import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

from agentrun.v1 import run_service_pb2 as run_pb  # noqa: E402
from agentrun.v1 import run_service_pb2_grpc as run_grpc  # noqa: E402
from agentrun.v1 import types_pb2  # noqa: E402

PROMPT = "[approval] deploy the site"
EXPECTED_REPLY = "Approval: accept"


def channel_from_env() -> grpc.Channel:
    url = os.environ.get("AGENTRUN_MANAGER_URL", "127.0.0.1:7400")
    if url.startswith("https://"):
        return grpc.secure_channel(url[len("https://") :].rstrip("/"), grpc.ssl_channel_credentials())
    if url.startswith("http://"):
        url = url[len("http://") :]
    return grpc.insecure_channel(url.rstrip("/"))


def call_metadata() -> list:
    key = os.environ.get("AGENTRUN_API_KEY", "")
    return [("authorization", f"Bearer {key}")] if key else []


def describe(event: types_pb2.Event) -> str:
    payload = json.loads(event.payload_json or "{}")
    return f"{event.seq:>4} {event.type:<18} {json.dumps(payload, sort_keys=True)}"


def main() -> int:
    timeout_s = float(os.environ.get("AGENTRUN_TIMEOUT_S", "120"))
    deadline = time.monotonic() + timeout_s
    metadata = call_metadata()
    runs = run_grpc.RunServiceStub(channel_from_env())

    created = runs.CreateRun(
        run_pb.CreateRunRequest(
            backend_profile="scripted",
            input_json=json.dumps({"prompt": PROMPT}),
        ),
        metadata=metadata,
        timeout=30,
        wait_for_ready=True,
    )
    run_id = created.run.run_id
    print(f"created run {run_id} ({types_pb2.RunStatus.Name(created.run.status)})", flush=True)

    last_seq = 0
    reply = ""
    answered = set()
    terminal = None
    while terminal is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(f"error: run {run_id} did not end within {timeout_s:.0f}s", file=sys.stderr)
            return 1
        stream = runs.WatchRun(
            run_pb.WatchRunRequest(run_id=run_id, after_seq=last_seq),
            metadata=metadata,
            timeout=remaining,
        )
        try:
            for event in stream:
                last_seq = event.seq
                print(describe(event), flush=True)
                payload = json.loads(event.payload_json or "{}")
                if event.type == "content.delta" and payload.get("kind") == "assistant_text":
                    reply += payload.get("delta", "")
                elif event.type == "request.opened":
                    request_id = payload["request_id"]
                    if request_id in answered:
                        continue
                    resolved = runs.ResolveRequest(
                        run_pb.ResolveRequestRequest(
                            run_id=run_id, request_id=request_id, decision="accept"
                        ),
                        metadata=metadata,
                        timeout=30,
                    )
                    answered.add(request_id)
                    print(
                        f"     answered request {request_id}: {resolved.resolution_json}"
                        f" (resolved_now={resolved.resolved_now})",
                        flush=True,
                    )
                elif event.type == "run.terminal":
                    terminal = payload
        except grpc.RpcError as err:
            # A broken stream is resumed from the last seq seen: nothing is missed or
            # repeated. Anything but a transient error ends the example.
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                print(f"error: WatchRun: {err.code().name}: {err.details()}", file=sys.stderr)
                return 1
            print(f"     stream broke ({err.details()}); resuming after seq {last_seq}", flush=True)
            time.sleep(0.5)
            continue
        if terminal is None:
            print(f"     stream ended before run.terminal; resuming after seq {last_seq}", flush=True)
            time.sleep(0.5)

    run = runs.GetRun(run_pb.GetRunRequest(run_id=run_id), metadata=metadata, timeout=30).run
    status = types_pb2.RunStatus.Name(run.status)
    print(f"run {run_id} ended {status}; reply: {reply!r}", flush=True)
    if run.status != types_pb2.RUN_STATUS_COMPLETED:
        print(f"error: expected RUN_STATUS_COMPLETED, got {status} {terminal}", file=sys.stderr)
        return 1
    if EXPECTED_REPLY not in reply:
        print(f"error: the reply does not contain {EXPECTED_REPLY!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        sys.exit(1)
