//! Bad input gets the right status code and changes nothing: after each refusal
//! the same good request answers bit for bit as before, and the profile and
//! signature listings are unchanged.

mod common;

use std::collections::BTreeMap;

use common::*;
use rws::patch::quant::{Delta, Quant};
use rws::patch::signature::{Signature, TensorDelta};
use rws::serve::engine::EngineOptions;
use rws::server::pb;
use tonic::Code;
use tonic::transport::Channel;

struct Probe {
    inf: InferenceClient<Channel>,
    admin: AdminClient<Channel>,
    logits: Vec<Vec<u32>>,
    profiles: pb::ListProfilesResponse,
    signatures: pb::ListSignaturesResponse,
}

impl Probe {
    async fn new(server: &TestServer) -> Probe {
        let mut p = Probe {
            inf: server.inference(),
            admin: server.admin(),
            logits: vec![],
            profiles: Default::default(),
            signatures: Default::default(),
        };
        (p.logits, p.profiles, p.signatures) = p.observe().await;
        p
    }

    async fn observe(
        &mut self,
    ) -> (
        Vec<Vec<u32>>,
        pb::ListProfilesResponse,
        pb::ListSignaturesResponse,
    ) {
        let mut out = Vec::new();
        for profile in ["", "fog", "storm"] {
            out.push(logits(&mut self.inf, tensor_request(5, profile)).await);
        }
        let profiles = self
            .admin
            .list_profiles(pb::ListProfilesRequest {})
            .await
            .unwrap()
            .into_inner();
        let signatures = self
            .admin
            .list_signatures(pb::ListSignaturesRequest {})
            .await
            .unwrap()
            .into_inner();
        (out, profiles, signatures)
    }

    /// Asserts the refusal's code and that the server is exactly as before.
    async fn refused<T: std::fmt::Debug>(
        &mut self,
        what: &str,
        r: Result<tonic::Response<T>, tonic::Status>,
        code: Code,
    ) {
        let status = r.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(!status.message().is_empty(), "{what}: the message explains");
        let (logits, profiles, signatures) = self.observe().await;
        assert_eq!(logits, self.logits, "{what}: outputs changed");
        assert_eq!(profiles, self.profiles, "{what}: profiles changed");
        assert_eq!(signatures, self.signatures, "{what}: signatures changed");
    }
}

