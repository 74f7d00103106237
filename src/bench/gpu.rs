//! `rws bench gpu`: everything a machine with a GPU should establish about the CUDA
//! path, in one run (scripts/gpu-check.sh runs it).
//!
//! 1. **Kernel agreement.** The CUDA kernel against the CPU kernel on random layers,
//!    for every storage form and 1-3 signatures (BatchNorm deltas included, variance
//!    ones in log space), all layers of a case in one launch, into an output buffer
//!    poisoned with NaN first so that an element the kernel skips cannot pass; and
//!    the same errors (negative variance, non-finite output) at the same layer and
//!    channel.
//! 2. **Bandwidth.** The kernel's own time on large layers against a device-to-device
//!    copy with the same memory traffic: the floor (target: at least 0.8x its speed).
//! 3. **The served path.** A patched synthetic ResNet's logits on the GPU against the
//!    CPU; patch then remove gives back bitwise the clean logits; profile switch (apply
//!    until visible) against a full reload, and inference p50/p99, on ResNet-18 and
//!    ResNet-50 with conv1 + layer1 patchable (target: ResNet-50 switch p99 at most
//!    50 µs).

use std::time::Duration;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{CudaDevice, Device, Tensor};
use serde::Serialize;

use super::{Fixture, InferReport, Percentiles, SwitchReport};
use crate::patch::kernel::cuda::{
    self, DeviceConvBn, DeviceDelta, DeviceLayerDelta, FoldError, LayerJob, OutputLayout,
};
use crate::patch::kernel::{ConvBn, LayerDelta, cpu};
use crate::patch::quant::{Delta, Quant};
use crate::rng::Rng;
use crate::serve::change::Change;
use crate::{Result, bail};

/// The CPU and GPU kernels must agree to this relative error (max |diff| / max |value|
/// per output tensor). Only `expf` may differ (CUDA documents 2 ulp), so most cases
/// are bitwise equal.
pub const KERNEL_TOLERANCE: f32 = 1e-6;
/// Logits of the whole model: convolutions sum in a different order on cuBLAS.
pub const LOGITS_TOLERANCE: f32 = 1e-3;
/// Kernel speed relative to a device copy with the same traffic.
pub const BANDWIDTH_TARGET: f64 = 0.8;
/// ResNet-50 profile switch, p99.
pub const SWITCH_TARGET_US: f64 = 50.0;

pub struct GpuOptions {
    pub device: String,
    pub archs: Vec<String>,
    /// Blocks after conv1 that signatures patch; `None`: all of layer1.
    pub patchable_blocks: Option<usize>,
    pub applies: usize,
    pub batches: Vec<usize>,
    pub iterations: usize,
}

#[derive(Debug, Serialize)]
pub struct GpuReport {
    /// Name and architecture, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub device: String,
    pub kernel: CheckReport,
    pub bandwidth: Vec<BandwidthReport>,
    pub model: Vec<ModelCheck>,
    pub switch: Vec<SwitchReport>,
    pub infer: Vec<InferReport>,
    pub targets: Vec<Target>,
}

impl GpuReport {
    /// Whether the GPU computes what the CPU does. Speed targets are reported in
    /// [`GpuReport::targets`] but do not fail the run.
    pub fn correct(&self) -> bool {
        self.kernel.failures.is_empty() && self.model.iter().all(|m| m.passed)
    }
}

