//! Following a run's event log until `run.terminal`.
//!
//! `RunService.WatchRun` is the way (stored events after a cursor, then live ones);
//! a manager that answers UNIMPLEMENTED is polled with `ListEvents` instead. Either way
//! the last printed seq is the cursor: reconnecting resumes after it, and anything at
//! or below it is skipped, so no event is printed twice. UNAVAILABLE (manager
//! restarting, connection lost) is retried a few times with backoff.

use std::io::{self, Write};
use std::time::Duration;

use agentrun_shared::proto;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::client::Manager;
use crate::error::CliError;
use crate::render::{Printer, RUN_TERMINAL, Terminal};

/// How often `ListEvents` is polled when nothing new arrived.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Events per `ListEvents` page (the manager's maximum).
pub const PAGE_SIZE: i32 = 1000;
/// Consecutive transient failures tolerated before giving up.
const MAX_RETRIES: u32 = 5;
/// First retry delay; doubled per consecutive failure, capped at [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(3);

/// How following ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// The run ended; its outcome.
    Ended(Terminal),
    /// Ctrl-C: following stopped, the run goes on.
    Interrupted,
}

/// Prints the events of `run_id` after `after_seq` as they arrive until the run ends
/// or `shutdown` is cancelled.
pub async fn follow<O: Write, E: Write>(
    manager: &mut Manager,
    run_id: &str,
    after_seq: i64,
    printer: &mut Printer<O, E>,
    shutdown: &CancellationToken,
) -> Result<Followed, CliError> {
    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        result = follow_log(manager, run_id, after_seq, printer) => Some(result),
    };
    match outcome {
        Some(result) => result.map(Followed::Ended),
        None => {
            printer.finish()?;
            Ok(Followed::Interrupted)
        }
    }
}

async fn follow_log<O: Write, E: Write>(
    manager: &mut Manager,
    run_id: &str,
    after_seq: i64,
    printer: &mut Printer<O, E>,
) -> Result<Terminal, CliError> {
    let mut cursor = after_seq;
    let mut retry = Retry::default();
    let mut watch = true;
    loop {
        if watch {
            match manager.watch_run(run_id, cursor).await {
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            retry.reset();
                            if let Some(terminal) = show(printer, &mut cursor, &event)? {
                                return Ok(terminal);
                            }
                        }
                        Ok(None) => {
                            let ended = Status::unavailable("the event stream ended early");
                            retry.wait(printer, ended).await?;
                            break;
                        }
                        Err(status) if is_transient(&status) => {
                            retry.wait(printer, status).await?;
                            break;
                        }
                        Err(status) => return Err(status.into()),
                    }
                },
                Err(status) if status.code() == Code::Unimplemented => watch = false,
                Err(status) if is_transient(&status) => retry.wait(printer, status).await?,
                Err(status) => return Err(status.into()),
            }
        } else {
            match manager.list_events(run_id, cursor, PAGE_SIZE).await {
                Ok(page) => {
                    retry.reset();
                    let full = page.events.len() >= PAGE_SIZE as usize;
                    for event in &page.events {
                        if let Some(terminal) = show(printer, &mut cursor, event)? {
                            return Ok(terminal);
                        }
                    }
                    if page.end_of_run {
                        // Ended, but its terminal event was at or before the cursor.
                        return Ok(Terminal::from_run(&manager.get_run(run_id).await?));
                    }
                    if !full {
                        tokio::time::sleep(POLL_INTERVAL).await;
                    }
                }
                Err(status) if is_transient(&status) => retry.wait(printer, status).await?,
                Err(status) => return Err(status.into()),
            }
        }
    }
}

/// Prints `event` unless the cursor says it was printed already; returns the run's
/// outcome when it is the terminal event.
fn show<O: Write, E: Write>(
    printer: &mut Printer<O, E>,
    cursor: &mut i64,
    event: &proto::Event,
) -> io::Result<Option<Terminal>> {
    if event.seq <= *cursor {
        return Ok(None);
    }
    *cursor = event.seq;
    printer.event(event)?;
    Ok((event.r#type == RUN_TERMINAL).then(|| Terminal::from_event(event)))
}

/// Errors worth retrying: the manager is unreachable or the connection broke (a
/// broken stream surfaces as UNKNOWN).
fn is_transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown)
}

/// Consecutive transient failures and the backoff they earn.
#[derive(Default)]
struct Retry {
    failures: u32,
}

impl Retry {
    fn reset(&mut self) {
        self.failures = 0;
    }

    /// Sleeps before the next attempt, or gives up with `status` after [`MAX_RETRIES`].
    async fn wait<O: Write, E: Write>(
        &mut self,
        printer: &mut Printer<O, E>,
        status: Status,
    ) -> Result<(), CliError> {
        self.failures += 1;
        if self.failures > MAX_RETRIES {
            return Err(status.into());
        }
        let delay = FIRST_BACKOFF
            .saturating_mul(1 << (self.failures - 1))
            .min(MAX_BACKOFF);
        printer.dim(&format!(
            "· connection to the manager lost ({}); retrying in {} ms",
            status.message(),
            delay.as_millis()
        ))?;
        tokio::time::sleep(delay).await;
        Ok(())
    }
}
