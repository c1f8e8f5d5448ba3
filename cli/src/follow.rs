//! Following a run's event log until `run.terminal`, or a session's across its runs
//! until Ctrl-C.
//!
//! `RunService.WatchRun` (and `SessionService.WatchSession`) is the way: stored events
//! after a cursor, then live ones; a manager that answers UNIMPLEMENTED is polled with
//! `ListEvents` (`ListSessionEvents`) instead. Either way the last printed event is the
//! cursor — a seq for a run, a (run id, seq) pair for a session: reconnecting resumes
//! after it, and anything at or before it is skipped, so no event is printed twice.
//! UNAVAILABLE (manager restarting, connection lost) is retried a few times with
//! backoff. While the run waits for a runner or an approval, a [`Follower`] keeps a
//! status line saying so on a terminal, and an opened request prints how to answer it.

use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use agentrun_shared::proto;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::client::Manager;
use crate::error::CliError;
use crate::progress::{self, Waiting};
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
    let mut follower = Follower::new(printer);
    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        result = follow_log(manager, run_id, after_seq, &mut follower) => Some(result),
    };
    match outcome {
        Some(result) => result.map(Followed::Ended),
        None => {
            follower.printer.finish()?;
            Ok(Followed::Interrupted)
        }
    }
}

async fn follow_log<O: Write, E: Write>(
    manager: &mut Manager,
    run_id: &str,
    after_seq: i64,
    follower: &mut Follower<'_, O, E>,
) -> Result<Terminal, CliError> {
    let mut cursor = after_seq;
    let mut retry = Retry::default();
    let mut watch = true;
    loop {
        if watch {
            match manager.watch_run(run_id, cursor).await {
                Ok(mut stream) => loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        _ = tokio::time::sleep(progress::TICK), if follower.animating() => {
                            follower.redraw()?;
                            continue;
                        }
                    };
                    match message {
                        Ok(Some(event)) => {
                            retry.reset();
                            if let Some(terminal) = follower.show_run_event(&mut cursor, &event)? {
                                return Ok(terminal);
                            }
                        }
                        Ok(None) => {
                            let ended = Status::unavailable("the event stream ended early");
                            retry.wait(follower.printer, ended).await?;
                            break;
                        }
                        Err(status) if is_transient(&status) => {
                            retry.wait(follower.printer, status).await?;
                            break;
                        }
                        Err(status) => return Err(status.into()),
                    }
                },
                Err(status) if status.code() == Code::Unimplemented => watch = false,
                Err(status) if is_transient(&status) => {
                    retry.wait(follower.printer, status).await?
                }
                Err(status) => return Err(status.into()),
            }
        } else {
            match manager.list_events(run_id, cursor, PAGE_SIZE).await {
                Ok(page) => {
                    retry.reset();
                    let full = page.events.len() >= PAGE_SIZE as usize;
                    for event in &page.events {
                        if let Some(terminal) = follower.show_run_event(&mut cursor, event)? {
                            return Ok(terminal);
                        }
                    }
                    if page.end_of_run {
                        // Ended, but its terminal event was at or before the cursor.
                        return Ok(Terminal::from_run(&manager.get_run(run_id).await?));
                    }
                    if !full {
                        follower.pause(POLL_INTERVAL).await?;
                    }
                }
                Err(status) if is_transient(&status) => {
                    retry.wait(follower.printer, status).await?
                }
                Err(status) => return Err(status.into()),
            }
        }
    }
}

/// A position in a session's event log: runs in id order (ids are time-ordered, and
/// the manager writes them in canonical lowercase, so text order is id order), then
/// seq within a run. The default is before the first event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionCursor {
    pub run_id: String,
    pub seq: i64,
}

impl SessionCursor {
    /// True when `event` comes after this position.
    pub fn is_before(&self, event: &proto::Event) -> bool {
        (event.run_id.as_str(), event.seq) > (self.run_id.as_str(), self.seq)
    }

    /// ListSessionEvents after this position.
    pub fn list_request(
        &self,
        session_id: &str,
        output_only: bool,
        limit: i32,
    ) -> proto::ListSessionEventsRequest {
        proto::ListSessionEventsRequest {
            session_id: session_id.to_owned(),
            output_only,
            after_run_id: self.run_id.clone(),
            after_seq: self.seq,
            limit,
        }
    }

    fn watch_request(&self, session_id: &str, output_only: bool) -> proto::WatchSessionRequest {
        proto::WatchSessionRequest {
            session_id: session_id.to_owned(),
            output_only,
            after_run_id: self.run_id.clone(),
            after_seq: self.seq,
        }
    }
}

/// Prints a session's events after `cursor` as they arrive, across its runs, until
/// `shutdown` is cancelled (a session has no end); `cursor` is left at the last event
/// printed.
pub async fn follow_session<O: Write, E: Write>(
    manager: &mut Manager,
    session_id: &str,
    output_only: bool,
    cursor: &mut SessionCursor,
    follower: &mut Follower<'_, O, E>,
    shutdown: &CancellationToken,
) -> Result<(), CliError> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        result = follow_session_log(manager, session_id, output_only, cursor, follower) => {
            result?;
        }
    }
    follower.printer.finish()?;
    Ok(())
}

