//! `agentrun.v1.AdminService`: queue statistics. Runner listing and drain need the
//! Connect stream and are not implemented yet.

use agentrun_shared::proto::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::AppState;
use crate::error::Error;
use crate::store::runs;

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
        let stats = runs::queue_stats(&client).await?;
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
            tenants: vec![],
        }))
    }

    async fn list_runners(
        &self,
        _: Request<proto::ListRunnersRequest>,
    ) -> Result<Response<proto::ListRunnersResponse>, Status> {
        Err(Status::unimplemented(
            "AdminService.ListRunners is not implemented yet",
        ))
    }

    async fn set_tenant_limit(
        &self,
        _: Request<proto::SetTenantLimitRequest>,
    ) -> Result<Response<proto::SetTenantLimitResponse>, Status> {
        Err(Status::unimplemented(
            "AdminService.SetTenantLimit is not implemented yet",
        ))
    }

    async fn drain_runner(
        &self,
        _: Request<proto::DrainRunnerRequest>,
    ) -> Result<Response<proto::DrainRunnerResponse>, Status> {
        Err(Status::unimplemented(
            "AdminService.DrainRunner is not implemented yet",
        ))
    }
}
