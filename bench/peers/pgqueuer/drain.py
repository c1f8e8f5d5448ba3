"""pgqueuer as a peer in agentrun-bench.

Installs pgqueuer's schema in an empty database, enqueues N no-op jobs, then times
queue managers draining them (``QueueExecutionMode.drain``: each returns once the queue
is empty and its own jobs are logged), and prints ``{"jobs":N,"seconds":S}`` on stdout.

Usage: python drain.py DATABASE_URL JOBS

Settings: pgqueuer's own benchmark (docs/development/benchmark.md) runs several
QueueManagers, each on its own asyncpg connection (the driver those docs find twice as
fast as psycopg), and reports throughput rising with their number. A Python process
runs its asyncio loop on one core, so on the 2-core benchmark box the managers go one per
core: PGQUEUER_PROCESSES (2) processes with PGQUEUER_WORKERS (1) manager each. More
managers per process (the benchmark's 5) measured slower here, one process with two no
faster.
Each dequeues PGQUEUER_BATCH (100) jobs at a time: the benchmark's 10 suits a live
producer, 100 drained a pre-filled queue fastest, 500 no faster. The loop is uvloop, as
pgqueuer's CLI runs it. Jobs go in with pgqueuer's batch ``enqueue``, 10,000 per call,
before the clock starts; the clock stops when every manager has returned (its jobs
logged), before process teardown.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import time
from datetime import timedelta
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

import asyncpg
import uvloop
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.domain.types import QueueExecutionMode

INSERT_BATCH = 10_000


def worker(
    url: str, workers: int, batch: int, ready: Event, go: Event, finished: Synchronized[float]
) -> None:
    """One worker process: connect its queue managers, say so, drain on `go`, and set
    `finished` to the monotonic time its managers were done (before process teardown)."""

    async def run() -> None:
        managers = []
        for _ in range(workers):
            qm = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(url))))

            @qm.entrypoint("noop")
            async def noop(job: Job) -> None:
                pass

            managers.append(qm)
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        # A manager whose last dequeue came back empty while its own jobs still ran
        # sleeps up to `dequeue_timeout` for a notification before it re-checks the
        # queue and, being drained, returns; the default 30 s would be timed.
        await asyncio.gather(
            *(
                qm.run(
                    batch_size=batch,
                    mode=QueueExecutionMode.drain,
                    dequeue_timeout=timedelta(milliseconds=100),
                )
                for qm in managers
            )
        )
        finished.value = time.monotonic()

    uvloop.run(run())


async def prepare(url: str, jobs: int) -> None:
    """Installs the schema and enqueues `jobs` no-op jobs."""
    conn = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    for done in range(0, jobs, INSERT_BATCH):
        n = min(INSERT_BATCH, jobs - done)
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    queued = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    await conn.close()
    if queued != jobs:
        raise RuntimeError(f"expected {jobs} queued jobs, found {queued}")


async def check(url: str, jobs: int) -> None:
    """Fails unless every job ran and was logged successful."""
    conn = await asyncpg.connect(url)
    left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    done = await conn.fetchval(
        "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
    )
    await conn.close()
    if left != 0 or done != jobs:
        raise RuntimeError(f"{left} jobs left and {done} logged successful after the drain")


def main(url: str, jobs: int) -> None:
    processes = int(os.environ.get("PGQUEUER_PROCESSES", "2"))
    workers = int(os.environ.get("PGQUEUER_WORKERS", "1"))
    batch = int(os.environ.get("PGQUEUER_BATCH", "100"))
    uvloop.run(prepare(url, jobs))

    # Spawned, not forked: a fresh interpreter each, like separate `pgq run` processes.
    mp = multiprocessing.get_context("spawn")
    go = mp.Event()
    children = []
    for _ in range(processes):
        ready, finished = mp.Event(), mp.Value("d", 0.0)
        # Daemonic: terminated if this process exits early on an error.
        child = mp.Process(
            target=worker, args=(url, workers, batch, ready, go, finished), daemon=True
        )
        child.start()
        children.append((child, ready, finished))
    for child, ready, _ in children:
        while not ready.wait(0.1):
            if not child.is_alive():
                sys.exit(f"worker process exited early with {child.exitcode}")

    # CLOCK_MONOTONIC is one clock for every process on the machine.
    started = time.monotonic()
    go.set()
    for child, _, _ in children:
        child.join()
    failed = [c.exitcode for c, _, _ in children if c.exitcode != 0]
    if failed:
        sys.exit(f"worker processes failed with exit codes {failed}")
    seconds = max(f.value for _, _, f in children) - started

    uvloop.run(check(url, jobs))
    print(json.dumps({"jobs": jobs, "seconds": seconds}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python drain.py DATABASE_URL JOBS")
    main(sys.argv[1], int(sys.argv[2]))