async fn follow_session_log<O: Write, E: Write>(
    manager: &mut Manager,
    session_id: &str,
    output_only: bool,
    cursor: &mut SessionCursor,
    follower: &mut Follower<'_, O, E>,
) -> Result<(), CliError> {
    let mut retry = Retry::default();
    let mut watch = true;
    loop {
        if watch {
            let request = cursor.watch_request(session_id, output_only);
            match manager.watch_session(request).await {
                Ok(mut stream) => loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        _ = tokio::time::sleep(progress::TICK), if follower.animating() => {
                            follower.redraw()?;
                            continue;
                        }
                    };
                    match message {
                        Ok(Some(message)) => {
                            retry.reset();
                            if let Some(event) = &message.event {
                                follower.show_session_event(cursor, event)?;
                            }
                        }
                        Ok(None) => {
                            let ended = Status::unavailable("the session stream ended");
                            retry.wait(follower.printer, ended).await?;
                            break;
                        }
                        Err(status) if is_transient(&status) => {
                            retry.wait(follower.printer, status).await?;
                            break;
                        }
                        Err(status) => return Err(status.into()),
                    }
                },
                Err(status) if status.code() == Code::Unimplemented => watch = false,
                Err(status) if is_transient(&status) => {
                    retry.wait(follower.printer, status).await?
                }
                Err(status) => return Err(status.into()),
            }
        } else {
            let request = cursor.list_request(session_id, output_only, PAGE_SIZE);
            match manager.list_session_events(request).await {
                Ok(events) => {
                    retry.reset();
                    for event in &events {
                        follower.show_session_event(cursor, event)?;
                    }
                    if events.len() < PAGE_SIZE as usize {
                        follower.pause(POLL_INTERVAL).await?;
                    }
                }
                Err(status) if is_transient(&status) => {
                    retry.wait(follower.printer, status).await?
                }
                Err(status) => return Err(status.into()),
            }
        }
    }
}

/// Prints followed events: each event, how to answer a request it opens, a header
/// when a session moves on to another run, and the status line while the run waits.
pub struct Follower<'p, O: Write, E: Write> {
    printer: &'p mut Printer<O, E>,
    waiting: Waiting,
    /// Print `agentrun approve …` when a request opens.
    hints: bool,
    /// The run of the last session event printed.
    last_run: Option<String>,
}

impl<'p, O: Write, E: Write> Follower<'p, O, E> {
    /// A follower printing on `printer`, with the approval hints.
    pub fn new(printer: &'p mut Printer<O, E>) -> Self {
        Self {
            printer,
            waiting: Waiting::default(),
            hints: true,
            last_run: None,
        }
    }

    /// Without the approval hints (listing a log rather than following it).
    pub fn without_hints(mut self) -> Self {
        self.hints = false;
        self
    }

    /// The printer, for what is printed besides events.
    pub fn printer(&mut self) -> &mut Printer<O, E> {
        self.printer
    }

    /// Prints a run's event unless the cursor says it was printed already; returns the
    /// run's outcome when it is the terminal event.
    fn show_run_event(
        &mut self,
        cursor: &mut i64,
        event: &proto::Event,
    ) -> io::Result<Option<Terminal>> {
        // An ephemeral delta (a `final` run's, never stored) carries the seq of the
        // stored event it follows: shown where it belongs, the cursor stays.
        if event.ephemeral {
            if event.seq == *cursor {
                self.show(event)?;
            }
            return Ok(None);
        }
        if event.seq <= *cursor {
            return Ok(None);
        }
        *cursor = event.seq;
        self.show(event)?;
        Ok((event.r#type == RUN_TERMINAL).then(|| Terminal::from_event(event)))
    }

    /// Prints a session's event unless the cursor says it was printed already.
    pub fn show_session_event(
        &mut self,
        cursor: &mut SessionCursor,
        event: &proto::Event,
    ) -> io::Result<()> {
        if !cursor.is_before(event) {
            return Ok(());
        }
        *cursor = SessionCursor {
            run_id: event.run_id.clone(),
            seq: event.seq,
        };
        if self.last_run.as_deref() != Some(event.run_id.as_str()) {
            self.last_run = Some(event.run_id.clone());
            self.printer.run_header(&event.run_id)?;
        }
        self.show(event)
    }

    fn show(&mut self, event: &proto::Event) -> io::Result<()> {
        self.printer.event(event)?;
        if self.hints
            && event.r#type == "request.opened"
            && let Some(request_id) = progress::request_id(event)
        {
            self.printer.dim(&format!(
                "· the run waits for an answer: {}  (or: agentrun decline {} {request_id})",
                progress::approve_command(&event.run_id, &request_id),
                event.run_id
            ))?;
        }
        // The status line is drawn only once events stop flowing (the next tick
        // without one), so a replay of a long log does not flicker through it.
        self.waiting.observe(event);
        Ok(())
    }

    /// True while the run waits and a status line would say so (on a terminal).
    fn animating(&self) -> bool {
        self.printer.shows_progress() && self.waiting.is_waiting()
    }

    /// Draws (or clears) the status line for now; called after a tick without events.
    pub fn redraw(&mut self) -> io::Result<()> {
        if !self.printer.shows_progress() {
            return Ok(());
        }
        let line = self.waiting.line(SystemTime::now());
        self.printer.progress(line.as_deref())
    }

    /// Sleeps `delay`, keeping the status line moving.
    async fn pause(&mut self, delay: Duration) -> io::Result<()> {
        let until = tokio::time::Instant::now() + delay;
        while self.animating() && tokio::time::Instant::now() + progress::TICK < until {
            tokio::time::sleep(progress::TICK).await;
            self.redraw()?;
        }
        tokio::time::sleep_until(until).await;
        self.redraw()
    }
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
