//! Deterministic generated models and signatures, for tests, benchmarks and the
//! default model until a trained one ships. Everything it makes is marked
//! synthetic: the weights are random, not learned.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::model::repo::ModelConfig;
use crate::model::{Arch, Model};
use crate::patch::quant::{Delta, Quant};
use crate::patch::signature::{Signature, SignatureMeta, TensorDelta};
use crate::rng::Rng;
use crate::{Error, Result};

/// A config for `arch` with digit labels for small models and numbered classes otherwise.
pub fn config(
    arch: Arch,
    channels: usize,
    input: usize,
    classes: usize,
    patchable_blocks: usize,
) -> ModelConfig {
    let labels = (0..classes).map(|i| i.to_string()).collect();
    ModelConfig {
        arch,
        input_size: [input, input],
        resize: None,
        channels,
        mean: vec![0.5; channels],
        std: vec![0.25; channels],
        labels,
        patchable_blocks,
        bn_eps: 1e-5,
        synthetic: true,
    }
}

/// Random base weights with torchvision names: Kaiming-normal convs, BatchNorm
/// statistics near identity, a small classifier.
pub fn base_tensors(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    for (name, shape) in cfg.arch.tensor_shapes(cfg.channels, cfg.labels.len()) {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if name.ends_with("running_var") {
                    0.5 + rng.uniform()
                } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                    0.1 * rng.normal()
                } else if shape.len() == 1 {
                    // BatchNorm gamma.
                    0.8 + 0.4 * rng.uniform()
                } else {
                    rng.normal() * (2.0 / fan_in as f32).sqrt()
                }
            })
            .collect();
        out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// A random signature over every patchable tensor of `model`, with deltas about
/// `magnitude` times the size of each base tensor's elements.
pub fn signature(
    model: &Model,
    corruption: &str,
    seed: u64,
    magnitude: f32,
    quant: Quant,
) -> Result<Signature> {
    let mut rng = Rng::new(seed);
    let mut deltas = BTreeMap::new();
    for (name, shape) in model.patchable_tensors() {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        // Conv weights relative to their init scale; BatchNorm deltas (the running
        // variance's being a log ratio) around half the magnitude.
        let scale = if shape.len() > 1 {
            magnitude * (2.0 / fan_in as f32).sqrt()
        } else {
            magnitude * 0.5
        };
        let values: Vec<f32> = (0..n).map(|_| scale * rng.normal()).collect();
        let q = if shape.len() > 1 { quant } else { Quant::F32 };
        deltas.insert(
            name,
            TensorDelta {
                delta: Delta::quantize(&values, shape[0], q),
                shape,
            },
        );
    }
    Signature::new(
        SignatureMeta {
            arch: model.config.arch.name().into(),
            base_fingerprint: model.fingerprint().into(),
            corruption: corruption.into(),
            default_alpha: 1.0,
            synthetic: true,
        },
        deltas,
    )
}

/// Writes `model.toml` and `base.safetensors` into `dir`.
pub fn write_model_dir(
    dir: &Path,
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir.join("signatures")).map_err(|e| Error::io(dir, e))?;
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::Internal(e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join("model.toml"), text.as_bytes())?;
    candle_core::safetensors::save(tensors, dir.join("base.safetensors"))?;
    Ok(())
}

/// The architecture named `name`; `resnet-small` is the 28×28 digit ResNet
/// (widths 16/32/64, one block per stage).
pub fn arch_by_name(name: &str) -> Result<Arch> {
    if name == "resnet-small" {
        return Ok(Arch::Small {
            widths: vec![16, 32, 64],
            depths: vec![1, 1, 1],
            stem_stride: 1,
        });
    }
    toml::from_str(&format!("arch = {name:?}")).map_err(|_| {
        Error::InvalidArgument(format!(
            "unknown architecture {name:?}; use resnet18, resnet34, resnet50, resnet101, resnet-small, vgg16, vgg16-bn, vgg16-cifar, mobilenet-v2 or efficientnet-lite0"
        ))
    })
}

/// Writes a complete synthetic model directory: `model.toml`, `base.safetensors`
/// and one signature per name in `signatures/`. Small architectures take 28×28
/// grayscale input with 10 classes; the torchvision ones 224×224 RGB with 1000.
pub fn write_repo_model(
    dir: &Path,
    arch: Arch,
    blocks: usize,
    signatures: &[String],
    quant: Quant,
    seed: u64,
) -> Result<Model> {
    let (channels, input, classes) = match arch {
        Arch::Small { .. } => (1, 28, 10),
        Arch::Vgg16Cifar => (3, 32, 10),
        _ => (3, 224, 1000),
    };
    let cfg = config(arch, channels, input, classes, blocks);
    cfg.validate()?;
    let tensors = base_tensors(&cfg, seed)?;
    write_model_dir(dir, &cfg, &tensors)?;
    let model = Model::from_tensors(cfg, &tensors, &Device::Cpu)?;
    for (i, name) in signatures.iter().enumerate() {
        let sig = signature(&model, name, seed + 1 + i as u64, 0.3, quant)?;
        sig.save(
            &dir.join("signatures")
                .join(format!("{name}{}", crate::model::repo::SIGNATURE_SUFFIX)),
        )?;
    }
    Ok(model)
}
