//! Robust Weight Signature extraction (Cai, Zhang, Wang, ICML 2023), per tensor,
//! flattened:
//!
//! ```text
//! tau_rob = theta_rob - theta_pre        tau_std = theta_std - theta_pre
//! rws     = tau_rob - (tau_rob . u) u,   u = tau_std / |tau_std|
//! ```
//!
//! Removing the component along the clean fine-tuning direction keeps what the
//! corrupted data taught and drops what any further training would have taught.
//! Only the shallow units (conv1 plus the first k blocks) are kept.
//!
//! BatchNorm: the affine weight and bias are parameters like the conv weights and
//! get the same projection. The running mean and variance are statistics of the
//! activations the data produces, not learned directions, so they are carried
//! as the change the corruption alone makes to them: the mean as `rob - std`,
//! the variance as the log ratio `ln(rob / std)` (applied multiplicatively by the
//! kernel, so it stays positive at any alpha). Measured against `std`, which saw
//! the same images clean, they leave out what the training images themselves
//! move; that matters when those are a few photos unlike the base's training
//! set (distillation), and is next to nothing when `std` and `pre` saw the same
//! data (the MNIST pipeline).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use candle_core::{DType, Device, Tensor};

use crate::model::Model;
use crate::model::repo::ModelConfig;
use crate::patch::quant::{Delta, Quant};
use crate::patch::signature::{Signature, SignatureMeta, TensorDelta};
use crate::{Error, Result, bail};

/// Named checkpoint tensors (torchvision names).
pub type Checkpoint = HashMap<String, Tensor>;

pub fn load_checkpoint(path: &std::path::Path) -> Result<Checkpoint> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::InvalidArgument(format!("cannot read checkpoint {}: {e}", path.display()))
    })
}

fn flat(ck: &Checkpoint, name: &str, which: &str) -> Result<Vec<f32>> {
    let t = ck
        .get(name)
        .ok_or_else(|| Error::InvalidArgument(format!("{which} checkpoint lacks {name}")))?;
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

/// `tau_rob` with its component along `tau_std` removed.
pub fn project_out(tau_rob: &[f32], tau_std: &[f32]) -> Vec<f32> {
    let n = norm(tau_std);
    if n == 0.0 {
        return tau_rob.to_vec();
    }
    let c = dot(tau_rob, tau_std) / (n * n);
    tau_rob
        .iter()
        .zip(tau_std)
        .map(|(r, s)| (f64::from(*r) - c * f64::from(*s)) as f32)
        .collect()
}

/// Which tensors a signature over the first `blocks` blocks covers, with shapes.
pub fn shallow_tensors(cfg: &ModelConfig, blocks: usize) -> Result<Vec<(String, Vec<usize>)>> {
    if blocks > cfg.arch.block_count() {
        bail!(
            InvalidArgument,
            "--units {blocks} exceeds the {} blocks of {}",
            cfg.arch.block_count(),
            cfg.arch.name()
        );
    }
    let units = cfg.arch.units(cfg.channels);
    Ok(units[..=blocks]
        .iter()
        .flat_map(|u| u.convs.iter().flat_map(|c| c.patchable_tensors()))
        .collect())
}

/// What to extract.
pub struct Extraction<'a> {
    pub cfg: &'a ModelConfig,
    pub pre: &'a Checkpoint,
    pub std: &'a Checkpoint,
    pub robust: &'a Checkpoint,
    /// The base the signature is served on; its fingerprint is recorded. It is
    /// `std` when the fine-tuned clean model is what gets served, `pre` when the
    /// original is (after distillation).
    pub served: &'a Checkpoint,
    /// conv1 plus this many blocks.
    pub blocks: usize,
    pub quant: Quant,
    /// Carry BatchNorm deltas (weight, bias, running statistics) beside the conv deltas.
    pub batch_norm: bool,
    pub corruption: String,
    pub default_alpha: f32,
}

/// Extracts the signature, for the base `served`.
pub fn extract(e: &Extraction) -> Result<Signature> {
    let mut deltas = BTreeMap::new();
    for (name, shape) in shallow_tensors(e.cfg, e.blocks)? {
        if shape.len() == 1 && !e.batch_norm {
            continue;
        }
        let pre = flat(e.pre, &name, "pre")?;
        let std = flat(e.std, &name, "std")?;
        let rob = flat(e.robust, &name, "robust")?;
        let rws = if name.ends_with("running_var") {
            rob.iter()
                .zip(&std)
                .map(|(r, s)| (r.max(f32::MIN_POSITIVE) / s.max(f32::MIN_POSITIVE)).ln())
                .collect()
        } else if name.ends_with("running_mean") {
            rob.iter().zip(&std).map(|(r, s)| r - s).collect()
        } else {
            let tau_rob: Vec<f32> = rob.iter().zip(&pre).map(|(r, p)| r - p).collect();
            let tau_std: Vec<f32> = std.iter().zip(&pre).map(|(s, p)| s - p).collect();
            project_out(&tau_rob, &tau_std)
        };
        let quant = if shape.len() == 1 && matches!(e.quant, Quant::Int8 | Quant::Int4) {
            Quant::F32
        } else {
            e.quant
        };
        deltas.insert(
            name,
            TensorDelta {
                delta: Delta::quantize(&rws, shape[0], quant),
                shape,
            },
        );
    }
    let base = Model::from_tensors(e.cfg.clone(), e.served, &Device::Cpu)?;
    Signature::new(
        SignatureMeta {
            arch: e.cfg.arch.name().into(),
            base_fingerprint: base.fingerprint().into(),
            corruption: e.corruption.clone(),
            default_alpha: e.default_alpha,
            synthetic: false,
        },
        deltas,
    )
}

