//! `agentrun.v1.ScheduleService`: runs that start on a cron expression or an interval,
//! for the caller's tenant. Firing is the manager's background loop (`crate::schedules`);
//! these handlers define, list, pause, delete and trigger schedules.

use agentrun_shared::error::FieldError;
use agentrun_shared::ids::ScheduleId;
use agentrun_shared::proto::{self, schedule_service_server::ScheduleService};
use tonic::{Request, Response, Status};

use super::{AppState, RunApi, caller, convert, validate};
use crate::error::{Error, Result};
use crate::store::api_keys::Role;
use crate::store::firing;
use crate::store::schedules::{self, CatchUp, NewSchedule, Overlap, Timing};

pub struct ScheduleApi {
    state: AppState,
    /// Validates run templates exactly as CreateRun validates its requests.
    runs: RunApi,
}

impl ScheduleApi {
    pub fn new(state: AppState) -> Self {
        Self {
            runs: RunApi::new(state.clone()),
            state,
        }
    }

    fn new_schedule(&self, r: &proto::CreateScheduleRequest) -> Result<NewSchedule, FieldError> {
        let s = r
            .schedule
            .as_ref()
            .ok_or_else(|| FieldError::new("schedule", "is required"))?;
        let name = validate::name("schedule.name", &s.name)?.to_owned();
        let timing = match (s.cron.is_empty(), s.interval_ms) {
            (false, 0) => {
                Timing::cron("schedule.cron", &s.cron, "schedule.time_zone", &s.time_zone)?
            }
            (true, ms) if ms != 0 => {
                if !s.time_zone.is_empty() && s.time_zone != "UTC" {
                    return Err(FieldError::new(
                        "schedule.time_zone",
                        "is only for cron schedules",
                    ));
                }
                Timing::interval("schedule.interval_ms", ms)?
            }
            (false, _) => {
                return Err(FieldError::new(
                    "schedule.interval_ms",
                    "must be empty when schedule.cron is set (one of them)",
                ));
            }
            (true, _) => {
                return Err(FieldError::new(
                    "schedule.cron",
                    "one of schedule.cron and schedule.interval_ms is required",
                ));
            }
        };
        let template = s
            .run_template
            .as_ref()
            .ok_or_else(|| FieldError::new("schedule.run_template", "is required"))?;
        if !template.idempotency_key.is_empty() {
            return Err(FieldError::new(
                "schedule.run_template.idempotency_key",
                "must be empty: each due time creates its own run",
            ));
        }
        if template.scheduled_at.is_some() {
            return Err(FieldError::new(
                "schedule.run_template.scheduled_at",
                "must be empty: the schedule says when",
            ));
        }
        validate::optional_name("schedule.project_id", &s.project_id)?;
        if !s.project_id.is_empty()
            && !template.project_id.is_empty()
            && s.project_id != template.project_id
        {
            return Err(FieldError::new(
                "schedule.run_template.project_id",
                "must be empty or equal to schedule.project_id",
            ));
        }
        let mut template = self.runs.new_run("schedule.run_template.", template)?;
        // The schedule's project, else the template's, else "default".
        if !s.project_id.is_empty() {
            template.project_id = s.project_id.clone();
        }
        let project_id = template.project_id.clone();
        Ok(NewSchedule {
            project_id,
            name,
            timing,
            template,
            overlap: overlap_from_proto(s.overlap_policy)?,
            catch_up: catch_up_from_proto(s.catch_up_policy)?,
        })
    }
}

fn overlap_from_proto(value: i32) -> Result<Overlap, FieldError> {
    use proto::OverlapPolicy as P;
    match P::try_from(value) {
        Ok(P::Unspecified | P::Skip) => Ok(Overlap::Skip),
        Ok(P::Queue) => Ok(Overlap::Queue),
        Ok(P::CancelPrevious) => Ok(Overlap::CancelPrevious),
        Err(_) => Err(FieldError::new(
            "schedule.overlap_policy",
            "is not a known overlap policy",
        )),
    }
}

