// graphile-worker as a peer in agentrun-bench: installs its schema in an empty database,
// inserts N no-op jobs, then times worker processes draining them, and prints
// {"jobs":N,"seconds":S} on stdout.
//
// Usage: node drain.mjs DATABASE_URL JOBS
// Env:   GRAPHILE_WORKER_HOME  the folder install.sh ran `npm ci` in (holds node_modules)
//        GRAPHILE_WORKER_PROCESSES  worker processes (default 2)
//
// Settings are those of graphile-worker's own performance page, which reports its
// best throughput with them: concurrentJobs 24 with a pool of 25 connections, a local
// queue of 500 (jobs fetched and locked in batches), and job completion batched
// (completeJobBatchDelay/failJobBatchDelay 0: flush on the next tick). Its perfTest
// runs several `--once` workers side by side; here that is one process per core (2 on
// the benchmark box; 1 and 3 measured no faster), each running `runOnce`, which returns
// when no job is left. Jobs go in with the SQL function `graphile_worker.add_jobs`,
// 10,000 per call, before the clock starts; the clock runs from telling the loaded,
// waiting processes to start until the last one reports that `runOnce` returned.

import { fork } from "node:child_process";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const INSERT_BATCH = 10_000;
const WORKER = {
  concurrentJobs: 24,
  maxPoolSize: 25,
  localQueue: { size: 500 },
  completeJobBatchDelay: 0,
  failJobBatchDelay: 0,
};

const home = process.env.GRAPHILE_WORKER_HOME;
if (!home) {
  throw new Error("GRAPHILE_WORKER_HOME is not set (run bench/peers/install.sh)");
}
const requireFromHome = createRequire(`${home.replace(/\/$/, "")}/`);
const load = (name) => import(pathToFileURL(requireFromHome.resolve(name)).href);

const [, script, url, jobsArg] = process.argv;
const jobs = Number.parseInt(jobsArg ?? "", 10);
if (!url || !Number.isFinite(jobs) || jobs < 1) {
  throw new Error("usage: node drain.mjs DATABASE_URL JOBS");
}
const noop = { noop: async () => {} };
const quiet = async () => {
  const { Logger } = await load("@graphile/logger");
  // Warnings and errors only: per-job info lines would cost time and flood stderr.
  return new Logger(() => (level, message) => {
    if (level === "error" || level === "warning") console.error(`${level}: ${message}`);
  });
};

if (process.env.GRAPHILE_WORKER_CHILD === "1") {
  // One worker process: load everything, say so, and on "go" drain until the queue is
  // empty, then exit; so process start-up is not timed.
  // Without the parent (killed, or failed elsewhere) there is no one to report to.
  process.on("disconnect", () => process.exit(1));
  const { runOnce } = await load("graphile-worker");
  const logger = await quiet();
  await new Promise((resolve) => {
    process.once("message", resolve);
    process.send("ready");
  });
  await runOnce({
    connectionString: url,
    taskList: noop,
    noHandleSignals: true,
    logger,
    preset: { worker: { ...WORKER, connectionString: url } },
  });
  // The clock stops here, not at process exit.
  process.send("done", () => process.exit(0));
}

const { runMigrations } = await load("graphile-worker");
const pg = (await load("pg")).default;
await runMigrations({ connectionString: url, logger: await quiet() });

const client = new pg.Client({ connectionString: url });
await client.connect();
for (let done = 0; done < jobs; done += INSERT_BATCH) {
  const n = Math.min(INSERT_BATCH, jobs - done);
  await client.query(
    `SELECT graphile_worker.add_jobs(array(
       SELECT ('noop', json_build_object('i', i), NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
       FROM generate_series(1, $1::int) i))`,
    [n],
  );
}
const queued = await countJobs(client);
if (queued !== jobs) {
  throw new Error(`expected ${jobs} queued jobs, found ${queued}`);
}

const processes = Number.parseInt(process.env.GRAPHILE_WORKER_PROCESSES ?? "2", 10);
const children = Array.from({ length: processes }, () => {
  const child = fork(script, [url, String(jobs)], {
    env: { ...process.env, GRAPHILE_WORKER_CHILD: "1" },
    stdio: ["ignore", "inherit", "inherit", "ipc"],
  });
  const failed = (why) => new Error(`worker process failed: ${why}`);
  // Settles on the child's message `expected`, or fails if it exits or errs first.
  const message = (expected) =>
    new Promise((resolve, reject) => {
      child.on("message", (m) => m === expected && resolve(process.hrtime.bigint()));
      child.once("error", reject);
      child.once("exit", (code, signal) =>
        reject(failed(`exited with ${code ?? signal} before saying ${expected}`)),
      );
    });
  const ready = message("ready");
  const done = message("done");
  const exited = new Promise((resolve, reject) =>
    child.once("exit", (code, signal) =>
      code === 0 ? resolve() : reject(failed(`exited with ${code ?? signal}`)),
    ),
  );
  // Any may be left unawaited when another rejects first.
  ready.catch(() => {});
  done.catch(() => {});
  exited.catch(() => {});
  return { child, ready, done, exited };
});
await Promise.all(children.map((c) => c.ready));
const started = process.hrtime.bigint();
for (const { child } of children) child.send("go");
const finished = await Promise.all(children.map((c) => c.done));
const last = finished.reduce((a, b) => (a > b ? a : b));
const seconds = Number(last - started) / 1e9;
await Promise.all(children.map((c) => c.exited));

const left = await countJobs(client);
await client.end();
if (left !== 0) {
  throw new Error(`${left} jobs left after the workers exited`);
}
console.log(JSON.stringify({ jobs, seconds }));

async function countJobs(c) {
  const { rows } = await c.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs");
  return rows[0].n;
}
