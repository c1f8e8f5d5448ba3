//! `agentrun schedules`: runs that start on a cron expression (read in a time zone) or
//! at a fixed interval, over ScheduleService — create, list, get, pause, resume,
//! delete and trigger — and what a schedule looks like as JSON and as text.

use std::time::Duration;

use agentrun_shared::proto::{
    self, CatchUpPolicy, OverlapPolicy, schedule_service_client::ScheduleServiceClient,
};
use serde_json::{Value, json};
use tonic::Status;

use crate::ClientFlags;
use crate::client::Manager;
use crate::commands::{default_profile, write_list, write_one};
use crate::duration;
use crate::error::{CliError, EXIT_OK};
use crate::output::{self, OutputFormat};
use crate::render;

/// Most schedules one ListSchedules page holds.
const MAX_PAGE: u32 = 500;

/// Arguments of `agentrun schedules`.
#[derive(Debug, clap::Args)]
pub struct SchedulesArgs {
    #[command(subcommand)]
    pub action: Option<SchedulesAction>,
    #[command(flatten)]
    pub flags: ClientFlags,
}

/// What `agentrun schedules` does [default: list].
#[derive(Debug, clap::Subcommand)]
pub enum SchedulesAction {
    /// Create a schedule; prints it (a retry with the same definition finds it).
    Create(CreateArgs),
    /// List the schedules, oldest first.
    List {
        /// Most schedules to show.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
    /// Print a schedule.
    Get {
        /// The schedule's id (from `agentrun schedules list`).
        schedule_id: String,
    },
    /// Pause a schedule: no runs until it is resumed (TriggerSchedule still works).
    Pause {
        /// The schedule's id (from `agentrun schedules list`).
        schedule_id: String,
    },
    /// Resume a paused schedule from its next due time; nothing missed is caught up.
    Resume {
        /// The schedule's id (from `agentrun schedules list`).
        schedule_id: String,
    },
    /// Delete a schedule; the runs it created are kept.
    Delete {
        /// The schedule's id (from `agentrun schedules list`).
        schedule_id: String,
    },
    /// Create a run from the schedule now, under its overlap policy; prints the run id
    /// (nothing when the policy skipped it).
    Trigger {
        /// The schedule's id (from `agentrun schedules list`).
        schedule_id: String,
    },
}

/// Arguments of `agentrun schedules create`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("when").required(true).args(["cron", "every"])))]
pub struct CreateArgs {
    /// A name, unique among the tenant's schedules.
    pub name: String,
    /// The prompt each run starts with.
    pub prompt: String,
    /// Cron expression: five fields (minute hour day-of-month month day-of-week), or
    /// six with seconds first; e.g. "0 9 * * 1-5".
    #[arg(long)]
    pub cron: Option<String>,
    /// IANA time zone the cron expression is read in [default: UTC].
    #[arg(long, requires = "cron")]
    pub time_zone: Option<String>,
    /// A fixed interval instead of cron (`30s`, `10m`, `2h`, `1d`; at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    pub every: Option<Duration>,
    /// What a due time does while the previous run has not ended [default: skip].
    #[arg(long, value_enum)]
    pub overlap: Option<OverlapArg>,
    /// What due times missed while no manager ran get [default: one].
    #[arg(long, value_enum)]
    pub catch_up: Option<CatchUpArg>,
    /// Backend profile of the runs [default: `openai` when OPENAI_API_KEY is set, else
    /// `scripted`].
    #[arg(long)]
    pub profile: Option<String>,
    /// Queue of the runs [default: the manager's, `default`].
    #[arg(long)]
    pub queue: Option<String>,
    /// Project of the schedule and its runs [default: `default`].
    #[arg(long)]
    pub project: Option<String>,
    /// Higher is claimed first; -1000..=1000.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Each run joins this session.
    #[arg(long)]
    pub session: Option<String>,
}

/// An overlap policy as `--overlap` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverlapArg {
    /// Create no run for the due time.
    Skip,
    /// Create the run anyway; it waits its turn.
    Queue,
    /// Cancel the previous run, then create the new one.
    CancelPrevious,
}

/// A catch-up policy as `--catch-up` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CatchUpArg {
    /// One run for all the missed due times together.
    One,
    /// No run for missed due times.
    None,
}

