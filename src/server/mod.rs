//! The gRPC layer: the only module that knows the wire protocol. Each handler
//! translates a request, runs the engine off the async reactor, and maps errors
//! to status codes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::serve::activation::{Activation, End, now_ms};
use crate::serve::change::Change;
use crate::serve::engine::{Ask, Engine, SignatureSource};
use crate::serve::journal::Cause;
use crate::serve::preprocess::Input;
use crate::serve::profile::{self, Choice, LoadedSignature, Profile};
use crate::serve::shadow;
use crate::serve::state::sha256;

pub mod client;
pub mod console;
pub mod events;
mod http;
pub mod kserve;

pub mod pb {
    tonic::include_proto!("rws.v1");
    /// The encoded descriptors of rws.v1 and of the Open Inference Protocol, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rws_descriptor");
}

use pb::admin_server::{Admin, AdminServer};
use pb::inference_server::{Inference, InferenceServer};

/// Largest request accepted: uploads of big signatures go through Admin.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Largest Admin request accepted, whatever the message limit: an upload of a
/// signature at its size limit, with room for the other fields, so that
/// uploads up to that limit load and one just over it gets the size check's
/// RESOURCE_EXHAUSTED rather than the transport's OUT_OF_RANGE.
pub const MAX_ADMIN_MESSAGE_BYTES: usize = crate::serve::state::MAX_SIGNATURE_BYTES + (1 << 20);