#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    /// Layers compared (a case launches several at once).
    pub layers: usize,
    /// Of those, bitwise equal to the CPU kernel's output.
    pub bitwise_equal: usize,
    pub max_rel_err_weight: f32,
    pub max_rel_err_bias: f32,
    /// Cases where both kernels had to refuse the patch, with the same error.
    pub error_cases: usize,
    /// Every disagreement; empty when the kernel passed.
    pub failures: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BandwidthReport {
    /// `[out_channels, cols]` of the layer.
    pub shape: [usize; 2],
    pub quant: String,
    /// Bytes the kernel reads and writes: W, the delta, the output, BatchNorm vectors.
    pub traffic_bytes: usize,
    pub kernel_us: f64,
    /// A device-to-device copy of half the traffic (so the same bytes read and written).
    pub copy_us: f64,
    pub kernel_gbps: f64,
    pub copy_gbps: f64,
    /// `copy_us / kernel_us`: 1.0 is the memory floor.
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct ModelCheck {
    pub arch: String,
    /// Patched profile, GPU against CPU.
    pub max_rel_err_logits: f32,
    /// The patched profile's logits differ from the clean ones (the patch took).
    pub patch_changes_logits: bool,
    /// After the patch is removed, a freshly folded clean stem gives the clean
    /// logits bit for bit (the base weights were never written).
    pub removal_bitwise_equal: bool,
    pub passed: bool,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub goal: String,
    pub met: bool,
}

/// Runs the whole check on `opts.device`, which must open a GPU.
pub fn run(opts: &GpuOptions) -> Result<GpuReport> {
    let device = crate::model::device::select(&opts.device)?;
    let Device::Cuda(dev) = &device else {
        bail!(
            FailedPrecondition,
            "rws bench gpu needs a GPU, but --device {} opened the CPU; name one, e.g. --device cuda:0",
            opts.device
        );
    };
    let ctx = dev.cuda_stream().context().clone();
    let (major, minor) = ctx.compute_capability().w()?;
    let name = format!("{} (sm_{major}{minor})", ctx.name().w()?);
    tracing::info!(device = %name, "checking the CUDA kernel against the CPU kernel");
    let kernel = check_kernel(dev)?;
    tracing::info!("timing the kernel against a device copy");
    let bandwidth = bandwidth(dev)?;
    let (mut model, mut switch, mut infer) = (Vec::new(), Vec::new(), Vec::new());
    for arch in &opts.archs {
        let blocks = match opts.patchable_blocks {
            Some(n) => n,
            None => crate::lab::synth::arch_by_name(arch)?.first_stage_blocks(),
        };
        tracing::info!(%arch, blocks, "checking and timing the served path");
        let f = Fixture::new(arch, blocks, &device)?;
        model.push(check_model(&f)?);
        if !model.last().is_some_and(|m| m.passed) {
            tracing::error!(%arch, "the GPU model disagrees with the CPU: see the report");
        }
        switch.push(f.switch(opts.applies, 3)?);
        let m = f.registry.model();
        infer.extend(super::time_forward(
            arch,
            m,
            &m.materialize(&[])?,
            &opts.batches,
            opts.iterations,
        )?);
    }
    let targets = targets(&kernel, &bandwidth, &model, &switch);
    Ok(GpuReport {
        device: name,
        kernel,
        bandwidth,
        model,
        switch,
        infer,
        targets,
    })
}

fn targets(
    kernel: &CheckReport,
    bandwidth: &[BandwidthReport],
    model: &[ModelCheck],
    switch: &[SwitchReport],
) -> Vec<Target> {
    let mut t = Vec::new();
    let worst = kernel.max_rel_err_weight.max(kernel.max_rel_err_bias);
    t.push(Target {
        name: "CUDA kernel vs CPU kernel, max relative error".into(),
        value: f64::from(worst),
        goal: format!("<= {KERNEL_TOLERANCE:e}, no failures"),
        met: kernel.failures.is_empty(),
    });
    if let Some(worst) = model.iter().map(|m| m.max_rel_err_logits).reduce(f32::max) {
        t.push(Target {
            name: "patched model logits, GPU vs CPU, max relative error".into(),
            value: f64::from(worst),
            goal: format!("<= {LOGITS_TOLERANCE:e}"),
            met: model.iter().all(|m| m.passed),
        });
    }
    if let Some(ratio) = bandwidth.iter().map(|b| b.ratio).reduce(f64::min) {
        t.push(Target {
            name: "kernel speed / device copy speed, worst layer".into(),
            value: ratio,
            goal: format!(">= {BANDWIDTH_TARGET}"),
            met: ratio >= BANDWIDTH_TARGET,
        });
    }
    for s in switch.iter().filter(|s| s.arch == "resnet50") {
        t.push(Target {
            name: "resnet50 profile switch p99 (µs)".into(),
            value: s.apply.p99_us,
            goal: format!("<= {SWITCH_TARGET_US}"),
            met: s.apply.p99_us <= SWITCH_TARGET_US,
        });
    }
    t
}

/// A clean conv + BatchNorm on the host (ranges as in the CPU kernel's tests).
struct HostLayer {
    weight: Vec<f32>,
    out_channels: usize,
    bn: [Vec<f32>; 4],
}

impl HostLayer {
    fn random(rng: &mut Rng, out_channels: usize, cols: usize) -> HostLayer {
        let o = out_channels;
        HostLayer {
            weight: rng.vec(o * cols, -0.2, 0.2),
            out_channels,
            bn: [
                rng.vec(o, 0.5, 1.5),
                rng.vec(o, -0.5, 0.5),
                rng.vec(o, -0.3, 0.3),
                rng.vec(o, 0.2, 2.0),
            ],
        }
    }

    fn conv_bn(&self) -> ConvBn<'_> {
        let [gamma, beta, mean, var] = &self.bn;
        ConvBn {
            weight: &self.weight,
            out_channels: self.out_channels,
            gamma,
            beta,
            mean,
            var,
            eps: 1e-5,
        }
    }
}

