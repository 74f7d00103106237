//! Shadow evaluation over loopback gRPC: a candidate profile runs on sampled
//! traffic without changing a single response, its queue stays bounded under a
//! flood, its tally adds up, and bad requests change nothing.

mod common;

use common::*;
use rws::serve::engine::EngineOptions;
use rws::server::pb;
use tonic::Code;

/// The flood and the tally run one at a time: the shadow thread runs only on an
/// otherwise idle core, so a flood next door would drop the tally's samples.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shadow(profile: &str, fraction: f64) -> pb::ShadowRequest {
    pb::ShadowRequest {
        profile: profile.into(),
        fraction,
    }
}

async fn list(server: &TestServer) -> pb::ListShadowsResponse {
    server
        .admin()
        .list_shadows(pb::ListShadowsRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadowing_never_changes_a_response_and_its_queue_stays_bounded() {
    let _alone = ALONE.lock().await;
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let inputs: Vec<u64> = (0..16).collect();
    let mut client = server.inference();
    let mut want = Vec::new();
    for &seed in &inputs {
        want.push(logits(&mut client, tensor_request(seed, "")).await);
    }
    let started = server
        .admin()
        .shadow(shadow("fog", 1.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((started.profile.as_str(), started.sampled), ("fog", 0));

    // A flood: eight clients at once, every request sampled.
    let mut flood = tokio::task::JoinSet::new();
    for c in 0..8 {
        let mut client = server.inference();
        let (inputs, want) = (inputs.clone(), want.clone());
        flood.spawn(async move {
            for round in 0..12 {
                let i = (c + round) % inputs.len();
                let got = logits(&mut client, tensor_request(inputs[i], "")).await;
                assert_eq!(got, want[i], "a shadowed response changed");
            }
        });
    }
    let mut most_queued = 0;
    while !flood.is_empty() {
        let l = list(&server).await;
        assert!(
            l.queued <= l.capacity,
            "{} queued of {}",
            l.queued,
            l.capacity
        );
        most_queued = most_queued.max(l.queued);
        if let Some(done) = flood.try_join_next() {
            done.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }

    // Settled, the tally adds up: every sampled request is compared, dropped or
    // failed. (The shadow thread runs only on an otherwise idle core: on a
    // machine busy with other tests, settling can take a while.)
    let settled = |l: &pb::ListShadowsResponse| {
        let s = &l.shadows[0];
        l.queued == 0 && s.sampled == s.compared + s.dropped + s.failed
    };
    let mut l = list(&server).await;
    for _ in 0..2000 {
        if settled(&l) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        l = list(&server).await;
    }
    let s = &l.shadows[0];
    // (How many were dropped depends on the machine: a busy server drops them.)
    assert_eq!(s.sampled, 96, "every one of the 96 requests is picked");
    assert_eq!(
        s.sampled,
        s.compared + s.dropped + s.failed,
        "{s:?} (most queued {most_queued})"
    );
    assert_eq!(s.failed, 0);

    // Requests the candidate itself serves are not compared with themselves.
    let before = list(&server).await.shadows[0].sampled;
    logits(&mut client, tensor_request(1, "fog")).await;
    assert_eq!(list(&server).await.shadows[0].sampled, before);

    // Metrics name the candidate and the outcome.
    let stopped = server
        .admin()
        .shadow(shadow("fog", 0.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.compared, s.compared);
    assert!(list(&server).await.shadows.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn the_shadow_tally_compares_the_candidate_with_what_was_served() {
    let _alone = ALONE.lock().await;
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut admin = server.admin();
    // A candidate identical to the served profile agrees always, with the same confidence.
    admin
        .put_profile(pb::PutProfileRequest {
            name: "twin".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin.shadow(shadow("twin", 0.5)).await.unwrap();
    let mut client = server.inference();
    for seed in 0..20 {
        logits(&mut client, tensor_request(seed, "clean")).await;
        // One at a time: the server is idle when each is offered.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The shadow thread runs only on an otherwise idle core (SCHED_IDLE): on a
    // machine busy with other tests its samples wait their turn.
    let mut s = list(&server).await.shadows.remove(0);
    for _ in 0..2000 {
        if s.compared + s.dropped == 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        s = list(&server).await.shadows.remove(0);
    }
    assert_eq!(s.sampled, 10, "half of 20, evenly");
    assert_eq!(
        s.compared + s.dropped,
        10,
        "every sample computed or dropped"
    );
    assert!(s.compared > 0, "an idle server compares its samples: {s:?}");
    assert_eq!(s.agreement, 1.0);
    assert!(s.served_confidence > 0.0 && s.served_entropy >= 0.0);
    assert!((s.served_confidence - s.candidate_confidence).abs() < 1e-12);
    assert!((s.served_entropy - s.candidate_entropy).abs() < 1e-12);
    server.stop().await;
}

#[tokio::test]
async fn bad_shadow_requests_are_refused_and_change_nothing() {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut admin = server.admin();
    admin.shadow(shadow("fog", 0.1)).await.unwrap();
    let long = "x".repeat(10_000);
    for (req, code) in [
        (shadow("fog", 1.5), Code::InvalidArgument),
        (shadow("fog", -0.1), Code::InvalidArgument),
        (shadow("fog", f64::NAN), Code::InvalidArgument),
        (shadow("nope", 0.1), Code::NotFound),
        (shadow("rain", 0.0), Code::NotFound),
        (shadow("", 0.1), Code::InvalidArgument),
        (shadow(&long, 0.1), Code::InvalidArgument),
    ] {
        let e = admin.shadow(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().len() < 300,
            "the message must not echo the input"
        );
    }
    let l = list(&server).await;
    assert_eq!(l.shadows.len(), 1);
    assert_eq!(
        (l.shadows[0].profile.as_str(), l.shadows[0].fraction),
        ("fog", 0.1)
    );
    // At most four at once.
    for p in ["clean", "rain", "noise"] {
        admin.shadow(shadow(p, 0.1)).await.unwrap();
    }
    admin
        .put_profile(pb::PutProfileRequest {
            name: "fifth".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = admin.shadow(shadow("fifth", 0.1)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(list(&server).await.shadows.len(), 4);
    server.stop().await;
}
