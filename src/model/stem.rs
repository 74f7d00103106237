//! What a profile owns: its patched stem, folded from the clean layers kept on the
//! host and the signatures applied to them.

use candle_core::Device;

use super::{ConvSpec, CpuConv, FoldedConv};
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
}

impl PatchLayer {
    pub(super) fn conv_bn(&self, eps: f32) -> ConvBn<'_> {
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

    /// `sig`'s contribution to this layer at `alpha`, with `weight` its weight
    /// delta in the order the kernel reads.
    pub(super) fn layer_delta<'a, W>(
        &self,
        sig: &'a Signature,
        alpha: f32,
        weight: Option<W>,
    ) -> LayerDelta<'a, W> {
        let [_, g, b, m, v] = self.spec.tensor_names();
        LayerDelta {
            alpha,
            weight,
            gamma: sig.delta(&g),
            beta: sig.delta(&b),
            mean: sig.delta(&m),
            var: sig.delta(&v),
        }
    }

    /// The error a failed fold of this layer answers with.
    pub(super) fn patch_error(&self, e: KernelError) -> Error {
        Error::InvalidArgument(format!("cannot patch {}: {e}", self.spec.conv))
    }

    /// Folds this layer with the given signatures applied, packed for `device`
    /// and `conv`; `first` says it reads the model's input.
    pub(super) fn fold(
        &self,
        eps: f32,
        patches: &[(&Signature, f32)],
        (device, conv): (&Device, CpuConv),
        first: bool,
    ) -> Result<FoldedConv> {
        let w = &self.spec.tensor_names()[0];
        let deltas: Vec<LayerDelta> = (patches.iter())
            .map(|(sig, alpha)| self.layer_delta(sig, *alpha, sig.delta(w)))
            .collect();
        let mut out_w = vec![0f32; self.weight.len()];
        let mut out_b = vec![0f32; self.spec.out_channels];
        kernel::cpu::fused_add_scale(&self.conv_bn(eps), &deltas, &mut out_w, &mut out_b)
            .map_err(|e| self.patch_error(e))?;
        FoldedConv::new(&self.spec, out_w, out_b, device, conv, first)
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
