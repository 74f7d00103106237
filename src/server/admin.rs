//! rws.v1 Admin on the wire: each call to an engine change, with the identity
//! [`auth`](super::auth) verified as its author in the audit trail.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::who;
use super::pb::admin_server::Admin;
use super::{pb, status};
use crate::serve::activation::{Activation, End, now_ms};
use crate::serve::change::Change;
use crate::serve::engine::{Engine, SignatureSource};
use crate::serve::journal::Cause;
use crate::serve::profile::{self, LoadedSignature, Profile};
use crate::serve::shadow;

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
    pub(super) engine: Arc<Engine>,
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

pub(super) fn signature_refs(refs: &[profile::SignatureRef]) -> Vec<pb::SignatureRef> {
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
