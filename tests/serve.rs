//! Classification and profile switching over real loopback gRPC.

mod common;

use common::*;
use rws::serve::engine::EngineOptions;
use rws::server::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_then_remove_restores_logits_bitwise() {
    let repo = tiny_repo();
    let server = TestServer::start(
        repo.path(),
        EngineOptions {
            auto_profiles: false,
            ..Default::default()
        },
    )
    .await;
    let mut inf = server.inference();
    let mut admin = server.admin();

    let clean = logits(&mut inf, tensor_request(1, "")).await;
    let clean_img = logits(&mut inf, image_request(png(28, 28), "")).await;

    let loaded = admin
        .load_signature(pb::LoadSignatureRequest {
            name: String::new(),
            source: Some(pb::load_signature_request::Source::Path(
                "signatures/fog.rws.safetensors".into(),
            )),
            allow_transfer: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .signature
        .unwrap();
    assert_eq!(loaded.name, "fog");
    assert_eq!(loaded.quant, "int8");
    assert!(!loaded.transferred);

    let change = admin
        .put_profile(pb::PutProfileRequest {
            name: "foggy".into(),
            signatures: refs(&[("fog", 1.0)]),
            replace: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(change.apply_micros > 0.0);
    let foggy = inf
        .classify(tensor_request(1, "foggy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(foggy.profile, "foggy");
    assert_eq!(foggy.generation, change.profile.unwrap().generation);
    assert_ne!(
        bits(&foggy.logits),
        clean,
        "the signature must change the outputs"
    );

    // As the default, then back: the clean outputs return bit for bit.
    admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "foggy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        logits(&mut inf, tensor_request(1, "")).await,
        bits(&foggy.logits)
    );
    admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "clean".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .delete_profile(pb::DeleteProfileRequest {
            name: "foggy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .unload_signature(pb::UnloadSignatureRequest {
            name: "fog".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    assert_eq!(logits(&mut inf, tensor_request(1, "")).await, clean);
    assert_eq!(
        logits(&mut inf, image_request(png(28, 28), "")).await,
        clean_img
    );
    let err = inf.classify(tensor_request(1, "foggy")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_profiles_compose_and_scale() {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut inf = server.inference();
    let mut admin = server.admin();

    let listed = admin
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["clean", "fog", "noise", "rain"]);
    assert_eq!(listed.default_profile, "clean");
    let sigs = admin
        .list_signatures(pb::ListSignaturesRequest {})
        .await
        .unwrap()
        .into_inner()
        .signatures;
    let quants: Vec<&str> = sigs.iter().map(|s| s.quant.as_str()).collect();
    assert_eq!(quants, ["int8", "int4", "f16"]);
    assert!(sigs.iter().all(|s| s.synthetic && s.bytes > 0));

    // alpha = 0 is the clean model; distinct alphas give distinct outputs.
    let clean = logits(&mut inf, tensor_request(2, "clean")).await;
    let put = |name: &str, pairs: &[(&str, f32)]| pb::PutProfileRequest {
        name: name.into(),
        signatures: refs(pairs),
        replace: false,
        ..Default::default()
    };
    admin
        .put_profile(put("zero", &[("fog", 0.0)]))
        .await
        .unwrap();
    admin
        .put_profile(put("half", &[("fog", 0.5)]))
        .await
        .unwrap();
    admin
        .put_profile(put("storm", &[("rain", 0.7), ("fog", 0.5)]))
        .await
        .unwrap();
    assert_eq!(logits(&mut inf, tensor_request(2, "zero")).await, clean);
    let half = logits(&mut inf, tensor_request(2, "half")).await;
    let full = logits(&mut inf, tensor_request(2, "fog")).await;
    let storm = logits(&mut inf, tensor_request(2, "storm")).await;
    assert_ne!(half, clean);
    assert_ne!(half, full);
    assert_ne!(storm, full);

    // Replacing a profile bumps its generation and changes its outputs.
    let before = inf
        .classify(tensor_request(2, "half"))
        .await
        .unwrap()
        .into_inner();
    let change = admin
        .put_profile(pb::PutProfileRequest {
            name: "half".into(),
            signatures: refs(&[("fog", 1.0)]),
            replace: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let after = inf
        .classify(tensor_request(2, "half"))
        .await
        .unwrap()
        .into_inner();
    assert!(after.generation > before.generation);
    assert_eq!(after.generation, change.profile.unwrap().generation);
    assert_eq!(bits(&after.logits), full);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicted_profiles_come_back_bit_identical() {
    let repo = tiny_repo();
    let opts = EngineOptions {
        max_resident_profiles: 2,
        ..Default::default()
    };
    let server = TestServer::start(repo.path(), opts).await;
    let mut inf = server.inference();
    let mut admin = server.admin();

    let mut first = Vec::new();
    for p in ["fog", "noise", "rain"] {
        first.push(logits(&mut inf, tensor_request(3, p)).await);
    }
    let resident = admin
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .profiles
        .iter()
        .filter(|p| p.resident)
        .count();
    assert_eq!(resident, 2, "the cap holds");
    for round in 0..3 {
        for (p, want) in ["fog", "noise", "rain"].iter().zip(&first) {
            assert_eq!(
                &logits(&mut inf, tensor_request(3, p)).await,
                want,
                "round {round}, profile {p}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_k_is_sorted_softmax() {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut inf = server.inference();
    let mut req = tensor_request(4, "");
    req.top_k = 100;
    let r = inf.classify(req).await.unwrap().into_inner();
    assert_eq!(r.top_k.len(), 10, "capped at the number of classes");
    let sum: f32 = r.top_k.iter().map(|p| p.score).sum();
    assert!((sum - 1.0).abs() < 1e-5);
    assert!(r.top_k.windows(2).all(|w| w[0].score >= w[1].score));
    let best = r
        .logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    assert_eq!(r.top_k[0].index as usize, best);
    assert_eq!(r.top_k[0].label, best.to_string());
    server.stop().await;
}
