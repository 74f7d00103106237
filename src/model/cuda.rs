//! The patchable stem on a CUDA device: the clean parameters are uploaded once at
//! load, and each profile's stem is folded by one launch of the CUDA kernel into one
//! device allocation, which the stem's conv weights and biases then view.
//! Signature deltas are uploaded on first use and kept while the signature lives.

use std::sync::Arc;

use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};

use super::cache::SignatureCache;
use super::{FoldedConv, Model, PatchLayer, Stem};
use crate::patch::kernel::cuda::{
    self, DeviceConvBn, DeviceDeltas, DeviceLayerDelta, FoldError, LayerJob, OutputLayout,
};
use crate::patch::signature::Signature;
use crate::{Error, Result};

/// The clean stem layers on the device, in [`Model`]'s stem order.
#[derive(Debug)]
pub(super) struct CudaStem {
    layers: Vec<DeviceConvBn>,
    layout: OutputLayout,
    /// Each live signature's deltas on the device, so that a profile switch copies
    /// no weights.
    deltas: SignatureCache<DeviceDeltas>,
}

impl CudaStem {
    pub(super) fn upload(layers: &[PatchLayer], dev: &CudaDevice) -> Result<Self> {
        Ok(CudaStem {
            layers: layers
                .iter()
                .map(|l| DeviceConvBn::upload(&l.conv_bn(), dev))
                .collect::<Result<_>>()?,
            layout: OutputLayout::new(
                layers
                    .iter()
                    .map(|l| (l.spec.out_channels, l.weight.len() / l.spec.out_channels)),
            ),
            deltas: SignatureCache::default(),
        })
    }

    /// `sig`'s deltas on `dev`, uploaded on first use.
    fn deltas_of(&self, sig: &Arc<Signature>, dev: &CudaDevice) -> Result<Arc<DeviceDeltas>> {
        self.deltas.get(sig, |sig| {
            let views = sig
                .deltas()
                .iter()
                .map(|(n, d)| (n.as_str(), d.delta.view()));
            cuda::upload_deltas(dev, views)
        })
    }
}

impl Model {
    /// [`Model::materialize`] on the GPU: the same stem as the CPU kernel's (within a
    /// few ulps), with the same errors, without copying weights to the device.
    pub(super) fn materialize_cuda(
        &self,
        stem: &CudaStem,
        patches: &[(&Arc<Signature>, f32)],
    ) -> Result<Stem> {
        let dev = self.device.as_cuda_device()?;
        let sigs = patches
            .iter()
            .map(|(sig, _)| stem.deltas_of(sig, dev))
            .collect::<Result<Vec<_>>>()?;
        let jobs: Vec<LayerJob> = self
            .stem_layers
            .iter()
            .zip(&stem.layers)
            .map(|(l, base)| {
                let parts = l.spec.parts();
                let deltas = patches
                    .iter()
                    .zip(&sigs)
                    .map(|((_, alpha), d)| {
                        let get = |n: &Option<String>| n.as_ref().and_then(|n| d.get(n));
                        DeviceLayerDelta {
                            alpha: *alpha,
                            weight: d.get(&parts.weight),
                            gamma: get(&parts.gamma),
                            beta: get(&parts.beta),
                            mean: get(&parts.mean),
                            var: get(&parts.var),
                        }
                    })
                    .collect();
                LayerJob { base, deltas }
            })
            .collect();
        // SAFETY: uninitialized device memory, every element of which the kernel writes
        // before it is read (the alignment padding is never read).
        let mut out = unsafe { dev.alloc::<f32>(stem.layout.len()) }?;
        cuda::fused_add_scale(dev, &jobs, &stem.layout, &mut out).map_err(|e| match e {
            FoldError::Patch { layer, error } => Error::InvalidArgument(format!(
                "cannot patch {}: {error}",
                self.stem_layers[layer].spec.conv
            )),
            FoldError::Device(e) => e,
        })?;
        let flat = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
            stem.layout.len(),
            BackpropOp::none(),
            false,
        );
        let convs = self
            .stem_layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (w_at, b_at) = stem.layout.offsets(i);
                let o = l.spec.out_channels;
                let shape = l.spec.weight_shape();
                Ok(FoldedConv::Candle {
                    weight: flat
                        .narrow(0, w_at, l.weight.len())?
                        .reshape(shape.as_slice())?,
                    bias: flat.narrow(0, b_at, o)?.reshape((1, o, 1, 1))?,
                    stride: l.spec.stride,
                    padding: l.spec.padding,
                    groups: l.spec.groups,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Stem { convs })
    }
}
