//! The served classifier, split in two: a patchable **stem** (conv1 plus the first
//! `patchable_blocks` residual blocks), materialized once per profile by the fused
//! add-scale kernel, and a shared **trunk** folded once at load time. On the CPU
//! both run rws's blocked convolution ([`blocked`]); on a GPU, candle's.

pub mod arch;
pub mod blocked;
mod cache;
#[cfg(feature = "cuda")]
mod cuda;
pub mod detector;
pub mod device;
mod fit;
mod folded;
mod packed_stem;
pub mod repo;
mod stem;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use arch::{Act, Padding};
pub use arch::{Arch, ConvSpec, HeadSpec, UnitSpec};
use blocked::{Blocked, Maps, PackedConv, Planar, Threads};
pub use folded::{CpuConv, FoldedConv};
pub(crate) use folded::{classify_head, forward_unit, pad_for};
use packed_stem::PackedStem;
use stem::PatchLayer;
pub use stem::Stem;

use crate::model::repo::ModelConfig;
use crate::patch::signature::Signature;
use crate::{Error, Result, bail};

/// Everything after the stem, folded once and shared by every profile.
#[derive(Debug)]
struct Trunk {
    units: Vec<(UnitSpec, Vec<FoldedConv>)>,
    head: Head,
}

/// The classifier's linear layers, where the path that runs them wants them.
#[derive(Debug)]
enum Head {
    /// Each weight transposed to `[inputs, outputs]`, biases shaped `[1, outputs]`.
    Tensor {
        reduce: arch::Reduce,
        linears: Vec<(Tensor, Tensor)>,
    },
    /// After global average pooling, the only reduction the blocked path has.
    /// Each linear a 1×1 conv on one-pixel maps.
    Host { linears: Vec<PackedConv> },
}

/// One loaded model: the clean base, ready to materialize stems for profiles.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    stem_units: Vec<UnitSpec>,
    stem_layers: Vec<PatchLayer>,
    trunk: Trunk,
    fingerprint: String,
    device: Device,
    /// Whether convs run on rws's blocked maps ([`CpuConv::blocked_on`]).
    blocked: bool,
    /// On the blocked CPU path, the stem's clean parameters in the packed order.
    packed_stem: Option<PackedStem>,
    /// Whether any conv is depthwise: such a network's batch runs one image at
    /// a time per thread (see [`Model::forward_blocked`]).
    depthwise: bool,
    /// On a CUDA device, the stem's clean parameters there, for the GPU kernel.
    #[cfg(feature = "cuda")]
    cuda_stem: Option<cuda::CudaStem>,
}

/// Values per image below which the blocked path never moves a batch onto the
/// pool: entering it wakes a worker and this thread (about 40 µs on these
/// VMs, more than mnist-resnet's whole batch of one).
const SMALL_IMAGE: usize = 1 << 14;

impl Model {
    /// Loads `base.safetensors` (torchvision names; f32, f16 or bf16).
    pub fn load(config: ModelConfig, path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(config, path, device, CpuConv::default())
    }

