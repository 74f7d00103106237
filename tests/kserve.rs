//! The Open Inference Protocol (KServe v2) service over real loopback gRPC: it
//! computes exactly what rws.v1 computes, and refuses malformed requests.

mod common;

use std::collections::HashMap;

use common::*;
use rws::serve::engine::EngineOptions;
use rws::server::kserve::pb;
use rws::server::kserve::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use rws::server::kserve::pb::infer_parameter::ParameterChoice;
use rws::server::kserve::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use tonic::Code;
use tonic::transport::Channel;

type Client = GrpcInferenceServiceClient<Channel>;

fn param(p: ParameterChoice) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(p),
    }
}

/// A request for `tiny` with one input and its data in raw_input_contents.
fn request(
    datatype: &str,
    shape: Vec<i64>,
    raw: Vec<u8>,
    profile: Option<&str>,
) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: MODEL.into(),
        model_version: String::new(),
        id: "req-7".into(),
        parameters: profile
            .map(|p| {
                (
                    "profile".to_string(),
                    param(ParameterChoice::StringParam(p.into())),
                )
            })
            .into_iter()
            .collect(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        }],
        outputs: Vec::new(),
        raw_input_contents: vec![raw],
    }
}

/// FP32 `[N, 1, 28, 28]` of the inputs `common::input(seed)` for each seed.
fn fp32_request(seeds: &[u64], profile: Option<&str>) -> pb::ModelInferRequest {
    let raw = seeds
        .iter()
        .flat_map(|&s| input(s).data)
        .flat_map(f32::to_le_bytes)
        .collect();
    request("FP32", vec![seeds.len() as i64, 1, 28, 28], raw, profile)
}

/// Triton's raw BYTES encoding: a 4-byte little-endian length before each element.
fn bytes_raw(elements: &[&[u8]]) -> Vec<u8> {
    elements
        .iter()
        .flat_map(|e| {
            (e.len() as u32)
                .to_le_bytes()
                .into_iter()
                .chain(e.iter().copied())
        })
        .collect()
}

/// The response's outputs by name: (datatype, shape, raw bytes).
fn outputs(r: &pb::ModelInferResponse) -> HashMap<String, (String, Vec<i64>, Vec<u8>)> {
    assert_eq!(r.outputs.len(), r.raw_output_contents.len());
    r.outputs
        .iter()
        .zip(&r.raw_output_contents)
        .map(|(o, raw)| {
            (
                o.name.clone(),
                (o.datatype.clone(), o.shape.clone(), raw.clone()),
            )
        })
        .collect()
}

/// Logits rows as bits, and classes.
fn decode(r: &pb::ModelInferResponse) -> (Vec<Vec<u32>>, Vec<i64>) {
    let out = outputs(r);
    let (dt, shape, raw) = &out["logits"];
    assert_eq!(dt, "FP32");
    let classes = shape[1] as usize;
    let logits: Vec<u32> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let (dt, class_shape, raw) = &out["class"];
    assert_eq!(dt, "INT64");
    assert_eq!(class_shape, &[shape[0]]);
    let class = raw
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (logits.chunks(classes).map(<[u32]>::to_vec).collect(), class)
}

/// The alpha of the one signature in profile `name`.
async fn default_alpha(server: &TestServer, name: &str) -> f32 {
    let profiles = server
        .admin()
        .list_profiles(rws::server::pb::ListProfilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .profiles;
    profiles.iter().find(|p| p.name == name).unwrap().signatures[0].alpha
}

fn param_of<'a>(r: &'a pb::ModelInferResponse, key: &str) -> &'a ParameterChoice {
    r.parameters[key].parameter_choice.as_ref().unwrap()
}

async fn infer(client: &mut Client, req: pb::ModelInferRequest) -> pb::ModelInferResponse {
    client.model_infer(req).await.unwrap().into_inner()
}

