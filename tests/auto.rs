//! The `auto` profile over loopback gRPC: the detector shipped with the model
//! chooses each image's signatures, answers equal bitwise those of the explicit
//! profile it reports, a detector made for other weights is refused, and `auto`
//! can be the default or an activation's profile only where a detector exists.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{MODEL, TestServer, bits, refs};
use rws::lab::corrupt::Corruption;
use rws::lab::data::Digits;
use rws::lab::detector::{DetectorOptions, Sample};
use rws::model::Model;
use rws::model::repo::ModelDir;
use rws::patch::signature::Signature;
use rws::serve::engine::{Engine, EngineOptions};
use rws::server::kserve::pb as kserve;
use rws::server::kserve::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use rws::server::kserve::pb::infer_parameter::ParameterChoice;
use rws::server::kserve::pb::model_infer_request::InferInputTensor;
use rws::server::pb;

const KINDS: [Corruption; 2] = [Corruption::Fog, Corruption::GaussianNoise];

/// The shipped MNIST model under the test name, with its signatures.
fn repo_with_mnist() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path().join(MODEL);
    std::fs::create_dir_all(dir.join("signatures")).unwrap();
    let shipped = Path::new("models/mnist-resnet");
    for f in ["model.toml", "base.safetensors"] {
        std::fs::copy(shipped.join(f), dir.join(f)).unwrap();
    }
    for k in KINDS {
        let f = format!("signatures/{k}.rws.safetensors");
        std::fs::copy(shipped.join(&f), dir.join(&f)).unwrap();
    }
    repo
}

