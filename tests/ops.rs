//! Operating the server as a process: health through start-up and SIGTERM
//! drain, Prometheus metrics, admin tokens, TLS, the config file, JSON logs,
//! and state that survives restarts and SIGKILL, and whose changes are refused,
//! with nothing moved, while its directory cannot be written.

mod common;

use std::time::{Duration, Instant};

use common::{RwsProcess, sample, samples, tensor_request, tiny_repo};
use rws::serve::engine::EngineOptions;
use rws::serve::state::StateDir;
use rws::server::{admin_client, pb};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(channel: &Channel) -> ServingStatus {
    let r = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "rws.v1.Inference".into(),
        })
        .await
        .unwrap();
    r.into_inner().status()
}

async fn wait_serving(channel: &Channel) {
    let until = Instant::now() + Duration::from_secs(30);
    while health(channel).await != ServingStatus::Serving {
        assert!(Instant::now() < until, "never became SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn repo_args(repo: &std::path::Path) -> Vec<String> {
    vec![
        "--repo".into(),
        repo.display().to_string(),
        "--model".into(),
        common::MODEL.into(),
    ]
}

fn start(repo: &std::path::Path, extra: &[&str]) -> RwsProcess {
    let mut args = repo_args(repo);
    args.extend(extra.iter().map(|s| s.to_string()));
    RwsProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// SIGTERM under load, checked from outside as a load balancer would see it:
/// health turns NOT_SERVING at once while every request sent during the grace
/// period is still answered; after it clients get UNAVAILABLE (never a reset
/// or INTERNAL), an open health `Watch` ends, and the process exits 0 within
/// grace + drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_serves_through_the_grace_then_refuses_cleanly_and_exits() {
    use tokio_stream::StreamExt;
    let repo = tiny_repo();
    let grace = Duration::from_millis(1500);
    let mut p = start(
        repo.path(),
        &["--drain-grace-ms", "1500", "--drain-timeout-ms", "3000"],
    );
    let channel = p.channel().await;
    assert_eq!(
        health(&channel).await,
        ServingStatus::NotServing,
        "before warm-up"
    );
    wait_serving(&channel).await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    // Eight clients, each on its own connection, until the server is gone.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (addr, stop) = (p.addr.clone(), stop.clone());
            tokio::spawn(async move {
                let channel = Channel::from_shared(addr).unwrap().connect().await.unwrap();
                let mut c = common::InferenceClient::new(channel);
                let mut sent = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let at = Instant::now();
                    let (code, msg) = match c.classify(tensor_request(i, "")).await {
                        Ok(_) => (Code::Ok, String::new()),
                        Err(s) => (s.code(), s.message().to_string()),
                    };
                    sent.push((at, code, msg));
                    if code != Code::Ok {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                sent
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = Instant::now();
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        health(&channel).await,
        ServingStatus::NotServing,
        "NOT_SERVING at once"
    );
    let mut watched = Vec::new();
    while let Some(Ok(r)) = watch.next().await {
        watched.push(r.status());
    }
    assert_eq!(watched, [ServingStatus::NotServing], "then the Watch ends");
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            term.elapsed() < grace + Duration::from_secs(5),
            "did not exit within grace + drain timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut during, mut after) = (0, 0);
    for c in clients {
        for (at, code, msg) in c.await.unwrap() {
            // Sent before the grace period ended, with a margin for the
            // signal's delivery: answered.
            if at < term + grace - Duration::from_millis(100) {
                assert_eq!(
                    code,
                    Code::Ok,
                    "a request sent {:?} after SIGTERM",
                    at.saturating_duration_since(term)
                );
                during += usize::from(at > term);
            } else {
                // tonic's client says CANCELLED, "operation was canceled", for a
                // request it had queued on a connection as that closed: it was
                // never sent (hyper's `is_canceled`), so the server never saw it.
                let unsent = code == Code::Cancelled && msg == "operation was canceled";
                assert!(
                    matches!(code, Code::Ok | Code::Unavailable) || unsent,
                    "after the grace: {code:?} {msg}"
                );
                after += usize::from(code == Code::Unavailable);
            }
        }
    }
    assert!(
        during > 50,
        "only {during} requests during the grace period"
    );
    assert!(after > 0, "no client saw the server go");
}

#[tokio::test]
async fn metrics_are_scraped_and_parsed() {
    let repo = tiny_repo();
    let p = start(repo.path(), &[]);
    let channel = p.channel().await;
    wait_serving(&channel).await;
    let mut c = common::InferenceClient::new(channel.clone());
    for i in 0..3 {
        c.classify(tensor_request(i, "fog")).await.unwrap();
    }
    let err = c.classify(tensor_request(0, "nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut admin = admin_client(channel.clone(), None).unwrap();
    admin
        .put_profile(pb::PutProfileRequest {
            name: "storm".into(),
            signatures: common::refs(&[("fog", 0.5), ("rain", 0.5)]),
            replace: false,
            ..Default::default()
        })
        .await
        .unwrap();

    let text = common::http_get(&p.metrics).await;
    let all = samples(&text);
    assert_eq!(
        sample(&all, r#"rws_requests_total{profile="fog",status="ok"}"#),
        3.0
    );
    assert_eq!(
        sample(
            &all,
            r#"rws_requests_total{profile="unknown",status="not_found"}"#
        ),
        1.0
    );
    assert!(sample(&all, r#"rws_request_duration_seconds_count{profile="fog"}"#) >= 3.0);
    assert!(sample(&all, "rws_batch_size_count") >= 1.0);
    assert!(sample(&all, "rws_patch_apply_seconds_count") >= 1.0);
    assert_eq!(sample(&all, "rws_queue_depth"), 0.0);
    // The kernels' instruction set, as this test reads the CPU itself.
    #[cfg(target_arch = "x86_64")]
    let isa = {
        use std::arch::is_x86_feature_detected as has;
        match (
            has!("avx2") && has!("fma"),
            has!("avx512f") && has!("avx512vl"),
        ) {
            (true, true) => "avx512",
            (true, false) => "avx2",
            _ => "portable",
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let isa = "portable";
    assert_eq!(
        sample(&all, &format!(r#"rws_cpu_kernel_info{{isa="{isa}"}}"#)),
        1.0
    );
    // clean + fog + noise + rain + storm
    assert_eq!(sample(&all, "rws_profiles"), 5.0);
    assert!(sample(&all, "rws_resident_profiles") >= 2.0);
    assert_eq!(sample(&all, "rws_signatures"), 3.0);
    assert!(sample(&all, "rws_signature_bytes") > 0.0);
    assert!(
        text.contains("# TYPE rws_patch_apply_seconds histogram"),
        "{text}"
    );
}

#[tokio::test]
async fn admin_requires_the_token_when_one_is_set() {
    let repo = tiny_repo();
    let token = repo.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let p = start(
        repo.path(),
        &["--admin-token-file", token.to_str().unwrap()],
    );
    let channel = p.channel().await;
    let list = |t: Option<&'static str>| {
        let channel = channel.clone();
        async move {
            admin_client(channel, t)
                .unwrap()
                .list_profiles(pb::ListProfilesRequest {})
                .await
        }
    };
    assert_eq!(list(None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(
        list(Some("wrong")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        list(Some("s3cret-tok")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let ok = list(Some("s3cret-token")).await.unwrap().into_inner();
    assert_eq!(ok.default_profile, "clean");
    // A refused write changed nothing.
    let err = admin_client(channel.clone(), Some("wrong"))
        .unwrap()
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "fog".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let after = list(Some("s3cret-token")).await.unwrap().into_inner();
    assert_eq!(
        (after.default_profile, after.generation),
        ("clean".into(), ok.generation)
    );
    // Inference needs no token.
    common::InferenceClient::new(channel)
        .classify(tensor_request(1, "fog"))
        .await
        .unwrap();
}

#[tokio::test]
async fn state_survives_a_restart() {
    let repo = tiny_repo();
    let state = repo.path().join("state");
    let state_arg = state.to_str().unwrap();
    let p = start(repo.path(), &["--state-dir", state_arg]);
    let channel = p.channel().await;
    let mut admin = admin_client(channel.clone(), None).unwrap();
    // An uploaded copy of fog under another name, a mixed profile, a new default.
    let bytes = std::fs::read(repo.path().join("tiny/signatures/fog.rws.safetensors")).unwrap();
    admin
        .load_signature(pb::LoadSignatureRequest {
            name: "fog2".into(),
            source: Some(pb::load_signature_request::Source::Data(bytes)),
            allow_transfer: false,
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .put_profile(pb::PutProfileRequest {
            name: "storm".into(),
            signatures: common::refs(&[("fog2", 0.7), ("rain", 0.4)]),
            replace: false,
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .delete_profile(pb::DeleteProfileRequest {
            name: "noise".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .set_default_profile(pb::SetDefaultProfileRequest {
            name: "storm".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = common::profile_table(&channel).await;
    let mut c = common::InferenceClient::new(channel.clone());
    let logits = common::logits(&mut c, tensor_request(3, "")).await;
    drop(p);

    let p = start(repo.path(), &["--state-dir", state_arg]);
    let channel = p.channel().await;
    assert_eq!(common::profile_table(&channel).await, before);
    let mut c = common::InferenceClient::new(channel);
    assert_eq!(common::logits(&mut c, tensor_request(3, "")).await, logits);
}

/// Every file under `dir` with its bytes, sorted by path.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_signature_changed_on_disk_stops_the_restart_and_changes_nothing() {
    let repo = tiny_repo();
    let state = repo.path().join("state");
    let state_arg = state.to_str().unwrap();
    let p = start(repo.path(), &["--state-dir", state_arg]);
    let channel = p.channel().await;
    admin_client(channel.clone(), None)
        .unwrap()
        .put_profile(pb::PutProfileRequest {
            name: "storm".into(),
            signatures: common::refs(&[("fog", 0.7)]),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = common::profile_table(&channel).await;
    let mut c = common::InferenceClient::new(channel);
    let logits = common::logits(&mut c, tensor_request(3, "storm")).await;
    drop(p);

    // fog's file now holds another valid signature: its SHA-256 is not the recorded one.
    let sigs = repo.path().join(common::MODEL).join("signatures");
    let fog = sigs.join("fog.rws.safetensors");
    let original = std::fs::read(&fog).unwrap();
    std::fs::copy(sigs.join("rain.rws.safetensors"), &fog).unwrap();
    let saved = files(&state);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rws"))
        .arg("serve")
        .args(repo_args(repo.path()))
        .args(["--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .args([
            "--events-addr",
            "127.0.0.1:0",
            "--console-addr",
            "127.0.0.1:0",
        ])
        .args(["--state-dir", state_arg])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("the server started with a signature that is not the recorded one");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("put the original back"), "{err}");
    assert_eq!(files(&state), saved, "the refused start changed the state");

    // With the original back, the same state is served again.
    std::fs::write(&fog, original).unwrap();
    let p = start(repo.path(), &["--state-dir", state_arg]);
    let channel = p.channel().await;
    assert_eq!(common::profile_table(&channel).await, before);
    let mut c = common::InferenceClient::new(channel);
    assert_eq!(
        common::logits(&mut c, tensor_request(3, "storm")).await,
        logits
    );
}

/// Runs a command a fault injection needs (chattr, mount); fails the test if it
/// cannot, since a fault that was never put in proves nothing.
/// Whether this process may inject the state-directory faults (root); when not,
/// the test says it was skipped, unless RWS_REQUIRE_ROOT is set.
fn may_inject_faults() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("RWS_REQUIRE_ROOT").as_deref() != Ok("1"),
        "the state-directory fault tests need root (chattr +i, mount)"
    );
    eprintln!("skipped: the state-directory fault tests need root (chattr +i, mount)");
    false
}

fn sh(argv: &[&str]) {
    let status = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        status.success(),
        "{argv:?}: {status} (needs root: CAP_LINUX_IMMUTABLE, CAP_SYS_ADMIN)"
    );
}

/// Takes a fault out of the state directory when dropped, even when the test
/// panics, so that it never outlives the test (nor blocks the temp dir's removal).
struct Undo(Vec<String>);

impl Undo {
    fn new(argv: &[&str]) -> Undo {
        Undo(argv.iter().map(|s| s.to_string()).collect())
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.0[0])
            .args(&self.0[1..])
            .status();
    }
}

/// What Admin shows of the profile state: [`common::profile_table`], the
/// generation and the loaded signatures.
async fn admin_view(
    server: &common::TestServer,
) -> (Vec<(String, Vec<(String, f32)>)>, String, u64, Vec<String>) {
    let (profiles, default) = common::profile_table(&server.channel).await;
    let mut admin = server.admin();
    let generation = admin
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .generation;
    let s = admin
        .list_signatures(pb::ListSignaturesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut sigs: Vec<_> = s.signatures.into_iter().map(|s| s.name).collect();
    sigs.sort();
    (profiles, default, generation, sigs)
}

/// The README's promise for a state directory that cannot be written: each
/// kind of change (a profile, the default, an upload) is refused with
/// UNAVAILABLE naming the directory and what to check, nothing moves (Admin's
/// view, `state.json`, `uploads/`, the audit trail), inference goes on,
/// and the same changes go through once `unwritable`'s fault is taken out.
async fn refuses_changes_while_unwritable(
    repo: &std::path::Path,
    state: &std::path::Path,
    unwritable: impl FnOnce() -> Undo,
) {
    let opts = EngineOptions {
        state: Some(StateDir::new(state)),
        ..Default::default()
    };
    let server = common::TestServer::start(repo, opts).await;
    let mut admin = server.admin();
    let sigs = repo.join(common::MODEL).join("signatures");
    let upload = |name: &str, file: &str| pb::LoadSignatureRequest {
        name: name.into(),
        source: Some(pb::load_signature_request::Source::Data(
            std::fs::read(sigs.join(file)).unwrap(),
        )),
        ..Default::default()
    };
    // One of each on disk first: an upload, a profile using it, a default.
    admin
        .load_signature(upload("fog2", "fog.rws.safetensors"))
        .await
        .unwrap();
    let storm = pb::PutProfileRequest {
        name: "storm".into(),
        signatures: common::refs(&[("fog2", 0.7), ("rain", 0.4)]),
        ..Default::default()
    };
    admin.put_profile(storm).await.unwrap();
    let storm_default = pb::SetDefaultProfileRequest {
        name: "storm".into(),
        ..Default::default()
    };
    admin.set_default_profile(storm_default).await.unwrap();
    let view = admin_view(&server).await;
    let saved = files(state);
    let mut c = server.inference();
    let logits = common::logits(&mut c, tensor_request(3, "")).await;

    let fault = unwritable();
    let calm = pb::PutProfileRequest {
        name: "calm".into(),
        signatures: common::refs(&[("noise", 0.5)]),
        ..Default::default()
    };
    let fog_default = pb::SetDefaultProfileRequest {
        name: "fog".into(),
        ..Default::default()
    };
    let rain2 = upload("rain2", "rain.rws.safetensors");
    let refusals = [
        admin.put_profile(calm.clone()).await.map(drop),
        admin
            .set_default_profile(fog_default.clone())
            .await
            .map(drop),
        admin.load_signature(rain2.clone()).await.map(drop),
    ];
    for r in refusals {
        let err = r.expect_err("a change was acknowledged without being written");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        let (msg, dir) = (err.message(), state.display());
        assert!(
            msg.starts_with(&format!("cannot write the state directory {dir} ("))
                && msg.ends_with("check its permissions and free space"),
            "the refusal does not name the state directory and what to check: {err:?}"
        );
    }
    assert_eq!(admin_view(&server).await, view);
    // The state is written before the trail: a refused change has no line.
    assert_eq!(files(state), saved, "a refused change moved a state file");
    assert_eq!(common::logits(&mut c, tensor_request(3, "")).await, logits);

    drop(fault);
    admin.put_profile(calm).await.unwrap();
    admin.set_default_profile(fog_default).await.unwrap();
    admin.load_signature(rain2).await.unwrap();
    let (profiles, default, generation, sigs) = admin_view(&server).await;
    assert!(profiles.iter().any(|p| p.0 == "calm"), "{profiles:?}");
    assert_eq!((default.as_str(), generation), ("fog", view.2 + 3));
    assert!(sigs.contains(&"rain2".to_string()), "{sigs:?}");
    server.stop().await;
}

/// A read-only state directory: `state/` made immutable (`chattr +i`), which
/// refuses root, as a mode of 0o555 refuses anyone else, the creation of the
/// temp files every write starts with. Files already open stay writable, as
/// with a read-only directory (the audit trail). `uploads/` stays writable, so
/// an upload's bytes are stored before its state is refused, and must go again.
#[tokio::test]
async fn a_read_only_state_dir_refuses_changes_and_nothing_moves() {
    if !may_inject_faults() {
        return;
    }
    let repo = tiny_repo();
    let state = repo.path().join("state");
    let top = state.display().to_string();
    refuses_changes_while_unwritable(repo.path(), &state, || {
        let undo = Undo::new(&["chattr", "-i", &top]);
        sh(&["chattr", "+i", &top]);
        undo
    })
    .await;
}

/// A full state directory: the state lives on a 1 MiB tmpfs which, once the
/// server runs, another file fills until the kernel says ENOSPC. Writes to it
/// then fail as on any full disk, the new `state.json` and an upload's bytes alike.
#[tokio::test]
async fn a_full_state_dir_refuses_changes_and_nothing_moves() {
    if !may_inject_faults() {
        return;
    }
    let repo = tiny_repo();
    let disk = repo.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let disk_arg = disk.to_str().unwrap();
    sh(&["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk_arg]);
    // Lazily, so that it goes even while a panicking test's server holds files.
    let _unmount = Undo::new(&["umount", "-l", disk_arg]);
    let filler = disk.join("filler");
    refuses_changes_while_unwritable(repo.path(), &disk.join("state"), || {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let err = loop {
            if let Err(e) = f.write_all(&[0; 4096]) {
                break e;
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
        Undo::new(&["rm", filler.to_str().unwrap()])
    })
    .await;
}

#[tokio::test]
async fn sigkill_during_a_storm_of_changes_loses_no_acknowledged_change() {
    let repo = tiny_repo();
    let state = repo.path().join("state");
    let state_arg = state.to_str().unwrap().to_string();
    let p = start(repo.path(), &["--state-dir", &state_arg]);
    let channel = p.channel().await;
    let storm = {
        let mut admin = admin_client(channel.clone(), None).unwrap();
        tokio::spawn(async move {
            // (profiles acknowledged, default acknowledged)
            let mut acked: Vec<String> = Vec::new();
            let mut default = "clean".to_string();
            for i in 0.. {
                let name = format!("p{i}");
                let put = admin
                    .put_profile(pb::PutProfileRequest {
                        name: name.clone(),
                        signatures: common::refs(&[("fog", 0.01 * (i % 100) as f32)]),
                        replace: false,
                        ..Default::default()
                    })
                    .await;
                if put.is_err() {
                    break;
                }
                acked.push(name.clone());
                if admin
                    .set_default_profile(pb::SetDefaultProfileRequest {
                        name: name.clone(),
                        ..Default::default()
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                default = name;
            }
            (acked, default)
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.signal("KILL");
    let (acked, default) = storm.await.unwrap();
    assert!(acked.len() > 5, "the storm barely ran: {}", acked.len());
    drop(p);

    let p = start(repo.path(), &["--state-dir", &state_arg]);
    let channel = p.channel().await;
    let (restored, restored_default) = common::profile_table(&channel).await;
    let names: Vec<&str> = restored.iter().map(|(n, _)| n.as_str()).collect();
    for a in &acked {
        assert!(names.contains(&a.as_str()), "acknowledged {a} was lost");
    }
    // At most the one change in flight at the kill went through unacknowledged.
    let next = format!("p{}", acked.len());
    let extra: Vec<&&str> = names
        .iter()
        .filter(|n| n.starts_with('p') && !acked.iter().any(|a| a == *n))
        .collect();
    assert!(extra.is_empty() || extra == [&next.as_str()], "{extra:?}");
    let last = acked.last().unwrap();
    assert!(
        restored_default == default || restored_default == *last || restored_default == next,
        "default {restored_default}, acknowledged {default}"
    );
}

#[tokio::test]
async fn config_file_sets_flags_and_the_command_line_wins() {
    let repo = tiny_repo();
    let token = repo.path().join("token");
    std::fs::write(&token, "t0ken").unwrap();
    let config = repo.path().join("rws.toml");
    std::fs::write(
        &config,
        format!(
            "admin_token_file = {:?}\nmax_resident_profiles = 0\nno_auto_profiles = true\n",
            token.display()
        ),
    )
    .unwrap();
    // The file's max_resident_profiles = 0 is invalid; the command line overrides it.
    let p = start(
        repo.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--max-resident-profiles",
            "4",
        ],
    );
    let channel = p.channel().await;
    let err = admin_client(channel.clone(), None)
        .unwrap()
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "token from the file");
    let r = admin_client(channel, Some("t0ken"))
        .unwrap()
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.profiles.len(), 1, "no_auto_profiles from the file");
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let repo = tiny_repo();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rws"))
        .args([
            "serve",
            "--log-format",
            "json",
            "--addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "off",
            "--events-addr",
            "off",
            "--console-addr",
            "off",
        ])
        .args(repo_args(repo.path()))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(v["fields"]["message"].is_string(), "{line}");
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_certificate() {
    let repo = tiny_repo();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (repo.path().join("cert.pem"), repo.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let p = start(
        repo.path(),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    let https = p.addr.replace("http://", "https://");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(https)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    common::InferenceClient::new(channel)
        .classify(tensor_request(1, "fog"))
        .await
        .unwrap();
    // Plaintext gRPC to the TLS port fails.
    let plain = Channel::from_shared(p.addr.clone())
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => common::InferenceClient::new(ch)
            .classify(tensor_request(1, "fog"))
            .await
            .is_err(),
    };
    assert!(refused, "plaintext must not be served on a TLS port");

    // The side endpoints speak TLS with the same certificate, and the console's
    // session cookie is Secure.
    let curl = |url: &str, extra: &[&str]| {
        let port = url.rsplit(':').next().unwrap().split('/').next().unwrap();
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-i",
                "--max-time",
                "5",
                "--cacert",
                cert_path.to_str().unwrap(),
            ])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(extra)
            .arg(url.replace("127.0.0.1", "localhost"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(p.metrics.starts_with("https://"), "{}", p.metrics);
    let metrics = curl(&p.metrics, &[]);
    assert!(metrics.contains("rws_requests_total"), "{metrics}");
    let login = curl(
        &format!("{}login", p.console),
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            "{}",
        ],
    );
    let cookie = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("{login}"));
    assert!(cookie.contains("; Secure"), "{cookie}");
    let plain = curl(&p.metrics.replace("https://", "http://"), &[]);
    assert!(
        !plain.contains("rws_requests_total"),
        "plain HTTP on a TLS side port"
    );
}

/// With `--admin-client-ca`, Admin needs a client certificate that CA signed;
/// inference clients need none.
#[tokio::test]
async fn admin_can_require_a_client_certificate() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let repo = tiny_repo();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["operator".to_string()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    let path = |name: &str, pem: String| {
        let p = repo.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (cert, key) = (
        path("cert.pem", server.cert.pem()),
        path("key.pem", server.signing_key.serialize_pem()),
    );
    let ca_path = path("ca.pem", ca.pem());
    let p = start(
        repo.path(),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--admin-client-ca",
            &ca_path,
        ],
    );
    let connect = |identity: Option<tonic::transport::Identity>| {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(server.cert.pem()))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        Channel::from_shared(p.addr.replace("http://", "https://"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    let anonymous = connect(None).connect().await.unwrap();
    common::InferenceClient::new(anonymous.clone())
        .classify(tensor_request(1, "fog"))
        .await
        .unwrap();
    let err = admin_client(anonymous, None)
        .unwrap()
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let identity = tonic::transport::Identity::from_pem(client.pem(), client_key.serialize_pem());
    let operator = connect(Some(identity)).connect().await.unwrap();
    admin_client(operator, None)
        .unwrap()
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let repo = tiny_repo();
    let p = start(repo.path(), &["--max-message-bytes", "2000"]);
    let mut c = common::InferenceClient::new(p.channel().await);
    // 784 floats fit in ~3.2 kB: over the limit.
    let err = c.classify(tensor_request(1, "fog")).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let small = common::image_request(common::png(8, 8), "fog");
    c.classify(small).await.unwrap();
}
