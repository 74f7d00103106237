//! The patchable stem on the CPU: the clean weights and each live signature's
//! weight deltas are laid out in the blocked convs' packed order once, so that
//! folding a profile is one streaming pass of the fused kernel
//! ([`crate::patch::kernel::lanes`]) that packs nothing. The CPU counterpart
//! of `cuda.rs`.

use std::sync::Arc;

use super::blocked::{LANES, PackedConv, Packing};
use super::cache::SignatureCache;
use super::{FoldedConv, Model, PatchLayer, Stem};
use crate::Result;
use crate::patch::kernel::lanes::{self, LaneBuf, LaneLayout};
use crate::patch::kernel::{ConvBn, LayerDelta};
use crate::patch::signature::Signature;

/// The clean stem layers in the packed order, in [`Model`]'s stem order.
#[derive(Debug)]
pub(super) struct PackedStem {
    layers: Vec<PackedLayer>,
    /// Each live signature's weight deltas, per stem layer, in the packed order.
    deltas: SignatureCache<Vec<Option<LaneBuf>>>,
}

#[derive(Debug)]
struct PackedLayer {
    packing: Packing,
    live: Vec<bool>,
    weight: Vec<f32>,
}

impl PackedLayer {
    fn layout(&self) -> LaneLayout<'_> {
        LaneLayout {
            out_channels: self.packing.out_channels,
            width: Packing::GROUP_WIDTH,
            align: LANES,
            runs: self.packing.runs(),
            live: &self.live,
        }
    }
}

impl PackedStem {
    /// `None` for a stem with a depthwise conv: the lanes kernel lays out dense
    /// convs only, so such a stem folds through the row kernel and is laid out
    /// after.
    pub(super) fn new(layers: &[PatchLayer]) -> Option<Self> {
        if layers.iter().any(|l| l.spec.is_depthwise()) {
            return None;
        }
        let layers = (layers.iter().enumerate())
            .map(|(i, l)| {
                let packing = Packing {
                    out_channels: l.spec.out_channels,
                    in_channels: l.spec.in_channels,
                    kernel: l.spec.kernel,
                    planar: i == 0,
                };
                PackedLayer {
                    packing,
                    live: packing.live_runs(),
                    weight: packing.pack(&l.weight),
                }
            })
            .collect();
        Some(PackedStem {
            layers,
            deltas: SignatureCache::default(),
        })
    }

    /// `sig`'s weight deltas in the packed order, laid out on first use.
    fn deltas_of(
        &self,
        sig: &Arc<Signature>,
        stem: &[PatchLayer],
    ) -> Result<Arc<Vec<Option<LaneBuf>>>> {
        self.deltas.get(sig, |sig| {
            Ok((stem.iter().zip(&self.layers))
                .map(|(l, p)| {
                    let delta = sig.delta(&l.spec.parts().weight)?;
                    let pack = |v: &[f32]| p.packing.pack(v);
                    Some(LaneBuf::new(&delta, pack, |q| p.packing.pack(q)))
                })
                .collect())
        })
    }

    /// Bytes held: the clean weights and the live signatures' deltas.
    pub(super) fn bytes(&self) -> usize {
        let clean: usize = self.layers.iter().map(|l| l.weight.len() * 4).sum();
        let deltas = self
            .deltas
            .bytes(|d| d.iter().flatten().map(LaneBuf::bytes).sum());
        clean + deltas
    }
}

impl Model {
    /// [`Model::materialize`] on the CPU: the same weights, bit for bit, as the
    /// row kernel followed by packing.
    pub(super) fn materialize_packed(
        &self,
        stem: &PackedStem,
        patches: &[(&Arc<Signature>, f32)],
    ) -> Result<Stem> {
        let sigs = (patches.iter())
            .map(|(sig, _)| stem.deltas_of(sig, &self.stem_layers))
            .collect::<Result<Vec<_>>>()?;
        let convs = (self.stem_layers.iter().zip(&stem.layers).enumerate())
            .map(|(i, (l, p))| {
                let deltas: Vec<LayerDelta<_>> = (patches.iter().zip(&sigs))
                    .map(|((sig, alpha), d)| {
                        l.layer_delta(sig, *alpha, d[i].as_ref().map(LaneBuf::view))
                    })
                    .collect();
                let base = ConvBn {
                    weight: &p.weight,
                    ..l.conv_bn()
                };
                let (out_w, out_b) = lanes::fused_add_scale(&base, &deltas, p.layout())
                    .map_err(|e| l.patch_error(e))?;
                let (s, pad) = (l.spec.stride, l.spec.padding);
                let conv = PackedConv::from_packed(p.packing, out_w, &out_b, s, pad)?;
                Ok(FoldedConv::Packed(conv))
            })
            .collect::<Result<_>>()?;
        Ok(Stem { convs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::synth;
    use crate::model::Arch;
    use crate::patch::quant::Quant;
    use candle_core::Device;

    /// Folding in the packed order is the row kernel followed by packing, bit
    /// for bit, for every delta form and mixes of them, on channel counts that
    /// fill the groups and ones that leave them ragged.
    #[test]
    fn packed_fold_is_the_row_fold_packed() {
        let ragged = Arch::Small {
            widths: vec![12, 20],
            depths: vec![1, 1],
            stem_stride: 1,
        };
        let small = synth::arch_by_name("resnet-small").unwrap();
        for (arch, channels) in [(small, 1), (ragged, 3)] {
            let cfg = synth::config(arch, channels, 12, 5, 1);
            let tensors = synth::base_tensors(&cfg, 3).unwrap();
            let model = Model::from_tensors(cfg, &tensors, &Device::Cpu).unwrap();
            let sigs: Vec<Arc<Signature>> = (Quant::ALL.iter().enumerate())
                .map(|(i, &q)| Arc::new(synth::signature(&model, "s", i as u64, 0.3, q).unwrap()))
                .collect();
            let cases: Vec<Vec<(&Arc<Signature>, f32)>> = vec![
                vec![],
                vec![(&sigs[0], 1.0)],
                vec![(&sigs[1], 0.6)],
                vec![(&sigs[2], -0.4), (&sigs[3], 0.8)],
                vec![(&sigs[3], 0.5), (&sigs[0], 0.7), (&sigs[1], -0.2)],
            ];
            for patches in cases {
                let got = model.materialize(&patches).unwrap();
                let rows: Vec<(&Signature, f32)> =
                    patches.iter().map(|(s, a)| (&***s, *a)).collect();
                let want: Vec<FoldedConv> = (model.stem_layers.iter().enumerate())
                    .map(|(i, l)| l.fold(&rows, &Device::Cpu, true, i == 0).unwrap())
                    .collect();
                let want = Stem { convs: want };
                // Debug prints every float exactly, signed zeros included.
                let same = format!("{:?}", got.convs) == format!("{:?}", want.convs);
                assert!(same, "{} signatures: the folds differ", patches.len());
            }
        }
    }
}
