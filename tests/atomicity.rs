//! No request ever sees a mix of two profiles' weights, however fast they switch.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use rws::serve::engine::EngineOptions;
use rws::server::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_switch_storm_is_atomic() {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut admin = server.admin();
    let mut inf = server.inference();

    // Two profiles whose outputs differ, with their reference outputs and generations.
    let mut reference: HashMap<String, (Vec<u32>, u64)> = HashMap::new();
    for (name, sig) in [("a", "fog"), ("b", "noise")] {
        let change = admin
            .put_profile(pb::PutProfileRequest {
                name: name.into(),
                signatures: refs(&[(sig, 0.8)]),
                replace: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let out = inf
            .classify(tensor_request(9, name))
            .await
            .unwrap()
            .into_inner();
        reference.insert(
            name.into(),
            (bits(&out.logits), change.profile.unwrap().generation),
        );
    }
    assert_ne!(reference["a"].0, reference["b"].0);
    let reference = Arc::new(reference);
    admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut inf = server.inference();
        let (done, reference) = (done.clone(), reference.clone());
        clients.push(tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            while !done.load(Ordering::Relaxed) {
                let r = inf
                    .classify(tensor_request(9, ""))
                    .await
                    .expect("no request may fail")
                    .into_inner();
                let (want, generation) = reference
                    .get(&r.profile)
                    .expect("only a or b is ever the default");
                assert_eq!(
                    &bits(&r.logits),
                    want,
                    "response of {} mixes weights",
                    r.profile
                );
                assert_eq!(r.generation, *generation);
                *seen.entry(r.profile).or_default() += 1;
            }
            seen
        }));
    }
    for i in 0..1000 {
        let name = if i % 2 == 0 { "a" } else { "b" };
        admin
            .set_default_profile(pb::SetDefaultProfileRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut total: HashMap<String, usize> = HashMap::new();
    for c in clients {
        for (k, v) in c.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    assert!(
        total.get("a").copied().unwrap_or(0) > 0 && total.get("b").copied().unwrap_or(0) > 0,
        "{total:?}"
    );
    server.stop().await;
}
