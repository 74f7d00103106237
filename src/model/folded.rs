//! Layers with BatchNorm folded into the conv, and how a unit (the stem conv or a
//! residual block) runs them: shared by the served model and, through
//! [`forward_unit`], by training.

use candle_core::{Device, Tensor};

use super::{ConvSpec, UnitKind, UnitSpec, conv};
use crate::Result;

/// A conv with BatchNorm folded in: `conv(x, weight) + bias`.
#[derive(Debug, Clone)]
pub struct FoldedConv {
    pub(super) weight: Tensor,
    /// Shaped `[1, O, 1, 1]` to broadcast over NCHW.
    pub(super) bias: Tensor,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl FoldedConv {
    pub(super) fn new(
        spec: &ConvSpec,
        weight: Vec<f32>,
        bias: Vec<f32>,
        device: &Device,
    ) -> Result<Self> {
        let o = spec.out_channels;
        Ok(FoldedConv {
            weight: Tensor::from_vec(weight, spec.weight_shape().as_slice(), device)?,
            bias: Tensor::from_vec(bias, (1, o, 1, 1), device)?,
            stride: spec.stride,
            padding: spec.padding,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, then: Epilogue) -> candle_core::Result<Tensor> {
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
