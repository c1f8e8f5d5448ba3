//! The served surface: health.

use agentrun_tests::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test]
async fn health_reports_serving() {
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(connect(app.addr).await);
    for service in [
        "",
        "agentrun.v1.RunService",
        "agentrun.v1.RunnerService",
        "agentrun.v1.ScheduleService",
        "agentrun.v1.WebhookService",
    ] {
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

/// With an OTLP endpoint, the manager exports its RPC spans there (OTLP over gRPC: the
/// collector sees the HTTP/2 connection of the export call; without spans to export the
/// exporter never connects).
#[tokio::test]
async fn spans_are_exported_to_an_otlp_collector() {
    use tokio::io::AsyncReadExt;
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let url = fresh_database().await;
    let manager = ManagerProcess::start(
        &url,
        &[
            ("AGENTRUN_OTEL_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let mut runs =
        agentrun_shared::proto::run_service_client::RunServiceClient::new(manager.channel().await);
    runs.create_run(run_request("traced")).await.unwrap();

    let (mut socket, _) =
        tokio::time::timeout(std::time::Duration::from_secs(30), collector.accept())
            .await
            .expect("the manager connects to the collector")
            .unwrap();
    // The exporter connects lazily, on its first export: the HTTP/2 preface of a gRPC call.
    let mut received = [0u8; 14];
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        socket.read_exact(&mut received),
    )
    .await
    .expect("the export call starts")
    .unwrap();
    assert_eq!(&received, b"PRI * HTTP/2.0", "OTLP over gRPC speaks HTTP/2");
}

/// Server reflection answers in both versions, v1 and the v1alpha that grpcurl 1.8 and
/// other older tools still use, and lists the API's services.
#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic::codegen::tokio_stream::{self, StreamExt};
    use tonic_reflection::pb::{v1, v1alpha};

    let app = TestApp::spawn().await;
    let channel = connect(app.addr).await;

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
    let Some(Ok(answer)) = answers.next().await else {
        panic!("no v1alpha answer");
    };
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["agentrun.v1.RunService", "agentrun.v1.ScheduleService"] {
        assert!(names.contains(&service.to_owned()), "{names:?}");
    }

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = v1::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1 reflection is served")
        .into_inner();
    let Some(Ok(answer)) = answers.next().await else {
        panic!("no v1 answer");
    };
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    for service in ["agentrun.v1.AdminService", "agentrun.v1.WebhookService"] {
        assert!(
            list.service.iter().any(|s| s.name == service),
            "{service}: {list:?}"
        );
    }
}
