//! The Open Inference Protocol (KServe v2) over gRPC, as Triton speaks it, so
//! clients written for KServe or Triton (Python's `tritonclient[grpc]`, ...)
//! classify with rws unchanged. Like rws.v1, each handler only translates to
//! and from [`Engine`] calls.
//!
//! One model, named after its directory, version "1". Input "input": FP32
//! `[N, C, H, W]` (the normalized model input) or BYTES `[N]` (encoded PNG or
//! JPEG images). Outputs "logits" FP32 `[N, classes]` and "class" INT64 `[N]`.
//! The request parameter "profile" (a string) picks the robustness profile, and
//! "source" (a string, e.g. "site-a/cam-12") lets activations covering it choose
//! when no profile is named. The response parameters "profile" and "generation"
//! say which definition computed it, "selection" why ("explicit", "activation" or
//! "default") and "activation_id" which activation, if one chose it. Outputs
//! "signatures" BYTES `[N]` name what served each image (`fog@0.75`, `clean`): the
//! profile's signatures, or with the `auto` profile those it chose per image, and
//! "detector_confidence" FP32 `[N]` the detector's confidence in its reading of
//! the image (NaN where no detector ran, for every profile but `auto`).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use tonic::{Request, Response, Status};

use super::deadline::grpc_deadline;
use super::status;
use crate::model::repo::ModelConfig;
use crate::serve::auto;
use crate::serve::batch::Classification;
use crate::serve::engine::Ask;
use crate::serve::engine::Engine;
use crate::serve::preprocess::Input;
use crate::serve::profile::Choice;

pub mod pb {
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use pb::infer_parameter::ParameterChoice;
use pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use pb::model_infer_response::InferOutputTensor;
use pb::model_metadata_response::TensorMetadata;

/// The only version of the served model.
const VERSION: &str = "1";
const INPUT: &str = "input";
const LOGITS: &str = "logits";
const CLASS: &str = "class";
const SIGNATURES: &str = "signatures";
const CONFIDENCE: &str = "detector_confidence";
/// Images per request: each is queued as one engine request at once, so a
/// batch far beyond the queue's capacity could only fail.
const MAX_IMAGES: usize = 64;
/// Every output, in the order returned when a request names none.
const OUTPUTS: [&str; 4] = [LOGITS, CLASS, SIGNATURES, CONFIDENCE];

/// The KServe v2 service over `engine`, accepting requests up to `max_message_bytes`.
pub fn service(
    engine: Arc<Engine>,
    max_message_bytes: usize,
) -> GrpcInferenceServiceServer<KServeService> {
    GrpcInferenceServiceServer::new(KServeService { engine })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

pub struct KServeService {
    engine: Arc<Engine>,
}

impl KServeService {
    /// NOT_FOUND unless `name` and `version` ("" or "1") are the served model's.
    fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        let served = &self.engine.model_dir().name;
        if name != served {
            return Err(Status::not_found(format!(
                "model '{name}' is not served here; this server serves '{served}'"
            )));
        }
        if !version.is_empty() && version != VERSION {
            return Err(Status::not_found(format!(
                "model '{served}' has no version '{version}'; ask for \"{VERSION}\" or leave the version empty"
            )));
        }
        Ok(())
    }
}

fn invalid(msg: String) -> Status {
    Status::invalid_argument(msg)
}

/// Dimensions as sizes: negative ones (wildcards in metadata) are refused.
fn dims(shape: &[i64]) -> Result<Vec<usize>, Status> {
    shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid(format!("input shape {shape:?} has a negative dimension")))
}

/// Where a tensor's data travels: `raw_input_contents` or the typed `contents`.
enum Data {
    Raw(Vec<u8>),
    Typed(pb::InferTensorContents),
}

/// The request's one input as one engine input per image. Public for the
/// fuzz target (`fuzz/fuzz_targets/kserve_input.rs`).
pub fn images(
    inputs: Vec<InferInputTensor>,
    mut raw: Vec<Vec<u8>>,
    cfg: &ModelConfig,
) -> Result<Vec<Input>, Status> {
    let count = inputs.len();
    let [t]: [InferInputTensor; 1] = inputs.try_into().map_err(|_| {
        invalid(format!(
            "send exactly one input, '{INPUT}'; the request has {count}"
        ))
    })?;
    if t.name != INPUT {
        return Err(invalid(format!(
            "input '{}' is unknown; the model's input is '{INPUT}'",
            t.name
        )));
    }
    if let Some(key) = t.parameters.keys().next() {
        return Err(invalid(format!(
            "input parameter '{key}' is not supported (no shared memory): send the data in the request"
        )));
    }
    if raw.len() > 1 {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for 1 input",
            raw.len()
        )));
    }
    let data = match (raw.pop(), t.contents) {
        (Some(bytes), None) => Data::Raw(bytes),
        (None, Some(c)) => Data::Typed(c),
        (None, None) => {
            return Err(invalid(
                "input has no data: set raw_input_contents or the input's contents".into(),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "input has both raw_input_contents and contents; send one".into(),
            ));
        }
    };
    let shape = dims(&t.shape)?;
    match t.datatype.as_str() {
        "FP32" => tensors(&shape, data, cfg),
        "BYTES" => encoded(&shape, data),
        other => Err(invalid(format!(
            "input datatype '{other}' is not supported: send FP32 [N, C, H, W] (the normalized model input) or BYTES [N] (encoded PNG or JPEG images)"
        ))),
    }
}

