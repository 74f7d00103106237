//! Robustness for events, over real loopback gRPC and HTTP: a profile switched
//! on for a scope of sources serves exactly those sources, ends on time by
//! itself with no request failing across the instant, and survives a restart
//! with its absolute end; event reports become activations by rules, with
//! hysteresis, and bad reports change nothing; every change is in the audit
//! trail once, in generation order.

mod common;

use std::time::{Duration, Instant};

use common::{RwsProcess, TestServer, bits, tensor_request, tiny_repo};
use rws::serve::engine::EngineOptions;
use rws::server::pb;
use tonic::Code;
use tonic::transport::Channel;

fn activate(scope: &str, profile: &str, ttl_seconds: f64) -> pb::ActivateRequest {
    pb::ActivateRequest {
        scope: scope.into(),
        profile: profile.into(),
        ttl_seconds,
        reason: "test".into(),
        ..Default::default()
    }
}

fn from(source: &str, seed: u64) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        source: source.into(),
        ..tensor_request(seed, "")
    }
}

async fn classify(ch: &Channel, req: pb::ClassifyRequest) -> pb::ClassifyResponse {
    common::InferenceClient::new(ch.clone())
        .classify(req)
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn an_activation_serves_its_scope_and_nothing_else() {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let ch = server.channel.clone();
    let fog = bits(&classify(&ch, tensor_request(3, "fog")).await.logits);
    let clean = bits(&classify(&ch, tensor_request(3, "clean")).await.logits);
    assert_ne!(fog, clean);

    let a = server
        .admin()
        .activate(activate("site-a/", "fog", 60.0))
        .await
        .unwrap()
        .into_inner();
    assert!(a.until_unix_ms - a.since_unix_ms == 60_000, "{a:?}");
    for (source, want, selection) in [
        ("site-a/cam-1", &fog, pb::Selection::Activation),
        ("site-a/cam-2", &fog, pb::Selection::Activation),
        ("site-b/cam-1", &clean, pb::Selection::Default),
        ("site-a", &clean, pb::Selection::Default),
        ("", &clean, pb::Selection::Default),
    ] {
        let r = classify(&ch, from(source, 3)).await;
        assert_eq!(&bits(&r.logits), want, "{source}");
        assert_eq!(r.selection(), selection, "{source}");
        if selection == pb::Selection::Activation {
            assert_eq!(
                (r.profile.as_str(), r.activation_id.as_str()),
                ("fog", a.id.as_str())
            );
        }
    }
    // The metadata key stands in for the field.
    let mut req = tonic::Request::new(tensor_request(3, ""));
    req.metadata_mut()
        .insert("x-rws-source", "site-a/cam-9".parse().unwrap());
    let r = server.inference().classify(req).await.unwrap().into_inner();
    assert_eq!(
        (bits(&r.logits), r.activation_id),
        (fog.clone(), a.id.clone())
    );
    // A named profile still wins.
    let r = classify(
        &ch,
        pb::ClassifyRequest {
            source: "site-a/cam-1".into(),
            ..tensor_request(3, "clean")
        },
    )
    .await;
    assert_eq!(
        (bits(&r.logits), r.selection()),
        (clean.clone(), pb::Selection::Explicit)
    );
    // A more specific scope wins over a wider one; in one scope, the newest.
    let cam = server
        .admin()
        .activate(activate("site-a/cam-1", "rain", 60.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        classify(&ch, from("site-a/cam-1", 3)).await.activation_id,
        cam.id
    );
    assert_eq!(
        classify(&ch, from("site-a/cam-2", 3)).await.activation_id,
        a.id
    );
    let newer = server
        .admin()
        .activate(activate("site-a/", "noise", 60.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        classify(&ch, from("site-a/cam-2", 3)).await.activation_id,
        newer.id
    );

    let listed = server
        .admin()
        .list_activations(pb::ListActivationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.activations.len(), 3);

    // Bad requests are refused and change nothing.
    let mut admin = server.admin();
    let refused = [
        (activate("/site", "fog", 60.0), Code::InvalidArgument),
        (activate("site a/", "fog", 60.0), Code::InvalidArgument),
        (activate("site-a/", "hail", 60.0), Code::NotFound),
        (activate("site-a/", "fog", -1.0), Code::InvalidArgument),
        (activate("site-a/", "fog", f64::NAN), Code::InvalidArgument),
        (activate("site-a/", "fog", 1e12), Code::InvalidArgument),
        (activate("site-a/", "fog", 0.0), Code::InvalidArgument),
        (
            activate(&"x".repeat(100_000), "fog", 60.0),
            Code::InvalidArgument,
        ),
    ];
    for (req, code) in refused {
        let err = admin.activate(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().len() < 400, "{}", err.message());
    }
    let err = admin
        .delete_profile(pb::DeleteProfileRequest {
            name: "fog".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = admin
        .deactivate(pb::DeactivateRequest {
            id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = common::InferenceClient::new(ch.clone())
        .classify(from("site a", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let after = admin
        .list_activations(pb::ListActivationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.activations, listed.activations);

    admin
        .deactivate(pb::DeactivateRequest {
            id: newer.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        classify(&ch, from("site-a/cam-2", 3)).await.activation_id,
        a.id
    );
    server.stop().await;
}

#[tokio::test]
async fn an_activation_ends_on_time_and_no_request_fails_across_the_instant() {
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let ch = server.channel.clone();
    let fog = bits(&classify(&ch, tensor_request(4, "fog")).await.logits);
    let clean = bits(&classify(&ch, tensor_request(4, "clean")).await.logits);
    let a = server
        .admin()
        .activate(activate("*", "fog", 1.0))
        .await
        .unwrap()
        .into_inner();
    let until = a.until_unix_ms;
    let now_ms = || rws::serve::activation::now_ms();
    let stop = Instant::now() + Duration::from_millis(2500);
    let mut tasks = Vec::new();
    for c in 0..4 {
        let ch = ch.clone();
        let (fog, clean, id) = (fog.clone(), clean.clone(), a.id.clone());
        tasks.push(tokio::spawn(async move {
            let (mut before, mut after) = (0, 0);
            while Instant::now() < stop {
                let sent = now_ms();
                let r = classify(&ch, from(&format!("cam-{c}"), 4)).await;
                let done = now_ms();
                let got = bits(&r.logits);
                if got == fog {
                    assert!(sent < until, "fog served after the end");
                    assert_eq!(r.activation_id, id);
                    before += 1;
                } else {
                    assert_eq!(got, clean, "neither profile's output");
                    assert!(done >= until, "the default served before the end");
                    assert_eq!(r.selection(), pb::Selection::Default);
                    after += 1;
                }
            }
            (before, after)
        }));
    }
    for t in tasks {
        let (before, after) = t.await.unwrap();
        assert!(before > 0 && after > 0, "{before} before, {after} after");
    }
    // The ended activation is cleaned up by itself.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l = server
            .admin()
            .list_activations(pb::ListActivationsRequest {})
            .await
            .unwrap()
            .into_inner();
        if l.activations.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "never cleaned up: {l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn activations_survive_a_restart_with_their_absolute_end() {
    let repo = tiny_repo();
    let state = tempfile::tempdir().unwrap();
    let args = [
        "--repo",
        repo.path().to_str().unwrap(),
        "--model",
        common::MODEL,
        "--state-dir",
        state.path().to_str().unwrap(),
    ];
    let first = RwsProcess::start(&args);
    let ch = first.channel().await;
    let mut admin = rws::server::admin_client(ch, None).unwrap();
    let long = admin
        .activate(activate("site-a/", "fog", 600.0))
        .await
        .unwrap()
        .into_inner();
    let short = admin
        .activate(activate("site-b/", "rain", 1.0))
        .await
        .unwrap()
        .into_inner();
    first.signal("KILL");
    drop(first);
    // The short one ends while the server is down.
    tokio::time::sleep(Duration::from_millis(
        short
            .until_unix_ms
            .saturating_sub(rws::serve::activation::now_ms())
            + 100,
    ))
    .await;
    let second = RwsProcess::start(&args);
    let ch = second.channel().await;
    let mut admin = rws::server::admin_client(ch.clone(), None).unwrap();
    let listed = admin
        .list_activations(pb::ListActivationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .activations;
    let ids: Vec<&str> = listed.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, [long.id.as_str()], "the ended one is not back");
    let back = listed.iter().find(|a| a.id == long.id).unwrap();
    assert_eq!(back.until_unix_ms, long.until_unix_ms);
    assert_eq!(
        classify(&ch, from("site-a/cam-1", 1)).await.activation_id,
        long.id
    );
    let r = classify(&ch, from("site-b/cam-1", 1)).await;
    assert_eq!(
        (r.profile.as_str(), r.selection()),
        ("clean", pb::Selection::Default)
    );
}

#[tokio::test]
async fn every_acknowledged_change_is_in_the_audit_trail_once_in_generation_order() {
    let repo = tiny_repo();
    let state = tempfile::tempdir().unwrap();
    let opts = EngineOptions {
        state: Some(rws::serve::state::StateDir::new(state.path())),
        ..EngineOptions::default()
    };
    let server = TestServer::start(repo.path(), opts).await;
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut admin = server.admin();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..6 {
                let name = format!("w{w}-{i}");
                let put = pb::PutProfileRequest {
                    name: name.clone(),
                    signatures: common::refs(&[("fog", 0.1 * i as f32)]),
                    ..Default::default()
                };
                let c = admin.put_profile(put).await.unwrap().into_inner();
                acked.push((c.generation, "put_profile".to_string(), name.clone()));
                let a = admin
                    .activate(pb::ActivateRequest {
                        reason: format!("writer {w}"),
                        ..activate(&format!("w{w}/"), &name, 60.0)
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let d = pb::DeactivateRequest {
                    id: a.id.clone(),
                    ..Default::default()
                };
                admin.deactivate(d).await.unwrap();
                acked.push((0, "activate".to_string(), a.id));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let history = server
        .admin()
        .history(pb::HistoryRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    // Newest first, one entry per generation, without gaps after start-up.
    let gens: Vec<u64> = history.iter().map(|e| e.generation).collect();
    assert!(gens.windows(2).all(|w| w[0] == w[1] + 1), "{gens:?}");
    for (generation, op, key) in &acked {
        let hits: Vec<_> = history
            .iter()
            .filter(|e| &e.op == op && e.change_json.contains(&format!("\"{key}\"")))
            .collect();
        assert_eq!(hits.len(), 1, "{op} {key}: {hits:?}");
        if *generation > 0 {
            assert_eq!(hits[0].generation, *generation, "{op} {key}");
        }
        assert!(hits[0].who.starts_with("peer:127.0.0.1:"), "{:?}", hits[0]);
    }
    let deactivations = history.iter().filter(|e| e.op == "deactivate").count();
    assert_eq!(deactivations, 48);
    // The activations carry their scope and reason, and filter by scope.
    let w3 = server
        .admin()
        .history(pb::HistoryRequest {
            scope: "w3/".into(),
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(w3.len(), 12, "6 activations and 6 deactivations");
    assert!(w3.iter().all(|e| e.scope == "w3/"));
    assert!(
        w3.iter()
            .filter(|e| e.op == "activate")
            .all(|e| e.why == "writer 3")
    );
    // The same trail is on disk, one line per entry, oldest first.
    let text = std::fs::read_to_string(state.path().join("audit.jsonl")).unwrap();
    let on_disk: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["generation"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let mut newest_first = on_disk.clone();
    newest_first.reverse();
    assert_eq!(newest_first, gens);
    server.stop().await;
}

/// Fog (severity 2-5) and sensor noise switch their profiles on; holds,
/// cooldowns and TTLs short enough for a test.
const RULES: &str = r#"
min_hold = "1s"
cooldown = "1s"
[[rule]]
name = "fog"
kind = "fog"
severity = [2, 5]
profile = "fog"
ttl = "200ms"
[[rule]]
kind = "gaussian_noise"
severity = [1, 5]
profile = "noise"
ttl = "1h"
"#;

fn with_rules(repo: &std::path::Path) -> (RwsProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let p = RwsProcess::start(&[
        "--repo",
        repo.to_str().unwrap(),
        "--model",
        common::MODEL,
        "--event-rules",
        rules.to_str().unwrap(),
    ]);
    (p, dir)
}

async fn history(ch: &Channel) -> Vec<pb::AuditEntry> {
    rws::server::admin_client(ch.clone(), None)
        .unwrap()
        .history(pb::HistoryRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

#[tokio::test]
async fn reports_switch_profiles_on_by_rule_and_a_flapping_sensor_does_not_thrash() {
    let repo = tiny_repo();
    let (server, _rules) = with_rules(repo.path());
    let ch = server.channel().await;
    // Over HTTP: noise on one camera, an hour long.
    let (code, body) = common::http_post(
        &server.events,
        br#"{"kind": "gaussian_noise", "severity": 2, "scope": "site-c/cam-3", "id": "noise-1"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["outcome"], "activated");
    assert_eq!(r["profile"], "noise");
    let id = r["activation_id"].as_str().unwrap().to_string();
    let served = classify(&ch, from("site-c/cam-3", 2)).await;
    assert_eq!(
        (served.profile.as_str(), served.activation_id.as_str()),
        ("noise", id.as_str())
    );
    assert_eq!(
        classify(&ch, from("site-c/cam-4", 2)).await.profile,
        "clean"
    );
    // The same report again: already covered.
    let (_, body) = common::http_post(
        &server.events,
        br#"{"kind": "gaussian_noise", "severity": 2, "scope": "site-c/cam-3"}"#,
    )
    .await;
    assert!(body.contains("\"held\""), "{body}");
    // No rule for this severity: nothing changes.
    let mut events = pb::events_client::EventsClient::new(ch.clone());
    let report = |kind: &str, severity, scope: &str| pb::EventReport {
        kind: kind.into(),
        severity,
        scope: scope.into(),
        ..Default::default()
    };
    let r = events
        .report(report("fog", 1, "site-a/"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome, "no_rule");

    // A flapping fog sensor: a report every 300 ms for 4.2 s, each holding 200 ms,
    // so without hysteresis every report would start a new activation (14 of them).
    let mut outcomes = Vec::new();
    let start = Instant::now();
    for k in 0..14u32 {
        tokio::time::sleep_until((start + Duration::from_millis(300) * k).into()).await;
        let r = events
            .report(report("fog", 3, "site-a/"))
            .await
            .unwrap()
            .into_inner();
        outcomes.push(r.outcome);
    }
    let h = history(&ch).await;
    let fog = |op: &str| {
        h.iter()
            .filter(|e| e.op == op && e.who.starts_with("event:fog@site-a/"))
            .count()
    };
    // Each activation holds >= 1 s, then the rule rests >= 1 s: at most 4 in 4.2 s.
    assert!((2..=4).contains(&fog("activate")), "{outcomes:?}");
    assert!(fog("activate") + fog("extend") <= 8, "{outcomes:?}");
    assert!(outcomes.iter().any(|o| o == "cooldown"), "{outcomes:?}");
    assert!(outcomes.iter().any(|o| o == "held"), "{outcomes:?}");
    // Events are counted by kind and outcome.
    let all = common::samples(&common::http_get(&server.metrics).await);
    let cooldowns = common::sample(&all, r#"rws_events_total{kind="fog",outcome="cooldown"}"#);
    assert!(cooldowns >= 1.0);
}

#[tokio::test]
async fn bad_reports_are_refused_and_change_nothing() {
    let repo = tiny_repo();
    let (server, _rules) = with_rules(repo.path());
    let ch = server.channel().await;
    common::wait_ready(&ch).await;
    let before = (history(&ch).await, common::profile_table(&ch).await);
    let big = format!(
        r#"{{"kind": "fog", "severity": 3, "scope": "site-a/", "id": "{}"}}"#,
        "x".repeat(20_000)
    );
    let bad: [(&str, &[u8], u16); 11] = [
        ("malformed JSON", b"{\"kind\": \"fog\", ", 400),
        ("not JSON", b"fog at site a", 400),
        (
            "unknown kind",
            br#"{"kind": "volcano", "severity": 3, "scope": "site-a/"}"#,
            400,
        ),
        (
            "severity 0",
            br#"{"kind": "fog", "severity": 0, "scope": "site-a/"}"#,
            400,
        ),
        (
            "severity 6",
            br#"{"kind": "fog", "severity": 6, "scope": "site-a/"}"#,
            400,
        ),
        (
            "negative ttl",
            br#"{"kind": "fog", "severity": 3, "scope": "site-a/", "ttl_seconds": -5}"#,
            400,
        ),
        (
            "absurd ttl",
            br#"{"kind": "fog", "severity": 3, "scope": "site-a/", "ttl_seconds": 1e12}"#,
            400,
        ),
        (
            "bad scope",
            br#"{"kind": "fog", "severity": 3, "scope": "/site a"}"#,
            400,
        ),
        (
            "unknown field",
            br#"{"kind": "fog", "severity": 3, "scope": "site-a/", "wind": 4}"#,
            400,
        ),
        (
            "bad time",
            br#"{"kind": "fog", "severity": 3, "scope": "site-a/", "observed_at": "dawn"}"#,
            400,
        ),
        ("oversized body", big.as_bytes(), 413),
    ];
    for (what, body, want) in bad {
        let (code, text) = common::http_post(&server.events, body).await;
        assert_eq!(code, want, "{what}: {text}");
        assert!(text.len() < 1000, "{what}: the message echoes too much");
    }
    let mut events = pb::events_client::EventsClient::new(ch.clone());
    for (kind, severity, scope, ttl) in [
        ("volcano", 3, "site-a/", 0.0),
        ("fog", 300, "site-a/", 0.0),
        ("fog", 3, "", 0.0),
        ("fog", 3, "site-a/", f64::NAN),
    ] {
        let err = events
            .report(pb::EventReport {
                kind: kind.into(),
                severity,
                scope: scope.into(),
                ttl_seconds: ttl,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{kind} {severity} {scope:?} {ttl}"
        );
    }
    let after = (history(&ch).await, common::profile_table(&ch).await);
    assert_eq!(
        before, after,
        "a refused report changed the state or the trail"
    );
    let listed = rws::server::admin_client(ch.clone(), None)
        .unwrap()
        .list_activations(pb::ListActivationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.activations.is_empty());
}
