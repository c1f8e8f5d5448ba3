//! The session commands: `agentrun sessions` lists conversations with their attention
//! state for a reader, `agentrun session` prints one — its details, then the events of
//! all its runs in order — and can follow it live and mark it read.
//!
//! Marking read never claims more than was printed: the version marked is one the
//! session had before everything printed was read, or the current one when nothing is
//! stored after the last event printed.

use std::time::{Duration, SystemTime};

use agentrun_shared::proto::{self, SessionStateFilter};
use tokio_util::sync::CancellationToken;

use crate::client::Manager;
use crate::commands::{event_format, write_list};
use crate::error::{CliError, EXIT_INTERRUPTED, EXIT_OK};
use crate::follow::{self, Follower, PAGE_SIZE, SessionCursor};
use crate::output::{self, OutputFormat};
use crate::render::{self, Printer};

/// Most sessions one ListSessions page may hold.
const MAX_PAGE: usize = 200;
/// How long marking read may take once Ctrl-C stopped following.
const MARK_ON_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `agentrun sessions`.
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// Which sessions, for the reader: `default` hides read sessions that ended more
    /// than 7 days ago; `running` has an active run; `unread` changed since the reader
    /// marked it read; `terminal` has no active run; `idle` is read.
    #[arg(long, value_enum, default_value_t = StateArg::Default)]
    pub state: StateArg,
    /// Whose read cursor decides attention [default: the manager's, `default`].
    #[arg(long)]
    pub reader: Option<String>,
    /// Only sessions of this backend profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// Most sessions to show.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
}

/// A session state filter, as `--state` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    Default,
    Running,
    Unread,
    Terminal,
    Idle,
    All,
}

impl StateArg {
    fn to_proto(self) -> SessionStateFilter {
        match self {
            StateArg::Default => SessionStateFilter::Default,
            StateArg::Running => SessionStateFilter::Running,
            StateArg::Unread => SessionStateFilter::Unread,
            StateArg::Terminal => SessionStateFilter::Terminal,
            StateArg::Idle => SessionStateFilter::Idle,
            StateArg::All => SessionStateFilter::All,
        }
    }
}

/// Arguments of `agentrun session`.
#[derive(Debug, clap::Args)]
pub struct SessionArgs {
    /// The session's id.
    pub session_id: String,
    /// After the stored events, keep printing new ones (of this and later runs) until
    /// Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// Only output: reply text, command output, completed messages, diffs, errors and
    /// each run's end.
    #[arg(long)]
    pub output_only: bool,
    /// Whose read cursor decides attention and is moved by --mark-read [default: the
    /// manager's, `default`].
    #[arg(long)]
    pub reader: Option<String>,
    /// Mark the session read for the reader after printing it (with --follow: before
    /// following, and again on Ctrl-C).
    #[arg(long)]
    pub mark_read: bool,
    /// Print each event as one JSON line (as `-o jsonl`).
    #[arg(long)]
    pub json: bool,
}

/// `agentrun sessions`: ListSessions, paged up to `--limit`, as a table.
pub async fn sessions(
    manager: &mut Manager,
    args: SessionsArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let limit = args.limit as usize;
    let mut shown: Vec<proto::SessionView> = Vec::new();
    let mut page_token = String::new();
    loop {
        let page_size = (limit - shown.len()).min(MAX_PAGE);
        let page = manager
            .list_sessions(proto::ListSessionsRequest {
                state: args.state.to_proto() as i32,
                reader: args.reader.clone().unwrap_or_default(),
                backend_profile: args.profile.clone().unwrap_or_default(),
                page_size: page_size as i32,
                page_token,
                ..Default::default()
            })
            .await?;
        shown.extend(page.sessions);
        page_token = page.next_page_token;
        if page_token.is_empty() || shown.len() >= limit {
            break;
        }
    }
    shown.truncate(limit);
    let values = shown.iter().map(output::session_view).collect();
    write_list(out, values, || {
        render::sessions_table(&shown, SystemTime::now())
    })?;
    if !page_token.is_empty() {
        eprintln!("(more sessions exist: raise --limit or narrow with --state)");
    }
    Ok(EXIT_OK)
}