/// Makes ring rustls' process-wide provider, as tonic's `tls-ring` intends:
/// rustls refuses to pick one when the build enables two (a dependency of a
/// dependency may add aws-lc-rs), and TLS would then fail at the first handshake.
fn use_ring_for_tls() {
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

/// When the transport took a call, stamped by [`stamp_arrival`].
#[derive(Clone, Copy)]
struct Arrival(Instant);

/// Stamps each call's [`Arrival`] as it enters the server's layers, before
/// tonic starts its own `grpc-timeout` timer. A deadline counted from it ends
/// no later than that timer, so the handler answers DEADLINE_EXCEEDED first
/// (tonic's timer answers CANCELLED).
fn stamp_arrival(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.extensions_mut().insert(Arrival(Instant::now()));
    Ok(req)
}

/// The instant a client's `grpc-timeout` header (e.g. `250m`, `5S`) runs out,
/// counted from the call's arrival.
fn grpc_deadline<T>(req: &Request<T>) -> Option<Instant> {
    let timeout = parse_grpc_timeout(req.metadata().get("grpc-timeout")?.to_str().ok()?)?;
    let arrival = req
        .extensions()
        .get::<Arrival>()
        .map_or_else(Instant::now, |a| a.0);
    arrival.checked_add(timeout)
}

/// A `grpc-timeout` value (at most 8 digits and a unit, by the gRPC spec) as a
/// duration. Malformed or absurd values (whose deadline would overflow the clock)
/// mean no deadline rather than a failure: the header is the client's hint.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Clone)]
pub struct InferenceService {
    engine: Arc<Engine>,
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn classify(
        &self,
        req: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = grpc_deadline(&req);
        let header = match req.metadata().get(SOURCE_HEADER).map(|v| v.to_str()) {
            Some(Ok(h)) => h.to_string(),
            Some(Err(_)) => {
                return Err(Status::invalid_argument(format!(
                    "metadata {SOURCE_HEADER} must be printable ASCII"
                )));
            }
            None => String::new(),
        };
        let r = req.into_inner();
        let source = if r.source.is_empty() {
            header
        } else {
            r.source
        };
        let input = match r.input {
            Some(pb::classify_request::Input::Image(bytes)) => Input::Image(bytes),
            Some(pb::classify_request::Input::Tensor(t)) => Input::Tensor {
                shape: t.shape.into_iter().map(|d| d as usize).collect(),
                data: t.data,
            },
            None => return Err(Status::invalid_argument("set either image or tensor")),
        };
        let ask = Ask {
            profile: r.profile,
            source,
            top_k: r.top_k as usize,
            with_logits: r.return_logits,
            deadline,
        };
        let c = self.engine.classify(input, ask).await.map_err(status)?;
        let (selection, activation_id) = selection(c.chosen);
        Ok(Response::new(pb::ClassifyResponse {
            top_k: c
                .top_k
                .into_iter()
                .map(|p| pb::Prediction {
                    index: p.index as u32,
                    label: p.label,
                    score: p.score,
                })
                .collect(),
            profile: c.profile,
            generation: c.generation,
            logits: c.logits,
            selection: selection as i32,
            activation_id,
            signatures: signature_refs(&c.signatures),
            detection: c.auto.map(|a| pb::Detection {
                kind: a.kind,
                confidence: a.confidence,
                severity: u32::from(a.severity),
                familiar: a.familiar,
            }),
        }))
    }
}

/// Who sent an admin call, for the audit trail: the token's fingerprint when
/// it carried one (the guard has checked it), else the peer's address.
fn who<T>(req: &Request<T>) -> String {
    let token = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (token, req.remote_addr()) {
        (Some(t), _) => format!("token:{}", &sha256(t.as_bytes())[7..19]),
        (None, Some(peer)) => format!("peer:{peer}"),
        (None, None) => "peer:unknown".into(),
    }
}

/// The gRPC metadata key a client may name its source in.
pub const SOURCE_HEADER: &str = "x-rws-source";

/// A [`Choice`] on the wire.
fn selection(chosen: Choice) -> (pb::Selection, String) {
    match chosen {
        Choice::Explicit => (pb::Selection::Explicit, String::new()),
        Choice::Activation(id) => (pb::Selection::Activation, id),
        Choice::Default => (pb::Selection::Default, String::new()),
    }
}

fn activation_info(a: &Activation, revision: i64) -> pb::ActivationInfo {
    pb::ActivationInfo {
        id: a.id.clone(),
        scope: a.scope.clone(),
        profile: a.profile.clone(),
        since_unix_ms: a.since_ms,
        until_unix_ms: a.until_ms,
        reason: a.reason.clone(),
        revision,
    }
}

#[derive(Clone)]
pub struct AdminService {
    engine: Arc<Engine>,
}

fn signature_info(s: &LoadedSignature) -> pb::SignatureInfo {
    let m = &s.signature.meta;
    pb::SignatureInfo {
        name: s.name.clone(),
        arch: m.arch.clone(),
        corruption: m.corruption.clone(),
        default_alpha: m.default_alpha,
        quant: s.signature.quant_summary(),
        bytes: s.signature.stored_bytes() as u64,
        base_fingerprint: m.base_fingerprint.clone(),
        transferred: s.transferred,
        tensors: s.signature.deltas().keys().cloned().collect(),
        synthetic: m.synthetic,
    }
}

fn shadow_info(r: &shadow::Report) -> pb::ShadowInfo {
    let t = &r.tally;
    pb::ShadowInfo {
        profile: r.profile.clone(),
        fraction: r.fraction,
        since_unix_ms: r.since_ms,
        sampled: t.sampled,
        dropped: t.dropped,
        compared: t.compared,
        failed: t.failed,
        agreement: t.agreement(),
        served_confidence: t.mean(t.served_confidence),
        candidate_confidence: t.mean(t.candidate_confidence),
        served_entropy: t.mean(t.served_entropy),
        candidate_entropy: t.mean(t.candidate_entropy),
    }
}

fn signature_refs(refs: &[profile::SignatureRef]) -> Vec<pb::SignatureRef> {
    refs.iter()
        .map(|s| pb::SignatureRef {
            name: s.name.clone(),
            alpha: s.alpha,
        })
        .collect()
}

fn profile_info(p: &Profile, default: &str) -> pb::ProfileInfo {
    pb::ProfileInfo {
        name: p.name.clone(),
        signatures: signature_refs(&p.signatures),
        generation: p.generation,
        resident: p.is_resident(),
        is_default: p.name == default,
    }
}

impl AdminService {
    /// Applies a profile change and says what it did.
    async fn profile_change(
        &self,
        change: Change,
        cause: Cause,
        wait_fleet: bool,
    ) -> Result<Response<pb::ProfileChange>, Status> {
        let op = change.op();
        let c = self
            .engine
            .change(change, cause, wait_fleet)
            .await
            .map_err(status)?;
        let profile = c.profile().map_err(status)?;
        tracing::info!(op, profile = %profile.name, generation = c.generation, apply_us = c.elapsed.as_micros() as u64, "profile change");
        let default = self.engine.registry().snapshot().default_profile.clone();
        Ok(Response::new(pb::ProfileChange {
            profile: Some(profile_info(profile, &default)),
            generation: c.generation,
            apply_micros: c.elapsed.as_secs_f64() * 1e6,
            revision: c.revision,
        }))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_signatures(
        &self,
        _: Request<pb::ListSignaturesRequest>,
    ) -> Result<Response<pb::ListSignaturesResponse>, Status> {
        let table = self.engine.registry().snapshot();
        Ok(Response::new(pb::ListSignaturesResponse {
            signatures: table
                .signatures
                .values()
                .map(|s| signature_info(s))
                .collect(),
        }))
    }

    async fn load_signature(
        &self,
        req: Request<pb::LoadSignatureRequest>,
    ) -> Result<Response<pb::LoadSignatureResponse>, Status> {
        let cause = Cause::new(who(&req), "");
        let r = req.into_inner();
        let source = match r.source {
            Some(pb::load_signature_request::Source::Path(p)) => SignatureSource::Path(p),
            Some(pb::load_signature_request::Source::Data(b)) => SignatureSource::Bytes(b),
            None => return Err(Status::invalid_argument("set either path or data")),
        };
        let loaded = self
            .engine
            .load_signature(r.name, source, r.allow_transfer, cause, r.wait_fleet)
            .await
            .map_err(status)?;
        tracing::info!(signature = %loaded.name, transferred = loaded.transferred, "signature loaded");
        Ok(Response::new(pb::LoadSignatureResponse {
            signature: Some(signature_info(&loaded)),
        }))
    }

    async fn unload_signature(
        &self,
        req: Request<pb::UnloadSignatureRequest>,
    ) -> Result<Response<pb::UnloadSignatureResponse>, Status> {
        let cause = Cause::new(who(&req), "");
        let r = req.into_inner();
        self.engine
            .change(Change::Unload(r.name), cause, r.wait_fleet)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UnloadSignatureResponse {}))
    }

    async fn put_profile(
        &self,
        req: Request<pb::PutProfileRequest>,
    ) -> Result<Response<pb::ProfileChange>, Status> {
        let cause = Cause::new(who(&req), "");
        let r = req.into_inner();
        let sigs = r
            .signatures
            .into_iter()
            .map(|s| profile::SignatureRef {
                name: s.name,
                alpha: s.alpha,
            })
            .collect();
        let change = Change::Put {
            name: r.name,
            signatures: sigs,
            replace: r.replace,
        };
        self.profile_change(change, cause, r.wait_fleet).await
    }

    async fn delete_profile(
        &self,
        req: Request<pb::DeleteProfileRequest>,
    ) -> Result<Response<pb::ProfileChange>, Status> {
        let cause = Cause::new(who(&req), "");
        let r = req.into_inner();
        self.profile_change(Change::Delete(r.name), cause, r.wait_fleet)
            .await
    }

    async fn list_profiles(
        &self,
        _: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let table = self.engine.registry().snapshot();
        Ok(Response::new(pb::ListProfilesResponse {
            profiles: table
                .profiles
                .values()
                .map(|p| profile_info(p, &table.default_profile))
                .collect(),
            default_profile: table.default_profile.clone(),
            generation: table.generation,
        }))
    }

    async fn set_default_profile(
        &self,
        req: Request<pb::SetDefaultProfileRequest>,
    ) -> Result<Response<pb::ProfileChange>, Status> {
        let cause = Cause::new(who(&req), "");
        let r = req.into_inner();
        self.profile_change(Change::SetDefault(r.name), cause, r.wait_fleet)
            .await
    }

    async fn activate(
        &self,
        req: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivationInfo>, Status> {
        let cause = Cause::new(who(&req), "");
        let r = req.into_inner();
        let end = match (r.ttl_seconds, r.until_unix_ms) {
            (t, 0) if t > 0.0 => Duration::try_from_secs_f64(t).ok().map(End::After),
            (t, u) if t == 0.0 && u > 0 => Some(End::At(u)),
            _ => None,
        };
        let end = end.ok_or_else(|| {
            Status::invalid_argument("set either ttl_seconds (a positive number) or until_unix_ms")
        })?;
        let cause = Cause {
            why: r.reason.clone(),
            ..cause
        };
        let a = Activation::starting_now(r.scope, r.profile, end, r.reason);
        let c = self
            .engine
            .change(Change::Activate(a.clone()), cause, r.wait_fleet)
            .await
            .map_err(status)?;
        tracing::info!(id = %a.id, scope = %a.scope, profile = %a.profile, until_ms = a.until_ms, reason = %a.reason, "activated");
        Ok(Response::new(activation_info(&a, c.revision)))
    }

    async fn deactivate(
        &self,
        req: Request<pb::DeactivateRequest>,
    ) -> Result<Response<pb::DeactivateResponse>, Status> {
        let cause = Cause::new(who(&req), "");
        let r = req.into_inner();
        self.engine
            .change(Change::Deactivate(r.id.clone()), cause, r.wait_fleet)
            .await
            .map_err(status)?;
        tracing::info!(id = %r.id, "deactivated");
        Ok(Response::new(pb::DeactivateResponse {}))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n => (n as usize).min(10_000),
        };
        let entries = self.engine.history(&r.scope, limit).await.map_err(status)?;
        Ok(Response::new(pb::HistoryResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::AuditEntry {
                    at_unix_ms: e.at_ms,
                    generation: e.generation,
                    revision: e.revision,
                    op: e.op,
                    scope: e.scope.unwrap_or_default(),
                    change_json: e.change.to_string(),
                    who: e.cause.who,
                    why: e.cause.why,
                })
                .collect(),
        }))
    }

    async fn shadow(
        &self,
        req: Request<pb::ShadowRequest>,
    ) -> Result<Response<pb::ShadowInfo>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let report = self
            .engine
            .shadow(&r.profile, r.fraction, &who)
            .map_err(status)?;
        Ok(Response::new(shadow_info(&report)))
    }

    async fn list_shadows(
        &self,
        _: Request<pb::ListShadowsRequest>,
    ) -> Result<Response<pb::ListShadowsResponse>, Status> {
        let shadows = self.engine.shadows();
        Ok(Response::new(pb::ListShadowsResponse {
            shadows: shadows.list().iter().map(shadow_info).collect(),
            queued: shadows.queued() as u32,
            capacity: shadow::QUEUE as u32,
        }))
    }

    async fn list_activations(
        &self,
        _: Request<pb::ListActivationsRequest>,
    ) -> Result<Response<pb::ListActivationsResponse>, Status> {
        let table = self.engine.registry().snapshot();
        Ok(Response::new(pb::ListActivationsResponse {
            activations: table
                .activations
                .all()
                .iter()
                .map(|a| activation_info(a, 0))
                .collect(),
            now_unix_ms: now_ms(),
        }))
    }
}

