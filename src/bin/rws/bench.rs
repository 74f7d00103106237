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
    /// A hostile flood beside a well-behaved client, against a running server
    /// (loopback only): the good client alone, then under clients sending large
    /// noise JPEGs; its latency both ways, and the server's memory, decodes in
    /// flight and shed counts each second from its /metrics.
    Abuse {
        /// Seconds the good client runs alone, then under the flood.
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
        #[arg(long, default_value_t = 24)]
        hostile_clients: usize,
        /// Side of the flood's square noise JPEG.
        #[arg(long, default_value_t = 5000)]
        side: u32,
        /// The flood's deadline in milliseconds; 0 sends without one.
        #[arg(long, default_value_t = 50)]
        hostile_deadline_ms: u64,
        /// Run the flood's threads this much lower in priority (Linux nice): a
        /// stand-in, on one machine, for a flood sent from other machines.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
        flood_nice: i32,
        /// The good client's requests per second.
        #[arg(long, default_value_t = 20.0)]
        good_rate: f64,
        /// The good client's deadline in milliseconds.
        #[arg(long, default_value_t = 5000)]
        good_deadline_ms: u64,
        /// What the good client sends (default: a generated 28x28 digit-like PNG).
        #[arg(long)]
        image: Option<PathBuf>,
        /// The server's Prometheus endpoint.
        #[arg(long, default_value = "http://127.0.0.1:9464/metrics")]
        metrics_url: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
    /// A long run against a running server (loopback only) that looks for growth:
    /// paced traffic at a share of the measured capacity, the default toggled, a
    /// signature churned, and the server's memory, descriptors and threads scraped
    /// from its /metrics.
    Soak {
        /// Minutes to run.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Minutes after which memory is taken as settled; the end is compared with it.
        #[arg(long, default_value_t = 5.0)]
        settle_minutes: f64,
        /// Share of the measured capacity to send.
        #[arg(long, default_value_t = 0.7)]
        load: f64,
        /// Seconds of closed-loop load that measure the capacity first.
        #[arg(long, default_value_t = 15.0)]
        calibrate: f64,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Profiles to name, round robin (default: every profile, and the default).
        #[arg(long, value_delimiter = ',')]
        profiles: Vec<String>,
        /// The default profile is switched between these two.
        #[arg(long, value_delimiter = ',', default_value = "clean,fog")]
        toggle: Vec<String>,
        /// Milliseconds between toggles.
        #[arg(long, default_value_t = 100)]
        toggle_ms: u64,
        /// Signature file to churn; it must also be in the model's signatures/.
        #[arg(
            long,
            default_value = "models/mnist-resnet/signatures/fog.rws.safetensors"
        )]
        signature: PathBuf,
        /// Milliseconds between churn cycles.
        #[arg(long, default_value_t = 100)]
        churn_ms: u64,
        /// The server's Prometheus endpoint.
        #[arg(long, default_value = "http://127.0.0.1:9464/metrics")]
        metrics_url: String,
        /// Seconds between scrapes.
        #[arg(long, default_value_t = 5.0)]
        sample: f64,
        /// Seconds per latency window.
        #[arg(long, default_value_t = 60.0)]
        window: f64,
        /// Image to send (default: a generated 28x28 digit-like PNG).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Write the report (soak.json) and its charts (soak-memory.png,
        /// soak-latency.png, soak-handles.png) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Do not run: draw the charts of this saved soak.json into --out.
        #[arg(long, requires = "out")]
        replot: Option<PathBuf>,
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

/// The file's bytes, or a generated 28x28 digit-like PNG.
fn image_or_digit(image: Option<PathBuf>) -> Result<Vec<u8>> {
    if let Some(p) = image {
        return std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()));
    }
    let img =
        image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y * 5) % 256) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

