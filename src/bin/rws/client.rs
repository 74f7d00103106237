//! The client commands: classify, profiles, signatures, activations and the fleet's status, each
//! one call through `rws::server::client`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use rws::serve::activation::{self, End};
use rws::serve::profile::SignatureRef;
use rws::server::client::{RwsClient, SignatureUpload};
use rws::server::pb;

/// The command's output. `println!` panics once stdout's reader has gone
/// (`rws history | head`); `writeln!(out, ..)?` on this ends the command with
/// [`StdoutClosed`] instead, which `main` turns into a quiet success.
pub struct Out(std::io::StdoutLock<'static>);

/// Stdout's reader closed it: it has all it wanted.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

impl Out {
    pub fn lock() -> Self {
        Out(std::io::stdout().lock())
    }

    /// What `writeln!` calls.
    pub fn write_fmt(&mut self, args: std::fmt::Arguments<'_>) -> Result<()> {
        match std::io::Write::write_fmt(&mut self.0, args) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
            r => Ok(r?),
        }
    }
}

/// Where the server is and how to talk to it.
#[derive(clap::Args)]
pub struct Client {
    /// Server address: host:port as `rws serve` prints it, or http(s)://host:port.
    #[arg(long, default_value = "127.0.0.1:50051", env = "RWS_ADDR")]
    pub addr: String,
    /// File holding the server's admin token, for Admin calls.
    #[arg(long, env = "RWS_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate authority that signed a TLS server's certificate.
    #[arg(long, env = "RWS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl Client {
    /// The admin token from `--token-file`, if given.
    pub fn token(&self) -> Result<Option<String>> {
        self.token_file
            .as_deref()
            .map(crate::serve::read_token)
            .transpose()
    }

    pub async fn connect(&self) -> Result<RwsClient> {
        let token = self.token()?;
        let ca = self
            .ca_file
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
            .transpose()?;
        Ok(RwsClient::connect(&self.addr, ca.as_deref(), token.as_deref()).await?)
    }
}

/// For commands that change profiles or signatures.
#[derive(clap::Args)]
pub struct Wait {
    /// Fleet mode: return once every live replica has applied the change.
    #[arg(long)]
    wait_fleet: bool,
}

#[derive(clap::Args)]
pub struct ClassifyArgs {
    image: PathBuf,
    #[arg(long)]
    profile: Option<String>,
    /// Where the image comes from (site-a/cam-12): activations covering it
    /// choose the profile when none is named.
    #[arg(long, default_value = "")]
    source: String,
    #[arg(long, default_value_t = 5)]
    top_k: u32,
    /// Print the reply as JSON, with every class's logit (for scripts and checks).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: Client,
}