fn catch_up_from_proto(value: i32) -> Result<CatchUp, FieldError> {
    use proto::CatchUpPolicy as P;
    match P::try_from(value) {
        Ok(P::Unspecified | P::One) => Ok(CatchUp::One),
        Ok(P::None) => Ok(CatchUp::None),
        Err(_) => Err(FieldError::new(
            "schedule.catch_up_policy",
            "is not a known catch-up policy",
        )),
    }
}

fn schedule_id(text: &str) -> Result<ScheduleId> {
    Ok(ScheduleId::parse("schedule_id", text)?)
}

#[tonic::async_trait]
impl ScheduleService for ScheduleApi {
    async fn create_schedule(
        &self,
        request: Request<proto::CreateScheduleRequest>,
    ) -> Result<Response<proto::CreateScheduleResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Client).await?;
        let new = self.new_schedule(request.get_ref()).map_err(Error::from)?;
        caller.check_project("schedule.project_id", &new.project_id)?;
        let created = schedules::insert(&self.state.pool, &caller.tenant, &new).await?;
        self.state.schedules_changed.notify_one();
        Ok(Response::new(proto::CreateScheduleResponse {
            schedule: Some(convert::schedule(&created.value)),
        }))
    }

    async fn get_schedule(
        &self,
        request: Request<proto::GetScheduleRequest>,
    ) -> Result<Response<proto::GetScheduleResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let id = schedule_id(&request.get_ref().schedule_id)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let schedule = schedules::get(&client, &tenant, id).await?;
        Ok(Response::new(proto::GetScheduleResponse {
            schedule: Some(convert::schedule(&schedule)),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<proto::ListSchedulesRequest>,
    ) -> Result<Response<proto::ListSchedulesResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let after = ScheduleId::parse_optional("page_token", &r.page_token).map_err(Error::from)?;
        let limit =
            validate::bounded("page_size", r.page_size.into(), 50, 1, 500).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let page = schedules::list(&client, &tenant, after, limit).await?;
        let next_page_token = match page.last() {
            Some(last) if page.len() as i64 == limit => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListSchedulesResponse {
            schedules: page.iter().map(convert::schedule).collect(),
            next_page_token,
        }))
    }

    async fn pause_schedule(
        &self,
        request: Request<proto::PauseScheduleRequest>,
    ) -> Result<Response<proto::PauseScheduleResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let r = request.get_ref();
        let id = schedule_id(&r.schedule_id)?;
        let schedule = firing::set_paused(&self.state.pool, &tenant, id, r.paused).await?;
        self.state.schedules_changed.notify_one();
        Ok(Response::new(proto::PauseScheduleResponse {
            schedule: Some(convert::schedule(&schedule)),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<proto::DeleteScheduleRequest>,
    ) -> Result<Response<proto::DeleteScheduleResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let id = schedule_id(&request.get_ref().schedule_id)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        schedules::delete(&client, &tenant, id).await?;
        Ok(Response::new(proto::DeleteScheduleResponse {}))
    }

    async fn trigger_schedule(
        &self,
        request: Request<proto::TriggerScheduleRequest>,
    ) -> Result<Response<proto::TriggerScheduleResponse>, Status> {
        let tenant = caller(&self.state, &request, Role::Client).await?.tenant;
        let id = schedule_id(&request.get_ref().schedule_id)?;
        let fired =
            firing::trigger(&self.state.pool, &tenant, id, &self.state.settings.quotas()).await?;
        let notifier = &self.state.notifier;
        if fired.run.is_some() {
            notifier.work_available();
        }
        if let Some(session) = fired.session() {
            notifier.events_appended([session.0]);
        }
        if let Some(cancelled) = fired.cancelled {
            notifier.commands_added(&[cancelled]);
        }
        Ok(Response::new(proto::TriggerScheduleResponse {
            run_id: fired.run.map(|r| r.id.to_string()).unwrap_or_default(),
        }))
    }
}
