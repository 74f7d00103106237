//! The gRPC layer: the only module that knows the wire protocol. Each handler
//! translates a request, runs the engine off the async reactor, and maps errors
//! to status codes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::engine::Engine;
use crate::preprocess::Input;
use crate::profile::{self, Change, LoadedSignature, Profile};

pub mod pb {
    tonic::include_proto!("rws.v1");
}

use pb::admin_server::{Admin, AdminServer};
use pb::inference_server::{Inference, InferenceServer};

/// Largest request accepted: uploads of big signatures go through Admin.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::NotFound(_) => Status::not_found(msg),
        Error::AlreadyExists(_) => Status::already_exists(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
        Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
        Error::Io { .. } | Error::Candle(_) | Error::Internal(_) => {
            tracing::error!(error = %msg, "internal error");
            Status::internal(msg)
        }
    }
}

/// Runs blocking engine work on tokio's blocking pool, keeping reactor threads free.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(status)
}

/// The instant a client's `grpc-timeout` header runs out (e.g. `250m`, `5S`).
fn grpc_deadline(md: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(Instant::now() + d)
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
        let deadline = grpc_deadline(req.metadata());
        let r = req.into_inner();
        let input = match r.input {
            Some(pb::classify_request::Input::Image(bytes)) => Input::Image(bytes),
            Some(pb::classify_request::Input::Tensor(t)) => Input::Tensor {
                shape: t.shape.into_iter().map(|d| d as usize).collect(),
                data: t.data,
            },
            None => return Err(Status::invalid_argument("set either image or tensor")),
        };
        let c = self
            .engine
            .classify(
                input,
                r.profile,
                r.top_k as usize,
                r.return_logits,
                deadline,
            )
            .await
            .map_err(status)?;
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
        }))
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

fn profile_info(p: &Profile, default: &str) -> pb::ProfileInfo {
    pb::ProfileInfo {
        name: p.name.clone(),
        signatures: p
            .signatures
            .iter()
            .map(|s| pb::SignatureRef {
                name: s.name.clone(),
                alpha: s.alpha,
            })
            .collect(),
        generation: p.generation,
        resident: p.is_resident(),
        is_default: p.name == default,
    }
}

impl AdminService {
    fn change(&self, c: Change) -> pb::ProfileChange {
        let default = self.engine.registry().snapshot().default_profile.clone();
        pb::ProfileChange {
            profile: Some(profile_info(&c.profile, &default)),
            generation: c.generation,
            apply_micros: c.apply.as_secs_f64() * 1e6,
        }
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
        let r = req.into_inner();
        let engine = self.engine.clone();
        let loaded = blocking(move || match r.source {
            Some(pb::load_signature_request::Source::Path(p)) => {
                engine.load_signature_path(Some(&r.name), &p, r.allow_transfer)
            }
            Some(pb::load_signature_request::Source::Data(bytes)) => {
                engine.load_signature_bytes(&r.name, &bytes, r.allow_transfer)
            }
            None => Err(Error::InvalidArgument("set either path or data".into())),
        })
        .await?;
        tracing::info!(signature = %loaded.name, transferred = loaded.transferred, "signature loaded");
        Ok(Response::new(pb::LoadSignatureResponse {
            signature: Some(signature_info(&loaded)),
        }))
    }

    async fn unload_signature(
        &self,
        req: Request<pb::UnloadSignatureRequest>,
    ) -> Result<Response<pb::UnloadSignatureResponse>, Status> {
        let name = req.into_inner().name;
        let engine = self.engine.clone();
        blocking(move || engine.registry().unload_signature(&name)).await?;
        Ok(Response::new(pb::UnloadSignatureResponse {}))
    }

    async fn put_profile(
        &self,
        req: Request<pb::PutProfileRequest>,
    ) -> Result<Response<pb::ProfileChange>, Status> {
        let r = req.into_inner();
        let sigs = r
            .signatures
            .into_iter()
            .map(|s| profile::SignatureRef {
                name: s.name,
                alpha: s.alpha,
            })
            .collect();
        let engine = self.engine.clone();
        let c = blocking(move || engine.registry().put_profile(&r.name, sigs, r.replace)).await?;
        tracing::info!(profile = %c.profile.name, generation = c.generation, apply_us = c.apply.as_micros() as u64, "profile put");
        Ok(Response::new(self.change(c)))
    }

    async fn delete_profile(
        &self,
        req: Request<pb::DeleteProfileRequest>,
    ) -> Result<Response<pb::ProfileChange>, Status> {
        let name = req.into_inner().name;
        let engine = self.engine.clone();
        let c = blocking(move || engine.registry().delete_profile(&name)).await?;
        tracing::info!(profile = %c.profile.name, generation = c.generation, "profile deleted");
        Ok(Response::new(self.change(c)))
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
        let name = req.into_inner().name;
        let engine = self.engine.clone();
        let c = blocking(move || engine.registry().set_default(&name)).await?;
        tracing::info!(profile = %c.profile.name, generation = c.generation, "default profile set");
        Ok(Response::new(self.change(c)))
    }
}

/// Serves Inference and Admin on `listener` until `shutdown` completes.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> crate::Result<()> {
    let inference = InferenceServer::new(InferenceService {
        engine: engine.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let admin =
        AdminServer::new(AdminService { engine }).max_decoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(inference)
        .add_service(admin)
        // Socket options must be set on the incoming stream (the builder's are
        // ignored here). Without TCP_NODELAY, 1% of requests waited 40 ms for a
        // delayed ACK under load.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            shutdown,
        )
        .await
        .map_err(|e| Error::Internal(format!("server failed: {e}")))
}