/// N of `[N, ...]`: at least one image, and few enough to queue at once.
fn check_batch(n: usize) -> Result<(), Status> {
    if n == 0 {
        return Err(invalid("the batch is empty: N must be at least 1".into()));
    }
    if n > MAX_IMAGES {
        return Err(invalid(format!(
            "the batch has {n} images; send at most {MAX_IMAGES} per request"
        )));
    }
    Ok(())
}

/// FP32 `[N, C, H, W]`: N model inputs, checked by the engine like rws.v1 tensors.
fn tensors(shape: &[usize], data: Data, cfg: &ModelConfig) -> Result<Vec<Input>, Status> {
    let [h, w] = cfg.input_size;
    let image = [cfg.channels, h, w];
    let n = match *shape {
        [n, c, hh, ww] if [c, hh, ww] == image => n,
        _ => {
            return Err(invalid(format!(
                "FP32 input shape {shape:?} does not match the model input [N, {}, {h}, {w}]",
                cfg.channels
            )));
        }
    };
    check_batch(n)?;
    let per = image.iter().product::<usize>();
    let want = n * per;
    let values: Vec<f32> = match data {
        Data::Raw(bytes) => {
            if bytes.len() % 4 != 0 || bytes.len() / 4 != want {
                return Err(invalid(format!(
                    "FP32 input of shape {shape:?} needs {want} values (4 bytes each); raw_input_contents has {} bytes",
                    bytes.len()
                )));
            }
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        Data::Typed(c) => {
            if c.fp32_contents.len() != want {
                return Err(invalid(format!(
                    "FP32 input of shape {shape:?} needs {want} values; contents.fp32_contents has {}",
                    c.fp32_contents.len()
                )));
            }
            c.fp32_contents
        }
    };
    Ok(values
        .chunks_exact(per)
        .map(|d| Input::Tensor {
            shape: image.to_vec(),
            data: d.to_vec(),
        })
        .collect())
}

/// BYTES `[N]` or `[N, 1]`: N encoded images, decoded by the engine.
fn encoded(shape: &[usize], data: Data) -> Result<Vec<Input>, Status> {
    let n = match *shape {
        [n] | [n, 1] => n,
        _ => {
            return Err(invalid(format!(
                "BYTES input shape {shape:?} must be [N] or [N, 1]: N encoded PNG or JPEG images"
            )));
        }
    };
    check_batch(n)?;
    let elements = match data {
        Data::Raw(bytes) => split_bytes(&bytes)?,
        Data::Typed(c) => c.bytes_contents,
    };
    if elements.len() != n {
        return Err(invalid(format!(
            "BYTES input of shape {shape:?} needs {n} elements; the data holds {}",
            elements.len()
        )));
    }
    Ok(elements.into_iter().map(Input::Image).collect())
}

/// Triton's raw BYTES encoding: each element a 4-byte little-endian length,
/// then that many bytes.
fn split_bytes(mut rest: &[u8]) -> Result<Vec<Vec<u8>>, Status> {
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(invalid(format!(
                "BYTES element {} claims {len} bytes but {} remain; each element is a 4-byte little-endian length, then the bytes",
                out.len(),
                tail.len()
            )));
        }
        let (element, tail) = tail.split_at(len);
        out.push(element.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(invalid(format!(
            "BYTES raw_input_contents ends with {} stray bytes after element {}; each element is a 4-byte little-endian length, then the bytes",
            rest.len(),
            out.len()
        )));
    }
    Ok(out)
}

/// The outputs to return, in the order asked; every output when none is named.
fn requested(outputs: Vec<InferRequestedOutputTensor>) -> Result<Vec<&'static str>, Status> {
    if outputs.is_empty() {
        return Ok(OUTPUTS.to_vec());
    }
    let mut names = Vec::new();
    for o in outputs {
        let Some(&name) = OUTPUTS.iter().find(|&&n| n == o.name) else {
            return Err(invalid(format!(
                "output '{}' is unknown; the model's outputs are '{LOGITS}', '{CLASS}', '{SIGNATURES}' and '{CONFIDENCE}'",
                o.name
            )));
        };
        if let Some(key) = o.parameters.keys().next() {
            return Err(invalid(format!(
                "output parameter '{key}' on '{name}' is not supported; name the output alone"
            )));
        }
        if names.contains(&name) {
            return Err(invalid(format!("output '{name}' is requested twice")));
        }
        names.push(name);
    }
    Ok(names)
}

/// The string a request gives in `parameters[name]`; empty when absent (an
/// empty profile, as in rws.v1, means none is named).
fn string_param(
    params: &HashMap<String, pb::InferParameter>,
    name: &str,
) -> Result<String, Status> {
    match params.get(name).map(|p| &p.parameter_choice) {
        None => Ok(String::new()),
        Some(Some(ParameterChoice::StringParam(s))) => Ok(s.clone()),
        Some(_) => Err(invalid(format!(
            "parameter '{name}' must be a string (string_param)"
        ))),
    }
}

