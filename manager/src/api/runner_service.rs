//! `agentrun.v1.RunnerService`: the unary runner RPCs. Every write is fenced by the lease
//! epoch in the store (`store::leases`); `runner_messages` validates and converts, and
//! `connect` serves the stream.

use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::proto::{self, runner_service_server::RunnerService};
use agentrun_shared::state::RunStatus;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Caller;
use super::runner_messages::{
    append_write, delivered_to, finish_write, heartbeat_response, lease_refs, runner_identity,
    within_capacity,
};
use super::{AppState, caller, convert, validate};
use crate::error::Error;
use crate::observe;
use crate::store::api_keys::Role;
use crate::store::leases::{self, Heartbeat, LeaseWrite, Written};

pub struct RunnerApi {
    state: AppState,
}

impl RunnerApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    fn lease_ttl_ms(&self) -> i64 {
        self.state.settings.lease_ttl_ms as i64
    }

    /// Stores one lease write of the caller's runner (fenced by its epoch in the store).
    async fn write(
        &self,
        caller: &Caller,
        runner_id: RunnerId,
        write: LeaseWrite,
    ) -> Result<Written, Error> {
        leases::write_one(
            &self.state.pool,
            runner_id,
            caller.runner_tenant(),
            write,
            &self.state.settings.quotas(),
        )
        .await
    }
}

#[tonic::async_trait]
impl RunnerService for RunnerApi {
    type ConnectStream = super::connect::ManagerStream;

    async fn connect(
        &self,
        request: Request<Streaming<proto::RunnerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let caller = caller(&self.state, &request, Role::Runner).await?;
        super::connect::open(
            self.state.clone(),
            caller.runner_tenant().cloned(),
            caller.key_id,
            request.into_inner(),
        )
        .await
        .map(Response::new)
    }

    async fn claim_runs(
        &self,
        request: Request<proto::ClaimRunsRequest>,
    ) -> Result<Response<proto::ClaimRunsResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Runner).await?;
        let r = request.get_ref();
        let mut runner = runner_identity(r.runner.as_ref()).map_err(Error::from)?;
        runner.tenant = caller.runner_tenant().cloned();
        observe::record_runner(&runner.id);
        let max_runs =
            validate::bounded("max_runs", r.max_runs.into(), 1, 1, 1000).map_err(Error::from)?;
        let assignments = leases::claim(
            &self.state.pool,
            &runner,
            true,
            max_runs,
            self.state.settings.lease_ttl(),
            self.state.settings.tenant_max_active_runs,
        )
        .await?;
        self.state.metrics.claimed(&assignments);
        self.state
            .notifier
            .events_appended(assignments.iter().map(|a| a.run.id.0));
        Ok(Response::new(proto::ClaimRunsResponse {
            assignments: assignments.iter().map(convert::assignment).collect(),
            lease_ttl_ms: self.lease_ttl_ms(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Runner).await?;
        let r = request.get_ref();
        let runner_id = RunnerId::parse("runner_id", &r.runner_id).map_err(Error::from)?;
        let named = lease_refs("leases", &r.leases).map_err(Error::from)?;
        let tenant = caller.runner_tenant().cloned();
        let _turn = self
            .state
            .heartbeats
            .admit_unary(tenant.as_ref(), runner_id)
            .await?;
        let held = {
            let client = self.state.pool.get().await.map_err(Error::from)?;
            let capacity = leases::capacity(&client, runner_id, tenant.as_ref()).await?;
            within_capacity(&named, capacity.unwrap_or(0)).map_err(Error::from)?;
            leases::held_by(&client, runner_id, &named).await?
        };
        let renewed = self
            .state
            .heartbeats
            .beat_unary(
                Heartbeat {
                    runner_id,
                    tenant,
                    leases: named,
                },
                |run, epoch| held.contains(&(run, epoch)),
            )
            .await?;
        self.state
            .notifier
            .events_appended(delivered_to(&renewed.leases));
        Ok(Response::new(heartbeat_response(
            &renewed.leases,
            self.state.settings.lease_ttl_ms,
        )))
    }

    async fn append_events(
        &self,
        request: Request<proto::AppendEventsRequest>,
    ) -> Result<Response<proto::AppendEventsResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Runner).await?;
        let r = request.into_inner();
        let runner_id = RunnerId::parse("runner_id", &r.runner_id).map_err(Error::from)?;
        let run_id = RunId::parse("run_id", &r.run_id).map_err(Error::from)?;
        observe::record_runner(&runner_id);
        observe::record_run(&run_id);
        let events = r.events.len();
        let write = append_write(&self.state.settings, r).map_err(Error::from)?;
        let Written::Appended(outcome) = self.write(&caller, runner_id, write).await? else {
            return Err(Status::internal("an append stored something else"));
        };
        self.state.metrics.appended(events, outcome.duplicates);
        // As on the stream (`connect.rs`): ephemeral deltas first, then the stored events.
        self.state.watch_hub.publish_live(&outcome.live);
        let fanned_out = self.state.watch_hub.publish_stored(outcome.stored);
        if fanned_out.is_empty() {
            self.state.notifier.events_appended([run_id.0]);
        } else {
            self.state
                .notifier
                .events_appended_and_fanned_out(fanned_out);
        }
        Ok(Response::new(proto::AppendEventsResponse {
            first_seq: outcome.first_seq,
            last_seq: outcome.last_seq,
            acked_runner_seq: outcome.acked_runner_seq,
            duplicates: outcome.duplicates,
        }))
    }

    async fn finish_run(
        &self,
        request: Request<proto::FinishRunRequest>,
    ) -> Result<Response<proto::FinishRunResponse>, Status> {
        let caller = caller(&self.state, &request, Role::Runner).await?;
        let r = request.get_ref();
        let runner_id = RunnerId::parse("runner_id", &r.runner_id).map_err(Error::from)?;
        let write = finish_write(r).map_err(Error::from)?;
        let Written::Finished(run, _) = self.write(&caller, runner_id, write).await? else {
            return Err(Status::internal("a finish stored something else"));
        };
        self.state.notifier.events_appended([run.id.0]);
        if run.concurrency_key.is_some() || run.status == RunStatus::Pending {
            // Its key's next run was let in, or the run went back to the queue for a
            // turn queued meanwhile: wake claimers.
            self.state.notifier.work_available();
        }
        Ok(Response::new(proto::FinishRunResponse {
            run: Some(convert::run(&run)),
        }))
    }
}
