//! The database limit: pgbench on the same PostgreSQL, running the minimal SQL of the
//! work the manager does, as the ceiling for the dispatch and stream figures.
//!
//! - dispatch: insert a pending row, claim one with `FOR UPDATE SKIP LOCKED`, mark it
//!   finished; each its own transaction, so one pgbench "transaction" (one script run)
//!   is one dispatch.
//! - batched dispatch: the same three statements, each for 100 jobs at once (the
//!   ceiling a dispatcher that batches its claims can approach).
//! - insert: one multi-row `INSERT` of 100 rows into an events-like table.

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

/// Creates the scratch tables in `url`'s database and runs both pgbench scripts for
/// `seconds` each.
pub async fn run(
    db: &tokio_postgres::Client,
    url: &str,
    seconds: u32,
) -> anyhow::Result<Vec<Figure>> {
    db.batch_execute(SCHEMA)
        .await
        .context("create the pgbench scratch tables")?;
    let pgbench = find_pgbench()?;
    let dir = std::env::temp_dir().join(format!("agentrun-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dispatch_script = dir.join("dispatch.sql");
    let batched_script = dir.join("batched-dispatch.sql");
    let insert_script = dir.join("insert.sql");
    std::fs::write(&dispatch_script, DISPATCH_SCRIPT)?;
    std::fs::write(&batched_script, BATCHED_DISPATCH_SCRIPT)?;
    std::fs::write(&insert_script, INSERT_SCRIPT)?;

    let tps = |script: PathBuf| {
        let (pgbench, url) = (pgbench.clone(), url.to_owned());
        tokio::task::spawn_blocking(move || run_pgbench(&pgbench, &url, &script, seconds))
    };
    let dispatch_tps = tps(dispatch_script).await?;
    let batched_tps = tps(batched_script).await?;
    let insert_tps = tps(insert_script).await?;
    let _ = std::fs::remove_dir_all(&dir);
    db.batch_execute("DROP TABLE bench_jobs; DROP TABLE bench_events")
        .await
        .context("drop the pgbench scratch tables")?;
    let (dispatch_tps, batched_tps, insert_tps) = (dispatch_tps?, batched_tps?, insert_tps?);

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