/// `agentrun session`: the session, then its events; with `--follow` new ones until
/// Ctrl-C (exit 130).
pub async fn session(
    manager: &mut Manager,
    args: SessionArgs,
    out: OutputFormat,
    shutdown: &CancellationToken,
) -> Result<u8, CliError> {
    // Listing without following: no status line, no hints for long-answered requests.
    let mut printer = Printer::stdio(event_format(out, args.json));
    if !args.follow {
        printer = printer.with_progress(false);
    }
    let mut follower = Follower::new(&mut printer);
    if !args.follow {
        follower = follower.without_hints();
    }
    let reader = args.reader.clone().unwrap_or_default();
    let mut cursor = SessionCursor::default();
    // Ctrl-C before following: nothing to mark, just stop.
    let printed = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        result = print_stored(manager, &args, &reader, &mut cursor, &mut follower) => Some(result?),
    };
    let Some(known_version) = printed else {
        follower.printer().finish()?;
        return Ok(EXIT_INTERRUPTED);
    };
    if args.mark_read {
        mark_read(
            manager,
            &args,
            &reader,
            &cursor,
            known_version,
            &mut follower,
        )
        .await?;
    }
    if !args.follow {
        follower.printer().finish()?;
        return Ok(EXIT_OK);
    }
    follow::follow_session(
        manager,
        &args.session_id,
        args.output_only,
        &mut cursor,
        &mut follower,
        shutdown,
    )
    .await?;
    if args.mark_read {
        // Ctrl-C ended following; a second one exits at once (main).
        let marked = tokio::time::timeout(
            MARK_ON_EXIT_TIMEOUT,
            mark_read(
                manager,
                &args,
                &reader,
                &cursor,
                known_version,
                &mut follower,
            ),
        )
        .await;
        match marked {
            Ok(result) => result?,
            Err(_) => follower
                .printer()
                .dim("· not marked read: the manager did not answer in time")?,
        }
    }
    Ok(EXIT_INTERRUPTED)
}

/// Prints the session's details (on stderr) and its stored events, leaving `cursor` at
/// the last one; returns the session's version as read before the events, which they
/// cover.
async fn print_stored<O: std::io::Write, E: std::io::Write>(
    manager: &mut Manager,
    args: &SessionArgs,
    reader: &str,
    cursor: &mut SessionCursor,
    follower: &mut Follower<'_, O, E>,
) -> Result<i64, CliError> {
    let view = manager.get_session(&args.session_id, reader).await?;
    for line in render::session_details(&view, SystemTime::now()) {
        follower.printer().dim(&line)?;
    }
    loop {
        let request = cursor.list_request(&args.session_id, args.output_only, PAGE_SIZE);
        let events = manager.list_session_events(request).await?;
        for event in &events {
            follower.show_session_event(cursor, event)?;
        }
        if events.len() < PAGE_SIZE as usize {
            break;
        }
    }
    Ok(view.session.map_or(0, |s| s.version))
}

/// MarkSessionRead for what was printed: the current version when nothing is stored
/// after `cursor`, else `known_version` (a version whose events were all printed).
async fn mark_read<O: std::io::Write, E: std::io::Write>(
    manager: &mut Manager,
    args: &SessionArgs,
    reader: &str,
    cursor: &SessionCursor,
    known_version: i64,
    follower: &mut Follower<'_, O, E>,
) -> Result<(), CliError> {
    let current = manager.get_session(&args.session_id, reader).await?;
    let current_version = current.session.map_or(0, |s| s.version);
    let unseen = manager
        .list_session_events(cursor.list_request(&args.session_id, args.output_only, 1))
        .await?;
    let version = if unseen.is_empty() {
        current_version
    } else {
        known_version
    };
    if version < 1 {
        return Ok(());
    }
    let marked = manager
        .mark_session_read(&args.session_id, reader, version)
        .await?;
    let reader = if reader.is_empty() { "default" } else { reader };
    follower.printer().dim(&format!(
        "· marked read up to version {version} for reader {reader}: {}",
        render::attention(marked.attention)
    ))?;
    Ok(())
}
