//! `serve --otlp-endpoint` exports the server's spans over OTLP to a receiver this
//! test runs on loopback: a request's span carries its source, the profile that
//! served it and the activation that chose it, and the batch, stem and trunk
//! spans come along.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{RwsProcess, tensor_request, tiny_repo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use rws::server::pb;

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for r in req.into_inner().resource_spans {
            for s in r.scope_spans {
                spans.extend(s.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

// Multi-threaded: the receiver must answer while this thread waits for the server to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_with_profile_source_and_activation() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let serving = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(serving))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let repo = tiny_repo();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut server = RwsProcess::start(&[
        "--repo",
        repo.path().to_str().unwrap(),
        "--model",
        common::MODEL,
        "--otlp-endpoint",
        &endpoint,
    ]);
    let ch = server.channel().await;
    common::wait_ready(&ch).await;
    let a = rws::server::admin_client(ch.clone(), None)
        .unwrap()
        .activate(pb::ActivateRequest {
            scope: "site-a/".into(),
            profile: "fog".into(),
            ttl_seconds: 600.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = common::InferenceClient::new(ch.clone())
        .classify(pb::ClassifyRequest {
            source: "site-a/cam-1".into(),
            ..tensor_request(2, "")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.profile, "fog");
    // SIGTERM: the server drains and flushes its spans on the way out.
    server.signal("TERM");
    let _ = server.child.wait();
    let until = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = receiver.0.lock().unwrap().clone();
        if spans
            .iter()
            .any(|s| s.name == "classify" && attr(s, "source") == Some("site-a/cam-1"))
        {
            break spans;
        }
        assert!(
            Instant::now() < until,
            "no classify span arrived: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let request = spans
        .iter()
        .find(|s| s.name == "classify" && attr(s, "source") == Some("site-a/cam-1"))
        .unwrap();
    assert_eq!(attr(request, "profile"), Some("fog"));
    assert_eq!(attr(request, "selection"), Some("activation"));
    assert_eq!(attr(request, "activation"), Some(a.id.as_str()));
    assert_eq!(attr(request, "status"), Some("ok"));
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let change = spans
        .iter()
        .find(|s| s.name == "admin_change" && attr(s, "op") == Some("activate"))
        .unwrap_or_else(|| panic!("no admin_change span for the activation: {names:?}"));
    assert_eq!(attr(change, "status"), Some("ok"));
    for name in ["decode", "batch", "stem", "forward", "patch_apply"] {
        assert!(names.contains(&name), "no {name} span: {names:?}");
    }
    // The decode ran inside the request; the batch links to it.
    let decode = spans
        .iter()
        .find(|s| s.name == "decode" && s.trace_id == request.trace_id)
        .expect("the request's decode span");
    assert_eq!(decode.parent_span_id, request.span_id);
    assert!(
        spans
            .iter()
            .filter(|s| s.name == "batch")
            .any(|b| b.links.iter().any(|l| l.span_id == request.span_id)),
        "no batch links to the request"
    );
}
