//! The wire layer: the only module that knows a protocol. Each service
//! translates requests to the engine and maps its errors to status codes:
//! [`inference`] and [`admin`] (rws.v1), [`kserve`] (the Open Inference
//! Protocol), [`events`], [`health`], the [`console`], [`metrics`]; [`auth`] decides who may
//! change things for all of them, [`deadline`] reads a call's deadline, and
//! [`serve`] assembles them behind the transport's limits and runs the
//! [`shutdown`] phases.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::Error;
use crate::serve::engine::Engine;

pub mod admin;
pub mod auth;
pub mod client;
pub mod console;
mod deadline;
pub mod events;
pub mod health;
mod http;
pub mod inference;
pub mod kserve;
pub mod metrics;
pub mod shutdown;
mod upload;

pub use client::{AdminClient, Bearer, EventsClient, admin_client, events_client};
pub use health::FLEET_HEALTH;
pub use http::Side;

pub mod pb {
    tonic::include_proto!("rws.v1");
    /// The encoded descriptors of rws.v1 and of the Open Inference Protocol, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rws_descriptor");
}

/// Largest request accepted by default: a 40-megapixel JPEG fits; uploads of big
/// signatures go through Admin, which takes more.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest Admin request accepted, whatever the message limit: an upload of a
/// signature at its size limit, with room for the other fields, so that
/// uploads up to that limit load and one just over it gets the size check's
/// RESOURCE_EXHAUSTED rather than the transport's OUT_OF_RANGE.
pub const MAX_ADMIN_MESSAGE_BYTES: usize = crate::serve::state::MAX_SIGNATURE_BYTES + (1 << 20);

/// Makes ring rustls' process-wide provider, as tonic's `tls-ring` intends:
/// rustls refuses to pick one when the build enables two (a dependency of a
/// dependency may add aws-lc-rs), and TLS would then fail at the first handshake.
pub(crate) fn use_ring_for_tls() {
    // Already set (by an earlier call, or by the embedding program): keep it.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::NotFound(_) => Status::not_found(msg),
        Error::AlreadyExists(_) => Status::already_exists(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
        Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
        Error::Unavailable(_) => Status::unavailable(msg),
        Error::Aborted(_) => Status::aborted(msg),
        Error::Io { .. } | Error::Candle(_) | Error::Internal(_) => {
            tracing::error!(error = %msg, "internal error");
            Status::internal(msg)
        }
    }
}

/// The transport's bounds, before any request reaches a service.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls in flight on the whole server; beyond it they are refused at once
    /// with RESOURCE_EXHAUSTED (load shedding) rather than queued.
    pub max_concurrent_requests: usize,
    /// Calls in flight on one connection, likewise.
    pub per_connection: usize,
    /// HTTP/2 streams a client may open on one connection.
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent_requests: 1024,
            per_connection: 128,
            max_streams: 256,
        }
    }
}

/// The certificate the server presents on every port, and the CA that
/// verifies Admin's client certificates, as PEM.
#[derive(Clone)]
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

/// How the server is exposed; the engine holds everything about the model.
#[derive(Clone)]
pub struct ServeOptions {
    /// Who may change things.
    pub auth: Arc<auth::Auth>,
    pub tls: Option<Tls>,
    pub max_message_bytes: usize,
    pub limits: Limits,
    /// After the shutdown signal: how long health says NOT_SERVING while
    /// requests are still served, so load balancers move traffic away first.
    pub drain_grace: Duration,
    /// Then, once the listener is closed: how long in-flight work may take.
    pub drain_timeout: Duration,
    /// The phases, shared with the side endpoints.
    pub shutdown: shutdown::Shutdown,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            auth: auth::Auth::trust_loopback(),
            tls: None,
            max_message_bytes: MAX_MESSAGE_BYTES,
            limits: Limits::default(),
            drain_grace: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
            shutdown: shutdown::Shutdown::default(),
        }
    }
}

