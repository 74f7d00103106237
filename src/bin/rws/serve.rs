//! `rws serve`: flags (or a config file) to a running server.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rws::model::repo::ModelDir;
use rws::serve::admission::AdmissionConfig;
use rws::serve::durability::Retention;
use rws::serve::engine::{Engine, EngineOptions};
use rws::serve::state::StateDir;
use rws::server::auth::{Auth, AuthConfig};
use rws::server::shutdown::Shutdown;
use rws::server::{ServeOptions, Side, Tls};
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
    /// File holding the bearer token that Admin, Events, the events endpoint and
    /// the console require. Read again on SIGHUP; a new token ends console sessions.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Without a token: let any loopback peer change the server. Behind a sidecar,
    /// a proxy on this host or a port-forward, that is everyone. Without this and
    /// without a token, nobody may change the server.
    #[arg(long, conflicts_with = "admin_token_file")]
    trust_loopback: bool,
    /// PEM CA certificate: Admin and Events calls must present a client
    /// certificate it signed (mutual TLS; needs --tls-cert).
    #[arg(long, requires = "tls_cert")]
    admin_client_ca: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, default_value_t = rws::server::MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// On SIGTERM: milliseconds of NOT_SERVING, with requests still served, before
    /// the listeners close (load balancers move traffic away meanwhile).
    #[arg(long, default_value_t = 1000)]
    drain_grace_ms: u64,
    /// Then: milliseconds in-flight requests and open connections may take to
    /// finish before they are cut and the process exits.
    #[arg(long, default_value_t = 10_000)]
    drain_timeout_ms: u64,
    /// Calls in flight on the whole server; more are refused at once (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = rws::server::Limits::default().max_concurrent_requests)]
    max_concurrent_requests: usize,
    /// Calls in flight on one connection; more are refused at once.
    #[arg(long, default_value_t = rws::server::Limits::default().per_connection)]
    max_requests_per_connection: usize,
    /// HTTP/2 streams a client may open on one connection.
    #[arg(long, default_value_t = rws::server::Limits::default().max_streams)]
    max_streams_per_connection: u32,
    /// Images over this many pixels are "large": they share fewer decode slots
    /// (one core is left to the rest) and a bounded pixel budget.
    #[arg(long, default_value_t = AdmissionConfig::default().small_pixels)]
    large_image_pixels: u64,
    /// Large images one client address may have waiting or decoding at once.
    #[arg(long, default_value_t = AdmissionConfig::default().large_per_peer)]
    large_images_per_client: usize,
    /// Pixels of large images decoded at once, in all (memory: up to 8 bytes each).
    #[arg(long, default_value_t = AdmissionConfig::default().large_pixels)]
    large_decode_pixels: u64,
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
    /// With --state-dir: rotate `audit.jsonl` to `audit.jsonl.1` once it passes
    /// this many bytes, so that the trail neither fills the disk nor slows start-up.
    #[arg(long, default_value_t = Retention::default().audit_max_bytes)]
    audit_max_bytes: u64,
    /// With --state-dir: rotated audit files kept (`audit.jsonl.1` to `.N`);
    /// older ones are deleted.
    #[arg(long, default_value_t = Retention::default().audit_keep_files)]
    audit_keep_files: usize,
    /// With --state-dir: how long an uploaded signature's file is kept once no
    /// signature uses it (`24h`, `30m`; `0s` deletes it at once), so that a
    /// state that names it can still be restored.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    uploads_keep: Duration,
}

