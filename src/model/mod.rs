//! The served classifier, split in two: a patchable **stem** (conv1 plus the first
//! `patchable_blocks` residual blocks), materialized once per profile by the fused
//! add-scale kernel, and a shared **trunk** folded once at load time.

pub mod arch;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
mod fit;
pub mod repo;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

pub use arch::{Arch, ConvSpec, UnitKind, UnitSpec};

use crate::model::repo::ModelConfig;
use crate::patch::kernel::{self, ConvBn, LayerDelta};
use crate::patch::signature::Signature;
use crate::{Error, Result, bail};

/// A conv with BatchNorm folded in: `conv(x, weight) + bias`.
#[derive(Debug, Clone)]
pub struct FoldedConv {
    weight: Tensor,
    /// Shaped `[1, O, 1, 1]` to broadcast over NCHW.
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl FoldedConv {
    fn new(spec: &ConvSpec, weight: Vec<f32>, bias: Vec<f32>, device: &Device) -> Result<Self> {
        let o = spec.out_channels;
        Ok(FoldedConv {
            weight: Tensor::from_vec(weight, spec.weight_shape().as_slice(), device)?,
            bias: Tensor::from_vec(bias, (1, o, 1, 1), device)?,
            stride: spec.stride,
            padding: spec.padding,
        })
    }

    fn forward(&self, x: &Tensor, then: Epilogue) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            let op = conv::Conv2dBias {
                stride: self.stride,
                padding: self.padding,
                residual: then.residual,
                relu: then.relu,
            };
            x.contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op)
        } else {
            let y = x
                .conv2d(&self.weight, self.padding, self.stride, 1, 1)?
                .broadcast_add(&self.bias)?;
            then.apply(y)
        }
    }
}

/// What follows a conv inside a unit: a residual block's shortcut added, then
/// ReLU. The served CPU path fuses both into the conv; this is the plain form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
}

impl Epilogue<'_> {
    pub(crate) fn apply(self, y: Tensor) -> candle_core::Result<Tensor> {
        let y = match self.residual {
            Some(r) => (y + r)?,
            None => y,
        };
        if self.relu { y.relu() } else { Ok(y) }
    }
}

/// The clean, unfolded parameters of one patchable layer, kept on the host
/// because every profile is computed from them.
#[derive(Debug)]
struct PatchLayer {
    spec: ConvSpec,
    weight: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
}

impl PatchLayer {
    fn conv_bn(&self, eps: f32) -> ConvBn<'_> {
        ConvBn {
            weight: &self.weight,
            out_channels: self.spec.out_channels,
            gamma: &self.gamma,
            beta: &self.beta,
            mean: &self.mean,
            var: &self.var,
            eps,
        }
    }

    /// Folds this layer with the given signatures applied.
    fn fold(&self, eps: f32, patches: &[(&Signature, f32)], device: &Device) -> Result<FoldedConv> {
        let [w, g, b, m, v] = self.spec.tensor_names();
        let deltas: Vec<LayerDelta> = patches
            .iter()
            .map(|(sig, alpha)| LayerDelta {
                alpha: *alpha,
                weight: sig.delta(&w),
                gamma: sig.delta(&g),
                beta: sig.delta(&b),
                mean: sig.delta(&m),
                var: sig.delta(&v),
            })
            .collect();
        let mut out_w = vec![0f32; self.weight.len()];
        let mut out_b = vec![0f32; self.spec.out_channels];
        kernel::cpu::fused_add_scale(&self.conv_bn(eps), &deltas, &mut out_w, &mut out_b)
            .map_err(|e| Error::InvalidArgument(format!("cannot patch {}: {e}", self.spec.conv)))?;
        FoldedConv::new(&self.spec, out_w, out_b, device)
    }
}

/// The patched shallow units of one profile. Cheap to hold many of: it is the
/// only per-profile copy of weights.
#[derive(Debug)]
pub struct Stem {
    convs: Vec<FoldedConv>,
}

impl Stem {
    /// Bytes of weights this stem holds.
    pub fn bytes(&self) -> usize {
        self.convs
            .iter()
            .map(|c| (c.weight.elem_count() + c.bias.elem_count()) * 4)
            .sum()
    }
}

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
    /// CUDA device the GPU kernel folds it from device-resident weights.
    pub fn materialize(&self, patches: &[(&Signature, f32)]) -> Result<Stem> {
        #[cfg(feature = "cuda")]
        if let Some(stem) = &self.cuda_stem {
            return self.materialize_cuda(stem, patches);
        }
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

/// Runs one unit, given how to apply one of its convs (conv + BatchNorm, then
/// the epilogue): the served model passes folded convs with the epilogue fused
/// in, training passes conv and BatchNorm modules.
pub(crate) fn forward_unit<C>(
    unit: &UnitSpec,
    convs: &[C],
    x: &Tensor,
    conv: impl Fn(&C, &Tensor, Epilogue) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let relu = Epilogue {
        residual: None,
        relu: true,
    };
    match unit.kind {
        UnitKind::Stem { maxpool } => {
            let h = conv(&convs[0], x, relu)?;
            if maxpool {
                // Zero padding equals -inf padding here: the input is post-ReLU.
                let h = h.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
                h.max_pool2d_with_stride(3, 2)
            } else {
                Ok(h)
            }
        }
        UnitKind::Basic | UnitKind::Bottleneck => {
            let (main, shortcut) = if unit.downsample {
                convs.split_at(convs.len() - 1)
            } else {
                (convs, &[][..])
            };
            let identity = match shortcut.first() {
                Some(c) => conv(
                    c,
                    x,
                    Epilogue {
                        residual: None,
                        relu: false,
                    },
                )?,
                None => x.clone(),
            };
            let (last, inner) = main.split_last().expect("a block has convs");
            let mut h = x.clone();
            for c in inner {
                h = conv(c, &h, relu)?;
            }
            conv(
                last,
                &h,
                Epilogue {
                    residual: Some(&identity),
                    relu: true,
                },
            )
        }
    }
}

/// Global average pooling then the classifier.
pub(crate) fn classify_head(
    h: &Tensor,
    fc_weight_t: &Tensor,
    fc_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    h.mean((2, 3))?.matmul(fc_weight_t)?.broadcast_add(fc_bias)
}
