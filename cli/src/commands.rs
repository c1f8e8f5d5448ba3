//! The client commands: their arguments and what each one calls and prints.
//!
//! Results go to stdout (a run id, a status, a table; JSON with `-o json|jsonl`, shaped
//! in `output`); progress and notes go to stderr, so `agentrun run "…" --follow >
//! reply.txt` captures just the reply.

use std::io::Write;
use std::time::{Duration, SystemTime};

use agentrun_shared::proto::{self, CommandKind, RunStatus, StreamMode, TurnDeliveryPolicy};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::client::Manager;
use crate::duration;
use crate::error::{CliError, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK};
use crate::follow::{self, Followed, PAGE_SIZE};
use crate::output::{self, OutputFormat};
use crate::render::{self, Format, Printer};

/// Arguments of `agentrun run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The prompt; it becomes the run's first turn.
    pub prompt: String,
    /// Backend profile (provider and model) [default: `openai` when OPENAI_API_KEY is
    /// set, else `scripted`].
    #[arg(long)]
    pub profile: Option<String>,
    /// Queue to submit to [default: the manager's, `default`].
    #[arg(long)]
    pub queue: Option<String>,
    /// Higher is claimed first; -1000..=1000.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Continue (or start) this session.
    #[arg(long)]
    pub session: Option<String>,
    /// How the run's streamed output is stored [default: deltas].
    #[arg(long, value_enum)]
    pub stream_mode: Option<StreamModeArg>,
    /// Expire the run when no runner claimed it within this long (`30s`, `10m`, `2h`,
    /// or milliseconds) [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    pub queue_timeout: Option<Duration>,
    /// Fail the run when an attempt runs longer than this (`30s`, `10m`, `2h`, or
    /// milliseconds) [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    pub run_timeout: Option<Duration>,
    /// Stream the reply to stdout (the run id goes to stderr) until the run ends; exit
    /// 0 when it completed, 1 otherwise.
    #[arg(long, short)]
    pub follow: bool,
    /// With --follow, print every event as a JSON line instead (as `-o jsonl`).
    #[arg(long, requires = "follow")]
    pub json: bool,
}

/// How a run's streamed output (content deltas) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamModeArg {
    /// Every delta is stored.
    Deltas,
    /// The deltas of one item that arrive together are stored as one.
    Coalesced,
    /// Deltas are only streamed live; the completed item, stored, has the whole text.
    Final,
}

impl StreamModeArg {
    fn to_proto(self) -> StreamMode {
        match self {
            StreamModeArg::Deltas => StreamMode::Deltas,
            StreamModeArg::Coalesced => StreamMode::Coalesced,
            StreamModeArg::Final => StreamMode::Final,
        }
    }
}

/// Arguments of `agentrun events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// The run's id.
    pub run_id: String,
    /// Only events with a seq above this one.
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// Keep printing new events until the run ends (exit 0 however it ended).
    #[arg(long, short)]
    pub follow: bool,
    /// Print each event as one JSON line (as `-o jsonl`).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `agentrun cancel`: one run, or every run a filter matches.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The run's id. Without it, every run not ended that matches the filters below is
    /// cancelled (CancelRuns).
    #[arg(required_unless_present_any = ["status", "queue", "session", "profile", "label", "all"])]
    pub run_id: Option<String>,
    /// Recorded as the runs' failure message.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Only runs in these statuses: pending, claimed, running, waiting (repeat or
    /// separate with commas).
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "run_id")]
    pub status: Vec<StatusArg>,
    /// Only runs of this queue.
    #[arg(long, conflicts_with = "run_id")]
    pub queue: Option<String>,
    /// Only runs of this session.
    #[arg(long, conflicts_with = "run_id")]
    pub session: Option<String>,
    /// Only runs of this backend profile.
    #[arg(long, conflicts_with = "run_id")]
    pub profile: Option<String>,
    /// Only runs with this label (repeat for several: runs with all of them).
    #[arg(long, conflicts_with = "run_id")]
    pub label: Vec<String>,
    /// Every run not ended (needed when no filter is given).
    #[arg(long, conflicts_with = "run_id")]
    pub all: bool,
}

