//! What a profile owns: its patched stem, folded from the clean layers kept on the
//! host and the signatures applied to them.

use candle_core::Device;

use super::{ConvSpec, CpuConv, FoldedConv};
use crate::patch::kernel::{self, ConvBn, LayerDelta};
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

    /// Folds this layer with the given signatures applied, packed for `device`
    /// and `conv`; `first` says it reads the model's input.
    pub(super) fn fold(
        &self,
        eps: f32,
        patches: &[(&Signature, f32)],
        (device, conv): (&Device, CpuConv),
        first: bool,
    ) -> Result<FoldedConv> {
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
