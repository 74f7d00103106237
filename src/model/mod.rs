//! The served classifier, split in two: a patchable **stem** (conv1 plus the first
//! `patchable_blocks` residual blocks), materialized once per profile by the fused
//! add-scale kernel, and a shared **trunk** folded once at load time.

pub mod arch;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod detector;
pub mod device;
mod fit;
mod folded;
pub mod repo;
mod stem;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

pub use arch::{Arch, ConvSpec, UnitKind, UnitSpec};
pub use folded::FoldedConv;
pub(crate) use folded::{classify_head, forward_unit};
use stem::PatchLayer;
pub use stem::Stem;

use crate::model::repo::ModelConfig;
use crate::patch::signature::Signature;
use crate::{Error, Result, bail};

/// Everything after the stem, folded once and shared by every profile.
#[derive(Debug)]
struct Trunk {
    units: Vec<(UnitSpec, Vec<FoldedConv>)>,
    /// `fc.weight` transposed to `[features, classes]`.
    fc_weight_t: Tensor,
    fc_bias: Tensor,
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
    /// On a CUDA device, the stem's clean parameters there, for the GPU kernel.
    #[cfg(feature = "cuda")]
    cuda_stem: Option<cuda::CudaStem>,
}

impl Model {
    /// Loads `base.safetensors` (torchvision names; f32, f16 or bf16).
    pub fn load(config: ModelConfig, path: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::InvalidArgument(format!("cannot read base weights {}: {e}", path.display()))
        })?;
        Self::from_tensors(config, &tensors, device)
    }

    pub fn from_tensors(
        config: ModelConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
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
        let trunk_specs = units.split_off(1 + config.patchable_blocks);
        let mut take = |name: &str| params.remove(name).expect("checked above");
        let layer = |spec: &ConvSpec, take: &mut dyn FnMut(&str) -> Vec<f32>| {
            let [w, g, b, m, v] = spec.tensor_names();
            PatchLayer {
                spec: spec.clone(),
                weight: take(&w),
                gamma: take(&g),
                beta: take(&b),
                mean: take(&m),
                var: take(&v),
            }
        };
        let stem_layers: Vec<PatchLayer> = units
            .iter()
            .flat_map(|u| u.convs.iter())
            .map(|c| layer(c, &mut take))
            .collect();
        let mut trunk_units = Vec::new();
        for unit in trunk_specs {
            let convs = unit
                .convs
                .iter()
                .map(|c| layer(c, &mut take).fold(eps, &[], device))
                .collect::<Result<Vec<_>>>()?;
            trunk_units.push((unit, convs));
        }
        let feat = config.arch.feature_channels();
        let fc_weight_t = Tensor::from_vec(take("fc.weight"), (classes, feat), device)?
            .t()?
            .contiguous()?;
        let fc_bias = Tensor::from_vec(take("fc.bias"), (1, classes), device)?;
        #[cfg(feature = "cuda")]
        let cuda_stem = match device {
            Device::Cuda(d) => Some(cuda::CudaStem::upload(&stem_layers, eps, d)?),
            _ => None,
        };
        // Uploads to a GPU are asynchronous, and the threads that will run the model
        // use other streams: let them finish here.
        device.synchronize()?;
        Ok(Model {
            config,
            stem_units: units,
            stem_layers,
            trunk: Trunk {
                units: trunk_units,
                fc_weight_t,
                fc_bias,
            },
            fingerprint,
            device: device.clone(),
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

    /// Base tensor names a signature may patch, with their shapes.
    pub fn patchable_tensors(&self) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
        self.stem_layers.iter().flat_map(|l| {
            let [w, g, b, m, v] = l.spec.tensor_names();
            let o = l.spec.out_channels;
            [
                (w, l.spec.weight_shape().to_vec()),
                (g, vec![o]),
                (b, vec![o]),
                (m, vec![o]),
                (v, vec![o]),
            ]
        })
    }

    /// The stem with the given signatures added at the given alphas. With no
    /// signatures it is the clean stem; the result is bitwise deterministic. On a
    /// CUDA device the GPU kernel folds it from device-resident weights (the
    /// signatures are shared so that their deltas stay on the device while they live).
    pub fn materialize(&self, patches: &[(&Arc<Signature>, f32)]) -> Result<Stem> {
        #[cfg(feature = "cuda")]
        if let Some(stem) = &self.cuda_stem {
            return self.materialize_cuda(stem, patches);
        }
        let patches: Vec<(&Signature, f32)> = patches.iter().map(|(s, a)| (&***s, *a)).collect();
        let patches = patches.as_slice();
        // Sequential over layers: parallel layers gained 25% at the median but
        // doubled the p99 (rayon wake-ups) in `rws bench switch`.
        let convs = self
            .stem_layers
            .iter()
            .map(|l| l.fold(self.config.bn_eps, patches, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Stem { convs })
    }

    /// Runs the stem on a batch `[N, C, H, W]`.
    pub fn forward_stem(&self, stem: &Stem, x: &Tensor) -> Result<Tensor> {
        let mut convs = stem.convs.as_slice();
        let mut h = x.clone();
        for unit in &self.stem_units {
            let (mine, rest) = convs.split_at(unit.convs.len());
            h = forward_unit(unit, mine, &h, FoldedConv::forward)?;
            convs = rest;
        }
        Ok(h)
    }

    /// Runs the shared trunk and the classifier: logits `[N, classes]`.
    pub fn forward_trunk(&self, h: &Tensor) -> Result<Tensor> {
        let mut h = h.clone();
        for (unit, convs) in &self.trunk.units {
            h = forward_unit(unit, convs, &h, FoldedConv::forward)?;
        }
        Ok(classify_head(
            &h,
            &self.trunk.fc_weight_t,
            &self.trunk.fc_bias,
        )?)
    }

    pub fn forward(&self, stem: &Stem, x: &Tensor) -> Result<Tensor> {
        self.forward_trunk(&self.forward_stem(stem, x)?)
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