/// Arguments of `agentrun rerun`.
#[derive(Debug, clap::Args)]
pub struct RerunArgs {
    /// The run to run again, with its input and settings.
    pub run_id: String,
    /// Makes the call safe to retry: the same key returns the first re-run.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Stream the reply to stdout until the new run ends (as `agentrun run --follow`).
    #[arg(long, short)]
    pub follow: bool,
}

/// Arguments of `agentrun fork`.
#[derive(Debug, clap::Args)]
pub struct ForkArgs {
    /// The run to fork.
    pub run_id: String,
    /// The turn to start from (its command id; `agentrun events RUN` shows them in
    /// `turn.started`). Everything before it is the new run's context.
    pub turn_id: String,
    /// The new run's first prompt [default: the forked turn's prompt].
    #[arg(long)]
    pub prompt: Option<String>,
    /// Stream the reply to stdout until the new run ends (as `agentrun run --follow`).
    #[arg(long, short)]
    pub follow: bool,
}

/// Arguments of `agentrun send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The run's id.
    pub run_id: String,
    /// What to send.
    #[arg(value_enum)]
    pub kind: SendKind,
    /// The prompt of a turn, or the text of a steer.
    pub text: Option<String>,
    /// For a turn: what happens when another turn is active [default: queue].
    #[arg(long, value_enum)]
    pub policy: Option<Policy>,
}

/// A command `agentrun send` can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendKind {
    /// Add input to the active turn.
    Steer,
    /// Stop the active turn, keep the run (queued turns wait for `resume` or a new turn).
    Interrupt,
    /// Start a turn with a prompt.
    Turn,
    /// Let turns queued before an interrupt run again.
    Resume,
}

/// Turn delivery policy when a turn is already active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Run it after the active turn ends.
    Queue,
    /// Interrupt the active turn, then start this one.
    Interrupt,
    /// Inject it into the active turn.
    Steer,
    /// Refuse it.
    Reject,
}

/// Arguments of `agentrun get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The run's id.
    pub run_id: String,
}

/// Arguments of `agentrun list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only runs in these statuses (repeat or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub status: Vec<StatusArg>,
    /// Only runs of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only runs of this session.
    #[arg(long)]
    pub session: Option<String>,
    /// Most runs to show, 1..=500.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i32).range(1..=500))]
    pub limit: i32,
}

/// Arguments of `agentrun requests`.
#[derive(Debug, clap::Args)]
pub struct RequestsArgs {
    /// Only the requests of this run [default: every run].
    pub run_id: Option<String>,
    /// Only requests in these statuses (repeat or separate with commas) [default: open].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub status: Vec<RequestStatusArg>,
    /// Most requests to show, 1..=500.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i32).range(1..=500))]
    pub limit: i32,
}

/// A request status, as `agentrun requests --status` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestStatusArg {
    Open,
    Resolved,
    Cancelled,
    Expired,
}

impl RequestStatusArg {
    fn as_str(self) -> &'static str {
        match self {
            RequestStatusArg::Open => "open",
            RequestStatusArg::Resolved => "resolved",
            RequestStatusArg::Cancelled => "cancelled",
            RequestStatusArg::Expired => "expired",
        }
    }
}

/// A run status, as `--status` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    Pending,
    Claimed,
    Running,
    Waiting,
    Completed,
    Failed,
    Cancelled,
    Blocked,
    Expired,
}

impl StatusArg {
    fn to_proto(self) -> RunStatus {
        match self {
            StatusArg::Pending => RunStatus::Pending,
            StatusArg::Claimed => RunStatus::Claimed,
            StatusArg::Running => RunStatus::Running,
            StatusArg::Waiting => RunStatus::Waiting,
            StatusArg::Completed => RunStatus::Completed,
            StatusArg::Failed => RunStatus::Failed,
            StatusArg::Cancelled => RunStatus::Cancelled,
            StatusArg::Blocked => RunStatus::Blocked,
            StatusArg::Expired => RunStatus::Expired,
        }
    }
}