/// `agentrun schedules …`.
pub async fn schedules(
    manager: &mut Manager,
    args: SchedulesArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let mut client = ScheduleServiceClient::new(manager.channel());
    let action = args.action.unwrap_or(SchedulesAction::List { limit: 100 });
    let one = |schedule: Option<proto::Schedule>| {
        schedule.ok_or_else(|| {
            CliError::Rpc(Status::internal("the manager answered without a schedule"))
        })
    };
    let schedule = match action {
        SchedulesAction::List { limit } => return list(manager, &mut client, limit, out).await,
        SchedulesAction::Trigger { schedule_id } => {
            let request = manager.request(proto::TriggerScheduleRequest { schedule_id });
            let run_id = client.trigger_schedule(request).await?.into_inner().run_id;
            write_one(out, &json!({ "run_id": run_id }), || {
                if run_id.is_empty() {
                    "skipped: the previous run has not ended (overlap policy skip)\n".into()
                } else {
                    format!("{run_id}\n")
                }
            })?;
            return Ok(EXIT_OK);
        }
        SchedulesAction::Delete { schedule_id } => {
            let request = manager.request(proto::DeleteScheduleRequest {
                schedule_id: schedule_id.clone(),
            });
            client.delete_schedule(request).await?;
            write_one(
                out,
                &json!({ "schedule_id": schedule_id, "deleted": true }),
                || format!("deleted {schedule_id}\n"),
            )?;
            return Ok(EXIT_OK);
        }
        SchedulesAction::Create(args) => {
            let request = manager.request(proto::CreateScheduleRequest {
                schedule: Some(new_schedule(args)),
            });
            one(client.create_schedule(request).await?.into_inner().schedule)?
        }
        SchedulesAction::Get { schedule_id } => {
            let request = manager.request(proto::GetScheduleRequest { schedule_id });
            one(client.get_schedule(request).await?.into_inner().schedule)?
        }
        SchedulesAction::Pause { schedule_id } => {
            let request = manager.request(proto::PauseScheduleRequest {
                schedule_id,
                paused: true,
            });
            one(client.pause_schedule(request).await?.into_inner().schedule)?
        }
        SchedulesAction::Resume { schedule_id } => {
            let request = manager.request(proto::PauseScheduleRequest {
                schedule_id,
                paused: false,
            });
            one(client.pause_schedule(request).await?.into_inner().schedule)?
        }
    };
    write_one(out, &schedule_json(&schedule), || details(&schedule))?;
    Ok(EXIT_OK)
}

