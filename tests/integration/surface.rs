//! The served surface: health, and RPCs not built yet answer UNIMPLEMENTED.

use agentrun_shared::proto::{self, session_service_client::SessionServiceClient};
use agentrun_tests::*;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test]
async fn health_reports_serving() {
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(connect(app.addr).await);
    for service in ["", "agentrun.v1.RunService", "agentrun.v1.RunnerService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status, ServingStatus::Serving as i32, "{service}");
    }
}

#[tokio::test]
async fn unbuilt_rpcs_answer_unimplemented() {
    let mut app = TestApp::spawn().await;
    let run = app
        .runs
        .create_run(run_request("x"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let err = app
        .runs
        .watch_run(proto::WatchRunRequest {
            run_id: run.run_id,
            after_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let mut sessions = SessionServiceClient::new(connect(app.addr).await);
    let err = sessions
        .get_session(proto::GetSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}
