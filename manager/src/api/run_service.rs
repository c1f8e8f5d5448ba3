//! `agentrun.v1.RunService`: what clients call.

use std::time::{Duration, SystemTime};

use agentrun_shared::error::{FieldError, reason};
use agentrun_shared::ids::{CommandId, RequestId, RunId, SessionId};
use agentrun_shared::payload::parse_object;
use agentrun_shared::proto::{self, run_service_server::RunService};
use agentrun_shared::state::{CommandKind, RunStatus, StreamMode, TurnDeliveryPolicy};
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::{AppState, caller, convert, validate};
use crate::error::{Error, Result};
use crate::observe;
use crate::store::api_keys::Role;
use crate::store::commands::{EXPECTED_TURN_ID, NewCommand};
use crate::store::runs::{self, Lineage, NewRun, RunFilter, RunRecord};
use crate::store::{Created, Tenant};
use crate::store::{context, events, lifecycle};

/// Most runs in one CreateRuns call.
const MAX_BULK_RUNS: usize = 1000;
/// How far ahead a run may be scheduled (`scheduled_at`).
const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest CancelRun reason.
const MAX_REASON_BYTES: usize = 4096;

pub struct RunApi {
    state: AppState,
}

impl RunApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// Creates runs and wakes whoever waits for them: runners everywhere, and watchers
    /// of the sessions the runs join.
    async fn create(
        &self,
        tenant: &Tenant,
        new_runs: Vec<NewRun>,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Vec<Created<RunRecord>>, Error> {
        let trace_parent = observe::trace_parent(metadata);
        let created = lifecycle::create_runs(
            &self.state.pool,
            tenant,
            new_runs,
            &self.state.settings.quotas(),
            trace_parent.as_deref(),
        )
        .await?;
        self.state.notifier.work_available();
        self.state.notifier.events_appended(
            created
                .iter()
                .filter(|c| c.created)
                .filter_map(|c| c.value.session_id.map(|s| s.0)),
        );
        Ok(created)
    }

    fn max_payload(&self) -> usize {
        self.state.settings.max_payload_bytes
    }

    /// Validates a CreateRun request; `field` prefixes the field names in errors (a
    /// schedule's run template is validated the same way).
    pub(super) fn new_run(
        &self,
        field: &str,
        r: &proto::CreateRunRequest,
    ) -> Result<NewRun, FieldError> {
        let f = |name: &str| format!("{field}{name}");
        let input = self.run_input(&f("input_json"), &r.input_json)?;
        Ok(NewRun {
            project_id: validate::name_or(&f("project_id"), &r.project_id, "default")?.to_owned(),
            session_id: SessionId::parse_optional(&f("session_id"), &r.session_id)?,
            backend_profile: validate::name(&f("backend_profile"), &r.backend_profile)?.to_owned(),
            input,
            queue: validate::name_or(&f("queue"), &r.queue, "default")?.to_owned(),
            priority: validate::bounded(&f("priority"), r.priority.into(), 0, -1000, 1000)? as i32,
            labels: validate::names(&f("labels"), &r.labels)?,
            max_attempts: validate::bounded(&f("max_attempts"), r.max_attempts.into(), 3, 1, 100)?
                as i32,
            queue_timeout_ms: validate::timeout_ms(&f("queue_timeout_ms"), r.queue_timeout_ms)?,
            run_timeout_ms: validate::timeout_ms(&f("run_timeout_ms"), r.run_timeout_ms)?,
            metadata: parse_object(&f("metadata_json"), &r.metadata_json, self.max_payload())?,
            idempotency_key: validate::optional_name(&f("idempotency_key"), &r.idempotency_key)?,
            stream_mode: StreamMode::from_proto_or_default(&f("stream_mode"), r.stream_mode)?,
            lineage: None,
            concurrency_key: validate::concurrency_key(&f("concurrency_key"), &r.concurrency_key)?
                .map(str::to_owned),
            scheduled_at: match validate::optional_timestamp(
                &f("scheduled_at"),
                r.scheduled_at.as_ref(),
            )? {
                // A time in the past means at once.
                Some(at) if at > SystemTime::now() + MAX_SCHEDULE_AHEAD => {
                    return Err(FieldError::new(
                        f("scheduled_at"),
                        "must be at most a year ahead",
                    ));
                }
                at => at,
            },
        })
    }

    /// A run's input: a JSON object whose "prompt", if any, is a valid turn text.
    fn run_input(&self, field: &str, json: &str) -> Result<Map<String, Value>, FieldError> {
        let mut input = parse_object(field, json, self.max_payload())?;
        if input.contains_key("prompt") {
            validate::trim_text_in(&mut input, "prompt", &format!("{field}.prompt"))?;
        }
        Ok(input)
    }

    /// Creates one run (see [`Self::create`]).
    async fn create_one(
        &self,
        tenant: &Tenant,
        new_run: NewRun,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Created<RunRecord>, Error> {
        let created = self.create(tenant, vec![new_run], metadata).await?;
        let created = created
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("create returned nothing".into()))?;
        observe::record_run(&created.value.id);
        Ok(created)
    }

    fn new_command(&self, r: &proto::SendCommandRequest) -> Result<NewCommand, FieldError> {
        let kind = CommandKind::from_proto("kind", r.kind)?;
        let mut payload = parse_object("payload_json", &r.payload_json, self.max_payload())?;
        command_payload_rules(kind, &mut payload)?;
        if !r.expected_turn_id.is_empty() {
            let aimed = matches!(kind, CommandKind::Steer | CommandKind::Interrupt)
                || (kind == CommandKind::Turn
                    && r.delivery_policy == TurnDeliveryPolicy::Steer.to_proto() as i32);
            if !aimed {
                return Err(FieldError::new(
                    "expected_turn_id",
                    "is only for steer, interrupt and steering turns",
                ));
            }
            CommandId::parse("expected_turn_id", &r.expected_turn_id)?;
            // Travels with the command so the runner can check it against its own turn.
            payload.insert(
                EXPECTED_TURN_ID.into(),
                Value::String(r.expected_turn_id.clone()),
            );
        }
        let delivery_policy = match kind {
            CommandKind::Turn => Some(TurnDeliveryPolicy::from_proto_or_default(
                "delivery_policy",
                r.delivery_policy,
            )?),
            _ if r.delivery_policy != 0 => {
                return Err(FieldError::new(
                    "delivery_policy",
                    "is only for turn commands",
                ));
            }
            _ => None,
        };
        Ok(NewCommand {
            kind,
            payload,
            delivery_policy,
            idempotency_key: validate::optional_name("idempotency_key", &r.idempotency_key)?,
        })
    }
}