fn new_schedule(args: CreateArgs) -> proto::Schedule {
    proto::Schedule {
        name: args.name,
        project_id: args.project.unwrap_or_default(),
        cron: args.cron.unwrap_or_default(),
        time_zone: args.time_zone.unwrap_or_default(),
        interval_ms: args.every.map_or(0, duration::millis),
        overlap_policy: match args.overlap {
            None => OverlapPolicy::Unspecified,
            Some(OverlapArg::Skip) => OverlapPolicy::Skip,
            Some(OverlapArg::Queue) => OverlapPolicy::Queue,
            Some(OverlapArg::CancelPrevious) => OverlapPolicy::CancelPrevious,
        } as i32,
        catch_up_policy: match args.catch_up {
            None => CatchUpPolicy::Unspecified,
            Some(CatchUpArg::One) => CatchUpPolicy::One,
            Some(CatchUpArg::None) => CatchUpPolicy::None,
        } as i32,
        run_template: Some(proto::CreateRunRequest {
            backend_profile: args.profile.unwrap_or_else(|| default_profile().to_owned()),
            input_json: json!({ "prompt": args.prompt }).to_string(),
            queue: args.queue.unwrap_or_default(),
            priority: args.priority,
            session_id: args.session.unwrap_or_default(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// ListSchedules, paged up to `limit`, as a table.
async fn list(
    manager: &mut Manager,
    client: &mut ScheduleServiceClient<tonic::transport::Channel>,
    limit: u32,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let mut shown: Vec<proto::Schedule> = Vec::new();
    let mut page_token = String::new();
    loop {
        let page_size = (limit - shown.len() as u32).min(MAX_PAGE);
        let request = manager.request(proto::ListSchedulesRequest {
            page_size: page_size as i32,
            page_token,
        });
        let page = client.list_schedules(request).await?.into_inner();
        shown.extend(page.schedules);
        page_token = page.next_page_token;
        if page_token.is_empty() || shown.len() as u32 >= limit {
            break;
        }
    }
    shown.truncate(limit as usize);
    let values = shown.iter().map(schedule_json).collect();
    write_list(out, values, || table(&shown))?;
    if !page_token.is_empty() {
        eprintln!("(more schedules exist: raise --limit)");
    }
    Ok(EXIT_OK)
}

/// When a schedule comes due, for people: `cron "0 9 * * *" in Europe/Berlin` or
/// `every 30s`.
fn when(s: &proto::Schedule) -> String {
    if s.cron.is_empty() {
        let ms = s.interval_ms;
        match ms {
            _ if ms % 86_400_000 == 0 => format!("every {}d", ms / 86_400_000),
            _ if ms % 3_600_000 == 0 => format!("every {}h", ms / 3_600_000),
            _ if ms % 60_000 == 0 => format!("every {}m", ms / 60_000),
            _ if ms % 1000 == 0 => format!("every {}s", ms / 1000),
            _ => format!("every {ms}ms"),
        }
    } else {
        format!("cron {:?} in {}", s.cron, s.time_zone)
    }
}

fn overlap_name(value: i32) -> String {
    OverlapPolicy::try_from(value).map_or(value.to_string(), |p| {
        output::enum_name(p.as_str_name(), "OVERLAP_POLICY_")
    })
}

fn catch_up_name(value: i32) -> String {
    CatchUpPolicy::try_from(value).map_or(value.to_string(), |p| {
        output::enum_name(p.as_str_name(), "CATCH_UP_POLICY_")
    })
}

/// Schedules as an aligned table, for `agentrun schedules list`.
fn table(schedules: &[proto::Schedule]) -> String {
    let rows = schedules
        .iter()
        .map(|s| {
            vec![
                s.schedule_id.clone(),
                s.name.clone(),
                when(s),
                if s.paused {
                    "paused".into()
                } else {
                    render::time(s.next_run_at.as_ref())
                },
                if s.last_run_id.is_empty() {
                    "-".into()
                } else {
                    s.last_run_id.clone()
                },
            ]
        })
        .collect();
    render::table(&["ID", "NAME", "WHEN", "NEXT", "LAST RUN"], rows)
}

/// One schedule as `key value` lines.
fn details(s: &proto::Schedule) -> String {
    let or_dash = |text: &str| {
        if text.is_empty() {
            "-".to_owned()
        } else {
            text.to_owned()
        }
    };
    let template = s.run_template.clone().unwrap_or_default();
    let rows: Vec<(&str, String)> = vec![
        ("schedule", s.schedule_id.clone()),
        ("name", s.name.clone()),
        ("project", s.project_id.clone()),
        ("when", when(s)),
        ("overlap", overlap_name(s.overlap_policy)),
        ("catch-up", catch_up_name(s.catch_up_policy)),
        ("paused", s.paused.to_string()),
        ("next run", render::time(s.next_run_at.as_ref())),
        ("last run", render::time(s.last_run_at.as_ref())),
        ("last run id", or_dash(&s.last_run_id)),
        ("profile", template.backend_profile),
        ("queue", template.queue),
        ("input", or_dash(&template.input_json)),
        ("created", render::time(s.created_at.as_ref())),
    ];
    let mut text = String::new();
    for (key, value) in rows {
        text.push_str(&format!("{key:<12}{value}\n"));
    }
    text
}

/// A schedule as JSON: the proto field names, enums by name, the run template with its
/// JSON fields parsed (as a run's are).
pub fn schedule_json(s: &proto::Schedule) -> Value {
    let template = s.run_template.clone().unwrap_or_default();
    json!({
        "schedule_id": s.schedule_id,
        "project_id": s.project_id,
        "name": s.name,
        "cron": s.cron,
        "time_zone": s.time_zone,
        "interval_ms": s.interval_ms,
        "run_template": {
            "project_id": template.project_id,
            "session_id": template.session_id,
            "backend_profile": template.backend_profile,
            "input": output::parsed(&template.input_json),
            "queue": template.queue,
            "priority": template.priority,
            "labels": template.labels,
            "max_attempts": template.max_attempts,
            "queue_timeout_ms": template.queue_timeout_ms,
            "run_timeout_ms": template.run_timeout_ms,
            "metadata": output::parsed(&template.metadata_json),
        },
        "overlap_policy": overlap_name(s.overlap_policy),
        "catch_up_policy": catch_up_name(s.catch_up_policy),
        "paused": s.paused,
        "next_run_at": output::timestamp(s.next_run_at.as_ref()),
        "last_run_at": output::timestamp(s.last_run_at.as_ref()),
        "last_run_id": s.last_run_id,
        "created_at": output::timestamp(s.created_at.as_ref()),
    })
}
