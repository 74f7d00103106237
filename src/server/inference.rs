//! rws.v1 Inference on the wire: a request's input, profile, source, deadline
//! and peer to the engine, and its answer back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::deadline::grpc_deadline;
use super::pb::inference_server::Inference;
use super::{pb, status};
use crate::serve::engine::{Ask, Engine};
use crate::serve::preprocess::Input;
use crate::serve::profile::Choice;

#[derive(Clone)]
pub struct InferenceService {
    pub(super) engine: Arc<Engine>,
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn classify(
        &self,
        req: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = grpc_deadline(&req);
        let peer = req.remote_addr().map(|a| a.ip());
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
            peer,
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
            signatures: super::admin::signature_refs(&c.signatures),
            detection: c.auto.map(|a| pb::Detection {
                kind: a.kind,
                confidence: a.confidence,
                severity: u32::from(a.severity),
                familiar: a.familiar,
            }),
        }))
    }
}

/// The gRPC metadata key a client may name its source in.
pub const SOURCE_HEADER: &str = "x-rws-source";

/// A [`Choice`] on the wire.
pub(super) fn selection(chosen: Choice) -> (pb::Selection, String) {
    match chosen {
        Choice::Explicit => (pb::Selection::Explicit, String::new()),
        Choice::Activation(id) => (pb::Selection::Activation, id),
        Choice::Default => (pb::Selection::Default, String::new()),
    }
}