/// Arguments of `agentrun approve`.
#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    #[command(flatten)]
    pub request: ResolveArgs,
    /// Accept this and the same requests for the rest of the session
    /// (`accept_for_session`).
    #[arg(long)]
    pub for_session: bool,
}

/// Which request `agentrun approve` or `agentrun decline` answers.
#[derive(Debug, clap::Args)]
pub struct ResolveArgs {
    /// The run's id.
    #[arg(value_name = "RUN")]
    pub run_id: String,
    /// The request's id (from `agentrun requests RUN` or its `request.opened` event)
    /// [default: the run's only open request].
    #[arg(value_name = "REQUEST")]
    pub request_id: Option<String>,
}

/// An answer to a request, as ResolveRequest spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    AcceptForSession,
    Decline,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::AcceptForSession => "accept_for_session",
            Decision::Decline => "decline",
        }
    }
}

/// The profile a run gets without `--profile`: the real model when a key is at hand,
/// the built-in scripted provider otherwise.
pub fn default_profile() -> &'static str {
    match std::env::var("OPENAI_API_KEY") {
        Ok(key) if !key.is_empty() => "openai",
        _ => "scripted",
    }
}

/// `agentrun run`: CreateRun, then print the id or follow the run.
pub async fn run(
    manager: &mut Manager,
    args: RunArgs,
    out: OutputFormat,
    shutdown: &CancellationToken,
) -> Result<u8, CliError> {
    let request = proto::CreateRunRequest {
        backend_profile: args.profile.unwrap_or_else(|| default_profile().to_owned()),
        input_json: json!({ "prompt": args.prompt }).to_string(),
        queue: args.queue.unwrap_or_default(),
        priority: args.priority,
        session_id: args.session.unwrap_or_default(),
        stream_mode: args
            .stream_mode
            .map_or(StreamMode::Unspecified, StreamModeArg::to_proto) as i32,
        queue_timeout_ms: args.queue_timeout.map_or(0, duration::millis),
        run_timeout_ms: args.run_timeout.map_or(0, duration::millis),
        ..Default::default()
    };
    let response = manager.create_run(request).await?;
    let run = response.run.ok_or_else(|| {
        CliError::Rpc(tonic::Status::internal(
            "the manager answered CreateRun without a run",
        ))
    })?;
    created(manager, run, args.follow, args.json, out, shutdown).await
}

/// Prints a run just created (its id; the run with -o json), or with `follow` streams
/// its reply: exit 0 when it completed, 1 otherwise.
async fn created(
    manager: &mut Manager,
    run: proto::Run,
    follow: bool,
    json: bool,
    out: OutputFormat,
    shutdown: &CancellationToken,
) -> Result<u8, CliError> {
    if !follow {
        write_one(out, &output::run(&run), || format!("{}\n", run.run_id))?;
        return Ok(EXIT_OK);
    }
    let mut printer = Printer::stdio(event_format(out, json));
    printer.dim(&format!("run {}", run.run_id))?;
    match follow::follow(manager, &run.run_id, 0, &mut printer, shutdown).await? {
        Followed::Ended(terminal) => {
            printer.status(&terminal)?;
            Ok(if terminal.completed() {
                EXIT_OK
            } else {
                EXIT_FAILURE
            })
        }
        Followed::Interrupted => Ok(EXIT_INTERRUPTED),
    }
}

/// `agentrun rerun`: RerunRun, then print or follow the new run.
pub async fn rerun(
    manager: &mut Manager,
    args: RerunArgs,
    out: OutputFormat,
    shutdown: &CancellationToken,
) -> Result<u8, CliError> {
    let response = manager
        .rerun_run(proto::RerunRunRequest {
            run_id: args.run_id,
            idempotency_key: args.idempotency_key.unwrap_or_default(),
        })
        .await?;
    let run = response.run.ok_or_else(|| {
        CliError::Rpc(tonic::Status::internal(
            "the manager answered RerunRun without a run",
        ))
    })?;
    created(manager, run, args.follow, false, out, shutdown).await
}

