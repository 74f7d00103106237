//! `rws serve`: flags (or a config file) to a running server.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rws::model::repo::ModelDir;
use rws::serve::engine::{Engine, EngineOptions};
use rws::serve::state::StateDir;
use rws::server::ServeOptions;
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML file whose keys are these flags' names (`max_batch = 16`); flags given here win.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "models")]
    repo: PathBuf,
    /// Model directory name; optional when the repository holds one model.
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Where Prometheus scrapes `/metrics`; `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// Keep signatures, profiles and the default profile here across restarts
    /// (written atomically on every change). Without it, changes last until exit.
    #[arg(long, conflicts_with = "state")]
    state_dir: Option<PathBuf>,
    /// Keep the profile state in etcd, shared by every replica under the same
    /// prefix: etcd://HOST:PORT/PREFIX. An empty prefix is seeded with this
    /// replica's profiles.
    #[arg(long)]
    state: Option<rws::serve::fleet::EtcdUrl>,
    /// This replica's name in the fleet (default: host name and process id).
    #[arg(long)]
    replica_id: Option<String>,
    /// The address this replica publishes in the fleet (default: the one it listens on).
    #[arg(long)]
    advertise_addr: Option<String>,
    /// File holding the bearer token Admin calls must present. Without it, Admin
    /// accepts loopback clients only.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, default_value_t = rws::server::MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// On SIGTERM: milliseconds of NOT_SERVING (new requests refused) before the
    /// listener closes and in-flight requests drain.
    #[arg(long, default_value_t = 1000)]
    drain_grace_ms: u64,
    /// Patched stems kept in memory at once (least recently used are dropped).
    #[arg(long, default_value_t = 16)]
    max_resident_profiles: usize,
    /// Do not load signatures/ at start-up nor define a profile per signature.
    #[arg(long)]
    no_auto_profiles: bool,
    /// Largest batch a compute worker forms.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// How long the first request of a batch waits for company, in microseconds.
    #[arg(long, default_value_t = 2000)]
    max_delay_us: u64,
    /// Requests that may wait; beyond it they get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    queue_capacity: usize,
    /// Compute threads (each parallelizes its tensor ops already).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Where the model runs: auto (GPU 0 if this build has CUDA and a GPU opens, else
    /// the CPU, with a warning on a CUDA build), cpu, or cuda:N (an error if it cannot
    /// be opened).
    #[arg(long, default_value = "auto")]
    device: String,
    /// TOML file of event rules (`min_hold`, `cooldown`, `[[rule]]` entries of kind,
    /// severity = [low, high], profile, ttl); or an `[events]` table in --config.
    /// Without rules, event reports are refused.
    #[arg(long, conflicts_with = "event_rules_inline")]
    event_rules: Option<PathBuf>,
    /// The `[events]` table of a config file, as TOML text.
    #[arg(long, hide = true)]
    event_rules_inline: Option<String>,
    /// Where event reports are POSTed as JSON (`/v1/events`); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9465")]
    events_addr: String,
    /// Export the server's spans to this OpenTelemetry collector over OTLP/gRPC
    /// (http://host:4317). Off by default.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// The operator console (a web page); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9466")]
    console_addr: String,
}

/// A token file's content, without surrounding whitespace.
pub fn read_token(path: &Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the admin token file {}", path.display()))?
        .trim()
        .to_string();
    if token.is_empty() {
        bail!("the admin token file {} is empty", path.display());
    }
    Ok(token)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn run(a: ServeArgs) -> Result<()> {
    let admin_token = a.admin_token_file.as_deref().map(read_token).transpose()?;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            Some(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ))
        }
        _ => None,
    };
    let dir = ModelDir::open(&a.repo, a.model.as_deref())?;
    let rules = match (&a.event_rules, &a.event_rules_inline) {
        (Some(path), _) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the event rules {}", path.display()))?,
        ),
        (None, inline) => inline.clone(),
    };
    let events = rules
        .map(|text| rws::serve::events::Rules::parse(&text))
        .transpose()
        .context("in the event rules")?;
    let opts = EngineOptions {
        max_resident_profiles: a.max_resident_profiles,
        batch: rws::serve::batch::BatchConfig {
            max_batch: a.max_batch,
            max_delay: Duration::from_micros(a.max_delay_us),
            queue_capacity: a.queue_capacity,
            workers: a.workers,
        },
        auto_profiles: !a.no_auto_profiles,
        state: a.state_dir.clone().map(StateDir::new),
        events,
    };
    let name = dir.name.clone();
    let device = a.device.clone();
    let engine = Arc::new(
        tokio::task::spawn_blocking(move || {
            Engine::open(dir, &rws::model::device::select(&device)?, &opts)
        })
        .await??,
    );
    let listener = TcpListener::bind(&a.addr)
        .await
        .with_context(|| format!("cannot listen on {}", a.addr))?;
    let addr = listener.local_addr()?;
    if let Some(url) = a.state.clone() {
        let id = a.replica_id.clone().unwrap_or_else(default_replica_id);
        let advertise = a.advertise_addr.clone().unwrap_or_else(|| addr.to_string());
        engine
            .join_fleet(url.clone(), id.clone(), advertise)
            .await
            .with_context(|| format!("cannot join the fleet at {}{}", url.endpoint, url.prefix))?;
        tracing::info!(replica = %id, etcd = %url.endpoint, prefix = %url.prefix, "joined the fleet");
    }
    // The side endpoints run until the gRPC server has drained.
    let (stop, stopped) = tokio::sync::watch::channel(());
    if let Some(l) = bind_side(&a.metrics_addr, "metrics", "/metrics").await? {
        let handle = rws::serve::metrics::install()?;
        run_side("metrics server", &stopped, |s| {
            rws::serve::metrics::serve(l, handle, s)
        });
    }
    if let Some(l) = bind_side(&a.events_addr, "events", "/v1/events").await? {
        let (engine, token) = (engine.clone(), admin_token.clone());
        run_side("events endpoint", &stopped, |s| {
            rws::server::events::serve_http(l, engine, token, s)
        });
    }
    if let Some(l) = bind_side(&a.console_addr, "console", "/").await? {
        let (engine, token) = (engine.clone(), admin_token.clone());
        run_side("console", &stopped, |s| {
            rws::server::console::serve(l, engine, token, s)
        });
    }
    println!("rws listening on {addr}");
    let table = engine.registry().snapshot();
    tracing::info!(
        model = %name,
        %addr,
        tls = tls.is_some(),
        device = ?engine.model().device().location(),
        profiles = ?table.profiles.keys().collect::<Vec<_>>(),
        default = %table.default_profile,
        state_dir = ?a.state_dir,
        "serving"
    );
    if admin_token.is_none() {
        let note = if is_loopback(&addr) {
            ""
        } else {
            "; remote clients are refused"
        };
        tracing::warn!(
            "no --admin-token-file: the Admin service accepts loopback clients only{note}"
        );
    }
    let opts = ServeOptions {
        admin_token,
        tls,
        max_message_bytes: a.max_message_bytes,
        drain_grace: Duration::from_millis(a.drain_grace_ms),
    };
    rws::server::serve(engine, listener, opts, shutdown_signal()).await?;
    drop(stop);
    tracing::info!("drained; exiting");
    Ok(())
}

/// Binds one of the side HTTP endpoints unless its address is `off`, and says
/// where on stdout, like the gRPC address, so scripts can learn ports chosen for :0.
async fn bind_side(addr: &str, what: &str, path: &str) -> Result<Option<TcpListener>> {
    if addr == "off" {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))?;
    println!("rws {what} on http://{}{path}", listener.local_addr()?);
    Ok(Some(listener))
}

/// Runs a side endpoint until `stopped` says the server is done; a failure is logged.
fn run_side<F>(
    what: &'static str,
    stopped: &tokio::sync::watch::Receiver<()>,
    serve: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) where
    F: Future<Output = rws::Result<()>> + Send + 'static,
{
    let mut stopped = stopped.clone();
    let running = serve(Box::pin(async move {
        // Fires when the sender is dropped.
        let _ = stopped.changed().await;
    }));
    tokio::spawn(async move {
        if let Err(e) = running.await {
            tracing::error!(error = %e, "{what} stopped");
        }
    });
}

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "rws".into());
    format!("{host}-{}", std::process::id())
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