async fn setup() -> (tempfile::TempDir, TestServer) {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    server
        .admin()
        .put_profile(pb::PutProfileRequest {
            name: "storm".into(),
            signatures: refs(&[("rain", 0.7), ("fog", 0.5)]),
            replace: false,
            ..Default::default()
        })
        .await
        .unwrap();
    (repo, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_images_and_tensors() {
    let (_repo, server) = setup().await;
    let mut p = Probe::new(&server).await;
    let good = png(28, 28);

    let r = p
        .inf
        .classify(image_request(good[..good.len() / 2].to_vec(), ""))
        .await;
    p.refused("truncated png", r, Code::InvalidArgument).await;
    let r = p
        .inf
        .classify(image_request(b"definitely not an image".to_vec(), ""))
        .await;
    p.refused("garbage bytes", r, Code::InvalidArgument).await;
    let r = p
        .inf
        .classify(image_request(png_header_only(0, 0), ""))
        .await;
    p.refused("0x0 image", r, Code::InvalidArgument).await;
    let r = p
        .inf
        .classify(image_request(png_header_only(100_000, 100_000), ""))
        .await;
    p.refused("100000x100000 header", r, Code::InvalidArgument)
        .await;
    let r = p.inf.classify(image_request(Vec::new(), "")).await;
    p.refused("empty image", r, Code::InvalidArgument).await;

    let mut req = tensor_request(5, "");
    if let Some(pb::classify_request::Input::Tensor(t)) = &mut req.input {
        t.shape = vec![1, 1, 28, 27];
    }
    p.refused(
        "wrong shape",
        p.inf.clone().classify(req).await,
        Code::InvalidArgument,
    )
    .await;
    let mut req = tensor_request(5, "");
    if let Some(pb::classify_request::Input::Tensor(t)) = &mut req.input {
        t.data.pop();
    }
    p.refused(
        "short data",
        p.inf.clone().classify(req).await,
        Code::InvalidArgument,
    )
    .await;
    let mut req = tensor_request(5, "");
    if let Some(pb::classify_request::Input::Tensor(t)) = &mut req.input {
        t.data[100] = f32::NAN;
    }
    p.refused(
        "NaN input",
        p.inf.clone().classify(req).await,
        Code::InvalidArgument,
    )
    .await;
    let mut req = tensor_request(5, "");
    if let Some(pb::classify_request::Input::Tensor(t)) = &mut req.input {
        t.data.iter_mut().for_each(|v| *v = 3e38);
    }
    let r = p.inf.clone().classify(req).await;
    let msg = r
        .as_ref()
        .map_or_else(|s| s.message().to_string(), |_| String::new());
    assert!(msg.contains("non-finite logits"), "{msg}");
    p.refused("finite input that overflows", r, Code::InvalidArgument)
        .await;
    let mut req = tensor_request(5, "");
    req.input = None;
    p.refused(
        "no input",
        p.inf.clone().classify(req).await,
        Code::InvalidArgument,
    )
    .await;

    // A larger image is fine: it is resized.
    p.inf
        .classify(image_request(png(640, 480), ""))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_profiles() {
    let (_repo, server) = setup().await;
    let mut p = Probe::new(&server).await;
    let put = |name: &str, pairs: &[(&str, f32)], replace: bool| pb::PutProfileRequest {
        name: name.into(),
        signatures: refs(pairs),
        replace,
        ..Default::default()
    };

    let r = p.inf.classify(tensor_request(5, "nope")).await;
    p.refused("classify with unknown profile", r, Code::NotFound)
        .await;
    // A 100 KB name: refused as invalid before any lookup, with a short message (a
    // full echo would overflow gRPC's 16 KB metadata and turn into RESOURCE_EXHAUSTED).
    let long = "x".repeat(100_000);
    let r = p.inf.classify(tensor_request(5, &long)).await;
    let msg = r.as_ref().map_or_else(|s| s.message().len(), |_| 0);
    assert!((1..300).contains(&msg), "message of {msg} bytes");
    p.refused(
        "classify with a 100 KB profile name",
        r,
        Code::InvalidArgument,
    )
    .await;
    let r = p
        .admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: long.clone(),
            wait_fleet: false,
        })
        .await;
    p.refused("default with a 100 KB name", r, Code::InvalidArgument)
        .await;
    let r = p.admin.put_profile(put("ok", &[(&long, 1.0)], false)).await;
    let msg = r.as_ref().map_or_else(|s| s.message().len(), |_| 0);
    assert!((1..300).contains(&msg), "message of {msg} bytes");
    p.refused("a 100 KB signature name", r, Code::InvalidArgument)
        .await;

    // An absurd grpc-timeout is no deadline: answered, and no worker panics.
    let mut req = tonic::Request::new(tensor_request(5, ""));
    req.metadata_mut()
        .insert("grpc-timeout", "18446744073709551615S".parse().unwrap());
    p.inf.classify(req).await.unwrap();
    let mut req = tonic::Request::new(tensor_request(5, ""));
    req.metadata_mut()
        .insert("grpc-timeout", "18446744073709551615H".parse().unwrap());
    p.inf.classify(req).await.unwrap();
    let r = p
        .admin
        .put_profile(put("storm", &[("fog", 1.0)], false))
        .await;
    p.refused("duplicate profile name", r, Code::AlreadyExists)
        .await;
    let r = p
        .admin
        .put_profile(put("x", &[("fog", f32::NAN)], false))
        .await;
    p.refused("NaN alpha", r, Code::InvalidArgument).await;
    let r = p
        .admin
        .put_profile(put("x", &[("fog", f32::INFINITY)], false))
        .await;
    p.refused("infinite alpha", r, Code::InvalidArgument).await;
    let r = p
        .admin
        .put_profile(put("storm", &[("fog", f32::NEG_INFINITY)], true))
        .await;
    p.refused("infinite alpha on replace", r, Code::InvalidArgument)
        .await;
    let r = p.admin.put_profile(put("x", &[("hail", 1.0)], false)).await;
    p.refused("unknown signature", r, Code::NotFound).await;
    let r = p
        .admin
        .put_profile(put("x", &[("fog", 0.5), ("fog", 0.5)], false))
        .await;
    p.refused("signature twice", r, Code::InvalidArgument).await;
    let r = p
        .admin
        .put_profile(put("../etc", &[("fog", 0.5)], false))
        .await;
    p.refused("bad profile name", r, Code::InvalidArgument)
        .await;
    let r = p
        .admin
        .put_profile(put("clean", &[("fog", 0.5)], true))
        .await;
    p.refused("redefine clean", r, Code::InvalidArgument).await;
    // A huge alpha folds to non-finite weights: refused before publishing.
    let r = p.admin.put_profile(put("x", &[("fog", 1e38)], false)).await;
    p.refused("overflowing alpha", r, Code::InvalidArgument)
        .await;

    let r = p
        .admin
        .delete_profile(pb::DeleteProfileRequest {
            name: "nope".into(),
            ..Default::default()
        })
        .await;
    p.refused("delete unknown", r, Code::NotFound).await;
    let r = p
        .admin
        .delete_profile(pb::DeleteProfileRequest {
            name: "clean".into(),
            ..Default::default()
        })
        .await;
    p.refused("delete clean", r, Code::FailedPrecondition).await;
    let r = p
        .admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "nope".into(),
            ..Default::default()
        })
        .await;
    p.refused("default unknown", r, Code::NotFound).await;
    let r = p
        .admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: String::new(),
            ..Default::default()
        })
        .await;
    p.refused("default empty", r, Code::InvalidArgument).await;
    let r = p
        .admin
        .unload_signature(pb::UnloadSignatureRequest {
            name: "fog".into(),
            ..Default::default()
        })
        .await;
    p.refused("unload in use", r, Code::FailedPrecondition)
        .await;
    let r = p
        .admin
        .unload_signature(pb::UnloadSignatureRequest {
            name: "hail".into(),
            ..Default::default()
        })
        .await;
    p.refused("unload unknown", r, Code::NotFound).await;

    // Deleting the default is refused until another default is set.
    p.admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "storm".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = p
        .admin
        .delete_profile(pb::DeleteProfileRequest {
            name: "storm".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
    server.stop().await;
}

fn upload(name: &str, data: Vec<u8>) -> pb::LoadSignatureRequest {
    pb::LoadSignatureRequest {
        name: name.into(),
        source: Some(pb::load_signature_request::Source::Data(data)),
        allow_transfer: false,
        ..Default::default()
    }
}

fn path(rel: &str) -> pb::LoadSignatureRequest {
    pb::LoadSignatureRequest {
        name: "x".into(),
        source: Some(pb::load_signature_request::Source::Path(rel.into())),
        allow_transfer: false,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_signatures() {
    let (_repo, server) = setup().await;
    let mut p = Probe::new(&server).await;
    let good = Signature::load(&server.model_dir.join("signatures/fog.rws.safetensors")).unwrap();

    let mut other_arch = good.clone();
    other_arch.meta.arch = "resnet18".into();
    let r = p
        .admin
        .load_signature(upload("x", other_arch.to_bytes().unwrap()))
        .await;
    p.refused("other architecture", r, Code::InvalidArgument)
        .await;

    let mut deltas: BTreeMap<String, TensorDelta> = good.deltas().clone();
    deltas.insert(
        "conv1.weight".into(),
        TensorDelta {
            shape: vec![16, 1, 5, 5],
            delta: Delta::quantize(&[0.01; 400], 16, Quant::Int8),
        },
    );
    let wrong_shape = Signature::new(good.meta.clone(), deltas).unwrap();
    let r = p
        .admin
        .load_signature(upload("x", wrong_shape.to_bytes().unwrap()))
        .await;
    p.refused("shape mismatch", r, Code::InvalidArgument).await;

    let mut deltas: BTreeMap<String, TensorDelta> = good.deltas().clone();
    deltas.insert(
        "layer3.0.conv1.weight".into(),
        TensorDelta {
            shape: vec![64, 32, 3, 3],
            delta: Delta::F32(vec![0.0; 64 * 32 * 9]),
        },
    );
    let outside = Signature::new(good.meta.clone(), deltas).unwrap();
    let r = p
        .admin
        .load_signature(upload("x", outside.to_bytes().unwrap()))
        .await;
    p.refused("tensor outside the stem", r, Code::InvalidArgument)
        .await;

    // NaN inside: written with safetensors directly, since Signature refuses to hold it.
    let nan_bytes = {
        let vals: Vec<u8> = [0.0f32, f32::NAN]
            .iter()
            .cycle()
            .take(16)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16], &vals).unwrap();
        let md = [
            ("rws.format", "1"),
            ("rws.arch", "resnet-small"),
            ("rws.base_fingerprint", good.meta.base_fingerprint.as_str()),
            ("rws.default_alpha", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        safetensors::serialize([("bn1.bias", view)], Some(md)).unwrap()
    };
    let r = p.admin.load_signature(upload("x", nan_bytes)).await;
    p.refused("NaN inside", r, Code::InvalidArgument).await;

    let mut corrupt = good.to_bytes().unwrap();
    corrupt[8..24].copy_from_slice(b"{\"garbage\": [1,2");
    let r = p.admin.load_signature(upload("x", corrupt)).await;
    p.refused("corrupted header", r, Code::InvalidArgument)
        .await;
    let mut huge_header = good.to_bytes().unwrap();
    huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let r = p.admin.load_signature(upload("x", huge_header)).await;
    p.refused("header length overflow", r, Code::InvalidArgument)
        .await;
    let r = p.admin.load_signature(upload("x", b"abc".to_vec())).await;
    p.refused("three bytes", r, Code::InvalidArgument).await;

    let mut transfer = good.clone();
    transfer.meta.base_fingerprint = "sha256:0000".into();
    let r = p
        .admin
        .load_signature(upload("moved", transfer.to_bytes().unwrap()))
        .await;
    p.refused("fingerprint mismatch", r, Code::FailedPrecondition)
        .await;

    let r = p
        .admin
        .load_signature(upload("fog", good.to_bytes().unwrap()))
        .await;
    p.refused("duplicate signature name", r, Code::AlreadyExists)
        .await;
    let r = p
        .admin
        .load_signature(upload("", good.to_bytes().unwrap()))
        .await;
    p.refused("upload without a name", r, Code::InvalidArgument)
        .await;
    let r = p.admin.load_signature(path("../../etc/passwd")).await;
    p.refused("path traversal", r, Code::InvalidArgument).await;
    let r = p.admin.load_signature(path("/etc/passwd")).await;
    p.refused("absolute path", r, Code::InvalidArgument).await;
    let r = p
        .admin
        .load_signature(path("signatures/missing.rws.safetensors"))
        .await;
    p.refused("missing file", r, Code::NotFound).await;
    std::os::unix::fs::symlink(
        "/etc/passwd",
        server.model_dir.join("signatures/link.rws.safetensors"),
    )
    .unwrap();
    let r = p
        .admin
        .load_signature(path("signatures/link.rws.safetensors"))
        .await;
    p.refused("symlink out of the repository", r, Code::InvalidArgument)
        .await;
    let r = p.admin.load_signature(path("model.toml")).await;
    p.refused("not a signature", r, Code::InvalidArgument).await;

    // Over the 256 MiB signature limit (and the 64 MiB message limit): the
    // size check answers, with the documented RESOURCE_EXHAUSTED.
    let limit = rws::serve::state::MAX_SIGNATURE_BYTES;
    let r = server
        .admin()
        .max_encoding_message_size(usize::MAX)
        .load_signature(upload("x", vec![0; limit + 1]))
        .await;
    if let Err(e) = &r {
        assert!(e.message().contains("limited to"), "{e:?}");
    }
    p.refused("upload over the size limit", r, Code::ResourceExhausted)
        .await;

    // The transfer flag accepts the moved signature and marks it.
    let mut req = upload("moved", transfer.to_bytes().unwrap());
    req.allow_transfer = true;
    let info = p
        .admin
        .load_signature(req)
        .await
        .unwrap()
        .into_inner()
        .signature
        .unwrap();
    assert!(info.transferred);
    server.stop().await;
}