/// Where robustness lives: per layer, |tau_rob| / |theta_pre| for each robust
/// model, then the cosine between the signatures of each pair of corruptions
/// over all shallow tensors.
pub fn analyze(
    cfg: &ModelConfig,
    pre: &Checkpoint,
    std: &Checkpoint,
    robust: &[(String, Checkpoint)],
    blocks: usize,
) -> Result<String> {
    let mut out = String::new();
    let convs: Vec<(String, String)> = cfg
        .arch
        .units(cfg.channels)
        .iter()
        .flat_map(|u| {
            u.convs
                .iter()
                .map(move |c| (u.name.clone(), format!("{}.weight", c.conv)))
        })
        .collect();
    let _ = write!(out, "{:<32} {:>5}", "layer (conv weight)", "unit");
    for (name, _) in robust {
        let _ = write!(out, " {:>10}", truncate(name, 10));
    }
    let _ = writeln!(out, " {:>10}", "std");
    let _ = writeln!(out, "|theta_c - theta_pre| / |theta_pre|, in percent:");
    for (i, (unit, conv)) in convs.iter().enumerate() {
        let p = flat(pre, conv, "pre")?;
        let _ = write!(
            out,
            "{conv:<32} {:>5}",
            if i == 0 {
                "stem"
            } else {
                unit.split('.').next().unwrap_or("")
            }
        );
        for (_, ck) in robust
            .iter()
            .map(|(n, c)| (n, c))
            .chain(std::iter::once((&"std".to_string(), std)))
        {
            let r = flat(ck, conv, "robust")?;
            let tau: Vec<f32> = r.iter().zip(&p).map(|(a, b)| a - b).collect();
            let _ = write!(out, " {:>9.2}%", 100.0 * norm(&tau) / norm(&p).max(1e-12));
        }
        let _ = writeln!(out);
    }
    // Signatures over the shallow tensors, as flat vectors.
    let names: Vec<String> = shallow_tensors(cfg, blocks)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut sigs = Vec::new();
    for (_, ck) in robust {
        let mut v = Vec::new();
        for n in &names {
            let p = flat(pre, n, "pre")?;
            let s = flat(std, n, "std")?;
            let r = flat(ck, n, "robust")?;
            let tr: Vec<f32> = r.iter().zip(&p).map(|(a, b)| a - b).collect();
            let ts: Vec<f32> = s.iter().zip(&p).map(|(a, b)| a - b).collect();
            v.extend(project_out(&tr, &ts));
        }
        sigs.push(v);
    }
    let _ = writeln!(
        out,
        "\ncosine similarity between signatures (conv1 + {blocks} blocks):"
    );
    let _ = write!(out, "{:>12}", "");
    for (name, _) in robust {
        let _ = write!(out, " {:>10}", truncate(name, 10));
    }
    let _ = writeln!(out);
    for (i, (name, _)) in robust.iter().enumerate() {
        let _ = write!(out, "{:>12}", truncate(name, 12));
        for j in 0..robust.len() {
            let c = dot(&sigs[i], &sigs[j]) / (norm(&sigs[i]) * norm(&sigs[j])).max(1e-30);
            let _ = write!(out, " {c:>10.3}");
        }
        let _ = writeln!(out);
    }
    Ok(out)
}

fn truncate(s: &str, n: usize) -> &str {
    &s[..s.len().min(n)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_is_orthogonal_and_keeps_the_rest() {
        let tau_std = [1.0f32, 0.0, 0.0];
        let tau_rob = [2.0f32, 3.0, -1.0];
        assert_eq!(project_out(&tau_rob, &tau_std), vec![0.0, 3.0, -1.0]);
        let s = [0.3f32, -0.4, 1.2];
        let r = [1.0f32, 2.0, 3.0];
        let p = project_out(&r, &s);
        assert!(dot(&p, &s).abs() < 1e-6);
        assert_eq!(project_out(&r, &[0.0; 3]), r.to_vec());
    }
}
