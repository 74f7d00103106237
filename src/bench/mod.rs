//! `rws bench`: measurements an engineer runs against rws. `load` drives a
//! running server over loopback gRPC; `switch` and `memory` measure the library
//! in-process on a synthetic model; [`soak`] runs a server's long life looking for
//! growth; [`gpu`] (the `cuda` feature) validates and
//! times the CUDA path.

pub mod abuse;
pub mod compare;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod soak;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::serve::change::Change;
use crate::serve::profile::Origin;
use crate::server::client::{RwsClient, applied_in};
use crate::{Error, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// Times `iterations` calls of `f`, one after another.
    pub fn time(iterations: usize, mut f: impl FnMut() -> Result<()>) -> Result<Percentiles> {
        let mut times = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed());
        }
        Ok(Percentiles::of(times))
    }

    pub fn of(mut v: Vec<Duration>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
        Percentiles {
            count: v.len(),
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            max_us: at(1.0),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            self.count, self.p50_us, self.p90_us, self.p99_us, self.max_us
        )
    }
}

pub struct LoadOptions {
    pub addr: String,
    pub clients: usize,
    pub duration: Duration,
    /// Stop after this many requests in total, if sooner.
    pub max_requests: Option<usize>,
    /// Profiles the requests name, round robin; empty names the default.
    pub profiles: Vec<String>,
    /// Switch the default profile between these two every `toggle_every`.
    pub toggle: Option<(String, String, Duration)>,
    /// Encoded images, sent in turn (each client starting at its own).
    pub images: Vec<Vec<u8>>,
    /// Token for the Admin calls of a toggle storm.
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub throughput_rps: f64,
    pub latency: Percentiles,
    pub switches: usize,
    pub switch_errors: usize,
    /// Server-side apply time reported by each switch.
    pub patch_apply: Percentiles,
}

/// Refuses any target that is not this machine.
fn check_loopback(addr: &str) -> Result<()> {
    let uri = crate::server::client::server_uri(addr)?;
    let host = uri
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!(
            InvalidArgument,
            "the load generator only targets loopback addresses, not {host:?}"
        );
    }
    Ok(())
}

/// Runs `clients` concurrent clients for the duration (or request budget), with
/// an optional toggle storm of the default profile.
pub async fn load(o: &LoadOptions) -> Result<LoadReport> {
    check_loopback(&o.addr)?;
    if o.images.is_empty() {
        bail!(InvalidArgument, "the load needs at least one image to send");
    }
    let client = RwsClient::connect(&o.addr, None, o.admin_token.as_deref()).await?;
    let stop_at = Instant::now() + o.duration;
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(
        o.max_requests.unwrap_or(usize::MAX),
    ));
    let toggler = o.toggle.clone().map(|(a, b, every)| {
        let mut admin = client.clone();
        tokio::spawn(async move {
            let (mut applies, mut errors, mut i) = (Vec::new(), 0usize, 0usize);
            let mut tick = tokio::time::interval(every);
            while Instant::now() < stop_at {
                tick.tick().await;
                let name = if i % 2 == 0 { &a } else { &b };
                i += 1;
                match admin.set_default(name, false).await {
                    Ok(r) => applies.push(applied_in(&r)),
                    Err(_) => errors += 1,
                }
            }
            (applies, errors)
        })
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..o.clients.max(1) {
        let mut client = client.clone();
        let (budget, images) = (budget.clone(), o.images.clone());
        let profiles = o.profiles.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut i) = (Vec::new(), 0usize, c);
            while Instant::now() < stop_at
                && budget
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |b| b.checked_sub(1),
                    )
                    .is_ok()
            {
                let profile = if profiles.is_empty() {
                    ""
                } else {
                    profiles[i % profiles.len()].as_str()
                };
                let image = images[i % images.len()].clone();
                i += 1;
                let t = Instant::now();
                match client.classify(image, profile, "", 1, false).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.map_err(|e| Error::Internal(e.to_string()))?;
        lat.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    let (applies, switch_errors) = match toggler {
        Some(t) => t.await.map_err(|e| Error::Internal(e.to_string()))?,
        None => (Vec::new(), 0),
    };
    Ok(LoadReport {
        requests: lat.len() + errors,
        errors,
        seconds,
        throughput_rps: lat.len() as f64 / seconds,
        latency: Percentiles::of(lat),
        switches: applies.len() + switch_errors,
        switch_errors,
        patch_apply: Percentiles::of(applies),
    })
}

/// A synthetic model of `arch` loaded in-process on `device`, with one int8 signature.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub arch: String,
    pub device: Device,
    pub model_dir: crate::model::repo::ModelDir,
    pub registry: crate::serve::registry::Registry,
}

