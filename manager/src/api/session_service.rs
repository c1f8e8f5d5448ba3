//! `agentrun.v1.SessionService`: not implemented yet. Sessions are already created and
//! kept by CreateRun; reading and following them comes with the client-surface work.

use std::pin::Pin;

use agentrun_shared::proto::{self, session_service_server::SessionService};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct SessionApi;

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!("SessionService.{method} is not implemented yet"))
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn get_session(
        &self,
        _: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::GetSessionResponse>, Status> {
        Err(unimplemented("GetSession"))
    }

    async fn list_sessions(
        &self,
        _: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        Err(unimplemented("ListSessions"))
    }

    async fn mark_session_read(
        &self,
        _: Request<proto::MarkSessionReadRequest>,
    ) -> Result<Response<proto::MarkSessionReadResponse>, Status> {
        Err(unimplemented("MarkSessionRead"))
    }

    async fn list_session_events(
        &self,
        _: Request<proto::ListSessionEventsRequest>,
    ) -> Result<Response<proto::ListSessionEventsResponse>, Status> {
        Err(unimplemented("ListSessionEvents"))
    }

    type WatchSessionStream =
        Pin<Box<dyn Stream<Item = Result<proto::SessionEvent, Status>> + Send>>;

    async fn watch_session(
        &self,
        _: Request<proto::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        Err(unimplemented("WatchSession"))
    }
}
