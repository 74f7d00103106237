//! What a profile owns: its patched stem, folded from the clean layers kept on the
//! host and the signatures applied to them.

use candle_core::Device;

use super::{ConvSpec, FoldedConv};
use crate::patch::kernel::{self, ConvBn, KernelError, LayerDelta};
use crate::patch::signature::Signature;
use crate::{Error, Result};

/// The clean, unfolded parameters of one patchable layer, kept on the host
/// because every profile is computed from them.
#[derive(Debug)]
pub(super) struct PatchLayer {
    pub(super) spec: ConvSpec,
    pub(super) weight: Vec<f32>,
    pub(super) gamma: Vec<f32>,
    pub(super) beta: Vec<f32>,
    pub(super) mean: Vec<f32>,
    pub(super) var: Vec<f32>,
    pub(super) eps: f32,
}

impl PatchLayer {
    /// The layer of `spec`, its tensors moved out by `take`. A conv without
    /// BatchNorm gets the identity around its bias (gamma 1, mean 0, variance 1,
    /// eps 0: a scale of exactly 1), so the one kernel folds every layer. A conv's
    /// own bias before BatchNorm is moved into the running mean, where only the
    /// difference of the two ever mattered.
    pub(super) fn take(spec: &ConvSpec, eps: f32, take: &mut dyn FnMut(&str) -> Vec<f32>) -> Self {
        let o = spec.out_channels;
        let parts = spec.parts();
        let weight = take(&parts.weight);
        let bias = spec.bias_name().map(|b| take(&b));
        let Some(bn) = &spec.bn else {
            return PatchLayer {
                spec: spec.clone(),
                weight,
                gamma: vec![1.0; o],
                beta: bias.unwrap_or_else(|| vec![0.0; o]),
                mean: vec![0.0; o],
                var: vec![1.0; o],
                eps: 0.0,
            };
        };
        let mut mean = take(&format!("{bn}.running_mean"));
        for (m, b) in mean.iter_mut().zip(bias.iter().flatten()) {
            *m -= b;
        }
        PatchLayer {
            spec: spec.clone(),
            weight,
            gamma: take(&format!("{bn}.weight")),
            beta: take(&format!("{bn}.bias")),
            mean,
            var: take(&format!("{bn}.running_var")),
            eps,
        }
    }

    pub(super) fn conv_bn(&self) -> ConvBn<'_> {
        ConvBn {
            weight: &self.weight,
            out_channels: self.spec.out_channels,
            gamma: &self.gamma,
            beta: &self.beta,
            mean: &self.mean,
            var: &self.var,
            eps: self.eps,
        }
    }

    /// `sig`'s contribution to this layer at `alpha`, with `weight` its weight
    /// delta in the order the kernel reads.
    pub(super) fn layer_delta<'a, W>(
        &self,
        sig: &'a Signature,
        alpha: f32,
        weight: Option<W>,
    ) -> LayerDelta<'a, W> {
        let parts = self.spec.parts();
        let delta = |name: &Option<String>| name.as_ref().and_then(|n| sig.delta(n));
        LayerDelta {
            alpha,
            weight,
            gamma: delta(&parts.gamma),
            beta: delta(&parts.beta),
            mean: delta(&parts.mean),
            var: delta(&parts.var),
        }
    }

    /// The error a failed fold of this layer answers with.
    pub(super) fn patch_error(&self, e: KernelError) -> Error {
        Error::InvalidArgument(format!("cannot patch {}: {e}", self.spec.conv))
    }

    /// Folds this layer with the given signatures applied, for `device`, packed
    /// when `blocked`; `first` says it reads the model's input.
    pub(super) fn fold(
        &self,
        patches: &[(&Signature, f32)],
        device: &Device,
        blocked: bool,
        first: bool,
    ) -> Result<FoldedConv> {
        let w = &self.spec.parts().weight;
        let deltas: Vec<LayerDelta> = (patches.iter())
            .map(|(sig, alpha)| self.layer_delta(sig, *alpha, sig.delta(w)))
            .collect();
        let mut out_w = vec![0f32; self.weight.len()];
        let mut out_b = vec![0f32; self.spec.out_channels];
        kernel::cpu::fused_add_scale(&self.conv_bn(), &deltas, &mut out_w, &mut out_b)
            .map_err(|e| self.patch_error(e))?;
        FoldedConv::new(&self.spec, out_w, out_b, device, blocked, first)
    }
}

/// The patched shallow units of one profile. Cheap to hold many of: it is the
/// only per-profile copy of weights.
#[derive(Debug)]
pub struct Stem {
    pub(super) convs: Vec<FoldedConv>,
}

impl Stem {
    /// Bytes of weights this stem holds.
    pub fn bytes(&self) -> usize {
        self.convs.iter().map(FoldedConv::bytes).sum()
    }
}