impl Fixture {
    pub fn new(arch: &str, blocks: usize, device: &Device) -> Result<Fixture> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let path = dir.path().join("m");
        crate::lab::synth::write_repo_model(
            &path,
            crate::lab::synth::arch_by_name(arch)?,
            blocks,
            &["sig".into()],
            crate::patch::quant::Quant::Int8,
            3,
        )?;
        let model_dir = crate::model::repo::ModelDir::open(dir.path(), Some("m"))?;
        let model =
            crate::model::Model::load(model_dir.config.clone(), &model_dir.base_path(), device)?;
        let registry = crate::serve::registry::Registry::new(Arc::new(model), 64)?;
        let sig =
            crate::patch::signature::Signature::load(&path.join("signatures/sig.rws.safetensors"))?;
        registry.load(
            "sig",
            Arc::new(sig),
            Origin::memory(false),
            &Default::default(),
        )?;
        Ok(Fixture {
            _dir: dir,
            arch: arch.into(),
            device: device.clone(),
            model_dir,
            registry,
        })
    }

    /// The model loaded again from its file, on `device`.
    pub fn reload(&self, device: &Device) -> Result<crate::model::Model> {
        crate::model::Model::load(
            self.model_dir.config.clone(),
            &self.model_dir.base_path(),
            device,
        )
    }

    /// Times `n` profile applies against `reloads` full model reloads.
    pub fn switch(&self, n: usize, reloads: usize) -> Result<SwitchReport> {
        let sig = vec![crate::serve::profile::SignatureRef {
            name: "sig".into(),
            alpha: 0.8,
        }];
        let mut apply = Vec::with_capacity(n);
        for _ in 0..n {
            let put = Change::put("p", sig.clone(), true);
            apply.push(self.registry.apply(&put, &Default::default())?.elapsed);
        }
        let table = self.registry.snapshot();
        let patches = [(&table.signatures["sig"].signature, 0.8f32)];
        let model = self.registry.model();
        let materialize = Percentiles::time(n, || model.materialize(&patches).map(drop))?;
        let reload = Percentiles::time(reloads, || self.reload(&self.device).map(drop))?;
        let apply = Percentiles::of(apply);
        Ok(SwitchReport {
            arch: self.arch.clone(),
            reload_over_apply_p99: reload.p50_us / apply.p99_us,
            apply,
            materialize,
            reload,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SwitchReport {
    pub arch: String,
    /// Build the patched stem and publish it, as `PutProfile` does.
    pub apply: Percentiles,
    /// Building the patched stem alone (on a GPU: descriptor upload, the kernel, the
    /// status read), so that the rest of `apply` is the table's publication.
    pub materialize: Percentiles,
    /// Rebuild the model from its safetensors file.
    pub reload: Percentiles,
    pub reload_over_apply_p99: f64,
}

/// Times `n` profile applies against `reloads` full model reloads, on `device`.
pub fn switch(
    arch: &str,
    blocks: usize,
    n: usize,
    reloads: usize,
    device: &Device,
) -> Result<SwitchReport> {
    Fixture::new(arch, blocks, device)?.switch(n, reloads)
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub arch: String,
    pub profiles: usize,
    pub rss_one_profile_bytes: u64,
    pub rss_all_profiles_bytes: u64,
    pub ratio: f64,
    /// Weights held, by account: the folded model plus every resident stem.
    pub weight_bytes_one_profile: u64,
    pub weight_bytes_all_profiles: u64,
    pub weight_ratio: f64,
    /// What full model copies would cost instead, as a ratio.
    pub full_copies_ratio: f64,
}

/// Resident set size of this process.
pub fn rss_bytes() -> Result<u64> {
    crate::serve::metrics::self_status("VmRSS:")
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::Internal("no VmRSS in /proc/self/status".into()))
}

/// RSS with the clean profile only, then with `profiles` distinct resident profiles.
pub fn memory(arch: &str, blocks: usize, profiles: usize) -> Result<MemoryReport> {
    let f = Fixture::new(arch, blocks, &Device::Cpu)?;
    let before = rss_bytes()?;
    for i in 0..profiles.saturating_sub(1) {
        let alpha = 0.1 + i as f32 * 0.05;
        let refs = vec![crate::serve::profile::SignatureRef {
            name: "sig".into(),
            alpha,
        }];
        f.registry.apply(
            &Change::put(&format!("p{i}"), refs, false),
            &Default::default(),
        )?;
    }
    let after = rss_bytes()?;
    let table = f.registry.snapshot();
    let resident = table.profiles.values().filter(|p| p.is_resident()).count();
    if resident != profiles {
        bail!(
            Internal,
            "expected {profiles} resident profiles, found {resident}"
        );
    }
    let model_bytes: u64 = std::fs::metadata(f.model_dir.base_path())
        .map(|m| m.len())
        .unwrap_or(0);
    let stems: Vec<u64> = table
        .profiles
        .values()
        .map(|p| f.registry.stem(&table, p).map(|s| s.bytes() as u64))
        .collect::<Result<_>>()?;
    let stem_bytes = stems.first().copied().unwrap_or(0);
    let one = model_bytes + stem_bytes;
    let all = model_bytes + stems.iter().sum::<u64>();
    Ok(MemoryReport {
        arch: arch.into(),
        profiles,
        rss_one_profile_bytes: before,
        rss_all_profiles_bytes: after,
        ratio: after as f64 / before as f64,
        weight_bytes_one_profile: one,
        weight_bytes_all_profiles: all,
        weight_ratio: all as f64 / one as f64,
        full_copies_ratio: profiles as f64,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct InferReport {
    pub model: String,
    pub batch: usize,
    pub iterations: usize,
    pub batch_latency: Percentiles,
    /// Images per second at the median batch latency.
    pub images_per_second: f64,
    /// The instruction set of the CPU kernels on this machine (whichever
    /// device ran): a figure says nothing about another ISA.
    pub isa: &'static str,
}

/// Forward passes of the clean model in `repo/model` at each batch size,
/// in-process, its convs run as `conv` says on the CPU.
pub fn infer(
    repo: &std::path::Path,
    model: Option<&str>,
    batches: &[usize],
    iterations: usize,
    device: &Device,
    conv: crate::model::CpuConv,
) -> Result<Vec<InferReport>> {
    let dir = crate::model::repo::ModelDir::open(repo, model)?;
    let m = crate::model::Model::load_with(dir.config.clone(), &dir.base_path(), device, conv)?;
    time_forward(&dir.name, &m, &m.materialize(&[])?, batches, iterations)
}

/// Times `iterations` forward passes of `m` with `stem` at each batch size, logits
/// read back to the host included.
pub fn time_forward(
    name: &str,
    m: &crate::model::Model,
    stem: &crate::model::Stem,
    batches: &[usize],
    iterations: usize,
) -> Result<Vec<InferReport>> {
    let [h, w] = m.config.input_size;
    let channels = m.config.channels;
    let mut rng = crate::rng::Rng::new(1);
    let mut out = Vec::new();
    for &b in batches {
        let x = candle_core::Tensor::from_vec(
            rng.vec(b * channels * h * w, -1.0, 1.0),
            (b, channels, h, w),
            m.device(),
        )?;
        let pass = || -> Result<()> {
            m.forward(stem, &x)?.to_vec2::<f32>()?;
            Ok(())
        };
        pass()?; // warm-up (and, on a GPU, kernel loading)
        let p = Percentiles::time(iterations, pass)?;
        out.push(InferReport {
            model: name.to_string(),
            batch: b,
            iterations,
            images_per_second: b as f64 / (p.p50_us / 1e6),
            batch_latency: p,
            isa: crate::model::blocked::kernel::isa().name(),
        });
    }
    Ok(out)
}

/// A stream spread over several profiles, served by one model.
#[derive(Debug, Clone, Serialize)]
pub struct MixedReport {
    pub model: String,
    pub profiles: Vec<String>,
    pub images: usize,
    pub batch: usize,
    pub iterations: usize,
    /// Images per second at the median time for the whole stream.
    pub images_per_second: f64,
    /// Weights held: the base file, every profile's stem and its signature
    /// file, and on the CPU the stem and signatures laid out for the kernel.
    pub weight_bytes: u64,
    /// Resident memory growth from before the model was loaded until every
    /// profile's stem was folded.
    pub rss_growth_bytes: u64,
}

/// Serves `images` random images spread evenly over `profiles` profiles (the
/// first of `repo/model`'s signatures, each alone at alpha 1), in batches of
/// `batch` consecutive images, each batch one forward pass with every image's
/// own stem: what the server does with a mixed stream. Compare with
/// `benches/onnx_baseline.py --profiles`, which serves the same kind of stream
/// with one full model per profile.
pub fn mixed(
    repo: &std::path::Path,
    model: Option<&str>,
    profiles: usize,
    (images, batch, iterations): (usize, usize, usize),
) -> Result<MixedReport> {
    let before = rss_bytes()?;
    let dir = crate::model::repo::ModelDir::open(repo, model)?;
    let m = crate::model::Model::load(dir.config.clone(), &dir.base_path(), &Device::Cpu)?;
    let files = dir.signature_files()?;
    if profiles == 0 || files.len() < profiles || batch == 0 || images == 0 {
        bail!(
            InvalidArgument,
            "{} has {} signatures; ask for 1 to {} profiles, and at least one image per batch",
            dir.name,
            files.len(),
            files.len()
        );
    }
    let file_bytes = |p: &std::path::Path| -> Result<u64> {
        Ok(std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len())
    };
    let mut weight_bytes = file_bytes(&dir.base_path())?;
    let mut names = Vec::new();
    let mut stems = Vec::new();
    let mut sigs = Vec::new();
    for path in &files[..profiles] {
        let sig = Arc::new(crate::patch::signature::Signature::load(path)?);
        let stem = m.materialize(&[(&sig, 1.0)])?;
        weight_bytes += file_bytes(path)?;
        weight_bytes += stem.bytes() as u64;
        names.push(crate::model::repo::signature_name(path));
        stems.push(stem);
        // Held as the server holds them, so their laid-out deltas are counted.
        sigs.push(sig);
    }
    weight_bytes += m.packed_stem_bytes() as u64;
    let rss_growth_bytes = rss_bytes()?.saturating_sub(before);
    let [h, w] = m.config.input_size;
    let c = m.config.channels;
    let mut rng = crate::rng::Rng::new(7);
    let x = rng.vec(images * c * h * w, -1.0, 1.0);
    // Evenly spread, in a shuffled order.
    let mut which: Vec<usize> = (0..images).map(|i| i % profiles).collect();
    for i in (1..images).rev() {
        which.swap(i, rng.next_u64() as usize % (i + 1));
    }
    let serve = || -> Result<()> {
        for (start, chunk) in which.chunks(batch).enumerate().map(|(b, c)| (b * batch, c)) {
            let xb = candle_core::Tensor::from_slice(
                &x[start * c * h * w..][..chunk.len() * c * h * w],
                (chunk.len(), c, h, w),
                &Device::Cpu,
            )?;
            let each: Vec<&crate::model::Stem> = chunk.iter().map(|&k| &stems[k]).collect();
            m.forward_mixed(&each, &xb)?.to_vec2::<f32>()?;
        }
        Ok(())
    };
    serve()?; // warm-up
    let p = Percentiles::time(iterations, serve)?;
    Ok(MixedReport {
        model: dir.name.clone(),
        profiles: names,
        images,
        batch,
        iterations,
        images_per_second: images as f64 / (p.p50_us / 1e6),
        weight_bytes,
        rss_growth_bytes,
    })
}

/// How fast a fleet converges.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub replicas: usize,
    pub changes: usize,
    /// From the admin call until the replica that took it answered (applied locally).
    pub acknowledged: Percentiles,
    /// From the admin call until every live replica had applied it.
    pub converged: Percentiles,
}

/// `changes` profile changes through the replica at `addr`, each timed until
/// every live replica under `url` has applied it (read from their leased
/// status keys in etcd). Redefines one profile, `bench-convergence`.
pub async fn fleet(
    addr: &str,
    token: Option<&str>,
    url: &crate::serve::fleet::EtcdUrl,
    changes: usize,
) -> Result<FleetReport> {
    check_loopback(addr)?;
    let mut admin = RwsClient::connect(addr, None, token).await?;
    let signature = admin
        .list_signatures()
        .await?
        .signatures
        .into_iter()
        .next()
        .ok_or_else(|| {
            Error::FailedPrecondition("the fleet has no signature to build a profile from".into())
        })?
        .name;
    let mut etcd = etcd_client::Client::connect([url.endpoint.as_str()], None)
        .await
        .map_err(|e| Error::Unavailable(format!("etcd: {e}")))?;
    let (mut acked, mut converged, mut replicas) = (Vec::new(), Vec::new(), 0);
    for i in 0..changes {
        let start = Instant::now();
        let refs = [crate::serve::profile::SignatureRef {
            name: signature.clone(),
            alpha: 0.1 + 0.001 * i as f32,
        }];
        let change = admin
            .put_profile("bench-convergence", &refs, true, false)
            .await?;
        acked.push(start.elapsed());
        loop {
            let rs = crate::serve::fleet::replicas(&mut etcd, url).await?;
            if rs.iter().all(|r| r.applied_revision >= change.revision) {
                replicas = rs.len();
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    Unavailable,
                    "change {i} did not reach every replica in 30 s"
                );
            }
        }
        converged.push(start.elapsed());
    }
    Ok(FleetReport {
        replicas,
        changes,
        acknowledged: Percentiles::of(acked),
        converged: Percentiles::of(converged),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_generator_targets_loopback_only() {
        for ok in [
            "http://127.0.0.1:50051",
            "http://localhost:1",
            "http://[::1]:50051",
            "http://127.8.0.1:9",
        ] {
            check_loopback(ok).unwrap();
        }
        for bad in [
            "http://10.0.0.1:50051",
            "http://192.168.1.2:1",
            "http://example.com:80",
            "not a uri",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles_pick_ranks() {
        let p = Percentiles::of((1..=100).map(Duration::from_micros).collect());
        assert_eq!(
            (p.count, p.p50_us.round(), p.p99_us.round(), p.max_us),
            (100, 51.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::of(vec![]).count, 0);
    }
}
