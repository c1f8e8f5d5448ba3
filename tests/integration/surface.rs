//! The served surface: health.

use agentrun_tests::*;
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
