//! Event reports on the wire: the gRPC `Events.Report`, and the same report as
//! JSON by `POST /v1/events` over HTTP. Both only translate to
//! [`Engine::report`]; both take the admin token (or, without one, loopback
//! callers only), since a report can change which weights serve requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tonic::{Request, Status};

use super::http::Refusal;
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
    token: Option<String>,
}

async fn post_event(
    State(http): State<Arc<Http>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let allowed = match (&http.token, given) {
        (Some(t), Some(g)) => constant_time_eq::constant_time_eq(t.as_bytes(), g.as_bytes()),
        (Some(_), None) => false,
        (None, _) => peer.ip().is_loopback(),
    };
    if !allowed {
        let msg = match http.token {
            Some(_) => "events need an `Authorization: Bearer <admin token>` header",
            None => "events are accepted from loopback clients only without --admin-token-file",
        };
        return Refusal::new(StatusCode::UNAUTHORIZED, msg).into_response();
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
pub async fn serve_http(
    listener: TcpListener,
    engine: Arc<Engine>,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = axum::Router::new()
        .route("/v1/events", axum::routing::post(post_event))
        .layer(DefaultBodyLimit::max(MAX_EVENT_BYTES))
        .with_state(Arc::new(Http { engine, token }));
    super::http::serve(listener, app, "events endpoint", shutdown).await
}