#[derive(Subcommand)]
pub enum FleetCmd {
    /// Each live replica with its applied etcd revision, lag and last error.
    Status {
        /// The fleet's state: etcd://HOST:PORT/PREFIX.
        #[arg(long, env = "RWS_STATE")]
        state: rws::serve::fleet::EtcdUrl,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ProfileCmd {
    /// Define a profile: `rws profile put storm rain@0.7 fog@0.5`.
    Put {
        name: String,
        signatures: Vec<String>,
        /// Replace an existing profile of that name.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        client: Client,
    },
    /// Delete a profile.
    Rm {
        name: String,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        client: Client,
    },
    /// List profiles.
    Ls {
        #[command(flatten)]
        client: Client,
    },
    /// Set the profile used by requests that name none.
    Default {
        name: String,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        client: Client,
    },
}

#[derive(Subcommand)]
pub enum SignatureCmd {
    /// List loaded signatures.
    Ls {
        #[command(flatten)]
        client: Client,
    },
    /// Load a signature: a path relative to the model directory on the server,
    /// or a local file sent with --upload.
    Load {
        path: String,
        #[arg(long)]
        name: Option<String>,
        /// Send the local file's bytes instead of naming a path on the server.
        #[arg(long)]
        upload: bool,
        /// Accept a signature made against other base weights.
        #[arg(long)]
        allow_transfer: bool,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        client: Client,
    },
    /// Unload a signature no profile uses.
    Unload {
        name: String,
        #[command(flatten)]
        wait: Wait,
        #[command(flatten)]
        client: Client,
    },
}

/// `rws activate fog --scope site-a/ --for 2h --reason "fog warning"`
#[derive(clap::Args)]
pub struct ActivateArgs {
    /// The profile to switch on.
    profile: String,
    /// Sources it covers: `*` (all), a prefix ending in `/` (site-a/), or one source.
    #[arg(long, default_value = "*")]
    scope: String,
    /// How long it lasts, e.g. 90s, 2h, 1day.
    #[arg(long = "for", value_parser = humantime::parse_duration, required_unless_present = "until", conflicts_with = "until")]
    duration: Option<std::time::Duration>,
    /// When it ends, RFC 3339 (2026-11-29T18:00:00Z).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    until: Option<std::time::SystemTime>,
    /// Why, for the record.
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    wait: Wait,
    #[command(flatten)]
    client: Client,
}

#[derive(clap::Args)]
pub struct DeactivateArgs {
    /// The activation's id, as `rws activate` or `rws activations` print it.
    id: String,
    #[command(flatten)]
    wait: Wait,
    #[command(flatten)]
    client: Client,
}

#[derive(clap::Args)]
pub struct ActivationsArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: Client,
}

/// `rws shadow fog --fraction 0.1`, `rws shadow fog --stop`, `rws shadow ls`
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ShadowArgs {
    #[command(subcommand)]
    list: Option<ShadowCmd>,
    /// The candidate profile to run on sampled traffic.
    #[arg(required = true)]
    profile: Option<String>,
    /// Share of requests to sample, in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    fraction: f64,
    /// Stop the shadow and print what it found.
    #[arg(long)]
    stop: bool,
    #[command(flatten)]
    client: Client,
}

#[derive(clap::Subcommand)]
pub enum ShadowCmd {
    /// The running shadows and what they found so far.
    Ls {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
}

pub async fn shadow(args: ShadowArgs) -> Result<()> {
    if let Some(ShadowCmd::Ls { json, client }) = args.list {
        let r = client.connect().await?.list_shadows().await?;
        let mut out = Out::lock();
        if json {
            let shadows: Vec<_> = r.shadows.iter().map(shadow_json).collect();
            let v =
                serde_json::json!({"shadows": shadows, "queued": r.queued, "capacity": r.capacity});
            writeln!(out, "{v}")?;
            return Ok(());
        }
        if r.shadows.is_empty() {
            writeln!(out, "no shadows running")?;
        }
        for s in &r.shadows {
            writeln!(out, "{}", shadow_line(s))?;
        }
        writeln!(out, "queue {}/{}", r.queued, r.capacity)?;
        return Ok(());
    }
    let profile = args.profile.unwrap_or_default();
    let fraction = if args.stop { 0.0 } else { args.fraction };
    let s = args
        .client
        .connect()
        .await?
        .shadow(&profile, fraction)
        .await?;
    let mut out = Out::lock();
    match args.stop {
        true => writeln!(out, "stopped: {}", shadow_line(&s))?,
        false => writeln!(
            out,
            "shadowing {} on {:.1}% of requests; see `rws shadow ls` or rws_shadow_* metrics",
            s.profile,
            s.fraction * 100.0
        )?,
    }
    Ok(())
}

fn shadow_line(s: &pb::ShadowInfo) -> String {
    format!(
        "{:<16} {:>5.1}%  sampled {} (compared {}, dropped {}, failed {})  agreement {:.1}%  \
         confidence {:.3} served / {:.3} candidate  entropy {:.3} / {:.3} nats",
        s.profile,
        s.fraction * 100.0,
        s.sampled,
        s.compared,
        s.dropped,
        s.failed,
        s.agreement * 100.0,
        s.served_confidence,
        s.candidate_confidence,
        s.served_entropy,
        s.candidate_entropy
    )
}

fn shadow_json(s: &pb::ShadowInfo) -> serde_json::Value {
    serde_json::json!({
        "profile": s.profile, "fraction": s.fraction, "since_unix_ms": s.since_unix_ms,
        "sampled": s.sampled, "dropped": s.dropped, "compared": s.compared, "failed": s.failed,
        "agreement": s.agreement, "served_confidence": s.served_confidence,
        "candidate_confidence": s.candidate_confidence, "served_entropy": s.served_entropy,
        "candidate_entropy": s.candidate_entropy,
    })
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    /// Only changes to scopes starting with this (site-a/).
    #[arg(long, default_value = "")]
    scope: String,
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// One JSON object per line, as the server keeps them.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: Client,
}

pub async fn history(args: HistoryArgs) -> Result<()> {
    let r = args
        .client
        .connect()
        .await?
        .history(&args.scope, args.limit)
        .await?;
    let mut out = Out::lock();
    for e in r.entries {
        if args.json {
            let change: serde_json::Value = serde_json::from_str(&e.change_json)?;
            let v = serde_json::json!({"at_unix_ms": e.at_unix_ms, "generation": e.generation,
                "revision": e.revision, "op": e.op, "scope": e.scope, "change": change,
                "who": e.who, "why": e.why});
            writeln!(out, "{v}")?;
            continue;
        }
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_unix_ms);
        let at = humantime::format_rfc3339_seconds(at);
        let order = match e.revision {
            0 => format!("gen {}", e.generation),
            r => format!("rev {r}"),
        };
        writeln!(
            out,
            "{at}  {order:<9} {:<16} {:<20} {:<24} {}  {}",
            e.op, e.scope, e.who, e.why, e.change_json
        )?;
    }
    Ok(())
}

pub async fn activate(args: ActivateArgs) -> Result<()> {
    let end = match (args.duration, args.until) {
        (Some(d), _) => End::After(d),
        (None, Some(t)) => {
            let ms = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            End::At(ms.as_millis() as u64)
        }
        (None, None) => anyhow::bail!("give --for DURATION or --until TIME"),
    };
    let a = args
        .client
        .connect()
        .await?
        .activate(
            &args.scope,
            &args.profile,
            end,
            &args.reason,
            args.wait.wait_fleet,
        )
        .await?;
    let mut out = Out::lock();
    writeln!(out, "{}", activation_line(&a, activation::now_ms()))?;
    Ok(())
}

pub async fn deactivate(args: DeactivateArgs) -> Result<()> {
    let mut client = args.client.connect().await?;
    client.deactivate(&args.id, args.wait.wait_fleet).await?;
    let mut out = Out::lock();
    writeln!(out, "deactivated {}", args.id)?;
    Ok(())
}

pub async fn activations(args: ActivationsArgs) -> Result<()> {
    let r = args.client.connect().await?.list_activations().await?;
    let mut out = Out::lock();
    if args.json {
        let list: Vec<_> = r
            .activations
            .iter()
            .map(|a| {
                serde_json::json!({"id": a.id, "scope": a.scope, "profile": a.profile,
                    "since_unix_ms": a.since_unix_ms, "until_unix_ms": a.until_unix_ms, "reason": a.reason})
            })
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"now_unix_ms": r.now_unix_ms, "activations": list})
        )?;
        return Ok(());
    }
    if r.activations.is_empty() {
        writeln!(out, "no activations")?;
    }
    for a in &r.activations {
        writeln!(out, "{}", activation_line(a, r.now_unix_ms))?;
    }
    Ok(())
}