/// How the server is exposed; the engine holds everything about the model.
#[derive(Clone)]
pub struct ServeOptions {
    /// Bearer token every Admin call must carry. Without one, Admin answers
    /// loopback clients only.
    pub admin_token: Option<String>,
    /// Serve TLS (rustls) with this certificate and key.
    pub tls: Option<tonic::transport::Identity>,
    pub max_message_bytes: usize,
    /// After the shutdown signal: how long health says NOT_SERVING (and new
    /// requests are refused) before the listener closes, so load balancers
    /// move traffic away first. In-flight requests then drain.
    pub drain_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            admin_token: None,
            tls: None,
            max_message_bytes: MAX_MESSAGE_BYTES,
            drain_grace: Duration::ZERO,
        }
    }
}

/// Health name that follows the fleet's link to etcd.
pub const FLEET_HEALTH: &str = "rws.fleet";

/// Health names reported: the whole server ("") and each service.
const HEALTH_SERVICES: [&str; 4] = [
    "",
    "rws.v1.Inference",
    "rws.v1.Admin",
    "inference.GRPCInferenceService",
];

async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in HEALTH_SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// Admin access: a bearer token compared in constant time, or, with no token
/// configured, loopback peers only.
fn admin_guard(token: Option<String>) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| match &token {
        Some(token) => {
            let given = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match given {
                Some(g) if constant_time_eq::constant_time_eq(g.as_bytes(), token.as_bytes()) => {
                    Ok(req)
                }
                Some(_) => Err(Status::unauthenticated("wrong admin token")),
                None => Err(Status::unauthenticated(
                    "Admin calls need an `authorization: Bearer <token>` header",
                )),
            }
        }
        None if req.remote_addr().is_some_and(|a| a.ip().is_loopback()) => Ok(req),
        None => Err(Status::permission_denied(
            "Admin accepts loopback clients only; start the server with --admin-token-file to allow remote admin",
        )),
    }
}

