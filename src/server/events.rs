//! Event reports on the wire: the gRPC `Events.Report`, and the same report as
//! JSON by `POST /v1/events` over HTTP. Both only translate to
//! [`Engine::report`]; both admit callers by [`super::auth`], since a report
//! can change which weights serve requests.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tonic::{Request, Status};

use super::auth::{Auth, Credentials, bearer};
use super::http::{Refusal, Side};
use super::{pb, status};
use crate::serve::engine::Engine;
use crate::serve::events::{Decision, Event, MAX_EVENT_BYTES};
use crate::{Error, Result};

pub struct EventsService {
    pub engine: Arc<Engine>,
}

fn outcome(d: &Decision) -> pb::EventOutcome {
    let a = d.activation.as_ref();
    pb::EventOutcome {
        outcome: d.outcome.as_str().into(),
        activation_id: a.map(|a| a.id.clone()).unwrap_or_default(),
        profile: a.map(|a| a.profile.clone()).unwrap_or_default(),
        until_unix_ms: a.map_or(0, |a| a.until_ms),
    }
}

#[tonic::async_trait]
impl pb::events_server::Events for EventsService {
    async fn report(
        &self,
        req: Request<pb::EventReport>,
    ) -> std::result::Result<tonic::Response<pb::EventOutcome>, Status> {
        let r = req.into_inner();
        let some = |s: String| (!s.is_empty()).then_some(s);
        let event = Event {
            kind: r.kind,
            // Out of u8's range is out of 1..=5 as well.
            severity: u8::try_from(r.severity).unwrap_or(0),
            scope: r.scope,
            observed_at: some(r.observed_at),
            ttl_seconds: (r.ttl_seconds != 0.0).then_some(r.ttl_seconds),
            id: some(r.id),
        };
        let d = self.engine.report(event).await.map_err(status)?;
        Ok(tonic::Response::new(outcome(&d)))
    }
}

struct Http {
    engine: Arc<Engine>,
    auth: Arc<Auth>,
}

async fn post_event(
    State(http): State<Arc<Http>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let creds = Credentials {
        bearer: bearer(headers.get("authorization").and_then(|v| v.to_str().ok())),
        peer: Some(peer),
        client_cert: None,
    };
    if let Err(r) = http.auth.check(&creds) {
        return Refusal::from(r).into_response();
    }
    let event: Event = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            let e = Error::InvalidArgument(format!(
                "not an event ({}); send JSON like {{\"kind\": \"fog\", \"severity\": 3, \"scope\": \"site-a/\"}}",
                crate::error::clip(&e.to_string())
            ));
            return Refusal::from(e).into_response();
        }
    };
    match http.engine.report(event).await {
        Ok(d) => {
            let o = outcome(&d);
            axum::Json(serde_json::json!({
                "outcome": o.outcome,
                "activation_id": o.activation_id,
                "profile": o.profile,
                "until_unix_ms": o.until_unix_ms,
            }))
            .into_response()
        }
        Err(e) => Refusal::from(e).into_response(),
    }
}

/// Serves `POST /v1/events` until `shutdown` completes. Bodies over
/// [`MAX_EVENT_BYTES`] are refused (413) unread.
pub async fn serve_http(listener: TcpListener, engine: Arc<Engine>, side: Side) -> Result<()> {
    let app = axum::Router::new()
        .route("/v1/events", axum::routing::post(post_event))
        .layer(DefaultBodyLimit::max(MAX_EVENT_BYTES))
        .with_state(Arc::new(Http {
            engine,
            auth: side.auth.clone(),
        }));
    super::http::serve(listener, app, "events endpoint", &side).await
}