/// The fields each command kind needs in its payload.
/// Text a person typed (a turn's prompt, a steer's text) is stored trimmed.
fn command_payload_rules(
    kind: CommandKind,
    payload: &mut Map<String, Value>,
) -> Result<(), FieldError> {
    let mut require_text = |key: &str| {
        if !payload.contains_key(key) {
            return Err(FieldError::new(
                format!("payload_json.{key}"),
                "is required",
            ));
        }
        validate::trim_text_in(payload, key, &format!("payload_json.{key}"))
    };
    match kind {
        CommandKind::Turn => require_text("prompt"),
        CommandKind::Steer => require_text("text"),
        // Answers go through ResolveRequest, which checks the request and keeps the first.
        CommandKind::Resolve => Err(FieldError::new(
            "kind",
            "resolve commands are sent with ResolveRequest",
        )),
        CommandKind::Interrupt | CommandKind::Cancel | CommandKind::Resume => Ok(()),
    }
}

#[tonic::async_trait]
impl RunService for RunApi {
    async fn create_run(
        &self,
        request: Request<proto::CreateRunRequest>,
    ) -> Result<Response<proto::CreateRunResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let new_run = self.new_run("", request.get_ref()).map_err(Error::from)?;
        caller.check_project("project_id", &new_run.project_id)?;
        let created = self
            .create_one(&caller.tenant, new_run, request.metadata())
            .await?;
        Ok(Response::new(proto::CreateRunResponse {
            run: Some(convert::run(&created.value)),
            created: created.created,
        }))
    }

    async fn create_runs(
        &self,
        request: Request<proto::CreateRunsRequest>,
    ) -> Result<Response<proto::CreateRunsResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let runs_in = &request.get_ref().runs;
        if runs_in.is_empty() || runs_in.len() > MAX_BULK_RUNS {
            return Err(
                Error::invalid("runs", format!("must hold 1 to {MAX_BULK_RUNS} runs")).into(),
            );
        }
        let new_runs = runs_in
            .iter()
            .enumerate()
            .map(|(i, r)| self.new_run(&format!("runs[{i}]."), r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::from)?;
        for (i, run) in new_runs.iter().enumerate() {
            caller.check_project(&format!("runs[{i}].project_id"), &run.project_id)?;
        }
        let created = self
            .create(&caller.tenant, new_runs, request.metadata())
            .await?;
        Ok(Response::new(proto::CreateRunsResponse {
            runs: created
                .iter()
                .map(|c| proto::CreateRunResponse {
                    run: Some(convert::run(&c.value)),
                    created: c.created,
                })
                .collect(),
        }))
    }

    async fn get_run(
        &self,
        request: Request<proto::GetRunRequest>,
    ) -> Result<Response<proto::GetRunResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let run_id = RunId::parse("run_id", &request.get_ref().run_id).map_err(Error::from)?;
        observe::record_run(&run_id);
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let run = runs::get_explained(&client, &tenant, run_id).await?;
        Ok(Response::new(proto::GetRunResponse {
            run: Some(convert::run(&run)),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let tenant = &caller.tenant;
        let r = request.get_ref();
        validate::list_len("statuses", r.statuses.len()).map_err(Error::from)?;
        let mut filter = RunFilter {
            statuses: r
                .statuses
                .iter()
                .enumerate()
                .map(|(i, s)| RunStatus::from_proto(&format!("statuses[{i}]"), *s))
                .collect::<Result<_, _>>()
                .map_err(Error::from)?,
            queue: validate::optional_name("queue", &r.queue).map_err(Error::from)?,
            session_id: SessionId::parse_optional("session_id", &r.session_id)
                .map_err(Error::from)?,
            project_id: validate::optional_name("project_id", &r.project_id)
                .map_err(Error::from)?,
            backend_profile: validate::optional_name("backend_profile", &r.backend_profile)
                .map_err(Error::from)?,
            labels: validate::names("labels", &r.labels).map_err(Error::from)?,
            created_after: validate::optional_timestamp("created_after", r.created_after.as_ref())
                .map_err(Error::from)?,
            created_before: validate::optional_timestamp(
                "created_before",
                r.created_before.as_ref(),
            )
            .map_err(Error::from)?,
            concurrency_key: None,
            before: RunId::parse_optional("page_token", &r.page_token).map_err(Error::from)?,
            limit: validate::bounded("page_size", r.page_size.into(), 50, 1, 500)
                .map_err(Error::from)?,
        };
        validate::time_window(
            "created_before",
            filter.created_after,
            filter.created_before,
        )
        .map_err(Error::from)?;
        filter.project_id = project_scope(&caller, filter.project_id)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let page = runs::list(&client, tenant, &filter).await?;
        let next_page_token = match page.last() {
            Some(last) if page.len() as i64 == filter.limit => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListRunsResponse {
            runs: page.iter().map(convert::run).collect(),
            next_page_token,
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<proto::CancelRunRequest>,
    ) -> Result<Response<proto::CancelRunResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let reason =
            validate::short_text("reason", &r.reason, MAX_REASON_BYTES).map_err(Error::from)?;
        let mut payload = Map::new();
        if !reason.is_empty() {
            payload.insert("reason".into(), Value::String(reason.to_owned()));
        }
        let run = lifecycle::cancel_run(&self.state.pool, &tenant, run_id, payload).await?;
        self.state.notifier.commands_added(&[run_id]);
        if run.concurrency_key.is_some() {
            // A pending run that ended may have let its key's next run in.
            self.state.notifier.work_available();
        }
        Ok(Response::new(proto::CancelRunResponse {
            run: Some(convert::run(&run)),
        }))
    }

    async fn send_command(
        &self,
        request: Request<proto::SendCommandRequest>,
    ) -> Result<Response<proto::SendCommandResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let command = self.new_command(r).map_err(Error::from)?;
        let sent = lifecycle::send_command(
            &self.state.pool,
            &tenant,
            run_id,
            command,
            &self.state.settings.quotas(),
        )
        .await?;
        if sent.created {
            self.state.notifier.commands_added(&[run_id]);
            if sent.value.kind == CommandKind::Cancel {
                // A pending run that ended may have let its key's next run in.
                self.state.notifier.work_available();
            }
        }
        Ok(Response::new(proto::SendCommandResponse {
            command: Some(convert::command(&sent.value)),
            created: sent.created,
        }))
    }

    async fn list_commands(
        &self,
        request: Request<proto::ListCommandsRequest>,
    ) -> Result<Response<proto::ListCommandsResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let after_seq = validate::cursor("after_seq", r.after_seq).map_err(Error::from)?;
        let limit =
            validate::bounded("limit", r.limit.into(), 100, 1, 1000).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let found = lifecycle::list_commands(&client, &tenant, run_id, after_seq, limit).await?;
        Ok(Response::new(proto::ListCommandsResponse {
            commands: found.iter().map(convert::command).collect(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let after_seq = validate::cursor("after_seq", r.after_seq).map_err(Error::from)?;
        let limit =
            validate::bounded("limit", r.limit.into(), 100, 1, 1000).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        // Read the run first: its last_event_seq bounds what the page can be missing.
        let run = runs::position(&client, &tenant, run_id).await?;
        let found = events::list(&client, run_id, after_seq, limit).await?;
        let last_returned = found.last().map_or(after_seq, |e| e.seq);
        Ok(Response::new(proto::ListEventsResponse {
            events: convert::events(found),
            last_seq: run.last_event_seq,
            end_of_run: run.status.is_terminal() && last_returned >= run.last_event_seq,
        }))
    }

    type WatchRunStream = super::watch::EventStream;

    async fn watch_run(
        &self,
        request: Request<proto::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let after_seq = validate::cursor("after_seq", r.after_seq).map_err(Error::from)?;
        let stream = super::watch::watch_run(
            &self.state,
            &caller.tenant,
            caller.key_id,
            run_id,
            after_seq,
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn resolve_request(
        &self,
        request: Request<proto::ResolveRequestRequest>,
    ) -> Result<Response<proto::ResolveRequestResponse>, Status> {
        use crate::store::requests::{self, Answer, Decision};
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let request_id = RequestId::parse("request_id", &r.request_id).map_err(Error::from)?;
        let decision = Decision::parse("decision", &r.decision).map_err(Error::from)?;
        let answers = if r.answers_json.trim().is_empty() {
            None
        } else {
            Some(
                parse_object("answers_json", &r.answers_json, self.max_payload())
                    .map_err(Error::from)?,
            )
        };
        let value = validate::json_value("value_json", &r.value_json, self.max_payload())
            .map_err(Error::from)?;
        let error =
            validate::short_text("error", &r.error, MAX_REASON_BYTES).map_err(Error::from)?;
        let error = (!error.is_empty()).then(|| error.to_owned());
        if value.is_some() && error.is_some() {
            return Err(Error::invalid("error", "is not allowed together with value_json").into());
        }
        let answer = Answer {
            decision,
            answers,
            value,
            error,
        };
        let resolved =
            requests::resolve(&self.state.pool, &tenant, run_id, request_id, answer).await?;
        if resolved.resolved_now {
            // The `resolve` command reaches the runner holding the run, on any replica.
            self.state.notifier.commands_added(&[run_id]);
        }
        Ok(Response::new(proto::ResolveRequestResponse {
            resolution_json: resolved
                .request
                .resolution
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            resolved_now: resolved.resolved_now,
            request: Some(convert::request(&resolved.request)),
        }))
    }

    async fn cancel_command(
        &self,
        request: Request<proto::CancelCommandRequest>,
    ) -> Result<Response<proto::CancelCommandResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let command_id = CommandId::parse("command_id", &r.command_id).map_err(Error::from)?;
        let cancelled =
            lifecycle::cancel_command(&self.state.pool, &tenant, run_id, command_id).await?;
        if cancelled.created {
            // Watchers of the run see its command.completed at once.
            self.state.notifier.events_appended([run_id.0]);
        }
        Ok(Response::new(proto::CancelCommandResponse {
            command: Some(convert::command(&cancelled.value)),
            cancelled_now: cancelled.created,
        }))
    }

    async fn get_command(
        &self,
        request: Request<proto::GetCommandRequest>,
    ) -> Result<Response<proto::GetCommandResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let command_id = CommandId::parse("command_id", &r.command_id).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let command = lifecycle::get_command(&client, &tenant, run_id, command_id).await?;
        Ok(Response::new(proto::GetCommandResponse {
            command: Some(convert::command(&command)),
        }))
    }

    async fn list_requests(
        &self,
        request: Request<proto::ListRequestsRequest>,
    ) -> Result<Response<proto::ListRequestsResponse>, Status> {
        use crate::store::requests::{self, RequestFilter, RequestStatus};
        let caller = caller(&self.state, &request, Role::Client).await?;
        let tenant = &caller.tenant;
        let r = request.get_ref();
        let run_id = RunId::parse_optional("run_id", &r.run_id).map_err(Error::from)?;
        validate::list_len("statuses", r.statuses.len()).map_err(Error::from)?;
        let mut statuses = r
            .statuses
            .iter()
            .enumerate()
            .map(|(i, s)| RequestStatus::parse(&format!("statuses[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::from)?;
        if statuses.is_empty() {
            statuses.push(RequestStatus::Open);
        }
        let token = RequestId::parse_optional("page_token", &r.page_token).map_err(Error::from)?;
        let limit =
            validate::bounded("page_size", r.page_size.into(), 50, 1, 500).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        if let Some(run_id) = run_id {
            observe::record_run(&run_id);
            // Another tenant's run answers like an unknown one.
            runs::position(&client, tenant, run_id).await?;
        }
        let before =
            match token {
                None => None,
                // Requests are never deleted: a token that names none of the tenant's did not
                // come from a listing.
                Some(id) => Some(requests::cursor(&client, tenant, id).await?.ok_or_else(
                    || Error::invalid("page_token", "is not a page token of this listing"),
                )?),
            };
        let filter = RequestFilter {
            run_id,
            statuses,
            // A key limited to projects sees the requests of its projects' runs only.
            projects: caller.projects.clone(),
            before,
            limit,
        };
        let page = requests::list(&client, tenant, &filter).await?;
        let next_page_token = match page.requests.last() {
            Some(last) if page.more => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListRequestsResponse {
            requests: page.requests.iter().map(convert::request).collect(),
            next_page_token,
        }))
    }

    async fn rerun_run(
        &self,
        request: Request<proto::RerunRunRequest>,
    ) -> Result<Response<proto::RerunRunResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let idempotency_key =
            validate::optional_name("idempotency_key", &r.idempotency_key).map_err(Error::from)?;
        observe::record_run(&run_id);
        let source = {
            let client = self.state.pool.get().await.map_err(Error::from)?;
            runs::get(&client, &caller.tenant, run_id).await?
        };
        caller.check_project("project_id", &source.project_id)?;
        let mut new_run = NewRun::copy_of(&source);
        new_run.idempotency_key = idempotency_key;
        new_run.lineage = Some(Lineage::rerun_of(run_id));
        let created = self
            .create_one(&caller.tenant, new_run, request.metadata())
            .await?;
        Ok(Response::new(proto::RerunRunResponse {
            run: Some(convert::run(&created.value)),
            created: created.created,
        }))
    }

    async fn fork_run(
        &self,
        request: Request<proto::ForkRunRequest>,
    ) -> Result<Response<proto::ForkRunResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let r = request.get_ref();
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        let turn_id = CommandId::parse("turn_id", &r.turn_id).map_err(Error::from)?;
        let input = if r.input_json.is_empty() {
            None
        } else {
            Some(
                self.run_input("input_json", &r.input_json)
                    .map_err(Error::from)?,
            )
        };
        let idempotency_key =
            validate::optional_name("idempotency_key", &r.idempotency_key).map_err(Error::from)?;
        observe::record_run(&run_id);
        let (source, point) = {
            let client = self.state.pool.get().await.map_err(Error::from)?;
            let source = runs::get(&client, &caller.tenant, run_id).await?;
            let point = context::fork_point(&client, run_id.0, turn_id.0)
                .await?
                .ok_or(Error::NotFound { what: "turn" })?;
            (source, point)
        };
        caller.check_project("project_id", &source.project_id)?;
        let started_seq = point.started_seq.ok_or_else(|| {
            Error::precondition(
                reason::TURN_NOT_STARTED,
                "turn_id names a turn that has not started: there is nothing before it to fork",
            )
        })?;
        let mut new_run = NewRun::copy_of(&source);
        new_run.input = match input {
            Some(input) => input,
            // The earlier input with the forked turn's prompt as the first turn.
            None => {
                let mut input = new_run.input;
                match point.prompt {
                    Some(prompt) => input.insert("prompt".into(), Value::String(prompt)),
                    None => input.remove("prompt"),
                };
                input
            }
        };
        new_run.idempotency_key = idempotency_key;
        new_run.lineage = Some(Lineage::fork_of(run_id, turn_id, started_seq));
        let created = self
            .create_one(&caller.tenant, new_run, request.metadata())
            .await?;
        Ok(Response::new(proto::ForkRunResponse {
            run: Some(convert::run(&created.value)),
            created: created.created,
        }))
    }

    async fn cancel_runs(
        &self,
        request: Request<proto::CancelRunsRequest>,
    ) -> Result<Response<proto::CancelRunsResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let r = request.get_ref();
        let mut filter = cancel_filter(r).map_err(Error::from)?;
        filter.project_id = project_scope(&caller, filter.project_id)?;
        let reason =
            validate::short_text("reason", &r.reason, MAX_REASON_BYTES).map_err(Error::from)?;
        let mut payload = Map::new();
        if !reason.is_empty() {
            payload.insert("reason".into(), Value::String(reason.to_owned()));
        }
        let (cancelled, more) =
            lifecycle::cancel_runs(&self.state.pool, &caller.tenant, &filter, payload).await?;
        let ids: Vec<RunId> = cancelled.iter().map(|run| run.id).collect();
        self.state.notifier.commands_added(&ids);
        Ok(Response::new(proto::CancelRunsResponse {
            cancelled: ids.len() as i64,
            more,
            run_ids: ids.iter().map(RunId::to_string).collect(),
        }))
    }
}

/// The project a listing or bulk action of the caller covers: for a key limited to
/// projects, one of them (the one named, or its only one).
fn project_scope(caller: &Caller, named: Option<String>) -> Result<Option<String>> {
    match (named, caller.projects.as_slice()) {
        (Some(project), _) => {
            caller.check_project("project_id", &project)?;
            Ok(Some(project))
        }
        (None, []) => Ok(None),
        (None, [only]) => Ok(Some(only.clone())),
        (None, _) => Err(Error::PermissionDenied(
            "this API key is limited to projects: name one in project_id".into(),
        )),
    }
}

/// Most runs one CancelRuns call cancels.
const MAX_CANCEL_RUNS: i64 = 1000;

/// The runs a CancelRuns request covers: not terminal, matching every filter given, with
/// at least one given unless `all` says every run is meant.
fn cancel_filter(r: &proto::CancelRunsRequest) -> Result<RunFilter, FieldError> {
    validate::list_len("statuses", r.statuses.len())?;
    let mut statuses = Vec::with_capacity(r.statuses.len());
    for (i, status) in r.statuses.iter().enumerate() {
        let field = format!("statuses[{i}]");
        let status = RunStatus::from_proto(&field, *status)?;
        if status.is_terminal() {
            return Err(FieldError::new(
                field,
                format!(
                    "{} is terminal: only runs not ended can be cancelled",
                    status.as_str()
                ),
            ));
        }
        statuses.push(status);
    }
    let filter = RunFilter {
        statuses,
        queue: validate::optional_name("queue", &r.queue)?,
        session_id: SessionId::parse_optional("session_id", &r.session_id)?,
        project_id: validate::optional_name("project_id", &r.project_id)?,
        backend_profile: validate::optional_name("backend_profile", &r.backend_profile)?,
        labels: validate::names("labels", &r.labels)?,
        created_after: validate::optional_timestamp("created_after", r.created_after.as_ref())?,
        created_before: validate::optional_timestamp("created_before", r.created_before.as_ref())?,
        concurrency_key: validate::concurrency_key("concurrency_key", &r.concurrency_key)?
            .map(str::to_owned),
        before: None,
        limit: MAX_CANCEL_RUNS,
    };
    validate::time_window(
        "created_before",
        filter.created_after,
        filter.created_before,
    )?;
    let filtered = !filter.statuses.is_empty()
        || filter.queue.is_some()
        || filter.session_id.is_some()
        || filter.project_id.is_some()
        || filter.backend_profile.is_some()
        || !filter.labels.is_empty()
        || filter.created_after.is_some()
        || filter.created_before.is_some()
        || filter.concurrency_key.is_some();
    if !filtered && !r.all {
        return Err(FieldError::new(
            "all",
            "must be true to cancel every run: no filter was given",
        ));
    }
    Ok(filter)
}