    /// As [`Model::load`], with convs run as `conv` says when on the CPU.
    pub fn load_with(
        config: ModelConfig,
        path: &Path,
        device: &Device,
        conv: CpuConv,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::InvalidArgument(format!("cannot read base weights {}: {e}", path.display()))
        })?;
        Self::from_tensors_with(config, &tensors, device, conv)
    }

    pub fn from_tensors(
        config: ModelConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_tensors_with(config, tensors, device, CpuConv::default())
    }

    fn from_tensors_with(
        config: ModelConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
        conv: CpuConv,
    ) -> Result<Self> {
        config.validate()?;
        let classes = config.labels.len();
        let mut params: HashMap<String, Vec<f32>> = HashMap::new();
        let mut hasher = Sha256::new();
        for (name, shape) in config.arch.tensor_shapes(config.channels, classes) {
            let t = tensors.get(&name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "base weights lack tensor {name} (expected torchvision names for {})",
                    config.arch.name()
                ))
            })?;
            if t.dims() != shape.as_slice() {
                bail!(
                    InvalidArgument,
                    "base tensor {name} has shape {:?}, expected {shape:?}",
                    t.dims()
                );
            }
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if values.iter().any(|v| !v.is_finite()) {
                bail!(InvalidArgument, "base tensor {name} contains NaN or Inf");
            }
            if name.ends_with("running_var") && values.iter().any(|v| *v < 0.0) {
                bail!(
                    InvalidArgument,
                    "base tensor {name} holds a negative variance"
                );
            }
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            for d in &shape {
                hasher.update((*d as u64).to_le_bytes());
            }
            for v in &values {
                hasher.update(v.to_le_bytes());
            }
            params.insert(name, values);
        }
        let fingerprint = format!("sha256:{:x}", hasher.finalize());

        let eps = config.bn_eps;
        let mut units = config.arch.units(config.channels);
        let head_spec = config.arch.head(config.channels, classes);
        let blocked = conv.blocked_on(device, &units, &head_spec);
        let trunk_specs = units.split_off(1 + config.patchable_blocks);
        let mut take = |name: &str| params.remove(name).expect("checked above");
        let stem_layers: Vec<PatchLayer> = (units.iter())
            .flat_map(|u| u.convs.iter())
            .map(|c| PatchLayer::take(c, eps, &mut take))
            .collect();
        let mut trunk_units = Vec::new();
        for unit in trunk_specs {
            let convs = (unit.convs.iter())
                .map(|c| PatchLayer::take(c, eps, &mut take).fold(&[], device, blocked, false))
                .collect::<Result<Vec<_>>>()?;
            trunk_units.push((unit, convs));
        }
        // Per linear layer, its weight (`[outputs, inputs]`) and bias.
        let linears: Vec<(&arch::LinearSpec, Vec<f32>, Vec<f32>)> = (head_spec.linears.iter())
            .map(|l| {
                (
                    l,
                    take(&format!("{}.weight", l.name)),
                    take(&format!("{}.bias", l.name)),
                )
            })
            .collect();
        let head = match blocked {
            true => Head::Host {
                linears: (linears.into_iter())
                    .map(|(l, w, b)| {
                        let shape = (l.outputs, l.inputs, 1);
                        PackedConv::new(&w, &b, shape, 1, Padding::Symmetric(0), false)
                    })
                    .collect::<Result<_>>()?,
            },
            false => Head::Tensor {
                reduce: head_spec.reduce,
                linears: (linears.into_iter())
                    .map(|(l, w, b)| {
                        let w = Tensor::from_vec(w, (l.outputs, l.inputs), &Device::Cpu)?;
                        let w = w.t()?.contiguous()?.to_device(device)?;
                        Ok((w, Tensor::from_vec(b, (1, l.outputs), device)?))
                    })
                    .collect::<Result<_>>()?,
            },
        };
        let packed_stem = blocked.then(|| PackedStem::new(&stem_layers)).flatten();
        #[cfg(feature = "cuda")]
        let cuda_stem = match device {
            Device::Cuda(d) => Some(cuda::CudaStem::upload(&stem_layers, d)?),
            _ => None,
        };
        // Uploads to a GPU are asynchronous, and the threads that will run the model
        // use other streams: let them finish here.
        device.synchronize()?;
        let depthwise = (units.iter().chain(trunk_units.iter().map(|(u, _)| u)))
            .flat_map(|u| &u.convs)
            .any(|c| c.is_depthwise());
        Ok(Model {
            config,
            stem_units: units,
            stem_layers,
            trunk: Trunk {
                units: trunk_units,
                head,
            },
            fingerprint,
            device: device.clone(),
            blocked,
            packed_stem,
            depthwise,
            #[cfg(feature = "cuda")]
            cuda_stem,
        })
    }

    /// Identifies the exact base weights; signatures record the one they were made against.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes held for the CPU's stem beyond the base weights: the clean stem
    /// and the live signatures' weight deltas, in the packed order.
    pub fn packed_stem_bytes(&self) -> usize {
        self.packed_stem.as_ref().map_or(0, PackedStem::bytes)
    }

    /// Base tensor names a signature may patch, with their shapes.
    pub fn patchable_tensors(&self) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
        (self.stem_layers.iter()).flat_map(|l| l.spec.patchable_tensors())
    }

    /// The stem with the given signatures added at the given alphas. With no
    /// signatures it is the clean stem; the result is bitwise deterministic. On a
    /// CUDA device the GPU kernel folds it from device-resident weights, and on
    /// the blocked CPU path the kernel writes the packed order from weights laid
    /// out in it (the signatures are shared so that their deltas stay on the
    /// device, or laid out, while they live).
    pub fn materialize(&self, patches: &[(&Arc<Signature>, f32)]) -> Result<Stem> {
        #[cfg(feature = "cuda")]
        if let Some(stem) = &self.cuda_stem {
            return self.materialize_cuda(stem, patches);
        }
        if let Some(stem) = &self.packed_stem {
            return self.materialize_packed(stem, patches);
        }
        let patches: Vec<(&Signature, f32)> = patches.iter().map(|(s, a)| (&***s, *a)).collect();
        let patches = patches.as_slice();
        // Sequential over layers: parallel layers gained 25% at the median but
        // doubled the p99 (rayon wake-ups) in `rws bench switch`.
        let convs = (self.stem_layers.iter().enumerate())
            .map(|(i, l)| l.fold(patches, &self.device, self.blocked, i == 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(Stem { convs })
    }

    /// Logits `[N, classes]` of a batch `[N, C, H, W]`, every image through `stem`.
    pub fn forward(&self, stem: &Stem, x: &Tensor) -> Result<Tensor> {
        self.forward_mixed(&vec![stem; x.dim(0)?], x)
    }

    /// Logits `[N, classes]` of a batch `[N, C, H, W]`, image `i` through
    /// `stems[i]` and all through the shared trunk: images served by different
    /// profiles share one batch. An image's logits do not depend on the rest of
    /// its batch.
    pub fn forward_mixed(&self, stems: &[&Stem], x: &Tensor) -> Result<Tensor> {
        let (n, ..) = x.dims4()?;
        if stems.len() != n {
            bail!(Internal, "{} stems for {n} images", stems.len());
        }
        match self.blocked {
            true => self.forward_blocked(stems, x),
            false => self.forward_tensor(stems, x),
        }
    }

    /// On blocked maps, reading the input where the tensor holds it. A batch
    /// that divides evenly over the rayon pool is split into parts, each run
    /// through the whole network on one thread: one fork-join per batch
    /// instead of one per conv, which on small models cost more than the
    /// convs. Otherwise the batch runs layer by layer, each conv split over
    /// the pool.
    fn forward_blocked(&self, stems: &[&Stem], x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            bail!(
                Internal,
                "the blocked path reads a contiguous input on the CPU"
            );
        };
        let data = &cpu.as_slice::<f32>()?[start..end];
        let (n, c, h, w) = x.dims4()?;
        let threads = rayon::current_num_threads();
        let features = match threads == 1 || n < threads || n % threads != 0 {
            // Small images (mnist-resnet's 28×28) have every conv under the
            // fork-join threshold: they run here, with no pool to wake.
            true if c * h * w < SMALL_IMAGE => {
                self.forward_blocked_on(stems, data, (n, c, h, w), Threads::Pool)?
            }
            // Otherwise on a pool thread, so that each conv's fork-join is a
            // local push the other workers steal, not a job injected from
            // outside and a sleep and a wake of this thread per conv.
            true => {
                rayon::scope(|_| self.forward_blocked_on(stems, data, (n, c, h, w), Threads::Pool))?
            }
            false => {
                // Depthwise networks widen their activations sixfold inside
                // each block: one image at a time keeps them nearer the core
                // (MobileNetV2 at batch 8: 210 against 173 images/s in parts
                // of 4). Dense ones share each layer's weights over the part
                // (ResNet-18: 58 against 55).
                let part = if self.depthwise { 1 } else { n / threads };
                let parts = (stems
                    .par_chunks(part)
                    .zip(data.par_chunks(part * c * h * w)))
                .map(|(stems, x)| self.forward_blocked_on(stems, x, (part, c, h, w), Threads::This))
                .collect::<Result<Vec<_>>>()?;
                parts.concat()
            }
        };
        let logits = self.classify_blocked(&features, n)?;
        Ok(Tensor::from_vec(
            logits,
            (n, self.config.labels.len()),
            &self.device,
        )?)
    }

    /// The classifier's input (`[n, features]`, row-major: the trunk's output
    /// averaged over its pixels) of NCHW `x`, layer by layer over the whole
    /// batch, each image with its own stem's weights.
    fn forward_blocked_on(
        &self,
        stems: &[&Stem],
        x: &[f32],
        dims: (usize, usize, usize, usize),
        threads: Threads,
    ) -> Result<Vec<f32>> {
        let run = |convs: &Vec<&FoldedConv>, x: &Maps, then: folded::Epilogue<Maps>| {
            FoldedConv::forward_blocked(convs, x, then, threads)
        };
        // The input's border: the most the first conv pads on any side.
        let first = &self.stem_units[0].convs[0];
        let (k, s) = (first.kernel, first.stride);
        let ((a, b), (c, d)) = (
            first.padding.amounts(dims.2, k, s),
            first.padding.amounts(dims.3, k, s),
        );
        let pad = a.max(b).max(c).max(d);
        let mut h = Maps::Planar(Planar::new(x, dims, pad));
        // Per stem layer, the conv of each image.
        let layers: Vec<Vec<&FoldedConv>> = (0..self.stem_layers.len())
            .map(|l| stems.iter().map(|s| &s.convs[l]).collect())
            .collect();
        let mut layers = layers.as_slice();
        for unit in &self.stem_units {
            let (mine, rest) = layers.split_at(unit.convs.len());
            h = forward_unit(unit, mine, &h, run)?;
            layers = rest;
        }
        for (unit, convs) in &self.trunk.units {
            let mine: Vec<Vec<&FoldedConv>> = convs.iter().map(|c| vec![c; stems.len()]).collect();
            h = forward_unit(unit, &mine, &h, run)?;
        }
        let Maps::Blocked(h) = h else {
            bail!(Internal, "the trunk's output is not blocked");
        };
        Ok(blocked::global_average(&h).concat())
    }

    /// On candle tensors (a GPU, or the stock baseline): each distinct stem on
    /// its images, then the trunk once on all of them.
    fn forward_tensor(&self, stems: &[&Stem], x: &Tensor) -> Result<Tensor> {
        // Images grouped by stem, in order of first appearance.
        let mut groups: Vec<(&Stem, Vec<u32>)> = Vec::new();
        for (i, s) in stems.iter().enumerate() {
            match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, *s)) {
                Some((_, members)) => members.push(i as u32),
                None => groups.push((s, vec![i as u32])),
            }
        }
        let mut hidden = Vec::with_capacity(groups.len());
        let mut order: Vec<u32> = Vec::with_capacity(stems.len());
        for (stem, members) in &groups {
            let idx = Tensor::new(members.as_slice(), x.device())?;
            let mut h = x.index_select(&idx, 0)?;
            let mut convs = stem.convs.as_slice();
            for unit in &self.stem_units {
                let (mine, rest) = convs.split_at(unit.convs.len());
                h = forward_unit(unit, mine, &h, FoldedConv::forward_tensor)?;
                convs = rest;
            }
            hidden.push(h);
            order.extend(members);
        }
        let mut h = Tensor::cat(&hidden, 0)?;
        for (unit, convs) in &self.trunk.units {
            h = forward_unit(unit, convs, &h, FoldedConv::forward_tensor)?;
        }
        let Head::Tensor { reduce, linears } = &self.trunk.head else {
            bail!(Internal, "the classifier is not on the device");
        };
        let logits = classify_head(&h, *reduce, linears)?;
        if groups.len() == 1 {
            return Ok(logits);
        }
        // Row r of `logits` is image order[r]: put each back in its place.
        let mut back = vec![0u32; order.len()];
        for (r, i) in order.iter().enumerate() {
            back[*i as usize] = r as u32;
        }
        Ok(logits.index_select(&Tensor::new(back.as_slice(), x.device())?, 0)?)
    }

    /// The classifier on `n` images' `features` (`[n, features]`): its
    /// linears as 1×1 convs over one map of `n` pixels, one per image, so that
    /// each weight is read once per batch, not per image (1000 × 1280 of
    /// them in Lite0's). Each output is its own sequence of multiply-adds,
    /// so an image's logits do not depend on the others. `[n, classes]`.
    fn classify_blocked(&self, features: &[f32], n: usize) -> Result<Vec<f32>> {
        let Head::Host { linears } = &self.trunk.head else {
            bail!(Internal, "the classifier is not on the host");
        };
        let transpose = |x: &[f32], rows: usize| {
            let cols = x.len() / rows;
            (0..cols * rows)
                .map(|i| x[(i % rows) * cols + i / rows])
                .collect::<Vec<f32>>()
        };
        let c = features.len() / n;
        let mut x = Blocked::from_nchw(&transpose(features, n), (1, c, 1, n));
        for (i, linear) in linears.iter().enumerate() {
            // ReLU between linears, none after the last.
            let act = match i + 1 < linears.len() {
                true => Act::Relu,
                false => Act::None,
            };
            x = linear.forward(&Maps::Blocked(x), None, act)?;
        }
        Ok(transpose(&x.to_nchw(), x.channels))
    }
}

/// Softmax probabilities of `logits` (shifted by their maximum, so no logit overflows).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

/// The index of the largest value, the first of equals; 0 when empty.
pub fn argmax(values: &[f32]) -> usize {
    (0..values.len())
        .max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}
