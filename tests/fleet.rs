//! Fleet mode over a real etcd (Debian's etcd-server, started here on loopback
//! ports): replicas converge, survive SIGKILL, ride out an etcd outage, and
//! concurrent admins never lose an update silently.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{RwsProcess, refs, tensor_request, tiny_repo};
use rws::serve::fleet::EtcdUrl;
use rws::server::{admin_client, pb};
use tonic::Code;
use tonic::transport::Channel;

/// An etcd server on free loopback ports, killed on drop.
struct Etcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// None when etcd is not installed (and RWS_REQUIRE_ETCD is not set).
    fn start() -> Option<Etcd> {
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(
                std::env::var("RWS_REQUIRE_ETCD").as_deref() != Ok("1"),
                "etcd is not installed: apt-get install etcd-server"
            );
            eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
            return None;
        }
        let mut e = Etcd {
            child: None,
            data: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        e.run();
        Some(e)
    }

    fn run(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.data.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(Instant::now() < until, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.client_port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn replica(repo: &Path, url: &str, id: &str) -> RwsProcess {
    RwsProcess::start(&[
        "--repo",
        repo.to_str().unwrap(),
        "--model",
        common::MODEL,
        "--state",
        url,
        "--replica-id",
        id,
    ])
}

fn put(name: &str, sigs: &[(&str, f32)], replace: bool, wait_fleet: bool) -> pb::PutProfileRequest {
    pb::PutProfileRequest {
        name: name.into(),
        signatures: refs(sigs),
        replace,
        wait_fleet,
    }
}

/// Waits until every replica lists the same profiles and default.
async fn converged(channels: &[Channel]) -> (Vec<(String, Vec<(String, f32)>)>, String) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let first = common::profile_table(&channels[0]).await;
        let mut same = true;
        for ch in &channels[1..] {
            same &= common::profile_table(ch).await == first;
        }
        if same {
            return first;
        }
        assert!(Instant::now() < until, "replicas did not converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_change_on_one_replica_reaches_all_three() {
    let Some(etcd) = Etcd::start() else { return };
    let repo = tiny_repo();
    let url = etcd.url("converge");
    let rs: Vec<RwsProcess> = (0..3)
        .map(|i| replica(repo.path(), &url, &format!("r{i}")))
        .collect();
    let mut chs = Vec::new();
    for r in &rs {
        chs.push(r.channel().await);
    }
    // The first replica seeded etcd with its auto-profiles; all agree on them.
    let (seeded, default) = converged(&chs).await;
    assert_eq!(default, "clean");
    assert!(seeded.iter().any(|(n, _)| n == "fog"), "{seeded:?}");

    // How many stems each replica has folded so far.
    let folds = |r: &RwsProcess| {
        let url = r.metrics.clone();
        async move {
            let all = common::samples(&common::http_get(&url).await);
            let count = all
                .iter()
                .find(|(n, _)| n == "rws_patch_apply_seconds_count");
            count.map_or(0.0, |(_, v)| *v)
        }
    };
    let mut folded = Vec::new();
    for r in &rs {
        folded.push(folds(r).await);
    }
    // wait_fleet waits for a replica that cannot apply the change yet: r2 is
    // stopped (well within its 5 s lease, so it stays registered) until the
    // call has been seen waiting for it.
    rs[2].signal("STOP");
    let mut admin = admin_client(chs[0].clone(), None).unwrap();
    let call = admin.put_profile(put("storm", &[("fog", 0.5), ("rain", 0.5)], false, true));
    tokio::pin!(call);
    let early = tokio::time::timeout(Duration::from_millis(500), &mut call).await;
    rs[2].signal("CONT");
    assert!(
        early.is_err(),
        "wait_fleet returned while a replica was stopped: {early:?}"
    );
    let change = call.await.unwrap().into_inner();
    assert!(change.revision > 0);
    // wait_fleet: every replica has it when the call returns, without polling.
    for ch in &chs {
        let (ps, _) = common::profile_table(ch).await;
        assert!(ps.iter().any(|(n, _)| n == "storm"), "{ps:?}");
    }
    // The kernel ran once per replica for the new profile: the writer's check
    // before the etcd write is the stem its reconcile then published.
    for (r, before) in rs.iter().zip(&folded) {
        assert_eq!(folds(r).await - before, 1.0, "stems folded for one put");
    }
    admin_client(chs[1].clone(), None)
        .unwrap()
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "storm".into(),
            wait_fleet: true,
        })
        .await
        .unwrap();
    let mut answers = Vec::new();
    for ch in &chs {
        assert_eq!(common::profile_table(ch).await.1, "storm");
        let r = common::InferenceClient::new(ch.clone())
            .classify(tensor_request(5, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.profile, "storm");
        answers.push(common::bits(&r.logits));
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "replicas disagree"
    );

    // Fleet status sees three live replicas at the latest revision.
    let (latest, replicas) = rws::serve::fleet::status(&url.parse::<EtcdUrl>().unwrap())
        .await
        .unwrap();
    assert_eq!(replicas.len(), 3);
    assert!(
        replicas
            .iter()
            .all(|r| r.applied_revision >= latest && r.error.is_none()),
        "{replicas:?}"
    );

    // A replica that shuts down revokes its lease: it leaves the list at once,
    // not when the 5 s lease would have expired.
    let mut rs = rs;
    let mut leaving = rs.pop().unwrap();
    leaving.signal("TERM");
    let exit = Instant::now() + Duration::from_secs(15);
    while leaving.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < exit, "the replica did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, replicas) = rws::serve::fleet::status(&url.parse::<EtcdUrl>().unwrap())
        .await
        .unwrap();
    let ids: Vec<_> = replicas.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}: the replica's key outlived its exit");
    assert!(!ids.contains(&"r2"), "{ids:?}");
}

