//! One run is one trace: a client's W3C trace context on CreateRun is continued by the
//! manager's span for the call and, through the assignment, by the runner's span for
//! the run and a GenAI `chat` span per turn (the provider call) — all exported by OTLP
//! to a collector (here an in-process one, which the test's client reports its own span
//! to as well), named by the standard OTEL_* variables.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentrun_shared::proto::{self, run_service_client::RunServiceClient};
use agentrun_tests::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind};

const LONG: Duration = Duration::from_secs(60);

/// A span as received: its service, ids and attributes (values as text).
#[derive(Debug, Clone)]
struct Received {
    service: String,
    resource: HashMap<String, String>,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

fn text(values: &[KeyValue]) -> HashMap<String, String> {
    values
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = text(
                &resource_spans
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default(),
            );
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    resource: resource.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: text(&span.attributes),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The standard variables naming the collector and the service, and a resource
/// attribute; batches exported every 100 ms.
fn otel_env(endpoint: &str, service: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=trace-test".to_owned(),
        ),
    ]
}

/// What an instrumented client exports for its CreateRun call: a root span of its own
/// service, with the ids it sent as `traceparent`.
async fn export_client_span(collector: &str, trace_id: &str, span_id: &str) {
    let bytes = |hex: &str| {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let service = KeyValue {
        key: "service.name".into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue("test-client".into())),
        }),
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![service],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: bytes(trace_id),
                    span_id: bytes(span_id),
                    name: "client CreateRun".into(),
                    kind: SpanKind::Client as i32,
                    start_time_unix_nano: now - 1_000_000,
                    end_time_unix_nano: now,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    TraceServiceClient::connect(collector.to_owned())
        .await
        .expect("the collector listens")
        .export(request)
        .await
        .expect("the collector takes the client's span");
}

fn borrowed<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn a_run_is_one_trace_from_the_clients_create_run_to_the_runners_turns() {
    let collector = Collector::default();
    let collector_addr = free_addr();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve(collector_addr),
    );
    let endpoint = format!("http://{collector_addr}");
    let manager_env = otel_env(&endpoint, "manager-under-test");
    let runner_env = otel_env(&endpoint, "runner-under-test");
    let database = fresh_database().await;
    let manager = ManagerProcess::start(&database, &borrowed(&manager_env)).await;
    let _runner = RunnerProcess::start(manager.addr, "traced", &borrowed(&runner_env));

    // The client's own span: a trace id and span id of its choosing.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(run_request("[tokens:3] traced"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let mut runs = RunServiceClient::new(manager.channel().await);
    let run_id = runs
        .create_run(request)
        .await
        .expect("create the run")
        .into_inner()
        .run
        .unwrap()
        .run_id;
    wait_for("the run to complete", LONG, || {
        let mut runs = runs.clone();
        let run_id = run_id.clone();
        async move {
            let run = runs
                .get_run(proto::GetRunRequest { run_id })
                .await
                .ok()?
                .into_inner()
                .run?;
            (run.status == proto::RunStatus::Completed as i32).then_some(())
        }
    })
    .await;

    export_client_span(&endpoint, trace_id, client_span).await;

    // Every span of the trace, once the client's, the manager's call and the runner's
    // run and turn are all in.
    let spans = wait_for("the trace's spans", LONG, || {
        let collector = collector.clone();
        async move {
            let spans: Vec<Received> = collector
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            let has = |name: &str| spans.iter().any(|s| s.name == name);
            let all = ["client CreateRun", "rpc", "agentrun.run", "chat scripted"];
            all.iter().all(|name| has(name)).then_some(spans)
        }
    })
    .await;
    let named = |name: &str| spans.iter().find(|s| s.name == name).unwrap().clone();
    let create = spans
        .iter()
        .find(|s| {
            s.name == "rpc"
                && s.attributes.get("method").map(String::as_str)
                    == Some("/agentrun.v1.RunService/CreateRun")
        })
        .unwrap_or_else(|| panic!("no CreateRun span in {spans:#?}"))
        .clone();
    assert_eq!(create.service, "manager-under-test");
    assert_eq!(
        create.parent_span_id, client_span,
        "the client's span is its parent"
    );
    assert_eq!(
        create
            .resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("trace-test")
    );

    let run = named("agentrun.run");
    assert_eq!(run.service, "runner-under-test");
    assert_eq!(
        run.parent_span_id, create.span_id,
        "the run continues CreateRun"
    );
    assert_eq!(run.attributes["agentrun.run_id"], run_id);

    let turn = named("chat scripted");
    assert_eq!(
        turn.parent_span_id, run.span_id,
        "a turn is a child of its run"
    );
    assert_eq!(turn.attributes["gen_ai.operation.name"], "chat");
    assert_eq!(turn.attributes["gen_ai.request.model"], "scripted");
    assert_eq!(turn.attributes["gen_ai.provider.name"], "scripted");
    let first_token: f64 = turn.attributes["gen_ai.server.time_to_first_token"]
        .parse()
        .expect("a time to first token in seconds");
    assert!(first_token >= 0.0, "{first_token}");
}