/// `ID  SCOPE -> PROFILE  ends in 1h 59m 58s  (reason)`
fn activation_line(a: &pb::ActivationInfo, now_ms: u64) -> String {
    let left = a.until_unix_ms.saturating_sub(now_ms) / 1000;
    let ends = match left {
        0 => "ended".to_string(),
        s => format!(
            "ends in {}",
            humantime::format_duration(std::time::Duration::from_secs(s))
        ),
    };
    format!(
        "{:<16} {:<24} -> {:<16} {ends}  {}",
        a.id, a.scope, a.profile, a.reason
    )
}

pub async fn classify(args: ClassifyArgs) -> Result<()> {
    let bytes = std::fs::read(&args.image)
        .with_context(|| format!("cannot read {}", args.image.display()))?;
    let profile = args.profile.unwrap_or_default();
    let r = args
        .client
        .connect()
        .await?
        .classify(bytes, &profile, &args.source, args.top_k, args.json)
        .await?;
    let mut out = Out::lock();
    let refs: Vec<SignatureRef> = r
        .signatures
        .iter()
        .map(|s| SignatureRef {
            name: s.name.clone(),
            alpha: s.alpha,
        })
        .collect();
    let served = rws::serve::auto::describe(&refs);
    let why = match (r.selection(), r.activation_id.as_str()) {
        (pb::Selection::Activation, id) => format!("activation {id}"),
        (pb::Selection::Explicit, _) => "named".into(),
        _ => "default".into(),
    };
    if args.json {
        let top: Vec<_> = r
            .top_k
            .iter()
            .map(|p| serde_json::json!({"index": p.index, "label": p.label, "score": p.score}))
            .collect();
        let v = serde_json::json!({
            "profile": r.profile,
            "generation": r.generation,
            "chosen_by": why,
            "top_k": top,
            "logits": r.logits,
            "signatures": served.clone(),
            "detection": r.detection.as_ref().map(|d| serde_json::json!({
                "kind": d.kind, "confidence": d.confidence, "severity": d.severity,
                "familiar": d.familiar
            })),
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "profile {} (generation {}, {why})",
            r.profile, r.generation
        )?;
        // What served it, when the server chose: the profile names it otherwise.
        if let Some(d) = &r.detection {
            writeln!(
                out,
                "served with {served}: the detector saw {} (severity {}) with {:.0}% confidence{}",
                d.kind,
                d.severity,
                d.confidence * 100.0,
                match d.familiar {
                    true => "",
                    false => ", but unlike its training images of that kind",
                }
            )?;
        }
        for p in r.top_k {
            writeln!(
                out,
                "{:>6.2}%  {} (class {})",
                p.score * 100.0,
                p.label,
                p.index
            )?;
        }
    }
    Ok(())
}

pub async fn fleet(cmd: FleetCmd) -> Result<()> {
    let FleetCmd::Status { state, json } = cmd;
    let (latest, replicas) = rws::serve::fleet::status(&state).await?;
    let mut out = Out::lock();
    if json {
        let v = serde_json::json!({ "state_revision": latest, "replicas": replicas });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "state revision {latest}, {} live replica(s)",
            replicas.len()
        )?;
        for r in replicas {
            writeln!(
                out,
                "{:<24} {:<22} applied {:<8} lag {:<6} {}",
                r.id,
                r.addr,
                r.applied_revision,
                (latest - r.applied_revision).max(0),
                r.error.as_deref().unwrap_or("ok")
            )?;
        }
    }
    Ok(())
}