#[tokio::test]
async fn a_replica_killed_during_a_storm_converges_after_restart() {
    let Some(etcd) = Etcd::start() else { return };
    let repo = tiny_repo();
    let url = etcd.url("storm");
    let r0 = replica(repo.path(), &url, "r0");
    let r1 = replica(repo.path(), &url, "r1");
    let mut r2 = replica(repo.path(), &url, "r2");
    let ch0 = r0.channel().await;
    let storm = {
        let mut admin = admin_client(ch0.clone(), None).unwrap();
        tokio::spawn(async move {
            for i in 0..60 {
                let alpha = 0.01 * (i % 50) as f32;
                admin
                    .put_profile(put(&format!("p{i}"), &[("fog", alpha)], false, false))
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    r2.signal("KILL");
    let _ = r2.child.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    r2 = replica(repo.path(), &url, "r2");
    storm.await.unwrap();
    let chs = vec![ch0, r1.channel().await, r2.channel().await];
    let (ps, _) = converged(&chs).await;
    assert_eq!(ps.iter().filter(|(n, _)| n.starts_with('p')).count(), 60);
    let parsed: EtcdUrl = url.parse().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (latest, replicas) = rws::serve::fleet::status(&parsed).await.unwrap();
        // The killed r2's lease may linger a few seconds; the restarted one counts.
        let live: Vec<_> = replicas
            .iter()
            .filter(|r| r.applied_revision >= latest)
            .collect();
        if live.len() >= 3 {
            break;
        }
        assert!(
            Instant::now() < until,
            "not converged: {replicas:?} at {latest}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_etcd_outage_fails_no_inference_and_resyncs() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let repo = tiny_repo();
    let url = etcd.url("outage");
    let rs: Vec<RwsProcess> = (0..2)
        .map(|i| replica(repo.path(), &url, &format!("r{i}")))
        .collect();
    let mut chs = Vec::new();
    for r in &rs {
        chs.push(r.channel().await);
    }
    let before = converged(&chs).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = chs
        .iter()
        .map(|ch| {
            let (mut c, stop) = (common::InferenceClient::new(ch.clone()), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match c.classify(tensor_request(ok, "fog")).await {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            })
        })
        .collect();
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Changes are refused, not half-made; health says so; the state stands.
    let err = admin_client(chs[0].clone(), None)
        .unwrap()
        .put_profile(put("storm", &[("fog", 0.5)], false, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let fleet_health = tonic_health::pb::health_client::HealthClient::new(chs[0].clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "rws.fleet".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        fleet_health,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    tokio::time::sleep(Duration::from_secs(7)).await;
    for ch in &chs {
        assert_eq!(common::profile_table(ch).await, before);
    }
    etcd.run();
    // Back: a change made now reaches both replicas.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = admin_client(chs[0].clone(), None)
            .unwrap()
            .put_profile(put("storm", &[("fog", 0.5)], false, true))
            .await;
        match r {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("no resync: {e:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in traffic {
        let (ok, failed) = t.await.unwrap();
        assert!(ok > 100, "too little traffic: {ok}");
        assert_eq!(failed, 0, "inference failed during the outage");
    }
    let (ps, _) = converged(&chs).await;
    assert!(ps.iter().any(|(n, _)| n == "storm"));
}

#[tokio::test]
async fn concurrent_admins_never_lose_an_update_silently() {
    let Some(etcd) = Etcd::start() else { return };
    let repo = tiny_repo();
    let url = etcd.url("conflict");
    let (ra, rb) = (
        replica(repo.path(), &url, "a"),
        replica(repo.path(), &url, "b"),
    );
    let (cha, chb) = (ra.channel().await, rb.channel().await);
    converged(&[cha.clone(), chb.clone()]).await;
    let (mut a, mut b) = (
        admin_client(cha.clone(), None).unwrap(),
        admin_client(chb.clone(), None).unwrap(),
    );
    for i in 0..10 {
        let name = format!("c{i}");
        // Both create the same profile with different definitions at once.
        let (ra, rb) = tokio::join!(
            a.put_profile(put(&name, &[("fog", 0.25)], false, false)),
            b.put_profile(put(&name, &[("rain", 0.75)], false, false)),
        );
        let winner = match (&ra, &rb) {
            (Ok(_), Err(e)) => {
                assert!(
                    matches!(e.code(), Code::AlreadyExists | Code::Aborted),
                    "{e:?}"
                );
                ("fog".to_string(), 0.25)
            }
            (Err(e), Ok(_)) => {
                assert!(
                    matches!(e.code(), Code::AlreadyExists | Code::Aborted),
                    "{e:?}"
                );
                ("rain".to_string(), 0.75)
            }
            other => panic!("exactly one must win: {other:?}"),
        };
        let (ps, _) = converged(&[cha.clone(), chb.clone()]).await;
        let got = ps.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(
            got.1,
            vec![winner],
            "the acknowledged definition must stand"
        );
    }
    // Two replacements at once from the same view: one wins and the other is
    // told to retry, or, if one replica applied the other's change before it
    // took its view, both apply in revision order. Never two silent successes
    // from one view: across the rounds, the refusal must show up.
    let mut refused = 0;
    for i in 0..10 {
        let name = format!("c{i}");
        converged(&[cha.clone(), chb.clone()]).await;
        let (ra, rb) = tokio::join!(
            a.put_profile(put(&name, &[("noise", 0.1)], true, false)),
            b.put_profile(put(&name, &[("noise", 0.2)], true, false)),
        );
        let stands = match (&ra, &rb) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                assert_eq!(e.code(), Code::Aborted, "{e:?}");
                assert!(e.message().contains("retry"), "{e:?}");
                refused += 1;
                if ra.is_ok() { 0.1 } else { 0.2 }
            }
            (Ok(x), Ok(y)) => {
                let (x, y) = (x.get_ref().revision, y.get_ref().revision);
                assert_ne!(x, y, "two changes at one revision");
                if x > y { 0.1 } else { 0.2 }
            }
            other => panic!("one replacement must apply: {other:?}"),
        };
        let (ps, _) = converged(&[cha.clone(), chb.clone()]).await;
        let got = ps.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(
            got.1,
            vec![("noise".to_string(), stands)],
            "the last acknowledged replacement must stand"
        );
    }
    assert!(refused > 0, "no concurrent replacement was ever refused");
}

#[tokio::test]
async fn an_upload_in_fleet_mode_is_refused_and_changes_nothing() {
    let Some(etcd) = Etcd::start() else { return };
    let repo = tiny_repo();
    let url = etcd.url("upload");
    let r = replica(repo.path(), &url, "r0");
    let ch = r.channel().await;
    let mut admin = admin_client(ch.clone(), None).unwrap();
    let fleet_url = url.parse::<EtcdUrl>().unwrap();
    let view = || async {
        let signatures = admin_client(ch.clone(), None)
            .unwrap()
            .list_signatures(pb::ListSignaturesRequest {})
            .await
            .unwrap()
            .into_inner();
        let (revision, _) = rws::serve::fleet::status(&fleet_url).await.unwrap();
        (common::profile_table(&ch).await, signatures, revision)
    };
    let before = view().await;
    let bytes = std::fs::read(repo.path().join("tiny/signatures/fog.rws.safetensors")).unwrap();
    let err = admin
        .load_signature(pb::LoadSignatureRequest {
            name: "fog2".into(),
            source: Some(pb::load_signature_request::Source::Data(bytes)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("by repository path"), "{err:?}");
    assert_eq!(view().await, before, "the refused upload changed something");
}

#[tokio::test]
async fn a_replica_whose_copy_differs_does_not_serve_it_and_says_so() {
    let Some(etcd) = Etcd::start() else { return };
    let url = etcd.url("verify");
    let (repo_a, repo_b) = (tiny_repo(), tiny_repo());
    // The same path holds different bytes on the two replicas.
    let sigs = |r: &tempfile::TempDir| r.path().join(common::MODEL).join("signatures");
    std::fs::copy(
        sigs(&repo_a).join("fog.rws.safetensors"),
        sigs(&repo_a).join("extra.bin"),
    )
    .unwrap();
    std::fs::copy(
        sigs(&repo_b).join("rain.rws.safetensors"),
        sigs(&repo_b).join("extra.bin"),
    )
    .unwrap();
    let (ra, rb) = (
        replica(repo_a.path(), &url, "a"),
        replica(repo_b.path(), &url, "b"),
    );
    let (cha, chb) = (ra.channel().await, rb.channel().await);
    converged(&[cha.clone(), chb.clone()]).await;
    let mut admin = admin_client(cha.clone(), None).unwrap();
    admin
        .load_signature(pb::LoadSignatureRequest {
            name: "extra".into(),
            source: Some(pb::load_signature_request::Source::Path(
                "signatures/extra.bin".into(),
            )),
            wait_fleet: true,
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .put_profile(put("extra", &[("extra", 0.5)], false, true))
        .await
        .unwrap();
    assert!(
        common::profile_table(&cha)
            .await
            .0
            .iter()
            .any(|(n, _)| n == "extra")
    );
    assert!(
        !common::profile_table(&chb)
            .await
            .0
            .iter()
            .any(|(n, _)| n == "extra"),
        "b must not serve it"
    );
    let err = common::InferenceClient::new(chb)
        .classify(tensor_request(1, "extra"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let (_, replicas) = rws::serve::fleet::status(&url.parse::<EtcdUrl>().unwrap())
        .await
        .unwrap();
    let b = replicas.iter().find(|r| r.id == "b").unwrap();
    let a = replicas.iter().find(|r| r.id == "a").unwrap();
    assert!(a.error.is_none(), "{a:?}");
    assert!(
        b.error.as_deref().is_some_and(|e| e.contains("extra")),
        "{b:?}"
    );
}

#[tokio::test]
async fn replicas_start_and_end_an_activation_at_the_same_instants() {
    let Some(etcd) = Etcd::start() else { return };
    let repo = tiny_repo();
    let url = etcd.url("activations");
    let (ra, rb) = (
        replica(repo.path(), &url, "a"),
        replica(repo.path(), &url, "b"),
    );
    let chs = [ra.channel().await, rb.channel().await];
    converged(&chs).await;
    let ask = |ch: &Channel, profile: &str| {
        let mut c = common::InferenceClient::new(ch.clone());
        let req = pb::ClassifyRequest {
            source: "site-a/cam-1".into(),
            ..tensor_request(6, profile)
        };
        async move { c.classify(req).await.unwrap().into_inner() }
    };
    let fog = common::bits(&ask(&chs[0], "fog").await.logits);
    let clean = common::bits(&ask(&chs[0], "clean").await.logits);
    for ch in &chs {
        assert_eq!(common::bits(&ask(ch, "").await.logits), clean, "before");
    }
    let a = admin_client(chs[0].clone(), None)
        .unwrap()
        .activate(pb::ActivateRequest {
            scope: "site-a/".into(),
            profile: "fog".into(),
            ttl_seconds: 1.5,
            reason: "fog warning".into(),
            wait_fleet: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(a.revision > 0);
    // Both replicas, through the activation and past its end: each answer is
    // the activation's until its end and the default from then on.
    let stop = Instant::now() + Duration::from_millis(2500);
    let mut seen = [[0; 2]; 2];
    while Instant::now() < stop {
        for (i, ch) in chs.iter().enumerate() {
            let sent = rws::serve::activation::now_ms();
            let r = ask(ch, "").await;
            let done = rws::serve::activation::now_ms();
            let got = common::bits(&r.logits);
            if got == fog {
                assert!(sent < a.until_unix_ms, "replica {i}: fog after the end");
                assert_eq!(r.activation_id, a.id);
                seen[i][0] += 1;
            } else {
                assert_eq!(got, clean, "replica {i}");
                assert!(
                    done >= a.until_unix_ms,
                    "replica {i}: default before the end"
                );
                seen[i][1] += 1;
            }
        }
    }
    assert!(seen.iter().flatten().all(|&n| n > 0), "{seen:?}");
    // The fleet's audit trail, read through the other replica: the activation
    // once, at its revision, and its clean-up once although both replicas try.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let history = admin_client(chs[1].clone(), None)
        .unwrap()
        .history(pb::HistoryRequest {
            scope: String::new(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ops = |op: &str| history.iter().filter(|e| e.op == op).collect::<Vec<_>>();
    let activated = ops("activate");
    assert_eq!(activated.len(), 1, "{history:?}");
    assert_eq!(activated[0].revision, a.revision);
    assert_eq!(
        (activated[0].scope.as_str(), activated[0].why.as_str()),
        ("site-a/", "fog warning")
    );
    assert_eq!(ops("expire").len(), 1, "{history:?}");
}