/// One signature's deltas for one layer: weight, gamma, beta, mean, var.
struct HostSig {
    alpha: f32,
    parts: [Option<Delta>; 5],
}

impl HostSig {
    /// Random deltas: the weight stored as `weight`, the BatchNorm ones as `bn` (int
    /// forms as one row, which exercises [`crate::patch::quant::DeltaView::at`]'s general path).
    fn random(
        rng: &mut Rng,
        layer: &HostLayer,
        alpha: f32,
        weight: Option<Quant>,
        bn: Option<Quant>,
    ) -> HostSig {
        let o = layer.out_channels;
        let w = weight.map(|q| Delta::quantize(&rng.vec(layer.weight.len(), -0.05, 0.05), o, q));
        // Variance deltas stay small enough that var' > 0 for |alpha| <= 1.5.
        let mut bn_part = |lo: f32, hi: f32| bn.map(|q| Delta::quantize(&rng.vec(o, lo, hi), 1, q));
        HostSig {
            alpha,
            parts: [
                w,
                bn_part(-0.1, 0.1),
                bn_part(-0.1, 0.1),
                bn_part(-0.05, 0.05),
                bn_part(-0.1, 0.1),
            ],
        }
    }

    fn layer_delta(&self) -> LayerDelta<'_> {
        let [w, g, b, m, v] = self.parts.each_ref().map(|p| p.as_ref().map(Delta::view));
        LayerDelta {
            alpha: self.alpha,
            weight: w,
            gamma: g,
            beta: b,
            mean: m,
            var: v,
        }
    }
}

/// One case: layers, and per layer the signatures to add.
struct Case {
    name: String,
    layers: Vec<HostLayer>,
    sigs: Vec<Vec<HostSig>>,
}

/// Layer shapes `(out_channels, cols)`: ResNet conv1 and 3x3/1x1 convs, odd and tiny
/// rows, and rows longer than a thread block.
const SHAPES: [(usize, usize); 7] = [
    (64, 147),
    (64, 576),
    (16, 27),
    (256, 64),
    (33, 75),
    (128, 1152),
    (1, 1),
];