fn model(repo: &Path) -> Model {
    let dir = ModelDir::open(repo, Some(MODEL)).unwrap();
    Model::load(
        dir.config.clone(),
        &dir.base_path(),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// A reduced detector trained on a few committed test digits, saved next to
/// the model; and, from other digits, a stream of clean and corrupted inputs.
fn train_detector(repo: &Path) -> Vec<Sample> {
    let model = model(repo);
    let dir = repo.join(MODEL);
    let signatures: Vec<Arc<Signature>> = KINDS
        .iter()
        .map(|k| {
            let path = dir.join(format!("signatures/{k}.rws.safetensors"));
            Arc::new(Signature::load(&path).unwrap())
        })
        .collect();
    let digits = Digits::load(Path::new("data/mnist/test.safetensors")).unwrap();
    let opts = DetectorOptions {
        kinds: KINDS.to_vec(),
        copies: 3,
        steps: 300,
        seed: 5,
        ..Default::default()
    };
    let (detector, _) =
        rws::lab::detector::run(&digits.take_per_class(15), &model, &signatures, &opts).unwrap();
    detector.save(&dir.join("detector.safetensors")).unwrap();
    let stream = DetectorOptions {
        copies: 2,
        seed: 99,
        ..opts
    };
    // Digits beyond those trained on: the last of each class's first 40.
    let all = rws::lab::detector::samples(&digits.take_per_class(40), &model.config, &stream);
    all.into_iter().rev().take(24).collect()
}

fn tensor(s: &Sample) -> pb::Tensor {
    pb::Tensor {
        shape: vec![1, 28, 28],
        data: s.input.clone(),
    }
}

fn request(s: &Sample, profile: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        input: Some(pb::classify_request::Input::Tensor(tensor(s))),
        profile: profile.into(),
        return_logits: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_answers_equal_the_explicit_profile_it_reports_using() {
    let repo = repo_with_mnist();
    let stream = train_detector(repo.path());
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut admin = server.admin();
    let listed = admin
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.profiles.iter().any(|p| p.name == "auto"));

    // All at once, so that batches mix images with different stems.
    let mut pending = tokio::task::JoinSet::new();
    for (i, s) in stream.iter().enumerate() {
        let mut client = server.inference();
        let req = request(s, "auto");
        pending.spawn(async move { (i, client.classify(req).await.unwrap().into_inner()) });
    }
    let mut answers: Vec<Option<pb::ClassifyResponse>> = vec![None; stream.len()];
    while let Some(done) = pending.join_next().await {
        let (i, r) = done.unwrap();
        answers[i] = Some(r);
    }
    let (mut patched, mut clean) = (0, 0);
    let mut client = server.inference();
    for (s, r) in stream.iter().zip(answers) {
        let r = r.unwrap();
        assert_eq!(r.profile, "auto");
        let d = r.detection.as_ref().expect("auto reports its detection");
        assert!((0.0..=1.0).contains(&d.confidence) && (1..=5).contains(&d.severity));
        // The explicit profile with the very signatures and alphas reported.
        let profile = match r.signatures.as_slice() {
            [] => {
                clean += 1;
                "clean".to_string()
            }
            [one] => {
                patched += 1;
                assert_eq!(d.kind, one.name, "auto patches the kind it saw");
                let name = format!("x-{}-{}", one.name, one.alpha);
                let put = pb::PutProfileRequest {
                    name: name.clone(),
                    signatures: refs(&[(&one.name, one.alpha)]),
                    replace: true,
                    ..Default::default()
                };
                admin.put_profile(put).await.unwrap();
                name
            }
            more => panic!("one kind at a time, got {more:?}"),
        };
        let explicit = client
            .classify(request(s, &profile))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(explicit.signatures, r.signatures);
        assert_eq!(
            bits(&r.logits),
            bits(&explicit.logits),
            "kind {} severity {}: auto served as {profile:?}",
            s.kind,
            s.severity
        );
    }
    assert!(
        patched > 0 && clean > 0,
        "a mixed stream gets both ({patched} patched, {clean} clean)"
    );

    // KServe: one request of several images, each with its own choice.
    let n = 8;
    let raw: Vec<u8> = stream[..n]
        .iter()
        .flat_map(|s| s.input.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    let req = kserve::ModelInferRequest {
        model_name: MODEL.into(),
        parameters: [(
            "profile".to_string(),
            kserve::InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("auto".into())),
            },
        )]
        .into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![n as i64, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    };
    let r = GrpcInferenceServiceClient::new(server.channel.clone())
        .model_infer(req)
        .await
        .unwrap()
        .into_inner();
    let out = |name: &str| {
        let i = r.outputs.iter().position(|o| o.name == name).unwrap();
        r.raw_output_contents[i].clone()
    };
    let mut names = Vec::new();
    let mut rest = out("signatures");
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        names.push(String::from_utf8(tail[..len].to_vec()).unwrap());
        rest = tail[len..].to_vec();
    }
    let confidence: Vec<f32> = out("detector_confidence")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (i, s) in stream[..n].iter().enumerate() {
        let one = client
            .classify(request(s, "auto"))
            .await
            .unwrap()
            .into_inner();
        let want = match one.signatures.as_slice() {
            [] => "clean".to_string(),
            [r] => format!("{}@{}", r.name, r.alpha),
            more => panic!("{more:?}"),
        };
        assert_eq!(names[i], want, "image {i}");
        assert_eq!(confidence[i], one.detection.unwrap().confidence);
    }
    server.stop().await;
}

#[tokio::test]
async fn auto_as_default_and_activation_needs_a_detector() {
    let repo = repo_with_mnist();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut admin = server.admin();
    // No detector: no `auto`, and nothing may name it.
    let e = admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "auto".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("rws train-detector"), "{e:?}");
    let activate = |ttl_seconds| pb::ActivateRequest {
        scope: "site-a/".into(),
        profile: "auto".into(),
        ttl_seconds,
        ..Default::default()
    };
    let e = admin.activate(activate(60.0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = server
        .inference()
        .classify(pb::ClassifyRequest {
            input: Some(pb::classify_request::Input::Tensor(common::input(1))),
            profile: "auto".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // Nor may anyone define a profile of that name.
    let e = admin
        .put_profile(pb::PutProfileRequest {
            name: "auto".into(),
            signatures: refs(&[("fog", 1.0)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    server.stop().await;

    // With a detector, `auto` can be the default: a request naming nothing gets it.
    let stream = train_detector(repo.path());
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut admin = server.admin();
    admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "auto".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = server
        .inference()
        .classify(request(&stream[0], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.profile, "auto");
    assert_eq!(r.selection(), pb::Selection::Default);
    assert!(r.detection.is_some());
    // And an activation's: a camera of site-a gets it while the default is clean.
    admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "clean".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin.activate(activate(60.0)).await.unwrap();
    let mut req = request(&stream[0], "");
    req.source = "site-a/cam-1".into();
    let r = server.inference().classify(req).await.unwrap().into_inner();
    assert_eq!(
        (r.profile.as_str(), r.selection()),
        ("auto", pb::Selection::Activation)
    );
    let e = admin
        .delete_profile(pb::DeleteProfileRequest {
            name: "auto".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    server.stop().await;
}

#[test]
fn a_detector_for_other_weights_or_a_damaged_one_is_refused() {
    let repo = repo_with_mnist();
    train_detector(repo.path());
    let dir = repo.path().join(MODEL);
    let open = || {
        Engine::open(
            ModelDir::open(repo.path(), Some(MODEL)).unwrap(),
            &candle_core::Device::Cpu,
            &EngineOptions::default(),
        )
    };
    assert!(open().is_ok());
    // Made for other base weights.
    let detector = std::fs::read(dir.join("detector.safetensors")).unwrap();
    let mut d = rws::model::detector::Detector::from_bytes(&detector).unwrap();
    d.base_fingerprint = "sha256:0000".into();
    d.save(&dir.join("detector.safetensors")).unwrap();
    let e = open()
        .err()
        .expect("a detector for other weights is refused");
    assert_eq!(e.kind(), "failed_precondition", "{e}");
    assert!(e.to_string().contains("rws train-detector"), "{e}");
    // Truncated: refused with the file's name.
    std::fs::write(
        dir.join("detector.safetensors"),
        &detector[..detector.len() / 2],
    )
    .unwrap();
    let e = open().err().expect("a damaged detector is refused");
    assert!(e.to_string().contains("detector.safetensors"), "{e}");
}