/// rws.v1's logits bits and top class for the same input and profile.
async fn reference(
    server: &TestServer,
    req: rws::server::pb::ClassifyRequest,
) -> (Vec<u32>, i64, u64) {
    let r = server.inference().classify(req).await.unwrap().into_inner();
    (bits(&r.logits), i64::from(r.top_k[0].index), r.generation)
}

async fn start() -> (tempfile::TempDir, TestServer, Client) {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let client = GrpcInferenceServiceClient::new(server.channel.clone());
    (repo, server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn infer_matches_rws_v1_bitwise_and_follows_the_profile() {
    let (_repo, server, mut client) = start().await;

    assert!(
        client
            .server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    // Readiness follows the warm-up that runs as the server starts.
    wait_ready(&server.channel).await;
    for version in ["", "1"] {
        let r = client
            .model_ready(pb::ModelReadyRequest {
                name: MODEL.into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.ready);
    }
    let meta = client
        .model_metadata(pb::ModelMetadataRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (clean, _, _) = reference(&server, tensor_request(1, "")).await;
    let classes = clean.len() as i64;
    assert_eq!(meta.platform, "rws");
    assert_eq!(meta.versions, ["1"]);
    let shapes: Vec<_> = meta
        .inputs
        .iter()
        .chain(&meta.outputs)
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.clone()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("input", "FP32", vec![-1, 1, 28, 28]),
            ("logits", "FP32", vec![-1, classes]),
            ("class", "INT64", vec![-1]),
            ("signatures", "BYTES", vec![-1]),
            ("detector_confidence", "FP32", vec![-1]),
        ]
    );

    // FP32, three images in one request, with and without a profile.
    for profile in [None, Some(""), Some("clean"), Some("fog"), Some("noise")] {
        let r = infer(&mut client, fp32_request(&[1, 2, 3], profile)).await;
        assert_eq!(r.id, "req-7");
        assert_eq!(r.model_name, MODEL);
        assert_eq!(r.model_version, "1");
        let (logits, class) = decode(&r);
        assert_eq!(logits.len(), 3);
        let mut generation = 0;
        for (i, seed) in [1, 2, 3].into_iter().enumerate() {
            let (want, top, g) =
                reference(&server, tensor_request(seed, profile.unwrap_or(""))).await;
            assert_eq!(logits[i], want, "profile {profile:?}, image {i}");
            assert_eq!(class[i], top);
            generation = g;
        }
        let name = profile.filter(|p| !p.is_empty()).unwrap_or("clean");
        assert_eq!(
            param_of(&r, "profile"),
            &ParameterChoice::StringParam(name.into())
        );
        assert_eq!(
            param_of(&r, "generation"),
            &ParameterChoice::Int64Param(generation as i64)
        );
        // What served each image, by name; no detector ran.
        let out = outputs(&r);
        let served = match name {
            "clean" => "clean".to_string(),
            sig => format!("{sig}@{}", default_alpha(&server, sig).await),
        };
        let element = [
            (served.len() as u32).to_le_bytes().to_vec(),
            served.into_bytes(),
        ]
        .concat();
        assert_eq!(
            out["signatures"],
            ("BYTES".into(), vec![3], element.repeat(3))
        );
        let (dt, shape, raw) = &out["detector_confidence"];
        assert_eq!((dt.as_str(), shape.as_slice()), ("FP32", &[3][..]));
        assert!(
            raw.chunks_exact(4)
                .all(|b| f32::from_le_bytes(b.try_into().unwrap()).is_nan())
        );
    }
    let fog = decode(&infer(&mut client, fp32_request(&[1], Some("fog"))).await).0;
    assert_eq!(
        decode(&infer(&mut client, fp32_request(&[1], None)).await).0[0],
        clean
    );
    assert_ne!(fog[0], clean, "the fog profile must change the logits");

    // The parameter "source": an activation covering it chooses, and says so.
    let a = server
        .admin()
        .activate(rws::server::pb::ActivateRequest {
            scope: "site-a/".into(),
            profile: "fog".into(),
            ttl_seconds: 600.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let text = |s: &str| param(ParameterChoice::StringParam(s.into()));
    for (source, want, selection) in [
        ("site-a/cam-1", &fog[0], "activation"),
        ("site-b/cam-1", &clean, "default"),
    ] {
        let mut req = fp32_request(&[1], None);
        req.parameters.insert("source".into(), text(source));
        let r = infer(&mut client, req).await;
        assert_eq!(&decode(&r).0[0], want, "{source}");
        assert_eq!(
            param_of(&r, "selection"),
            &ParameterChoice::StringParam(selection.into())
        );
        if selection == "activation" {
            assert_eq!(
                param_of(&r, "activation_id"),
                &ParameterChoice::StringParam(a.id.clone())
            );
        }
    }
    let mut req = fp32_request(&[1], None);
    req.parameters.insert("source".into(), text("site a"));
    let err = client.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    server
        .admin()
        .deactivate(rws::server::pb::DeactivateRequest {
            id: a.id,
            ..Default::default()
        })
        .await
        .unwrap();

    // The same data in the typed contents instead of raw_input_contents.
    let mut req = fp32_request(&[1], Some("fog"));
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(pb::InferTensorContents {
        fp32_contents: input(1).data,
        ..Default::default()
    });
    assert_eq!(decode(&infer(&mut client, req).await).0, fog);

    // BYTES: encoded PNGs, raw and typed, shapes [N] and [N, 1].
    let image = png(28, 28);
    let (want, top, _) = reference(&server, image_request(image.clone(), "rain")).await;
    for shape in [vec![2], vec![2, 1]] {
        let req = request("BYTES", shape, bytes_raw(&[&image, &image]), Some("rain"));
        let (logits, class) = decode(&infer(&mut client, req).await);
        assert_eq!(logits, [want.clone(), want.clone()]);
        assert_eq!(class, [top, top]);
    }
    let mut req = request("BYTES", vec![1], Vec::new(), Some("rain"));
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(pb::InferTensorContents {
        bytes_contents: vec![image.clone()],
        ..Default::default()
    });
    assert_eq!(decode(&infer(&mut client, req).await).0, [want]);

    // Named outputs come back alone, in the order asked.
    let mut req = fp32_request(&[1, 2], None);
    req.outputs = ["class", "logits"]
        .map(|n| InferRequestedOutputTensor {
            name: n.into(),
            parameters: HashMap::new(),
        })
        .to_vec();
    let r = infer(&mut client, req.clone()).await;
    let names: Vec<_> = r.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["class", "logits"]);
    req.outputs.truncate(1);
    let r = infer(&mut client, req).await;
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.raw_output_contents[0].len(), 2 * 8);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_are_refused_with_a_reason() {
    let (_repo, server, mut client) = start().await;
    let one = || fp32_request(&[1], None);
    let typed = |mut r: pb::ModelInferRequest| {
        r.inputs[0].contents = Some(pb::InferTensorContents::default());
        r
    };
    let mut nan = one();
    nan.raw_input_contents[0][..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let cases: Vec<(&str, pb::ModelInferRequest, Code, &str)> = vec![
        (
            "unknown model",
            pb::ModelInferRequest {
                model_name: "other".into(),
                ..one()
            },
            Code::NotFound,
            "serves 'tiny'",
        ),
        (
            "unknown version",
            pb::ModelInferRequest {
                model_version: "2".into(),
                ..one()
            },
            Code::NotFound,
            "no version '2'",
        ),
        (
            "unknown profile",
            fp32_request(&[1], Some("nope")),
            Code::NotFound,
            "nope",
        ),
        (
            "profile not a string",
            pb::ModelInferRequest {
                parameters: HashMap::from([(
                    "profile".to_string(),
                    param(ParameterChoice::Int64Param(3)),
                )]),
                ..one()
            },
            Code::InvalidArgument,
            "must be a string",
        ),
        (
            "missing input",
            pb::ModelInferRequest {
                inputs: Vec::new(),
                raw_input_contents: Vec::new(),
                ..one()
            },
            Code::InvalidArgument,
            "exactly one input",
        ),
        (
            "wrong input name",
            {
                let mut r = one();
                r.inputs[0].name = "image".into();
                r
            },
            Code::InvalidArgument,
            "input 'image' is unknown",
        ),
        (
            "unknown output",
            pb::ModelInferRequest {
                outputs: vec![InferRequestedOutputTensor {
                    name: "probs".into(),
                    parameters: HashMap::new(),
                }],
                ..one()
            },
            Code::InvalidArgument,
            "output 'probs' is unknown",
        ),
        (
            "wrong datatype",
            request("INT32", vec![1, 1, 28, 28], vec![0; 784 * 4], None),
            Code::InvalidArgument,
            "datatype 'INT32'",
        ),
        (
            "wrong shape",
            request("FP32", vec![1, 1, 27, 28], vec![0; 27 * 28 * 4], None),
            Code::InvalidArgument,
            "[N, 1, 28, 28]",
        ),
        (
            "too few values",
            request("FP32", vec![2, 1, 28, 28], vec![0; 784 * 4], None),
            Code::InvalidArgument,
            "needs 1568 values",
        ),
        (
            "ragged bytes",
            request("FP32", vec![1, 1, 28, 28], vec![0; 784 * 4 + 1], None),
            Code::InvalidArgument,
            "needs 784 values",
        ),
        (
            "empty batch",
            request("FP32", vec![0, 1, 28, 28], Vec::new(), None),
            Code::InvalidArgument,
            "at least 1",
        ),
        (
            "negative dimension",
            request("FP32", vec![-1, 1, 28, 28], Vec::new(), None),
            Code::InvalidArgument,
            "negative",
        ),
        (
            "huge batch",
            request("FP32", vec![i64::MAX, 1, 28, 28], Vec::new(), None),
            Code::InvalidArgument,
            "at most 64",
        ),
        (
            "huge BYTES batch",
            request("BYTES", vec![65], bytes_raw(&[&b"x"[..]; 65]), None),
            Code::InvalidArgument,
            "at most 64",
        ),
        ("non-finite value", nan, Code::InvalidArgument, "finite"),
        (
            "no data",
            pb::ModelInferRequest {
                raw_input_contents: Vec::new(),
                ..one()
            },
            Code::InvalidArgument,
            "no data",
        ),
        (
            "raw and typed data",
            typed(one()),
            Code::InvalidArgument,
            "both",
        ),
        (
            "typed count mismatch",
            typed(pb::ModelInferRequest {
                raw_input_contents: Vec::new(),
                ..one()
            }),
            Code::InvalidArgument,
            "fp32_contents has 0",
        ),
        (
            "BYTES shape",
            request("BYTES", vec![1, 2], bytes_raw(&[b"a", b"b"]), None),
            Code::InvalidArgument,
            "[N] or [N, 1]",
        ),
        (
            "BYTES count mismatch",
            request("BYTES", vec![2], bytes_raw(&[&png(28, 28)]), None),
            Code::InvalidArgument,
            "needs 2 elements",
        ),
        (
            "BYTES length past the end",
            request("BYTES", vec![1], vec![200, 0, 0, 0, 1, 2], None),
            Code::InvalidArgument,
            "claims 200 bytes",
        ),
        (
            "BYTES stray tail",
            request(
                "BYTES",
                vec![1],
                [bytes_raw(&[b"x"]), vec![1, 2]].concat(),
                None,
            ),
            Code::InvalidArgument,
            "stray",
        ),
        (
            "BYTES not an image",
            request("BYTES", vec![1], bytes_raw(&[b"hello"]), None),
            Code::InvalidArgument,
            "PNG",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = client.model_infer(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(err.message().contains(needle), "{what}: {}", err.message());
    }
    let err = client
        .model_metadata(pb::ModelMetadataRequest {
            name: "other".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .model_ready(pb::ModelReadyRequest {
            name: MODEL.into(),
            version: "3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The server still answers after all that.
    infer(&mut client, one()).await;
    server.stop().await;
}