/// `agentrun fork`: ForkRun, then print or follow the new run.
pub async fn fork(
    manager: &mut Manager,
    args: ForkArgs,
    out: OutputFormat,
    shutdown: &CancellationToken,
) -> Result<u8, CliError> {
    let response = manager
        .fork_run(proto::ForkRunRequest {
            run_id: args.run_id,
            turn_id: args.turn_id,
            input_json: args
                .prompt
                .map(|prompt| json!({ "prompt": prompt }).to_string())
                .unwrap_or_default(),
            idempotency_key: String::new(),
        })
        .await?;
    let run = response.run.ok_or_else(|| {
        CliError::Rpc(tonic::Status::internal(
            "the manager answered ForkRun without a run",
        ))
    })?;
    created(manager, run, args.follow, false, out, shutdown).await
}

/// `agentrun events`: print stored events, and with `--follow` new ones to the end.
pub async fn events(
    manager: &mut Manager,
    args: EventsArgs,
    out: OutputFormat,
    shutdown: &CancellationToken,
) -> Result<u8, CliError> {
    let mut printer = Printer::stdio(event_format(out, args.json));
    if args.follow {
        return match follow::follow(manager, &args.run_id, args.after, &mut printer, shutdown)
            .await?
        {
            Followed::Ended(terminal) => {
                printer.status(&terminal)?;
                Ok(EXIT_OK)
            }
            Followed::Interrupted => Ok(EXIT_INTERRUPTED),
        };
    }
    let mut cursor = args.after;
    loop {
        let page = manager.list_events(&args.run_id, cursor, PAGE_SIZE).await?;
        for event in &page.events {
            if event.seq > cursor {
                printer.event(event)?;
                cursor = event.seq;
            }
        }
        if page.events.len() < PAGE_SIZE as usize {
            break;
        }
    }
    printer.finish()?;
    Ok(EXIT_OK)
}

/// `agentrun cancel`: CancelRun and print the run's status afterwards.
pub async fn cancel(
    manager: &mut Manager,
    args: CancelArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let Some(run_id) = args.run_id else {
        return cancel_matching(manager, args, out).await;
    };
    let run = manager.cancel_run(&run_id, &args.reason).await?;
    write_one(out, &output::run(&run), || {
        let status = render::run_status(run.status);
        let note = if run.status == RunStatus::Cancelled as i32 {
            ""
        } else {
            " (cancel requested: its runner will stop it)"
        };
        format!("run {} {status}{note}\n", run.run_id)
    })?;
    Ok(EXIT_OK)
}

/// `agentrun cancel` without a run: CancelRuns until no matching run is left (each call
/// cancels up to 1,000), then print how many were cancelled.
async fn cancel_matching(
    manager: &mut Manager,
    args: CancelArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let request = proto::CancelRunsRequest {
        statuses: args.status.iter().map(|s| s.to_proto() as i32).collect(),
        queue: args.queue.unwrap_or_default(),
        session_id: args.session.unwrap_or_default(),
        backend_profile: args.profile.unwrap_or_default(),
        labels: args.label,
        reason: args.reason,
        all: args.all,
        ..Default::default()
    };
    let mut run_ids = Vec::new();
    loop {
        let response = manager.cancel_runs(request.clone()).await?;
        run_ids.extend(response.run_ids);
        if !response.more {
            break;
        }
    }
    write_one(
        out,
        &json!({ "cancelled": run_ids.len(), "run_ids": run_ids }),
        || format!("cancelled {} runs\n", run_ids.len()),
    )?;
    Ok(EXIT_OK)
}

