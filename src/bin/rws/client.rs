//! The client commands: classify, profiles, signatures and the fleet's status, each
//! one call through `rws::server::client`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use rws::serve::profile::SignatureRef;
use rws::server::client::{RwsClient, SignatureUpload};
use rws::server::pb;

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

pub async fn classify(args: ClassifyArgs) -> Result<()> {
    let bytes = std::fs::read(&args.image)
        .with_context(|| format!("cannot read {}", args.image.display()))?;
    let profile = args.profile.unwrap_or_default();
    let r = args
        .client
        .connect()
        .await?
        .classify(bytes, &profile, args.top_k, args.json)
        .await?;
    if args.json {
        let top: Vec<_> = r
            .top_k
            .iter()
            .map(|p| serde_json::json!({"index": p.index, "label": p.label, "score": p.score}))
            .collect();
        let v = serde_json::json!({
            "profile": r.profile,
            "generation": r.generation,
            "top_k": top,
            "logits": r.logits,
        });
        println!("{v}");
    } else {
        println!("profile {} (generation {})", r.profile, r.generation);
        for p in r.top_k {
            println!("{:>6.2}%  {} (class {})", p.score * 100.0, p.label, p.index);
        }
    }
    Ok(())
}

pub async fn fleet(cmd: FleetCmd) -> Result<()> {
    let FleetCmd::Status { state, json } = cmd;
    let (latest, replicas) = rws::serve::fleet::status(&state).await?;
    if json {
        let v = serde_json::json!({ "state_revision": latest, "replicas": replicas });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "state revision {latest}, {} live replica(s)",
            replicas.len()
        );
        for r in replicas {
            println!(
                "{:<24} {:<22} applied {:<8} lag {:<6} {}",
                r.id,
                r.addr,
                r.applied_revision,
                (latest - r.applied_revision).max(0),
                r.error.as_deref().unwrap_or("ok")
            );
        }
    }
    Ok(())
}

fn print_change(c: pb::ProfileChange) {
    if let Some(p) = c.profile {
        let fleet = if c.revision > 0 {
            format!(", etcd revision {}", c.revision)
        } else {
            String::new()
        };
        println!(
            "profile {} generation {} (server generation {}), applied in {:.1} µs{fleet}",
            p.name, p.generation, c.generation, c.apply_micros
        );
    }
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
            print_change(c);
        }
        ProfileCmd::Rm { name, wait, client } => {
            let c = client
                .connect()
                .await?
                .delete_profile(&name, wait.wait_fleet)
                .await?;
            print_change(c);
        }
        ProfileCmd::Default { name, wait, client } => {
            let c = client
                .connect()
                .await?
                .set_default(&name, wait.wait_fleet)
                .await?;
            print_change(c);
        }
        ProfileCmd::Ls { client } => {
            let r = client.connect().await?.list_profiles().await?;
            println!("generation {}", r.generation);
            for p in r.profiles {
                let sigs: Vec<String> = p
                    .signatures
                    .iter()
                    .map(|s| format!("{}@{}", s.name, s.alpha))
                    .collect();
                println!(
                    "{}{:<20} gen {:<6} {:<9} [{}]",
                    if p.is_default { "* " } else { "  " },
                    p.name,
                    p.generation,
                    if p.resident { "resident" } else { "evicted" },
                    sigs.join(", ")
                );
            }
        }
    }
    Ok(())
}

pub async fn signature(cmd: SignatureCmd) -> Result<()> {
    match cmd {
        SignatureCmd::Ls { client } => {
            let r = client.connect().await?.list_signatures().await?;
            for s in r.signatures {
                println!(
                    "{:<20} {:<12} {:<10} alpha {:<5} {:>9} B{}{}",
                    s.name,
                    s.corruption,
                    s.quant,
                    s.default_alpha,
                    s.bytes,
                    if s.synthetic { "  synthetic" } else { "" },
                    if s.transferred { "  transferred" } else { "" }
                );
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
            if let Some(s) = r.signature {
                println!(
                    "loaded {} ({}, {} B, {} tensors)",
                    s.name,
                    s.quant,
                    s.bytes,
                    s.tensors.len()
                );
            }
        }
        SignatureCmd::Unload { name, wait, client } => {
            client
                .connect()
                .await?
                .unload_signature(&name, wait.wait_fleet)
                .await?;
            println!("unloaded {name}");
        }
    }
    Ok(())
}