pub async fn bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Soak {
            minutes,
            settle_minutes,
            load,
            calibrate,
            clients,
            profiles,
            toggle,
            toggle_ms,
            signature,
            churn_ms,
            metrics_url,
            sample,
            window,
            image,
            out,
            replot,
            json,
            client,
        } => {
            if let (Some(saved), Some(dir)) = (replot, &out) {
                let text = std::fs::read(&saved)
                    .with_context(|| format!("cannot read {}", saved.display()))?;
                let r: rws::bench::soak::SoakReport = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not a soak report", saved.display()))?;
                return Ok(rws::bench::soak::plot(&r, dir)?);
            }
            let [a, b] = toggle.as_slice() else {
                bail!("--toggle takes two profiles, e.g. clean,fog");
            };
            let secs = std::time::Duration::from_secs_f64;
            let opts = rws::bench::soak::SoakOptions {
                addr: client.addr.clone(),
                admin_token: client.token()?,
                metrics_url,
                duration: secs(minutes * 60.0),
                settle: secs(settle_minutes * 60.0),
                calibrate: secs(calibrate),
                clients,
                load_fraction: load,
                profiles,
                toggle: (a.clone(), b.clone()),
                toggle_every: std::time::Duration::from_millis(toggle_ms),
                signature,
                churn_every: std::time::Duration::from_millis(churn_ms),
                sample_every: secs(sample),
                window: secs(window),
                images: vec![image_or_digit(image)?],
            };
            let r = rws::bench::soak::soak(&opts).await?;
            if let Some(dir) = &out {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let json = dir.join("soak.json");
                std::fs::write(&json, serde_json::to_vec_pretty(&r)?)
                    .with_context(|| format!("cannot write {}", json.display()))?;
                rws::bench::soak::plot(&r, dir)?;
            }
            print_report(json, &r, print_soak)?;
        }
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
            let image = image_or_digit(image)?;
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
        BenchCmd::Abuse {
            duration,
            hostile_clients,
            side,
            hostile_deadline_ms,
            flood_nice,
            good_rate,
            good_deadline_ms,
            image,
            metrics_url,
            json,
            client,
        } => {
            let ms = std::time::Duration::from_millis;
            let opts = rws::bench::abuse::AbuseOptions {
                addr: client.addr.clone(),
                metrics_url,
                duration: std::time::Duration::from_secs_f64(duration),
                hostile_clients,
                side,
                hostile_deadline: (hostile_deadline_ms > 0).then(|| ms(hostile_deadline_ms)),
                flood_nice,
                good_image: image_or_digit(image)?,
                good_rate,
                good_deadline: ms(good_deadline_ms),
            };
            let r = rws::bench::abuse::abuse(&opts).await?;
            print_report(json, &r, |r| print!("{r}"))?;
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

fn print_soak(r: &rws::bench::soak::SoakReport) {
    let mb = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "capacity {:.0} req/s; sent at {:.0}, answered {:.0} req/s; {} requests, {} errors, {} skipped",
        r.capacity_rps, r.target_rps, r.achieved_rps, r.requests, r.errors, r.skipped
    );
    println!("switches {} ({} errors)", r.switches, r.switch_errors);
    println!(
        "churn    {} cycles, {} errors, {} expected refusals",
        r.churn_cycles, r.churn_errors, r.expected_refusals
    );
    for e in &r.error_kinds {
        println!("  {} x {} {}: {}", e.count, e.what, e.kind, e.example);
    }
    for w in &r.windows {
        println!(
            "{:>6.0} s  {:>7} requests {:>4} errors  p50 {:>7.0} µs  p99 {:>7.0} µs",
            w.start_s, w.requests, w.errors, w.latency.p50_us, w.latency.p99_us
        );
    }
    if let (Some(first), Some(last)) = (r.samples.first(), r.samples.last()) {
        println!(
            "resident {:.1} -> {:.1} MiB; heap {} -> {} MiB",
            mb(first.rss_bytes),
            mb(last.rss_bytes),
            first
                .heap_bytes
                .map_or("?".into(), |h| format!("{:.1}", mb(h))),
            last.heap_bytes
                .map_or("?".into(), |h| format!("{:.1}", mb(h))),
        );
    }
    if let (Some(first), Some(last)) = (r.samples.first(), r.samples.last()) {
        println!(
            "stems built {:.0}, resident profiles {:.0} at the end",
            last.stems_built - first.stems_built,
            last.resident_profiles
        );
    }
    println!(
        "resident growth since settling {:+.2}%",
        r.rss_growth * 100.0
    );
    if let Some(h) = r.heap_growth {
        println!("heap growth since settling     {:+.2}%", h * 100.0);
    }
    println!(
        "p99 change, last third over first {:+.1}%",
        r.p99_change * 100.0
    );
    println!(
        "descriptors {:.0}..{:.0}, threads {:.0}..{:.0} after settling",
        r.fds_range.0, r.fds_range.1, r.threads_range.0, r.threads_range.1
    );
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
