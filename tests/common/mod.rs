//! Shared test harness: a synthetic model repository in a temp dir and a real
//! rws server on a loopback port, with gRPC clients.
#![allow(dead_code)]

pub mod python;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rws::model::repo::ModelDir;
use rws::patch::quant::Quant;
use rws::serve::engine::{Engine, EngineOptions};
use rws::server::pb;
use tonic::transport::Channel;

pub use pb::admin_client::AdminClient;
pub use pb::inference_client::InferenceClient;

pub const MODEL: &str = "tiny";

/// A repository with one small synthetic model and signatures `fog` (int8),
/// `noise` (int4) and `rain` (f16).
pub fn tiny_repo() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let arch = rws::lab::synth::arch_by_name("resnet-small").unwrap();
    let dir = repo.path().join(MODEL);
    rws::lab::synth::write_repo_model(&dir, arch, 1, &["fog".into()], Quant::Int8, 11).unwrap();
    let model = rws::model::Model::load(
        ModelDir::open(repo.path(), Some(MODEL)).unwrap().config,
        &dir.join("base.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (name, seed, q) in [("noise", 21, Quant::Int4), ("rain", 31, Quant::F16)] {
        let sig = rws::lab::synth::signature(&model, name, seed, 0.3, q).unwrap();
        sig.save(
            &dir.join("signatures")
                .join(format!("{name}.rws.safetensors")),
        )
        .unwrap();
    }
    repo
}

pub struct TestServer {
    pub addr: String,
    pub channel: Channel,
    pub model_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(repo: &Path, opts: EngineOptions) -> TestServer {
        let dir = ModelDir::open(repo, Some(MODEL)).unwrap();
        let model_dir = dir.dir.clone();
        let engine = tokio::task::spawn_blocking(move || {
            Engine::open(dir, &candle_core::Device::Cpu, &opts)
        })
        .await
        .unwrap()
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            rws::server::serve(Arc::new(engine), listener, Default::default(), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let channel = Channel::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        TestServer {
            addr,
            channel,
            model_dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone()).max_encoding_message_size(64 << 20)
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

/// An HTTP/2 connection pool that tonic's generated clients can run on.
pub type PlainHttp2 = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

/// An Inference client for `addr` (`http://127.0.0.1:PORT`) that leaves
/// deadlines to the server. A tonic `Channel` enforces a request's
/// `grpc-timeout` itself and answers CANCELLED locally before the server's
/// answer can arrive; this one sends the header and reports what the server said.
pub fn deadline_blind_inference(addr: &str) -> InferenceClient<PlainHttp2> {
    let http2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    InferenceClient::with_origin(http2, addr.parse().unwrap())
}

/// A deterministic input tensor for the 28×28 model.
pub fn input(seed: u64) -> pb::Tensor {
    let mut rng = rws::rng::Rng::new(seed);
    pb::Tensor {
        shape: vec![1, 28, 28],
        data: (0..784).map(|_| rng.normal()).collect(),
    }
}

pub fn tensor_request(seed: u64, profile: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        input: Some(pb::classify_request::Input::Tensor(input(seed))),
        profile: profile.into(),
        top_k: 3,
        return_logits: true,
        ..Default::default()
    }
}

pub fn image_request(bytes: Vec<u8>, profile: &str) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        input: Some(pb::classify_request::Input::Image(bytes)),
        profile: profile.into(),
        top_k: 3,
        return_logits: true,
        ..Default::default()
    }
}

/// Logits as bits, for bitwise comparisons.
pub fn bits(logits: &[f32]) -> Vec<u32> {
    logits.iter().map(|v| v.to_bits()).collect()
}

pub async fn logits(client: &mut InferenceClient<Channel>, req: pb::ClassifyRequest) -> Vec<u32> {
    bits(&client.classify(req).await.unwrap().into_inner().logits)
}

pub fn refs(pairs: &[(&str, f32)]) -> Vec<pb::SignatureRef> {
    pairs
        .iter()
        .map(|(n, a)| pb::SignatureRef {
            name: n.to_string(),
            alpha: *a,
        })
        .collect()
}

/// A PNG of a digit-like pattern.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG whose header claims `w`×`h` pixels, with no pixel data behind it.
pub fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grayscale, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(13u32.to_be_bytes());
    out.extend(&ihdr);
    out.extend(crc32fast::hash(&ihdr).to_be_bytes());
    out
}

