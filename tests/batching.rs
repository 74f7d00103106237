//! Dynamic batching over loopback gRPC: batches that mix profiles answer every
//! request exactly as if it had been computed alone, a full queue refuses
//! with RESOURCE_EXHAUSTED instead of queueing without bound, and a request
//! whose deadline passes while it waits is answered DEADLINE_EXCEEDED uncomputed.

mod common;

use std::time::Duration;

use common::*;
use rws::serve::batch::BatchConfig;
use rws::serve::engine::EngineOptions;
use tonic::Code;

fn opts(batch: BatchConfig) -> EngineOptions {
    EngineOptions {
        batch,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_profile_batches_match_requests_computed_alone() {
    let repo = tiny_repo();
    let profiles = ["clean", "fog", "noise", "rain"];
    // Alone: one request at a time, so every batch holds one request.
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut inf = server.inference();
    let mut alone = Vec::new();
    for i in 0..16u64 {
        alone.push(logits(&mut inf, tensor_request(i, profiles[i as usize % 4])).await);
    }
    server.stop().await;

    // Together: each batch waits up to 1 s for up to 16 requests, so the 16
    // concurrent requests share batches across profiles.
    let server = slow_batcher(repo.path(), 16, 1_000_000);
    let channel = server.channel().await;
    wait_ready(&channel).await;
    let before = samples(&http_get(&server.metrics).await);
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let mut inf = InferenceClient::new(channel.clone());
            tokio::spawn(async move {
                logits(&mut inf, tensor_request(i, profiles[i as usize % 4])).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(
            t.await.unwrap(),
            alone[i],
            "request {i} ({})",
            profiles[i % 4]
        );
    }
    // The batches really were shared: 16 requests of 4 profiles in fewer than
    // 4 batches means some batch held several requests of several profiles.
    let after = samples(&http_get(&server.metrics).await);
    let grew = |name| sample(&after, name) - sample(&before, name);
    assert_eq!(grew("rws_batch_size_sum"), 16.0);
    let batches = grew("rws_batch_size_count");
    assert!(
        batches < 4.0,
        "16 requests of 4 profiles took {batches} batches"
    );
}

/// `rws serve` of the tiny model in `repo` with one compute worker that holds
/// each batch open `delay_us` for company, up to `max_batch` requests.
fn slow_batcher(repo: &std::path::Path, max_batch: usize, delay_us: u64) -> RwsProcess {
    RwsProcess::start(&[
        "--repo",
        repo.to_str().unwrap(),
        "--model",
        MODEL,
        "--workers",
        "1",
        "--max-batch",
        &max_batch.to_string(),
        "--max-delay-us",
        &delay_us.to_string(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_timeout_that_passes_in_the_queue_is_deadline_exceeded_uncomputed() {
    let repo = tiny_repo();
    // Each batch waits 2 s for company: a request sent with it waits that long
    // for a worker, far past a 250 ms grpc-timeout.
    let server = slow_batcher(repo.path(), 8, 2_000_000);
    let channel = server.channel().await;
    wait_ready(&channel).await;
    let before = samples(&http_get(&server.metrics).await);
    let mut inf = InferenceClient::new(channel.clone());
    let patient = tokio::spawn(async move { inf.classify(tensor_request(1, "")).await });
    let mut hurried = tonic::Request::new(tensor_request(2, ""));
    hurried.set_timeout(Duration::from_millis(250));
    let sent = std::time::Instant::now();
    let err = deadline_blind_inference(&server.addr)
        .classify(hurried)
        .await
        .expect_err("the deadline passed while the request waited");
    // The server's tonic layer answers CANCELLED at the deadline: the server
    // must answer first, with the code the deadline calls for.
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        sent.elapsed() < Duration::from_millis(1900),
        "answered when its batch ran, not at its deadline: {:?}",
        sent.elapsed()
    );
    patient
        .await
        .unwrap()
        .expect("a request without a deadline is served");
    // One more batch, of one request: the expired one was never computed.
    let after = samples(&http_get(&server.metrics).await);
    for (name, grew) in [("rws_batch_size_count", 1.0), ("rws_batch_size_sum", 1.0)] {
        assert_eq!(sample(&after, name) - sample(&before, name), grew, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_refuses_with_resource_exhausted() {
    let repo = tiny_repo();
    // One worker that holds each batch open 200 ms, and room for one waiting request.
    let batch = BatchConfig {
        max_batch: 2,
        max_delay: Duration::from_millis(200),
        queue_capacity: 1,
        workers: 1,
    };
    let server = TestServer::start(repo.path(), opts(batch)).await;
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let mut inf = server.inference();
            tokio::spawn(async move { inf.classify(tensor_request(i, "")).await.map(|_| ()) })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
            Err(s) => panic!("unexpected error: {s}"),
        }
    }
    assert!(ok >= 2 && refused >= 1, "ok {ok}, refused {refused}");
    // Once the storm passes, the server answers normally.
    server
        .inference()
        .classify(tensor_request(0, ""))
        .await
        .unwrap();
    server.stop().await;
}

/// The tiny model's profile registry, in-process, for driving the batcher directly.
fn tiny_registry(repo: &std::path::Path) -> std::sync::Arc<rws::serve::registry::Registry> {
    let dir = rws::model::repo::ModelDir::open(repo, Some(MODEL)).unwrap();
    let model = rws::model::Model::load(
        dir.config.clone(),
        &dir.base_path(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    std::sync::Arc::new(rws::serve::registry::Registry::new(std::sync::Arc::new(model), 4).unwrap())
}

type Answer = tokio::sync::oneshot::Receiver<rws::Result<rws::serve::batch::Classification>>;

/// A request for the default profile, and where its answer arrives.
fn job(seed: u64, deadline: Option<std::time::Instant>) -> (rws::serve::batch::Job, Answer) {
    let (reply, rx) = tokio::sync::oneshot::channel();
    let job = rws::serve::batch::Job {
        input: input(seed).data,
        profile: String::new(),
        source: String::new(),
        top_k: 1,
        with_logits: false,
        deadline,
        queued: std::time::Instant::now(),
        span: tracing::Span::none(),
        reply,
    };
    (job, rx)
}

#[test]
fn expired_requests_are_dropped_uncomputed() {
    let repo = tiny_repo();
    let registry = tiny_registry(repo.path());
    let past = std::time::Instant::now() - Duration::from_millis(1);
    let (expired, mut expired_rx) = job(1, Some(past));
    let (live, mut live_rx) = job(1, Some(std::time::Instant::now() + Duration::from_secs(60)));
    rws::serve::batch::run_batch(&registry, vec![expired, live], None);
    let err = expired_rx.try_recv().unwrap().unwrap_err();
    assert!(matches!(err, rws::Error::DeadlineExceeded(_)), "{err}");
    assert_eq!(live_rx.try_recv().unwrap().unwrap().profile, "clean");
}

/// A job whose caller has gone (cancelled, or timed out by its transport) is
/// never computed: the profile it names is not even folded.
#[test]
fn jobs_whose_callers_have_gone_are_not_computed() {
    let repo = tiny_repo();
    let dir = rws::model::repo::ModelDir::open(repo.path(), Some(MODEL)).unwrap();
    let device = candle_core::Device::Cpu;
    // One stem resident: the profiles folded at start-up, but the last, are not.
    let opts = EngineOptions {
        max_resident_profiles: 1,
        ..EngineOptions::default()
    };
    let engine = rws::serve::engine::Engine::open(dir, &device, &opts).unwrap();
    let registry = engine.registry();
    let name = registry
        .snapshot()
        .profiles
        .values()
        .find(|p| !p.is_resident())
        .expect("a profile that is not resident")
        .name
        .clone();
    let resident = || registry.snapshot().profiles[&name].is_resident();
    let (mut gone, answer) = job(1, None);
    gone.profile = name.clone();
    drop(answer);
    rws::serve::batch::run_batch(registry, vec![gone], None);
    assert!(!resident(), "a job nobody waits for was computed");
    let (mut live, mut answer) = job(1, None);
    live.profile = name.clone();
    rws::serve::batch::run_batch(registry, vec![live], None);
    assert_eq!(answer.try_recv().unwrap().unwrap().profile, name);
    assert!(resident());
}

#[test]
fn a_burst_beyond_the_queue_is_refused_at_once() {
    let repo = tiny_repo();
    let registry = tiny_registry(repo.path());
    let cfg = BatchConfig {
        max_batch: 1,
        max_delay: Duration::ZERO,
        queue_capacity: 2,
        workers: 1,
    };
    let batcher = rws::serve::batch::Batcher::start(registry, cfg).unwrap();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    // Submitting never blocks: 50 submissions take microseconds, one forward pass far longer.
    for i in 0..50 {
        let (job, rx) = job(i, None);
        match batcher.submit(job) {
            Ok(()) => accepted.push(rx),
            Err(rws::Error::ResourceExhausted(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 40, "refused {refused}");
    for rx in accepted {
        rx.blocking_recv().unwrap().unwrap();
    }
}
