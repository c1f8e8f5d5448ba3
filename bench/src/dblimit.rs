//! The database limit: pgbench on the same PostgreSQL, running the minimal SQL of the
//! work the manager does, as the ceiling for the dispatch and stream figures.
//!
//! - dispatch: insert a pending row, claim one with `FOR UPDATE SKIP LOCKED`, mark it
//!   finished; each its own transaction, so one pgbench "transaction" (one script run)
//!   is one dispatch.
//! - batched dispatch: the same three statements, each for 100 jobs at once (the
//!   ceiling a dispatcher that batches its claims can approach).
//! - insert: one multi-row `INSERT` of 100 rows into an events-like table.
//! - the data model's dispatch: what a dispatched `[tokens:1]` run writes, on agentrun's
//!   own schema (a scratch database migrated for it) and batched ×100 as the manager
//!   batches it, with nothing else: the run (carrying its first turn) and its first log
//!   batch; the claim (the run leased, its turn delivered, a log batch); the finish (the
//!   turn completed, the run ended, the runner's events with the manager's in one log
//!   batch).
//!   No manager, no runner, no fairness or limits: the most this data model allows on
//!   this server, however lean the processes around it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::report::Figure;

const CLIENTS: u32 = 16;
const INSERT_ROWS: u32 = 100;
/// Jobs per statement in the batched dispatch script.
const DISPATCH_BATCH: u32 = 100;