/// Serves rws.v1 (Inference, Admin, Events), KServe v2, health and reflection
/// on `listener` until `signal` completes, then shuts down in the phases of
/// [`shutdown`], leaves the fleet, and returns.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    opts: ServeOptions,
    signal: impl Future<Output = ()>,
) -> crate::Result<()> {
    let max = opts.max_message_bytes;
    let inference = upload::EarlyRefusal::new(
        pb::inference_server::InferenceServer::new(inference::InferenceService {
            engine: engine.clone(),
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
        engine.clone(),
    );
    let admin = InterceptedService::new(
        pb::admin_server::AdminServer::new(admin::AdminService {
            engine: engine.clone(),
        })
        .max_decoding_message_size(max.max(MAX_ADMIN_MESSAGE_BYTES))
        .max_encoding_message_size(max),
        opts.auth.interceptor(),
    );
    let events = InterceptedService::new(
        pb::events_server::EventsServer::new(events::EventsService {
            engine: engine.clone(),
        }),
        opts.auth.interceptor(),
    );
    // Both reflection versions: grpcurl asks for v1, many clients still for v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e| Error::Internal(format!("reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let shutdown = opts.shutdown.clone();
    let health = health::service(&engine, &shutdown).await;
    engine.expire_activations();
    let warm = {
        let engine = engine.clone();
        tokio::spawn(async move {
            match engine.warm_up().await {
                Ok(()) => tracing::info!("warmed up; health is SERVING"),
                Err(e) => tracing::error!(error = %e, "warm-up failed; health stays NOT_SERVING"),
            }
        })
    };
    let phases = {
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        async move {
            signal.await;
            warm.abort();
            shutdown.enter(shutdown::Phase::Draining);
            tracing::info!(grace = ?opts.drain_grace, "shutting down: NOT_SERVING, still serving through the grace period");
            tokio::time::sleep(opts.drain_grace).await;
            engine.drain();
            shutdown.enter(shutdown::Phase::Closing);
            tracing::info!(timeout = ?opts.drain_timeout, "closing the listener; in-flight requests drain");
        }
    };
    let mut builder = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(opts.limits.per_connection)
        .load_shed(true)
        .max_concurrent_streams(opts.limits.max_streams);
    if let Some(tls) = &opts.tls {
        use_ring_for_tls();
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key));
        if let Some(ca) = &tls.client_ca {
            // Optional at the handshake: inference clients need no certificate;
            // Admin and Events require one (auth).
            config = config
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| Error::InvalidArgument(format!("TLS configuration: {e}")))?;
    }
    let layers = tower::ServiceBuilder::new()
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            opts.limits.max_concurrent_requests,
        ))
        .layer(tonic::service::InterceptorLayer::new(
            deadline::stamp_arrival,
        ));
    let server = builder
        .layer(layers)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(upload::EarlyRefusal::new(
            kserve::service(engine.clone(), max),
            engine.clone(),
        ))
        .add_service(admin)
        .add_service(events)
        // Socket options must be set on the incoming stream (the builder's are
        // ignored here). Without TCP_NODELAY, 1% of requests waited 40 ms for a
        // delayed ACK under load.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            phases,
        );
    let bound = {
        let closing = shutdown.closing();
        async move {
            closing.await;
            tokio::time::sleep(opts.drain_timeout).await;
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| Error::Internal(format!("server failed: {e}")))?,
        () = bound => tracing::warn!(timeout = ?opts.drain_timeout, "in-flight requests outlived the drain timeout; cutting them"),
    }
    if let Some(fleet) = engine.fleet() {
        match fleet.leave().await {
            Ok(()) => tracing::info!("left the fleet: the replica's lease is revoked"),
            Err(e) => {
                tracing::warn!(error = %e, "could not revoke the fleet lease; it expires by itself")
            }
        }
    }
    Ok(())
}
