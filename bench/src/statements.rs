//! Where a scenario's database time goes: `pg_stat_statements` of the benchmark
//! database, reset before the scenario and read after it, printed per unit of work (a
//! dispatched run, 1,000 streamed events).
//!
//! The throwaway cluster preloads the extension; a server given by `DATABASE_URL` may
//! not, and then nothing is printed.

/// Statements shown, by total execution time.
const TOP: i64 = 12;

/// Starts counting from zero; `false` when the server does not keep statistics.
pub async fn reset(db: &tokio_postgres::Client) -> bool {
    let ready = db
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             SELECT pg_stat_statements_reset();",
        )
        .await;
    match ready {
        Ok(()) => true,
        Err(err) => {
            eprintln!("statement statistics unavailable: {err}");
            false
        }
    }
}

/// Prints the top statements of this database since [`reset`], per unit of work
/// (`per` units, e.g. runs), to stderr; returns the database execution time in ms per
/// unit (`None`: no statistics).
pub async fn report(
    db: &tokio_postgres::Client,
    scenario: &str,
    per: f64,
    unit: &str,
) -> anyhow::Result<Option<f64>> {
    let rows = db
        .query(
            "SELECT calls, total_exec_time, rows,
                    regexp_replace(query, '\\s+', ' ', 'g') AS query,
                    sum(total_exec_time) OVER () AS all_time
             FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             ORDER BY total_exec_time DESC LIMIT $1",
            &[&TOP],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let all_ms: f64 = first.get("all_time");
    eprintln!(
        "{scenario}: where the database time goes (pg_stat_statements, per {unit}; {:.2} ms per {unit} in all)",
        all_ms / per
    );
    eprintln!("  calls/{unit}  ms/{unit}   share  rows/call  statement");
    for row in &rows {
        let calls: i64 = row.get("calls");
        let ms: f64 = row.get("total_exec_time");
        let returned: i64 = row.get("rows");
        let query: String = row.get("query");
        eprintln!(
            "  {:>9.2}  {:>7.3}  {:>5.1} %  {:>9.1}  {}",
            calls as f64 / per,
            ms / per,
            100.0 * ms / all_ms.max(1e-9),
            returned as f64 / (calls.max(1) as f64),
            query.chars().take(110).collect::<String>()
        );
    }
    Ok(Some(all_ms / per))
}