/// Adds `authorization: Bearer <token>` to each call: the client's side of [`admin_guard`].
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type AdminClient = pb::admin_client::AdminClient<InterceptedService<Channel, Bearer>>;
pub type EventsClient = pb::events_client::EventsClient<InterceptedService<Channel, Bearer>>;

/// An Admin client that presents `token`, if any.
pub fn admin_client(channel: Channel, token: Option<&str>) -> crate::Result<AdminClient> {
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        bearer(token)?,
    ))
}

/// An Events client that presents `token`, as Events calls need it like Admin's.
pub fn events_client(channel: Channel, token: Option<&str>) -> crate::Result<EventsClient> {
    Ok(pb::events_client::EventsClient::with_interceptor(
        channel,
        bearer(token)?,
    ))
}

fn bearer(token: Option<&str>) -> crate::Result<Bearer> {
    let header = token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| Error::InvalidArgument("the admin token must be printable ASCII".into()))?;
    Ok(Bearer(header))
}

/// Serves rws.v1 (Inference, Admin), health and reflection on `listener`
/// until `shutdown` completes, then drains: health goes NOT_SERVING, new
/// requests are refused, and in-flight ones finish before this returns.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> crate::Result<()> {
    let max = opts.max_message_bytes;
    let inference = InferenceServer::new(InferenceService {
        engine: engine.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let admin = InterceptedService::new(
        AdminServer::new(AdminService {
            engine: engine.clone(),
        })
        .max_decoding_message_size(max.max(MAX_ADMIN_MESSAGE_BYTES))
        .max_encoding_message_size(max),
        admin_guard(opts.admin_token.clone()),
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
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, false).await;
    engine.expire_activations();
    let warm = {
        let (engine, reporter) = (engine.clone(), reporter.clone());
        tokio::spawn(async move {
            match engine.warm_up().await {
                Ok(()) => {
                    set_health(&reporter, true).await;
                    tracing::info!("warmed up; health is SERVING");
                }
                Err(e) => tracing::error!(error = %e, "warm-up failed; health stays NOT_SERVING"),
            }
        })
    };
    if let Some(fleet) = engine.fleet() {
        // "rws.fleet" follows etcd: NOT_SERVING while the replica serves its
        // last state without it ("" stays SERVING: inference is unaffected).
        let (mut link, reporter) = (fleet.link(), reporter.clone());
        tokio::spawn(async move {
            loop {
                let connected = link.borrow_and_update().connected;
                let status = if connected {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(FLEET_HEALTH, status).await;
                if link.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let drain = {
        let engine = engine.clone();
        async move {
            shutdown.await;
            warm.abort();
            engine.drain();
            set_health(&reporter, false).await;
            tracing::info!(grace = ?opts.drain_grace, "shutting down: NOT_SERVING, refusing new requests");
            tokio::time::sleep(opts.drain_grace).await;
            tracing::info!("closing the listener; in-flight requests drain");
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = opts.tls {
        use_ring_for_tls();
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| Error::InvalidArgument(format!("TLS configuration: {e}")))?;
    }
    builder
        .layer(tonic::service::InterceptorLayer::new(stamp_arrival))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(kserve::service(engine.clone(), max))
        .add_service(admin)
        .add_service(InterceptedService::new(
            pb::events_server::EventsServer::new(events::EventsService {
                engine: engine.clone(),
            }),
            admin_guard(opts.admin_token.clone()),
        ))
        // Socket options must be set on the incoming stream (the builder's are
        // ignored here). Without TCP_NODELAY, 1% of requests waited 40 ms for a
        // delayed ACK under load.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            drain,
        )
        .await
        .map_err(|e| Error::Internal(format!("server failed: {e}")))
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;
    use tonic::transport::server::TcpConnectInfo;

    use super::*;

    fn from(peer: &str, token: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(peer.parse().unwrap()),
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    }

    #[test]
    fn without_a_token_admin_is_loopback_only() {
        let mut guard = admin_guard(None);
        assert!(guard.call(from("127.0.0.1:5000", None)).is_ok());
        assert!(guard.call(from("[::1]:5000", None)).is_ok());
        let err = guard.call(from("10.1.2.3:5000", None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("--admin-token-file"));
    }

    #[test]
    fn with_a_token_any_peer_that_presents_it_is_admitted() {
        let mut guard = admin_guard(Some("tok".into()));
        assert!(guard.call(from("10.1.2.3:5000", Some("tok"))).is_ok());
        for bad in [None, Some("tok2"), Some("to"), Some("")] {
            let err = guard.call(from("127.0.0.1:5000", bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeouts_parse_and_absurd_ones_mean_none() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "5", "5x", "-1S", "1.5S", "18446744073709551616S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        // Overflows in the multiplication: no deadline, no panic.
        assert_eq!(parse_grpc_timeout("18446744073709551615H"), None);
        assert_eq!(parse_grpc_timeout("18446744073709551615M"), None);
        let mut req = Request::new(());
        let md = req.metadata_mut();
        md.insert("grpc-timeout", "18446744073709551615S".parse().unwrap());
        assert_eq!(
            grpc_deadline(&req),
            None,
            "a deadline past the clock's end is none"
        );
        req.metadata_mut()
            .insert("grpc-timeout", "3S".parse().unwrap());
        assert!(grpc_deadline(&req).is_some());
        // Counted from the call's arrival, not from when the handler reads it.
        let arrival = Instant::now() - Duration::from_secs(1);
        req.extensions_mut().insert(Arrival(arrival));
        assert_eq!(grpc_deadline(&req), Some(arrival + Duration::from_secs(3)));
    }
}