/// `agentrun send`: SendCommand and print the command's seq and status.
pub async fn send(
    manager: &mut Manager,
    args: SendArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let (kind, payload) = match (args.kind, args.text) {
        (SendKind::Turn, Some(text)) => (CommandKind::Turn, json!({ "prompt": text })),
        (SendKind::Steer, Some(text)) => (CommandKind::Steer, json!({ "text": text })),
        (SendKind::Interrupt, None) => (CommandKind::Interrupt, json!({})),
        (SendKind::Resume, None) => (CommandKind::Resume, json!({})),
        (SendKind::Interrupt | SendKind::Resume, Some(_)) => {
            return Err(CliError::Usage(
                "`interrupt` and `resume` take no TEXT".into(),
            ));
        }
        (SendKind::Turn | SendKind::Steer, None) => {
            return Err(CliError::Usage(
                "`turn` and `steer` need TEXT (the prompt or the steering text)".into(),
            ));
        }
    };
    if args.policy.is_some() && kind != CommandKind::Turn {
        return Err(CliError::Usage("--policy applies to `turn` only".into()));
    }
    let delivery_policy = match args.policy {
        None => TurnDeliveryPolicy::Unspecified,
        Some(Policy::Queue) => TurnDeliveryPolicy::Queue,
        Some(Policy::Interrupt) => TurnDeliveryPolicy::Interrupt,
        Some(Policy::Steer) => TurnDeliveryPolicy::Steer,
        Some(Policy::Reject) => TurnDeliveryPolicy::Reject,
    };
    let response = manager
        .send_command(proto::SendCommandRequest {
            run_id: args.run_id,
            kind: kind as i32,
            payload_json: payload.to_string(),
            delivery_policy: delivery_policy as i32,
            ..Default::default()
        })
        .await?;
    let command = response.command.ok_or_else(|| {
        CliError::Rpc(tonic::Status::internal(
            "the manager answered SendCommand without a command",
        ))
    })?;
    write_one(out, &output::command(&command), || {
        format!(
            "command {} ({}) {}\n",
            command.seq,
            render::command_kind(command.kind),
            render::command_status(command.status)
        )
    })?;
    Ok(EXIT_OK)
}

/// `agentrun get`: print a run.
pub async fn get(manager: &mut Manager, args: GetArgs, out: OutputFormat) -> Result<u8, CliError> {
    let run = manager.get_run(&args.run_id).await?;
    write_one(out, &output::run(&run), || render::run_details(&run))?;
    Ok(EXIT_OK)
}

/// `agentrun list`: print runs as a table, newest first.
pub async fn list(
    manager: &mut Manager,
    args: ListArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let response = manager
        .list_runs(proto::ListRunsRequest {
            statuses: args.status.iter().map(|s| s.to_proto() as i32).collect(),
            queue: args.queue.unwrap_or_default(),
            session_id: args.session.unwrap_or_default(),
            page_size: args.limit,
            ..Default::default()
        })
        .await?;
    let values = response.runs.iter().map(output::run).collect();
    write_list(out, values, || render::runs_table(&response.runs))?;
    if !response.next_page_token.is_empty() {
        eprintln!("(more runs exist: raise --limit or narrow with --status)");
    }
    Ok(EXIT_OK)
}

/// `agentrun requests`: print requests (open ones by default) as a table, newest first.
pub async fn requests(
    manager: &mut Manager,
    args: RequestsArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let response = manager
        .list_requests(proto::ListRequestsRequest {
            run_id: args.run_id.unwrap_or_default(),
            statuses: args.status.iter().map(|s| s.as_str().to_owned()).collect(),
            page_size: args.limit,
            ..Default::default()
        })
        .await?;
    let values = response.requests.iter().map(output::request).collect();
    write_list(out, values, || render::requests_table(&response.requests))?;
    if !response.next_page_token.is_empty() {
        eprintln!("(more requests exist: raise --limit or name a run)");
    }
    Ok(EXIT_OK)
}

