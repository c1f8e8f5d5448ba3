//! `agentrun.v1.AdminService`: what operators look at and act on — queue and per-tenant
//! statistics, the runners connected (to any replica) with their leases, draining a
//! runner, and per-tenant limits on active runs.
//!
//! A drain is recorded in the database (`runners.draining`); the replica holding the
//! runner's Connect stream notices it within its poll interval, stops assigning, and
//! tells the runner to finish its runs and exit (`api::connect`).

use agentrun_shared::ids::RunnerId;
use agentrun_shared::proto::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::{AppState, convert, validate};
use crate::error::Error;
use crate::store::{runners, runs};

pub struct AdminApi {
    state: AppState,
}

impl AdminApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_queue_stats(
        &self,
        _: Request<proto::GetQueueStatsRequest>,
    ) -> Result<Response<proto::GetQueueStatsResponse>, Status> {
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let stats = runs::queue_stats(&client, self.state.settings.tenant_max_active_runs).await?;
        Ok(Response::new(proto::GetQueueStatsResponse {
            depths: stats
                .depths
                .iter()
                .map(|d| proto::QueueDepth {
                    queue: d.queue.clone(),
                    status: d.status.to_proto() as i32,
                    runs: d.runs,
                })
                .collect(),
            ages: stats
                .oldest_pending_ms
                .iter()
                .map(|(queue, age)| proto::QueueAge {
                    queue: queue.clone(),
                    oldest_pending_age_ms: *age,
                })
                .collect(),
            tenants: stats
                .tenants
                .iter()
                .map(|t| proto::TenantStats {
                    tenant_id: t.tenant_id.clone(),
                    pending_runs: t.pending_runs,
                    active_runs: t.active_runs,
                    max_active_runs: t.max_active_runs,
                })
                .collect(),
        }))
    }

    async fn list_runners(
        &self,
        _: Request<proto::ListRunnersRequest>,
    ) -> Result<Response<proto::ListRunnersResponse>, Status> {
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let listed = runners::list_recent(&client).await?;
        Ok(Response::new(proto::ListRunnersResponse {
            runners: listed
                .iter()
                .map(|r| proto::RunnerInfo {
                    runner_id: r.id.to_string(),
                    name: r.name.clone(),
                    labels: r.labels.clone(),
                    backend_profiles: r.backend_profiles.clone(),
                    max_concurrency: r.max_concurrency,
                    version: r.version.clone(),
                    last_heartbeat_at: convert::timestamp(Some(r.last_heartbeat_at)),
                    draining: r.draining,
                    leases: r
                        .leases
                        .iter()
                        .map(|(run_id, epoch)| proto::LeaseRef {
                            run_id: run_id.to_string(),
                            epoch: *epoch,
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn set_tenant_limit(
        &self,
        request: Request<proto::SetTenantLimitRequest>,
    ) -> Result<Response<proto::SetTenantLimitResponse>, Status> {
        let r = request.get_ref();
        let tenant_id = validate::name("tenant_id", &r.tenant_id).map_err(Error::from)?;
        let max_active_runs = match r.max_active_runs {
            0 => None,
            n if n < 0 => {
                return Err(Error::invalid("max_active_runs", "must not be negative").into());
            }
            n => Some(n),
        };
        let client = self.state.pool.get().await.map_err(Error::from)?;
        runners::set_tenant_limit(&client, tenant_id, max_active_runs).await?;
        // A limit raised or removed may make runs claimable at once.
        self.state.notifier.work_available();
        Ok(Response::new(proto::SetTenantLimitResponse {}))
    }

    async fn drain_runner(
        &self,
        request: Request<proto::DrainRunnerRequest>,
    ) -> Result<Response<proto::DrainRunnerResponse>, Status> {
        let runner_id =
            RunnerId::parse("runner_id", &request.get_ref().runner_id).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let found = runners::drain(&client, runner_id).await?;
        if found {
            tracing::info!(runner = %runner_id, "runner drain requested");
        }
        Ok(Response::new(proto::DrainRunnerResponse { found }))
    }
}
