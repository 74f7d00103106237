//! gRPC health: what each name reports, and a `Watch` that ends when the
//! server closes (an open one would otherwise hold the drain for ever).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use super::shutdown::{Phase, Shutdown};
use crate::serve::engine::Engine;

/// Health name that follows the fleet's link to etcd.
pub const FLEET_HEALTH: &str = "rws.fleet";

/// Health names reported: the whole server ("") and each service.
const SERVICES: [&str; 4] = [
    "",
    "rws.v1.Inference",
    "rws.v1.Admin",
    "inference.GRPCInferenceService",
];

/// How often readiness is read again (a worker lost, a warm-up done).
const POLL: Duration = Duration::from_millis(250);

/// Health's [`HealthService`], with `Watch` streams that end at [`Phase::Closing`].
struct Closing {
    inner: HealthService,
    shutdown: Shutdown,
}

type WatchStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Closing {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(req).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let stream = self.inner.watch(req).await?.into_inner();
        let ends = self.shutdown.closing();
        Ok(Response::new(Box::pin(stream.take_until(ends))))
    }
}

/// The health service, NOT_SERVING until the engine is ready. It then follows
/// readiness (a worker that cannot be replaced turns it NOT_SERVING) until
/// the shutdown drains, when it says NOT_SERVING for good; and `rws.fleet`
/// follows the link to etcd.
pub async fn service(engine: &Arc<Engine>, shutdown: &Shutdown) -> HealthServer<impl Health> {
    let reporter = HealthReporter::new();
    set(&reporter, false).await;
    {
        let (engine, reporter, shutdown) = (engine.clone(), reporter.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut serving = false;
            loop {
                let ready = engine.is_ready() && shutdown.phase() == Phase::Serving;
                if ready != serving {
                    set(&reporter, ready).await;
                    serving = ready;
                    tracing::info!(serving, "health changed");
                }
                if shutdown.phase() >= Phase::Draining {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.reached(Phase::Draining) => {}
                }
            }
        });
    }
    if let Some(fleet) = engine.fleet() {
        // "rws.fleet" follows etcd: NOT_SERVING while the replica serves its
        // last state without it ("" stays SERVING: inference is unaffected).
        let (mut link, reporter) = (fleet.link(), reporter.clone());
        tokio::spawn(async move {
            loop {
                let status = match link.borrow_and_update().connected {
                    true => ServingStatus::Serving,
                    false => ServingStatus::NotServing,
                };
                reporter.set_service_status(FLEET_HEALTH, status).await;
                if link.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    HealthServer::new(Closing {
        inner: HealthService::from_health_reporter(reporter),
        shutdown: shutdown.clone(),
    })
}

async fn set(reporter: &HealthReporter, serving: bool) {
    let status = match serving {
        true => ServingStatus::Serving,
        false => ServingStatus::NotServing,
    };
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}