fn print_change(c: pb::ProfileChange) -> Result<()> {
    if let Some(p) = c.profile {
        let mut out = Out::lock();
        let fleet = if c.revision > 0 {
            format!(", etcd revision {}", c.revision)
        } else {
            String::new()
        };
        writeln!(
            out,
            "profile {} generation {} (server generation {}), applied in {:.1} µs{fleet}",
            p.name, p.generation, c.generation, c.apply_micros
        )?;
    }
    Ok(())
}

pub async fn profile(cmd: ProfileCmd) -> Result<()> {
    match cmd {
        ProfileCmd::Put {
            name,
            signatures,
            replace,
            wait,
            client,
        } => {
            let sigs = signatures
                .iter()
                .map(|s| s.parse())
                .collect::<rws::Result<Vec<SignatureRef>>>()?;
            let c = client
                .connect()
                .await?
                .put_profile(&name, &sigs, replace, wait.wait_fleet)
                .await?;
            print_change(c)?;
        }
        ProfileCmd::Rm { name, wait, client } => {
            let c = client
                .connect()
                .await?
                .delete_profile(&name, wait.wait_fleet)
                .await?;
            print_change(c)?;
        }
        ProfileCmd::Default { name, wait, client } => {
            let c = client
                .connect()
                .await?
                .set_default(&name, wait.wait_fleet)
                .await?;
            print_change(c)?;
        }
        ProfileCmd::Ls { client } => {
            let r = client.connect().await?.list_profiles().await?;
            let mut out = Out::lock();
            writeln!(out, "generation {}", r.generation)?;
            for p in r.profiles {
                let sigs: Vec<String> = p
                    .signatures
                    .iter()
                    .map(|s| format!("{}@{}", s.name, s.alpha))
                    .collect();
                writeln!(
                    out,
                    "{}{:<20} gen {:<6} {:<9} [{}]",
                    if p.is_default { "* " } else { "  " },
                    p.name,
                    p.generation,
                    if p.resident { "resident" } else { "evicted" },
                    sigs.join(", ")
                )?;
            }
        }
    }
    Ok(())
}

pub async fn signature(cmd: SignatureCmd) -> Result<()> {
    match cmd {
        SignatureCmd::Ls { client } => {
            let r = client.connect().await?.list_signatures().await?;
            let mut out = Out::lock();
            for s in r.signatures {
                writeln!(
                    out,
                    "{:<20} {:<12} {:<10} alpha {:<5} {:>9} B{}{}",
                    s.name,
                    s.corruption,
                    s.quant,
                    s.default_alpha,
                    s.bytes,
                    if s.synthetic { "  synthetic" } else { "" },
                    if s.transferred { "  transferred" } else { "" }
                )?;
            }
        }
        SignatureCmd::Load {
            path,
            name,
            upload,
            allow_transfer,
            wait,
            client,
        } => {
            let source = if upload {
                SignatureUpload::Bytes(
                    std::fs::read(&path).with_context(|| format!("cannot read {path}"))?,
                )
            } else {
                SignatureUpload::Path(path.clone())
            };
            let name = match (name, upload) {
                (Some(n), _) => n,
                (None, true) => rws::model::repo::signature_name(std::path::Path::new(&path)),
                (None, false) => String::new(),
            };
            let r = client
                .connect()
                .await?
                .load_signature(&name, source, allow_transfer, wait.wait_fleet)
                .await?;
            let mut out = Out::lock();
            if let Some(s) = r.signature {
                writeln!(
                    out,
                    "loaded {} ({}, {} B, {} tensors)",
                    s.name,
                    s.quant,
                    s.bytes,
                    s.tensors.len()
                )?;
            }
        }
        SignatureCmd::Unload { name, wait, client } => {
            client
                .connect()
                .await?
                .unload_signature(&name, wait.wait_fleet)
                .await?;
            let mut out = Out::lock();
            writeln!(out, "unloaded {name}")?;
        }
    }
    Ok(())
}