fn cases() -> Vec<Case> {
    let mut rng = Rng::new(2024);
    let mut cases = Vec::new();
    let layers = |rng: &mut Rng| -> Vec<HostLayer> {
        SHAPES
            .iter()
            .map(|&(o, c)| HostLayer::random(rng, o, c))
            .collect()
    };
    // No signature: the plain BatchNorm fold.
    let l = layers(&mut rng);
    cases.push(Case {
        name: "clean".into(),
        sigs: l.iter().map(|_| vec![]).collect(),
        layers: l,
    });
    let alphas = [0.7, -0.4, 1.3];
    let bn = [Some(Quant::F32), Some(Quant::F16), Some(Quant::Int8)];
    for (qi, q) in Quant::ALL.into_iter().enumerate() {
        for n in 1..=3 {
            let l = layers(&mut rng);
            let sigs = l
                .iter()
                .map(|layer| {
                    (0..n)
                        .map(|k| {
                            // With three, the middle one patches the BatchNorm only.
                            let w = (n < 3 || k != 1).then_some(Quant::ALL[(qi + k) % 4]);
                            HostSig::random(&mut rng, layer, alphas[k], w, bn[k])
                        })
                        .collect()
                })
                .collect();
            cases.push(Case {
                name: format!("{q} x{n}"),
                layers: l,
                sigs,
            });
        }
    }
    // Errors, each in one layer of several: both kernels must refuse the same way.
    let plain = |rng: &mut Rng, l: &[HostLayer]| -> Vec<Vec<HostSig>> {
        l.iter()
            .map(|layer| vec![HostSig::random(rng, layer, 0.5, Some(Quant::Int8), None)])
            .collect()
    };
    let mut l = layers(&mut rng);
    for (layer, c) in [(1, 50), (1, 37), (4, 5)] {
        l[layer].bn[3][c] = -1.0;
    }
    cases.push(Case {
        name: "negative variance".into(),
        sigs: plain(&mut rng, &l),
        layers: l,
    });
    let l = layers(&mut rng);
    let mut sigs = plain(&mut rng, &l);
    let big = Delta::F32(rng.vec(l[1].weight.len(), 50.0, 100.0));
    sigs[1] = vec![HostSig {
        alpha: 1e38,
        parts: [Some(big), None, None, None, None],
    }];
    cases.push(Case {
        name: "overflow everywhere".into(),
        sigs,
        layers: l,
    });
    let l = layers(&mut rng);
    let mut sigs = plain(&mut rng, &l);
    let mut vals = vec![0.01f32; l[1].weight.len()];
    vals[40 * SHAPES[1].1 + 17] = 1e30;
    sigs[1] = vec![HostSig {
        alpha: 1e10,
        parts: [
            Some(Delta::quantize(&vals, SHAPES[1].0, Quant::Int8)),
            None,
            None,
            None,
            None,
        ],
    }];
    cases.push(Case {
        name: "overflow in one channel".into(),
        sigs,
        layers: l,
    });
    let l = layers(&mut rng);
    let mut sigs = plain(&mut rng, &l);
    sigs[0] = vec![HostSig {
        alpha: 1e30,
        parts: [
            None,
            None,
            None,
            Some(Delta::F32(vec![1e30; SHAPES[0].0])),
            None,
        ],
    }];
    cases.push(Case {
        name: "non-finite bias".into(),
        sigs,
        layers: l,
    });
    cases
}

/// A case's inputs on the device.
struct DeviceCase {
    layers: Vec<DeviceConvBn>,
    /// Per layer, per signature: alpha and the five parts.
    sigs: Vec<Vec<(f32, [Option<DeviceDelta>; 5])>>,
}

impl DeviceCase {
    fn upload(dev: &CudaDevice, case: &Case) -> Result<DeviceCase> {
        let stream = dev.cuda_stream();
        let layers = case
            .layers
            .iter()
            .map(|l| DeviceConvBn::upload(&l.conv_bn(), dev))
            .collect::<Result<_>>()?;
        let mut sigs = Vec::new();
        for layer_sigs in &case.sigs {
            let mut per_layer = Vec::new();
            for s in layer_sigs {
                let mut parts: [Option<DeviceDelta>; 5] = Default::default();
                for (dst, src) in parts.iter_mut().zip(&s.parts) {
                    if let Some(d) = src {
                        *dst = Some(DeviceDelta::upload(d.view(), &stream)?);
                    }
                }
                per_layer.push((s.alpha, parts));
            }
            sigs.push(per_layer);
        }
        stream.synchronize().w()?;
        Ok(DeviceCase { layers, sigs })
    }