/// One output tensor and its little-endian bytes.
fn output(name: &str, results: &[Classification]) -> (InferOutputTensor, Vec<u8>) {
    let n = results.len() as i64;
    let (datatype, shape, bytes): (_, _, Vec<u8>) = if name == LOGITS {
        let classes = results.first().map_or(0, |c| c.logits.len()) as i64;
        let bytes = results
            .iter()
            .flat_map(|c| &c.logits)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        ("FP32", vec![n, classes], bytes)
    } else if name == SIGNATURES {
        let bytes = results
            .iter()
            .flat_map(|c| {
                let s = auto::describe(&c.signatures);
                [(s.len() as u32).to_le_bytes().to_vec(), s.into_bytes()].concat()
            })
            .collect();
        ("BYTES", vec![n], bytes)
    } else if name == CONFIDENCE {
        let bytes = results
            .iter()
            .flat_map(|c| {
                c.auto
                    .as_ref()
                    .map_or(f32::NAN, |a| a.confidence)
                    .to_le_bytes()
            })
            .collect();
        ("FP32", vec![n], bytes)
    } else {
        // top_k is asked as 1: its first entry is the argmax.
        let bytes = results
            .iter()
            .flat_map(|c| (c.top_k[0].index as i64).to_le_bytes())
            .collect();
        ("INT64", vec![n], bytes)
    };
    let tensor = InferOutputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        parameters: HashMap::new(),
        contents: None,
    };
    (tensor, bytes)
}

#[tonic::async_trait]
impl GrpcInferenceService for KServeService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.engine.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        self.check_model(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelReadyResponse {
            ready: self.engine.is_ready(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "rws".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        self.check_model(&r.name, &r.version)?;
        let cfg = &self.engine.model().config;
        let [h, w] = cfg.input_size;
        let meta = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape,
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: r.name,
            versions: vec![VERSION.into()],
            platform: "rws".into(),
            inputs: vec![meta(
                INPUT,
                "FP32",
                vec![-1, cfg.channels as i64, h as i64, w as i64],
            )],
            outputs: vec![
                meta(LOGITS, "FP32", vec![-1, cfg.labels.len() as i64]),
                meta(CLASS, "INT64", vec![-1]),
                meta(SIGNATURES, "BYTES", vec![-1]),
                meta(CONFIDENCE, "FP32", vec![-1]),
            ],
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = grpc_deadline(&req);
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        self.check_model(&r.model_name, &r.model_version)?;
        let outputs = requested(r.outputs)?;
        let inputs = images(r.inputs, r.raw_input_contents, &self.engine.model().config)?;
        // Resolved once, so every image of the request uses the same profile even
        // if the default or an activation changes meanwhile.
        let named = string_param(&r.parameters, "profile")?;
        let source = string_param(&r.parameters, "source")?;
        let (profile, chosen) = self.engine.resolve(&named, &source).map_err(status)?;
        // One engine request per image, all queued at once so the batcher groups
        // them; dropping the set (an error, a cancelled call) aborts the rest.
        let mut pending = JoinSet::new();
        for (i, input) in inputs.into_iter().enumerate() {
            let ask = Ask {
                profile: profile.clone(),
                top_k: 1,
                with_logits: true,
                deadline,
                peer,
                ..Ask::default()
            };
            let engine = self.engine.clone();
            pending.spawn(async move { (i, engine.classify(input, ask).await) });
        }
        let mut results: Vec<Option<Classification>> = vec![None; pending.len()];
        while let Some(done) = pending.join_next().await {
            let (i, c) = done.map_err(|e| Status::internal(format!("request task failed: {e}")))?;
            results[i] = Some(c.map_err(status)?);
        }
        let results: Vec<Classification> = results.into_iter().flatten().collect();
        let generation = results[0].generation;
        if results.iter().any(|c| c.generation != generation) {
            return Err(Status::aborted(format!(
                "profile '{profile}' was redefined while this request's images were computed; retry"
            )));
        }
        let (outputs, raw_output_contents) = outputs.iter().map(|n| output(n, &results)).unzip();
        let param = |p| pb::InferParameter {
            parameter_choice: Some(p),
        };
        let (selection, activation) = match chosen {
            Choice::Explicit => ("explicit", None),
            Choice::Activation(id) => ("activation", Some(id)),
            Choice::Default => ("default", None),
        };
        let text = |s: String| param(ParameterChoice::StringParam(s));
        let mut parameters = HashMap::from([
            ("profile".to_string(), text(profile)),
            (
                "generation".to_string(),
                param(ParameterChoice::Int64Param(generation as i64)),
            ),
            ("selection".to_string(), text(selection.into())),
        ]);
        if let Some(id) = activation {
            parameters.insert("activation_id".into(), text(id));
        }
        Ok(Response::new(pb::ModelInferResponse {
            model_name: r.model_name,
            model_version: VERSION.into(),
            id: r.id,
            parameters,
            outputs,
            raw_output_contents,
        }))
    }
}
