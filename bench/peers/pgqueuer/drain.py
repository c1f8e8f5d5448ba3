"""pgqueuer as a peer in agentrun-bench.

Installs pgqueuer's schema in an empty database, enqueues N no-op jobs, then times
queue managers draining them (``QueueExecutionMode.drain``: each returns once the queue
is empty and its own jobs are logged), and prints ``{"jobs":N,"seconds":S}`` on stdout.

Usage: python drain.py DATABASE_URL JOBS

Settings follow pgqueuer's own benchmark (docs/development/benchmark.md), which reports
its best figures with several dequeue workers, each a QueueManager on its own asyncpg
connection, in one process: 5 of them here (PGQUEUER_WORKERS), each dequeuing batches of
PGQUEUER_BATCH jobs (default 100: the benchmark's 10 is tuned for a live producer, and a
larger batch drains a pre-filled queue faster here), with asyncpg (the driver the docs
find twice as fast as psycopg) and uvloop (as pgqueuer's CLI runs it). Jobs go in with
pgqueuer's batch ``enqueue``, 10,000 per call, before the clock starts.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import time
from datetime import timedelta
from multiprocessing.synchronize import Event

import asyncpg
import uvloop
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.domain.types import QueueExecutionMode

INSERT_BATCH = 10_000


def worker(url: str, workers: int, batch: int, ready: Event, go: Event) -> None:
    """One worker process: connect its queue managers, say so, drain on `go`."""

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
    workers = int(os.environ.get("PGQUEUER_WORKERS", "5"))
    batch = int(os.environ.get("PGQUEUER_BATCH", "100"))
    uvloop.run(prepare(url, jobs))

    # Spawned, not forked: a fresh interpreter each, like separate `pgq run` processes.
    mp = multiprocessing.get_context("spawn")
    go = mp.Event()
    children = []
    for _ in range(processes):
        ready = mp.Event()
        child = mp.Process(target=worker, args=(url, workers, batch, ready, go))
        child.start()
        children.append((child, ready))
    for child, ready in children:
        while not ready.wait(0.1):
            if not child.is_alive():
                sys.exit(f"worker process exited early with {child.exitcode}")

    started = time.perf_counter()
    go.set()
    for child, _ in children:
        child.join()
    seconds = time.perf_counter() - started
    failed = [c.exitcode for c, _ in children if c.exitcode != 0]
    if failed:
        sys.exit(f"worker processes failed with exit codes {failed}")

    uvloop.run(check(url, jobs))
    print(json.dumps({"jobs": jobs, "seconds": seconds}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python drain.py DATABASE_URL JOBS")
    main(sys.argv[1], int(sys.argv[2]))