/// A token file's content, as the server reads it.
pub fn read_token(path: &Path) -> Result<String> {
    Ok(rws::server::auth::read_token(path)?)
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
    let auth = Auth::new(AuthConfig {
        token_file: a.admin_token_file.clone(),
        trust_loopback: a.trust_loopback,
        require_client_cert: a.admin_client_ca.is_some(),
    })?;
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(Tls {
            cert: read(cert)?,
            key: read(key)?,
            client_ca: a.admin_client_ca.as_ref().map(read).transpose()?,
        }),
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
        admission: AdmissionConfig {
            small_pixels: a.large_image_pixels,
            large_per_peer: a.large_images_per_client,
            large_pixels: a.large_decode_pixels,
            ..AdmissionConfig::default()
        },
        retention: Retention {
            audit_max_bytes: a.audit_max_bytes,
            audit_keep_files: a.audit_keep_files,
            uploads_keep: a.uploads_keep,
        },
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
    let shutdown = Shutdown::default();
    let drain_timeout = Duration::from_millis(a.drain_timeout_ms);
    let side = Side {
        auth: auth.clone(),
        tls: match &tls {
            Some(t) => Some(Side::tls_config(t).await?),
            None => None,
        },
        shutdown: shutdown.clone(),
        drain_timeout,
    };
    let mut sides = tokio::task::JoinSet::new();
    if let Some(l) = bind_side(&a.metrics_addr, "metrics", "/metrics", &side).await? {
        let handle = rws::serve::metrics::install()?;
        sides.spawn(side_task(
            "metrics server",
            rws::server::metrics::serve(l, handle, side.clone()),
        ));
    }
    if let Some(l) = bind_side(&a.events_addr, "events", "/v1/events", &side).await? {
        let serving = rws::server::events::serve_http(l, engine.clone(), side.clone());
        sides.spawn(side_task("events endpoint", serving));
    }
    if let Some(l) = bind_side(&a.console_addr, "console", "/", &side).await? {
        let serving = rws::server::console::serve(l, engine.clone(), side.clone());
        sides.spawn(side_task("console", serving));
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
    match a.admin_token_file.is_some() || a.admin_client_ca.is_some() {
        true => tracing::info!("{}", auth.describe()),
        false => tracing::warn!("{}", auth.describe()),
    }
    reload_on_sighup(auth.clone());
    let opts = ServeOptions {
        auth,
        tls,
        max_message_bytes: a.max_message_bytes,
        limits: rws::server::Limits {
            max_concurrent_requests: a.max_concurrent_requests,
            per_connection: a.max_requests_per_connection,
            max_streams: a.max_streams_per_connection,
        },
        drain_grace: Duration::from_millis(a.drain_grace_ms),
        drain_timeout,
        shutdown,
    };
    rws::server::serve(engine, listener, opts, shutdown_signal()).await?;
    // The side endpoints closed with the gRPC listener; they had the same bound.
    let _ = tokio::time::timeout(drain_timeout, async {
        while sides.join_next().await.is_some() {}
    })
    .await;
    tracing::info!("drained; exiting");
    Ok(())
}

/// Reads the admin token file again on every SIGHUP.
fn reload_on_sighup(auth: Arc<Auth>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match auth.reload() {
                Ok(true) => tracing::info!(
                    "SIGHUP: the admin token changed; console sessions opened with the old one are over"
                ),
                Ok(false) => tracing::info!("SIGHUP: the admin token is unchanged"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: cannot read the admin token file; the old token stays in force")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = auth;
}

/// Binds one of the side HTTP endpoints unless its address is `off`, and says
/// where on stdout, like the gRPC address, so scripts can learn ports chosen
/// for :0. Warns when it is reachable off this host in plain HTTP.
async fn bind_side(addr: &str, what: &str, path: &str, side: &Side) -> Result<Option<TcpListener>> {
    if addr == "off" {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))?;
    let local = listener.local_addr()?;
    let scheme = if side.tls.is_some() { "https" } else { "http" };
    if side.tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(%local, "the {what} endpoint is reachable off this host without TLS: start the server with --tls-cert, or bind it to 127.0.0.1");
    }
    println!("rws {what} on {scheme}://{local}{path}");
    Ok(Some(listener))
}

/// Runs a side endpoint to its end; a failure is logged.
async fn side_task(what: &'static str, serving: impl Future<Output = rws::Result<()>>) {
    if let Err(e) = serving.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "rws".into());
    format!("{host}-{}", std::process::id())
}