const SCHEMA: &str = "
CREATE TABLE bench_jobs (
    id      bigserial PRIMARY KEY,
    status  text NOT NULL DEFAULT 'pending',
    payload jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX bench_jobs_pending ON bench_jobs (id) WHERE status = 'pending';
INSERT INTO bench_jobs (payload) SELECT '{}' FROM generate_series(1, 1000);
CREATE TABLE bench_events (
    run_id     uuid NOT NULL,
    seq        bigint NOT NULL,
    type       text NOT NULL,
    payload    jsonb NOT NULL,
    producer   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
";

/// The aggregate keeps one result row even when nothing was claimed, so `\gset` holds.
const DISPATCH_SCRIPT: &str = r#"INSERT INTO bench_jobs (payload) VALUES ('{"prompt": "x"}');
WITH claimed AS (UPDATE bench_jobs SET status = 'claimed' WHERE id = (SELECT id FROM bench_jobs WHERE status = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id) SELECT coalesce(max(id), 0) AS job FROM claimed \gset
UPDATE bench_jobs SET status = 'finished' WHERE id = :job;
"#;

const BATCHED_DISPATCH_SCRIPT: &str = r#"INSERT INTO bench_jobs (payload) SELECT '{"prompt": "x"}' FROM generate_series(1, 100);
WITH claimed AS (UPDATE bench_jobs SET status = 'claimed' WHERE id IN (SELECT id FROM bench_jobs WHERE status = 'pending' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING id) SELECT coalesce(array_agg(id), '{}') AS jobs FROM claimed \gset
UPDATE bench_jobs SET status = 'finished' WHERE id = ANY(CAST(:jobs AS bigint[]));
"#;

const INSERT_SCRIPT: &str = r#"INSERT INTO bench_events (run_id, seq, type, payload, producer) SELECT r.id, g, 'content.delta', '{"text": "token"}', 'runner' FROM (SELECT gen_random_uuid() AS id) r, generate_series(1, 100) g;
"#;

/// Runs per pgbench transaction of [`MODEL_DISPATCH_SCRIPT`].
const MODEL_BATCH: u32 = 100;

/// One pgbench transaction: 100 runs created, claimed and finished, three transactions
/// as the manager's are (each client is its own tenant and runner, as the dispatcher's
/// groups are). The payloads are those of a dispatched `[tokens:1]` run; its first turn
/// is carried by the run row (delivered with the claim, completed by the update that
/// ends the run, which carries the runner's report on it). Log batches write no seqs
/// (migration V29).
const MODEL_DISPATCH_SCRIPT: &str = r#"BEGIN;
WITH created AS (
  INSERT INTO runs (id, tenant_id, project_id, backend_profile, queue, input, status, max_attempts,
                    run_timeout_ms, last_event_seq, last_command_seq, first_turn_id, first_turn_status,
                    first_turn_updated_at)
  SELECT gen_random_uuid(), 'model-' || :client_id, 'default', 'scripted', 'default',
         '{"prompt": "[tokens:1] x"}', 'pending', 3, 3600000, 2, 1, gen_random_uuid(), 'pending', now()
  FROM generate_series(1, 100) RETURNING id)
INSERT INTO event_batches (run_id, first_seq, last_seq, producer, created_at, seqs, types, payloads)
SELECT id, 1, 2, 'manager', now(), NULL, '{run.created,command.created}',
       '[{"backend_profile":"scripted","queue":"default"},{"kind":"turn","payload":{"prompt":"[tokens:1] x"},"seq":1}]'
FROM created;
COMMIT;
BEGIN;
WITH picked AS MATERIALIZED (
  SELECT id FROM runs
  WHERE tenant_id = 'model-' || :client_id AND queue = 'default' AND status = 'pending' AND held IS NULL
  ORDER BY priority DESC, created_at, id LIMIT 100 FOR UPDATE SKIP LOCKED),
 claimed AS (
  UPDATE runs SET status = 'claimed', lease_runner_id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid,
         lease_epoch = runs.lease_epoch + 1, lease_expires_at = now() + interval '30 s',
         claimed_at = now(), updated_at = now(), run_deadline = now() + runs.run_timeout_ms * interval '1 ms',
         first_turn_status = 'delivered', first_turn_updated_at = now(),
         last_event_seq = runs.last_event_seq + 2
  FROM picked WHERE runs.id = picked.id RETURNING runs.id)
INSERT INTO event_batches (run_id, first_seq, last_seq, producer, created_at, seqs, types, payloads)
SELECT id, 3, 4, 'manager', now(), NULL, '{run.claimed,command.delivered}',
       '[{"attempt":1,"epoch":1,"runner_id":"00000000-0000-0000-0000-000000000001","runner_name":"model"},{"command_id":"00000000-0000-0000-0000-000000000001","kind":"turn","seq":1}]'
FROM claimed;
COMMIT;
BEGIN;
WITH held AS MATERIALIZED (
  SELECT id FROM runs
  WHERE tenant_id = 'model-' || :client_id AND status IN ('claimed', 'running', 'waiting')
    AND lease_runner_id = ('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid
  FOR UPDATE),
 ended AS (
  UPDATE runs SET status = 'completed', finished_at = now(), updated_at = now(), lease_runner_seq = 6,
         last_event_seq = 13, first_turn_status = 'completed', first_turn_updated_at = now()
  FROM held WHERE runs.id = held.id RETURNING runs.id, runs.lease_runner_id)
INSERT INTO event_batches (run_id, first_seq, last_seq, producer, runner_id, epoch, created_at, seqs, types,
                           payloads, runner_seqs)
SELECT id, 5, 13, 'runner', lease_runner_id, 1, now(), NULL,
       '{run.started,turn.started,item.started,content.delta,item.completed,usage.updated,turn.completed,command.completed,run.terminal}',
       '[{"attempt":1,"epoch":1},{"command_id":"00000000-0000-0000-0000-000000000001","seq":1,"turn_id":"00000000-0000-0000-0000-000000000001"},{"item_id":"00000000-0000-0000-0000-000000000001:1","kind":"assistant_message"},{"delta":"token1","item_id":"00000000-0000-0000-0000-000000000001:1","kind":"assistant_text"},{"item_id":"00000000-0000-0000-0000-000000000001:1","kind":"assistant_message","text":"token1"},{"input_tokens":1,"output_tokens":1},{"state":"completed","turn_id":"00000000-0000-0000-0000-000000000001"},{"command_id":"00000000-0000-0000-0000-000000000001","status":"completed"},{"status":"completed"}]',
       '{NULL,1,2,3,4,5,6,NULL,NULL}'
FROM ended;
COMMIT;
"#;

/// Creates the scratch tables in `url`'s database and runs the pgbench scripts for
/// `seconds` each; the data model's dispatch runs in `model_url`'s database, which it
/// migrates first (an empty one, used for nothing else).
pub async fn run(
    db: &tokio_postgres::Client,
    url: &str,
    model_url: &str,
    seconds: u32,
) -> anyhow::Result<Vec<Figure>> {
    let model_db = agentrun_manager::db::pool(model_url, 1)?;
    agentrun_manager::db::migrate(&model_db)
        .await
        .context("migrate the data model's scratch database")?;
    drop(model_db);
    db.batch_execute(SCHEMA)
        .await
        .context("create the pgbench scratch tables")?;
    let pgbench = find_pgbench()?;
    let dir = std::env::temp_dir().join(format!("agentrun-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dispatch_script = dir.join("dispatch.sql");
    let batched_script = dir.join("batched-dispatch.sql");
    let insert_script = dir.join("insert.sql");
    let model_script = dir.join("model-dispatch.sql");
    std::fs::write(&dispatch_script, DISPATCH_SCRIPT)?;
    std::fs::write(&batched_script, BATCHED_DISPATCH_SCRIPT)?;
    std::fs::write(&insert_script, INSERT_SCRIPT)?;
    std::fs::write(&model_script, MODEL_DISPATCH_SCRIPT)?;

    let tps = |script: PathBuf, url: &str| {
        let (pgbench, url) = (pgbench.clone(), url.to_owned());
        tokio::task::spawn_blocking(move || run_pgbench(&pgbench, &url, &script, seconds))
    };
    let dispatch_tps = tps(dispatch_script, url).await?;
    let batched_tps = tps(batched_script, url).await?;
    let insert_tps = tps(insert_script, url).await?;
    let model_tps = tps(model_script, model_url).await?;
    let _ = std::fs::remove_dir_all(&dir);
    db.batch_execute("DROP TABLE bench_jobs; DROP TABLE bench_events")
        .await
        .context("drop the pgbench scratch tables")?;
    let (dispatch_tps, batched_tps, insert_tps, model_tps) =
        (dispatch_tps?, batched_tps?, insert_tps?, model_tps?);

    Ok(vec![
        Figure::new(
            "limit",
            "limit.dispatches_per_s",
            dispatch_tps,
            "dispatches/s",
        ),
        Figure::new(
            "limit",
            "limit.batched_dispatches_per_s",
            batched_tps * f64::from(DISPATCH_BATCH),
            "dispatches/s",
        ),
        Figure::new(
            "limit",
            "limit.rows_per_s",
            insert_tps * f64::from(INSERT_ROWS),
            "rows/s",
        ),
        Figure::new(
            "limit",
            "limit.model_dispatches_per_s",
            model_tps * f64::from(MODEL_BATCH),
            "runs/s",
        ),
    ])
}

/// Runs `script` with pgbench and returns its transactions per second.
fn run_pgbench(pgbench: &Path, url: &str, script: &Path, seconds: u32) -> anyhow::Result<f64> {
    let output = Command::new(pgbench)
        .args(["--no-vacuum", "--protocol=prepared"])
        .arg(format!("--client={CLIENTS}"))
        .arg("--jobs=2")
        .arg(format!("--time={seconds}"))
        .arg("--file")
        .arg(script)
        .arg(url)
        .output()
        .with_context(|| format!("run {}", pgbench.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench {} failed: {}{}",
            script.display(),
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // "tps = 1234.567890 (without initial connection time)"
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{stdout}"))
}

/// pgbench from PATH, or next to the newest /usr/lib/postgresql/*/bin/initdb.
fn find_pgbench() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|p| p.is_absolute())
        .collect();
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    candidates.extend(versioned.into_iter().map(|(_, p)| p));
    candidates
        .iter()
        .map(|d| d.join("pgbench"))
        .find(|p| p.is_file())
        .context("pgbench not found in PATH or /usr/lib/postgresql/*/bin (it ships with the PostgreSQL server package)")
}