/// `agentrun approve` and `agentrun decline`: ResolveRequest, then the stored
/// resolution and whether this call made it. Exit 0 also when the request had been
/// resolved before (the first answer stays); a cancelled or expired request is an error.
/// Without a request id, the run's only open request is answered.
pub async fn resolve(
    manager: &mut Manager,
    args: ResolveArgs,
    decision: Decision,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let request_id = match args.request_id {
        Some(id) => id,
        None => only_open_request(manager, &args.run_id, decision).await?,
    };
    let response = manager
        .resolve_request(&args.run_id, &request_id, decision.as_str())
        .await?;
    let stored = render::resolution(&response.resolution_json);
    // A request closed unanswered (cancelled with its turn or run, or expired) comes back
    // with that closure: nothing was answered, which is an error here.
    let status = response.request.as_ref().map_or("", |r| r.status.as_str());
    if !response.resolved_now && matches!(status, "cancelled" | "expired") {
        return Err(CliError::Other(anyhow::anyhow!(
            "request {request_id} is {status} and can no longer be answered ({stored})"
        )));
    }
    write_one(out, &output::resolution(&response), || {
        if response.resolved_now {
            format!("request {request_id} resolved now: {stored}\n")
        } else {
            format!(
                "request {request_id} was resolved earlier: {stored} (this {} was not applied)\n",
                decision.as_str()
            )
        }
    })?;
    Ok(EXIT_OK)
}

/// The id of the run's only open request; a usage error naming the open ones when it
/// has none or several.
async fn only_open_request(
    manager: &mut Manager,
    run_id: &str,
    decision: Decision,
) -> Result<String, CliError> {
    let response = manager
        .list_requests(proto::ListRequestsRequest {
            run_id: run_id.to_owned(),
            statuses: vec![RequestStatusArg::Open.as_str().to_owned()],
            page_size: 50,
            ..Default::default()
        })
        .await?;
    let verb = match decision {
        Decision::Accept | Decision::AcceptForSession => "approve",
        Decision::Decline => "decline",
    };
    let ids: Vec<&str> = response
        .requests
        .iter()
        .map(|r| r.request_id.as_str())
        .collect();
    match ids.as_slice() {
        [only] => Ok((*only).to_owned()),
        [] => Err(CliError::Usage(format!(
            "run {run_id} has no open request to {verb}"
        ))),
        several => {
            let more = if response.next_page_token.is_empty() {
                ""
            } else {
                " and more"
            };
            Err(CliError::Usage(format!(
                "run {run_id} has {} open requests ({}{more}): name one, as in `agentrun {verb} {run_id} {}`",
                several.len(),
                several.join(", "),
                several[0]
            )))
        }
    }
}

/// `agentrun stats`: queue depth and age, tenants, and runners as tables.
pub async fn stats(manager: &mut Manager, out: OutputFormat) -> Result<u8, CliError> {
    let stats = manager.queue_stats().await?;
    let runners = match manager.list_runners().await {
        Ok(runners) => Some(runners),
        // An older manager: the queue statistics are still worth showing.
        Err(status) if status.code() == tonic::Code::Unimplemented => None,
        Err(status) => return Err(status.into()),
    };
    let value = output::stats(&stats, runners.as_deref());
    write_one(out, &value, || {
        let now = SystemTime::now();
        let mut text = render::queue_table(&stats);
        text.push('\n');
        text.push_str(&render::tenants_table(&stats));
        if let Some(runners) = &runners {
            text.push('\n');
            text.push_str(&render::runners_table(runners, now));
        }
        text
    })?;
    if runners.is_none() {
        eprintln!("(this manager does not list runners)");
    }
    Ok(EXIT_OK)
}

/// How followed or listed events are printed: `--json` is `-o jsonl`.
pub(crate) fn event_format(out: OutputFormat, json_flag: bool) -> Format {
    if json_flag {
        Format::Json
    } else {
        Format::of(out)
    }
}

/// Writes one result to stdout in the output format (`text` when it is text).
pub(crate) fn write_one(
    out: OutputFormat,
    value: &serde_json::Value,
    text: impl FnOnce() -> String,
) -> std::io::Result<()> {
    output::write_one(&mut std::io::stdout().lock(), out, value, text)
}

/// Writes a list to stdout in the output format (`text` when it is text).
pub(crate) fn write_list(
    out: OutputFormat,
    values: Vec<serde_json::Value>,
    text: impl FnOnce() -> String,
) -> std::io::Result<()> {
    output::write_list(&mut std::io::stdout().lock(), out, values, text)
}

/// Writes `text` to stdout; unlike `print!`, a closed pipe is an error, not a panic.
pub(crate) fn write_out(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}
