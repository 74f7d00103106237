//! Layers with BatchNorm folded into the conv, and how a unit (the stem conv or a
//! residual block) runs them: shared by the served model on either path and,
//! through [`forward_unit`], by training.

use candle_core::{Device, Tensor};

use super::blocked::{self, Maps, PackedConv};
use super::{ConvSpec, UnitKind, UnitSpec};
use crate::Result;

/// A conv with BatchNorm folded in: `conv(x, weight) + bias`.
#[derive(Debug, Clone)]
pub enum FoldedConv {
    /// On the CPU: packed once for the blocked microkernel.
    Packed(PackedConv),
    /// Elsewhere (a GPU), or on the CPU as the stock baseline: candle's conv2d.
    Candle {
        weight: Tensor,
        /// Shaped `[1, O, 1, 1]` to broadcast over NCHW.
        bias: Tensor,
        stride: usize,
        padding: usize,
    },
}

/// How the model runs its convs on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuConv {
    /// rws's blocked direct convolution ([`blocked`]).
    #[default]
    Blocked,
    /// candle's stock `conv2d`, kept as a baseline for benchmarks.
    Candle,
}

impl CpuConv {
    /// Whether a model on `device` runs its convs on blocked maps: rws's convs
    /// are CPU-only, so a GPU always runs candle's.
    pub(super) fn blocked_on(self, device: &Device) -> bool {
        device.is_cpu() && self == CpuConv::Blocked
    }
}

impl FoldedConv {
    /// `first` says the conv reads the model's input (planar, not blocked).
    pub(super) fn new(
        spec: &ConvSpec,
        weight: Vec<f32>,
        bias: Vec<f32>,
        device: &Device,
        conv: CpuConv,
        first: bool,
    ) -> Result<Self> {
        let o = spec.out_channels;
        if conv.blocked_on(device) {
            let shape = (o, spec.in_channels, spec.kernel);
            let packed = PackedConv::new(&weight, &bias, shape, spec.stride, spec.padding, first)?;
            return Ok(FoldedConv::Packed(packed));
        }
        Ok(FoldedConv::Candle {
            weight: Tensor::from_vec(weight, spec.weight_shape().as_slice(), device)?,
            bias: Tensor::from_vec(bias, (1, o, 1, 1), device)?,
            stride: spec.stride,
            padding: spec.padding,
        })
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        match self {
            FoldedConv::Packed(p) => p.bytes(),
            FoldedConv::Candle { weight, bias, .. } => {
                (weight.elem_count() + bias.elem_count()) * 4
            }
        }
    }
}

/// Activations a unit passes along: candle tensors, or blocked maps.
pub(crate) trait Activations: Sized {
    /// ResNet's 3×3/2 max-pool with padding 1, after the stem's ReLU.
    fn max_pool(&self) -> Result<Self>;
}

impl Activations for Tensor {
    fn max_pool(&self) -> Result<Self> {
        // Zero padding equals -inf padding here: the input is post-ReLU.
        let h = self.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        Ok(h.max_pool2d_with_stride(3, 2)?)
    }
}

impl Activations for Maps {
    fn max_pool(&self) -> Result<Self> {
        match self {
            Maps::Blocked(b) => Ok(Maps::Blocked(blocked::max_pool_3x3_s2(b))),
            Maps::Planar(_) => crate::bail!(Internal, "max-pool reads blocked activations"),
        }
    }
}

impl FoldedConv {
    /// On candle tensors (the GPU or the stock baseline).
    pub(super) fn forward_tensor(&self, x: &Tensor, then: Epilogue<Tensor>) -> Result<Tensor> {
        let FoldedConv::Candle {
            weight,
            bias,
            stride,
            padding,
        } = self
        else {
            crate::bail!(Internal, "a packed conv runs on blocked activations");
        };
        let y = x
            .conv2d(weight, *padding, *stride, 1, 1)?
            .broadcast_add(bias)?;
        then.apply(y)
    }

    /// The packed form, which the blocked path runs.
    pub(super) fn packed(&self) -> Result<&PackedConv> {
        match self {
            FoldedConv::Packed(p) => Ok(p),
            FoldedConv::Candle { .. } => crate::bail!(Internal, "a conv not packed for the CPU"),
        }
    }
}

/// What follows a conv inside a unit: a residual block's shortcut added, then
/// ReLU. The blocked path fuses both into the conv; this is the plain form.
#[derive(Debug)]
pub(crate) struct Epilogue<'a, A> {
    pub residual: Option<&'a A>,
    pub relu: bool,
}

impl<A> Clone for Epilogue<'_, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Epilogue<'_, A> {}

impl Epilogue<'_, Tensor> {
    pub(crate) fn apply(self, y: Tensor) -> Result<Tensor> {
        let y = match self.residual {
            Some(r) => (y + r)?,
            None => y,
        };
        Ok(if self.relu { y.relu()? } else { y })
    }
}

/// Runs one unit, given how to apply one of its convs (conv + BatchNorm, then
/// the epilogue): the served model passes folded convs, training passes conv
/// and BatchNorm modules.
pub(crate) fn forward_unit<C, A: Activations>(
    unit: &UnitSpec,
    convs: &[C],
    x: &A,
    conv: impl Fn(&C, &A, Epilogue<A>) -> Result<A>,
) -> Result<A> {
    let relu = Epilogue {
        residual: None,
        relu: true,
    };
    match unit.kind {
        UnitKind::Stem { maxpool } => {
            let h = conv(&convs[0], x, relu)?;
            if maxpool { h.max_pool() } else { Ok(h) }
        }
        UnitKind::Basic | UnitKind::Bottleneck => {
            let (main, shortcut) = if unit.downsample {
                convs.split_at(convs.len() - 1)
            } else {
                (convs, &[][..])
            };
            let plain = Epilogue {
                residual: None,
                relu: false,
            };
            let projected = match shortcut.first() {
                Some(c) => Some(conv(c, x, plain)?),
                None => None,
            };
            let identity = projected.as_ref().unwrap_or(x);
            let (last, inner) = main.split_last().expect("a block has convs");
            let mut h: Option<A> = None;
            for c in inner {
                h = Some(conv(c, h.as_ref().unwrap_or(x), relu)?);
            }
            let residual = Epilogue {
                residual: Some(identity),
                relu: true,
            };
            conv(last, h.as_ref().unwrap_or(x), residual)
        }
    }
}

/// Global average pooling then the classifier, on tensors.
pub(crate) fn classify_head(h: &Tensor, fc_weight_t: &Tensor, fc_bias: &Tensor) -> Result<Tensor> {
    Ok(h.mean((2, 3))?
        .matmul(fc_weight_t)?
        .broadcast_add(fc_bias)?)
}