/// The `rws` binary serving in a child process (killed on drop), for what only
/// a real process shows: signals, restarts, metrics, the CLI.
pub struct RwsProcess {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    /// `http://127.0.0.1:PORT/metrics`
    pub metrics: String,
    /// `http://127.0.0.1:PORT/v1/events`
    pub events: String,
    /// `http://127.0.0.1:PORT/`
    pub console: String,
    /// The rest of stdout, for tests that read what comes after start-up.
    pub stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl RwsProcess {
    /// `rws serve ARGS` on free loopback ports; returns once it listens.
    /// Loopback callers may change it (`--trust-loopback`) unless ARGS set a
    /// token or a config file.
    pub fn start(args: &[&str]) -> RwsProcess {
        use std::io::BufRead;
        let trust = !args
            .iter()
            .any(|a| ["--admin-token-file", "--config"].contains(a));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rws"))
            .arg("serve")
            .args(trust.then_some("--trust-loopback"))
            .args(["--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args([
                "--events-addr",
                "127.0.0.1:0",
                "--console-addr",
                "127.0.0.1:0",
            ])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (mut addr, mut metrics, mut events, mut console) =
            (String::new(), String::new(), String::new(), String::new());
        while addr.is_empty() {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("rws serve {args:?} exited before listening: {status}");
            }
            if let Some(a) = line.trim().strip_prefix("rws listening on ") {
                addr = format!("http://{a}");
            } else if let Some(m) = line.trim().strip_prefix("rws metrics on ") {
                metrics = m.to_string();
            } else if let Some(e) = line.trim().strip_prefix("rws events on ") {
                events = e.to_string();
            } else if let Some(c) = line.trim().strip_prefix("rws console on ") {
                console = c.to_string();
            }
        }
        RwsProcess {
            child,
            addr,
            metrics,
            events,
            console,
            stdout,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Sends a signal (`"TERM"`, `"KILL"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for RwsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the server says it is ready over the Open Inference Protocol
/// (warm-up runs after start-up); fails the test after 10 s.
pub async fn wait_ready(channel: &Channel) {
    use rws::server::kserve::pb::{
        ServerReadyRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    };
    let mut client = GrpcInferenceServiceClient::new(channel.clone());
    for _ in 0..200 {
        let r = client.server_ready(ServerReadyRequest {}).await.unwrap();
        if r.into_inner().ready {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the server did not become ready within 10 s");
}

/// The README's fogged digit (`docs/fog-digit.png`) and its true label: the clean
/// model gets it wrong, the fog profile right.
pub const SHOWCASE_PNG: &str = "docs/fog-digit.png";

pub fn showcase_label() -> String {
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("docs/results.json").unwrap()).unwrap();
    results["showcase"]["label"].as_u64().unwrap().to_string()
}

/// The label of the first prediction in a client's printed output (second line,
/// second column: `  94.60%  0 (class 0)`).
pub fn top_label(out: &str) -> String {
    out.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no prediction line in {out:?}"))
        .to_string()
}

/// A server's profiles, each with its (signature, alpha) list, sorted by name,
/// and the default: what must agree across restarts and replicas.
pub async fn profile_table(channel: &Channel) -> (Vec<(String, Vec<(String, f32)>)>, String) {
    let r = rws::server::admin_client(channel.clone(), None)
        .unwrap()
        .list_profiles(pb::ListProfilesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut ps: Vec<_> = r
        .profiles
        .into_iter()
        .map(|p| {
            let refs = p
                .signatures
                .into_iter()
                .map(|s| (s.name, s.alpha))
                .collect();
            (p.name, refs)
        })
        .collect();
    ps.sort_by(|a, b| a.0.cmp(&b.0));
    (ps, r.default_profile)
}

/// A plain HTTP/1 GET over loopback (what Prometheus does to `/metrics`); the body.
pub async fn http_get(url: &str) -> String {
    let (code, head, body) = http("GET", url, &[], b"").await;
    assert_eq!(code, 200, "{head}");
    body
}

/// `name{labels} value` lines of a Prometheus text exposition.
pub fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("sample line");
            (name.to_string(), value.parse().expect("sample value"))
        })
        .collect()
}

pub fn sample(all: &[(String, f64)], name: &str) -> f64 {
    all.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no sample {name}"))
        .1
}

/// A plain HTTP/1 POST of a JSON body over loopback: the status code and the body.
pub async fn http_post(url: &str, body: &[u8]) -> (u16, String) {
    let (code, _, body) = http("POST", url, &[], body).await;
    (code, body)
}

/// One HTTP/1 request with a JSON body over loopback: the status code (0 if
/// none came back), the response head and the body.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl AsRef<[u8]>,
) -> (u16, String, String) {
    let body = body.as_ref();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut head = format!(
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // A body the server refuses unread may meet a closed socket.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_string(), body.to_string())
}