    fn jobs(&self) -> Vec<LayerJob<'_>> {
        self.layers
            .iter()
            .zip(&self.sigs)
            .map(|(base, sigs)| LayerJob {
                base,
                deltas: sigs
                    .iter()
                    .map(|(alpha, [w, g, b, m, v])| DeviceLayerDelta {
                        alpha: *alpha,
                        weight: w.as_ref(),
                        gamma: g.as_ref(),
                        beta: b.as_ref(),
                        mean: m.as_ref(),
                        var: v.as_ref(),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// `max |gpu - cpu| / max |cpu|`; infinite if the GPU left a NaN (the poison) or an Inf.
fn rel_err(gpu: &[f32], cpu: &[f32]) -> f32 {
    if gpu.len() != cpu.len() || gpu.iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    let diff = gpu
        .iter()
        .zip(cpu)
        .map(|(g, c)| (g - c).abs())
        .fold(0.0, f32::max);
    let scale = cpu.iter().map(|c| c.abs()).fold(0.0, f32::max);
    if scale > 0.0 { diff / scale } else { diff }
}

fn check_kernel(dev: &CudaDevice) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let stream = dev.cuda_stream();
    for case in cases() {
        // The CPU kernel, layer by layer (as the model folds them), outputs poisoned.
        let cpu: Vec<_> = case
            .layers
            .iter()
            .zip(&case.sigs)
            .map(|(l, sigs)| {
                let deltas: Vec<LayerDelta> = sigs.iter().map(HostSig::layer_delta).collect();
                let mut w = vec![f32::NAN; l.weight.len()];
                let mut b = vec![f32::NAN; l.out_channels];
                cpu::fused_add_scale(&l.conv_bn(), &deltas, &mut w, &mut b).map(|()| (w, b))
            })
            .collect();
        let want_err = cpu
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.as_ref().err().map(|e| (i, e.clone())));

        // The CUDA kernel, every layer in one launch, output poisoned.
        let on_device = DeviceCase::upload(dev, &case)?;
        let jobs = on_device.jobs();
        let layout = OutputLayout::new(
            case.layers
                .iter()
                .map(|l| (l.out_channels, l.weight.len() / l.out_channels)),
        );
        let mut out = stream.clone_htod(&vec![f32::NAN; layout.len()]).w()?;
        let got = cuda::fused_add_scale(dev, &jobs, &layout, &mut out);
        let host = stream.clone_dtoh(&out).w()?;

        match (want_err, got) {
            (_, Err(FoldError::Device(e))) => return Err(e),
            (None, Ok(())) => {
                for (i, r) in cpu.iter().enumerate() {
                    let (w, b) = r.as_ref().expect("no CPU error in this case");
                    let (w_at, b_at) = layout.offsets(i);
                    let (gw, gb) = (&host[w_at..][..w.len()], &host[b_at..][..b.len()]);
                    let (ew, eb) = (rel_err(gw, w), rel_err(gb, b));
                    report.layers += 1;
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    if bits(gw) == bits(w) && bits(gb) == bits(b) {
                        report.bitwise_equal += 1;
                    }
                    report.max_rel_err_weight = report.max_rel_err_weight.max(ew);
                    report.max_rel_err_bias = report.max_rel_err_bias.max(eb);
                    if ew > KERNEL_TOLERANCE || eb > KERNEL_TOLERANCE {
                        let (o, c) = SHAPES[i];
                        report.failures.push(format!(
                            "{}: layer {i} ({o}x{c}): relative error {ew:e} (weight), {eb:e} (bias)",
                            case.name
                        ));
                    }
                }
            }
            (Some((layer, want)), Err(FoldError::Patch { layer: l, error }))
                if layer == l && want == error =>
            {
                report.error_cases += 1;
            }
            (want, got) => report.failures.push(format!(
                "{}: the CPU kernel gives {want:?} (layer, error), the CUDA kernel {got:?}",
                case.name
            )),
        }
    }
    Ok(report)
}

/// Median of `n` timings after `n / 10` warm-up runs.
fn median(n: usize, mut time: impl FnMut() -> Result<Duration>) -> Result<f64> {
    for _ in 0..n / 10 {
        time()?;
    }
    let times = (0..n).map(|_| time()).collect::<Result<Vec<_>>>()?;
    Ok(Percentiles::of(times).p50_us)
}

fn bandwidth(dev: &CudaDevice) -> Result<Vec<BandwidthReport>> {
    let stream = dev.cuda_stream();
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    let runs = [
        ((512, 4608), Quant::Int8),
        ((512, 4608), Quant::Int4),
        ((512, 4608), Quant::F16),
        ((512, 4608), Quant::F32),
        ((2048, 4608), Quant::Int8),
    ];
    for ((o, cols), quant) in runs {
        let layer = HostLayer::random(&mut rng, o, cols);
        let case = Case {
            name: String::new(),
            sigs: vec![vec![HostSig::random(
                &mut rng,
                &layer,
                0.8,
                Some(quant),
                None,
            )]],
            layers: vec![layer],
        };
        let traffic = 2 * o * cols * 4
            + case.sigs[0][0].parts[0]
                .as_ref()
                .map_or(0, Delta::stored_bytes)
            + 5 * o * 4;
        let on_device = DeviceCase::upload(dev, &case)?;
        let jobs = on_device.jobs();
        let layout = OutputLayout::new([(o, cols)]);
        // SAFETY: written by the kernel before anything reads it.
        let mut dst = unsafe { dev.alloc::<f32>(layout.len()) }?;
        let kernel_us = median(50, || {
            cuda::fused_add_scale_timed(dev, &jobs, &layout, &mut dst).map_err(|e| match e {
                FoldError::Device(e) => e,
                patch => crate::Error::Internal(patch.to_string()),
            })
        })?;
        let src = stream.alloc_zeros::<u8>(traffic / 2).w()?;
        let mut copy = stream.alloc_zeros::<u8>(traffic / 2).w()?;
        let copy_us = median(50, || {
            let start = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            stream.memcpy_dtod(&src, &mut copy).w()?;
            let end = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            let ms = start.elapsed_ms(&end).w()?;
            Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
        })?;
        let gbps = |us: f64| traffic as f64 / us / 1e3;
        out.push(BandwidthReport {
            shape: [o, cols],
            quant: quant.to_string(),
            traffic_bytes: traffic,
            kernel_us,
            copy_us,
            kernel_gbps: gbps(kernel_us),
            copy_gbps: gbps(copy_us),
            ratio: copy_us / kernel_us,
        });
    }
    Ok(out)
}

/// A patched profile's logits from the fixture's GPU model against the same model
/// loaded on the CPU: checks the device-resident stem end to end (upload, the
/// signature's device copy, the output layout and its tensor views). Then patch and
/// remove through the registry, as `PutProfile` does: the logits must come back bit
/// for bit.
fn check_model(f: &Fixture) -> Result<ModelCheck> {
    let gpu = f.registry.model();
    let cpu = f.reload(&Device::Cpu)?;
    let table = f.registry.snapshot();
    let sig = &table.signatures["sig"].signature;
    let patches = [(sig, 0.8f32)];
    let cfg = &cpu.config;
    let [h, w] = cfg.input_size;
    let x = Rng::new(3).vec(2 * cfg.channels * h * w, -1.0, 1.0);
    let shape = (2, cfg.channels, h, w);
    let logits = |m: &crate::model::Model, stem: &crate::model::Stem| -> Result<Vec<f32>> {
        let x = Tensor::from_slice(&x, shape, m.device())?;
        Ok(m.forward(stem, &x)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let err = rel_err(
        &logits(gpu, &gpu.materialize(&patches)?)?,
        &logits(&cpu, &cpu.materialize(&patches)?)?,
    );

    let served = |name: &str| -> Result<Vec<f32>> {
        let table = f.registry.snapshot();
        let profile = table.profile(Some(name))?;
        let stem = f.registry.stem(&table, profile)?;
        logits(gpu, &stem)
    };
    let clean = served(crate::serve::profile::CLEAN)?;
    let sig_ref = |alpha| crate::serve::profile::SignatureRef {
        name: "sig".into(),
        alpha,
    };
    let put = |refs| {
        f.registry
            .apply(&Change::put("roundtrip", refs, true), &Default::default())
    };
    put(vec![sig_ref(0.8)])?;
    let patched = served("roundtrip")?;
    // Removing every signature refolds the stem from the untouched base weights.
    put(vec![])?;
    let removed = served("roundtrip")?;
    f.registry
        .apply(&Change::Delete("roundtrip".into()), &Default::default())?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let patch_changes_logits = bits(&patched) != bits(&clean);
    let removal_bitwise_equal = bits(&removed) == bits(&clean);
    Ok(ModelCheck {
        arch: f.arch.clone(),
        max_rel_err_logits: err,
        patch_changes_logits,
        removal_bitwise_equal,
        passed: err <= LOGITS_TOLERANCE && patch_changes_logits && removal_bitwise_equal,
    })
}
