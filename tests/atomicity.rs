//! No request ever sees a mix of two profiles' weights, however fast they switch
//! or are redefined, evicted and rebuilt.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// Redefinitions of one profile, with a second profile in the same traffic.
const DEFINITIONS: [&[(&str, f32)]; 4] = [
    &[("fog", 0.8)],
    &[("noise", 0.5)],
    &[("rain", 0.7)],
    &[("fog", 0.3), ("noise", 0.4)],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redefinitions_with_evictions_answer_each_generation_with_its_definition() {
    let repo = tiny_repo();
    // Room for one patched stem: `storm` and `fog` evict each other in every
    // other batch, so stems are rebuilt under load while `storm` is redefined.
    let opts = EngineOptions {
        max_resident_profiles: 1,
        ..Default::default()
    };
    let server = TestServer::start(repo.path(), opts).await;
    let mut admin = server.admin();
    let mut inf = server.inference();
    let put = |i: usize| pb::PutProfileRequest {
        name: "storm".into(),
        signatures: refs(DEFINITIONS[i]),
        replace: true,
        ..Default::default()
    };

    // Quiet phase: the logits of each definition, and of `fog`.
    let mut expected = Vec::new();
    let mut definition_of = HashMap::new();
    for i in 0..DEFINITIONS.len() {
        let change = admin.put_profile(put(i)).await.unwrap().into_inner();
        definition_of.insert(change.profile.unwrap().generation, i);
        expected.push(logits(&mut inf, tensor_request(9, "storm")).await);
    }
    let fog = logits(&mut inf, tensor_request(9, "fog")).await;
    for (i, e) in expected.iter().enumerate() {
        assert!(
            expected[..i].iter().chain([&fog]).all(|o| o != e),
            "definition {i} must be told apart by its logits"
        );
    }

    let done = Arc::new(AtomicBool::new(false));
    // Every storm answer's (generation, logits); checked once the storm is over,
    // when every generation's definition is known.
    let answers = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for c in 0..6 {
        let mut inf = server.inference();
        let (done, answers, fog) = (done.clone(), answers.clone(), fog.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !done.load(Ordering::Relaxed) {
                let profile = if (n + c).is_multiple_of(2) {
                    "storm"
                } else {
                    "fog"
                };
                let r = inf
                    .classify(tensor_request(9, profile))
                    .await
                    .expect("no request may fail")
                    .into_inner();
                assert_eq!(r.profile, profile);
                if profile == "fog" {
                    assert_eq!(bits(&r.logits), fog, "fog's answer changed");
                } else {
                    answers
                        .lock()
                        .unwrap()
                        .push((r.generation, bits(&r.logits)));
                }
                n += 1;
            }
        }));
    }
    // Redefinitions back to back, while at least 400 storm answers come back:
    // batches hold older generations while newer ones publish, and rebuild
    // their stems after an eviction.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut i = 0;
    while i < 100 || answers.lock().unwrap().len() < 400 {
        assert!(std::time::Instant::now() < until, "clients stalled");
        let d = i % DEFINITIONS.len();
        let change = admin.put_profile(put(d)).await.unwrap().into_inner();
        definition_of.insert(change.profile.unwrap().generation, d);
        i += 1;
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let mut generations = std::collections::HashSet::new();
    for (generation, got) in answers.iter() {
        let d = *definition_of
            .get(generation)
            .unwrap_or_else(|| panic!("generation {generation} was never published for storm"));
        assert_eq!(
            got, &expected[d],
            "generation {generation} answered with other weights than definition {d}"
        );
        generations.insert(*generation);
    }
    assert!(
        generations.len() > 20,
        "too few generations were served during the storm: {}",
        generations.len()
    );
    server.stop().await;
}
