//! `rws bench`: the measurements, each a call into `rws::bench`, printed as text or
//! JSON.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::client::Client;

#[derive(Subcommand)]
pub enum BenchCmd {
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
    /// Two ways of serving one stream side by side, in alternating phases
    /// against a running server: e.g. `--a clean --b auto`, or
    /// `--a clean --b clean --b-shadow fog --fraction 0.1`.
    Compare {
        /// Profile side A's requests name.
        #[arg(long, default_value = "clean")]
        a: String,
        /// Profile side B's requests name.
        #[arg(long, default_value = "auto")]
        b: String,
        /// A profile to shadow during side B's phases.
        #[arg(long)]
        b_shadow: Option<String>,
        /// The shadow's share of requests.
        #[arg(long, default_value_t = 0.1)]
        fraction: f64,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5.0)]
        phase: f64,
        /// Phases per side.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Digits the stream is drawn from: a third clean, the rest corrupted.
        #[arg(long, default_value = "data/mnist/test.safetensors")]
        digits: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = crate::lab::DEFAULT_KINDS)]
        kinds: Vec<rws::lab::corrupt::Corruption>,
        /// Distinct images in the stream.
        #[arg(long, default_value_t = 600)]
        images: usize,
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
        /// On the CPU: rws's blocked convolution, or candle's stock conv2d (the baseline).
        #[arg(long, default_value = "blocked", value_parser = ["blocked", "candle"])]
        conv: String,
        #[arg(long)]
        json: bool,
    },
    /// A stream spread evenly over several profiles, served in-process by one
    /// model in mixed batches (compare: benches/onnx_baseline.py --profiles).
    Mixed {
        #[arg(long, default_value = "models")]
        repo: PathBuf,
        #[arg(long)]
        model: Option<String>,
        /// Profiles: the model's first signatures, one each at alpha 1.
        #[arg(long, default_value_t = 4)]
        profiles: usize,
        #[arg(long, default_value_t = 64)]
        images: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        iterations: usize,
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

pub async fn bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Fleet {
            state,
            changes,
            json,
            client,
        } => {
            let token = client.token()?;
            let r = rws::bench::fleet(&client.addr, token.as_deref(), &state, changes).await?;
            print_report(json, &r, |r| {
                println!("{} changes over {} replicas", r.changes, r.replicas);
                println!("acknowledged {}", r.acknowledged);
                println!("converged    {}", r.converged);
            })?;
        }
        BenchCmd::Compare {
            a,
            b,
            b_shadow,
            fraction,
            clients,
            phase,
            rounds,
            digits,
            kinds,
            images,
            json,
            client,
        } => {
            let digits = rws::lab::data::Digits::load(&digits)?;
            let opts = rws::bench::compare::CompareOptions {
                addr: client.addr.clone(),
                admin_token: client.token()?,
                clients,
                phase: std::time::Duration::from_secs_f64(phase),
                rounds,
                a: rws::bench::compare::Side {
                    profile: a,
                    shadow: None,
                },
                b: rws::bench::compare::Side {
                    profile: b,
                    shadow: b_shadow.map(|p| (p, fraction)),
                },
                images: rws::bench::compare::mixed_stream(&digits, &kinds, images, 17)?,
            };
            let r = rws::bench::compare::compare(&opts).await?;
            print_report(json, &r, |r| {
                for (name, s) in [("A", &r.a), ("B", &r.b)] {
                    let shadow = s
                        .side
                        .shadow
                        .as_ref()
                        .map_or_else(String::new, |(p, f)| format!(" + shadow {p} at {f}"));
                    println!(
                        "{name} {}{shadow}: {:.1} req/s, p50 {:.0} µs, p99 {:.0} µs (medians of {} phases, {} errors)",
                        s.side.profile,
                        s.median_throughput_rps,
                        s.median_p50_us,
                        s.median_p99_us,
                        s.phases.len(),
                        s.errors
                    );
                }
                println!(
                    "B/A: throughput {:.3}x, p50 {:.3}x, p99 {:.3}x",
                    r.throughput_ratio, r.p50_ratio, r.p99_ratio
                );
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
                addr: client.addr.clone(),
                clients,
                duration: std::time::Duration::from_secs_f64(duration),
                max_requests: requests,
                profiles,
                toggle,
                images: vec![image],
                admin_token: client.token()?,
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
            conv,
            json,
        } => {
            let conv = match conv.as_str() {
                "candle" => rws::model::CpuConv::Candle,
                _ => rws::model::CpuConv::Blocked,
            };
            let r = tokio::task::spawn_blocking(move || {
                let device = rws::model::device::select(&device)?;
                rws::bench::infer(&repo, model.as_deref(), &batch, iterations, &device, conv)
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
        BenchCmd::Mixed {
            repo,
            model,
            profiles,
            images,
            batch,
            iterations,
            json,
        } => {
            let r = tokio::task::spawn_blocking(move || {
                rws::bench::mixed(
                    &repo,
                    model.as_deref(),
                    profiles,
                    (images, batch, iterations),
                )
            })
            .await??;
            print_report(json, &r, |r| {
                println!(
                    "{}, {} profiles ({}), batches of {}: {:.1} images/s; weights {:.1} MiB, RSS +{:.1} MiB",
                    r.model,
                    r.profiles.len(),
                    r.profiles.join(", "),
                    r.batch,
                    r.images_per_second,
                    r.weight_bytes as f64 / (1u64 << 20) as f64,
                    r.rss_growth_bytes as f64 / (1u64 << 20) as f64,
                );
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
