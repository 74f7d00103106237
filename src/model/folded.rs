//! Layers with BatchNorm folded into the conv, and how a unit (the stem or a
//! block) runs them: shared by the served model on either path and, through
//! [`forward_unit`], by training.

use candle_core::{Device, Tensor};

use super::arch::{Act, Padding, Pool, Reduce, Shortcut};
use super::blocked::{self, Maps, PackedConv, PackedDepthwise};
use super::{ConvSpec, HeadSpec, UnitSpec};
use crate::Result;

/// A conv with BatchNorm folded in: `conv(x, weight) + bias`.
#[derive(Debug, Clone)]
pub enum FoldedConv {
    /// On the CPU: packed once for the blocked microkernel.
    Packed(PackedConv),
    /// On the CPU, a depthwise conv: laid out once for its own loop.
    Depthwise(PackedDepthwise),
    /// Elsewhere (a GPU), or on the CPU as the stock baseline: candle's conv2d.
    Candle {
        weight: Tensor,
        /// Shaped `[1, O, 1, 1]` to broadcast over NCHW.
        bias: Tensor,
        stride: usize,
        padding: Padding,
        groups: usize,
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
    /// Whether a model of `units` and `head` on `device` runs on blocked maps:
    /// rws's convs are CPU-only, so a GPU always runs candle's, and so does a
    /// model with layers they do not cover yet.
    pub(super) fn blocked_on(self, device: &Device, units: &[UnitSpec], head: &HeadSpec) -> bool {
        device.is_cpu() && self == CpuConv::Blocked && blocked::covers(units, head)
    }
}

impl FoldedConv {
    /// `blocked` says it is packed for the blocked path, and `first` that it
    /// reads the model's input (planar, not blocked).
    pub(super) fn new(
        spec: &ConvSpec,
        weight: Vec<f32>,
        bias: Vec<f32>,
        device: &Device,
        blocked: bool,
        first: bool,
    ) -> Result<Self> {
        let o = spec.out_channels;
        if blocked && spec.is_depthwise() {
            let shape = (o, spec.kernel);
            let dw = PackedDepthwise::new(&weight, &bias, shape, spec.stride, spec.padding)?;
            return Ok(FoldedConv::Depthwise(dw));
        }
        if blocked {
            let shape = (o, spec.in_channels, spec.kernel);
            let packed = PackedConv::new(&weight, &bias, shape, spec.stride, spec.padding, first)?;
            return Ok(FoldedConv::Packed(packed));
        }
        Ok(FoldedConv::Candle {
            weight: Tensor::from_vec(weight, spec.weight_shape().as_slice(), device)?,
            bias: Tensor::from_vec(bias, (1, o, 1, 1), device)?,
            stride: spec.stride,
            padding: spec.padding,
            groups: spec.groups,
        })
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        match self {
            FoldedConv::Packed(p) => p.bytes(),
            FoldedConv::Depthwise(d) => d.bytes(),
            FoldedConv::Candle { weight, bias, .. } => {
                (weight.elem_count() + bias.elem_count()) * 4
            }
        }
    }
}

/// Activations a unit passes along: candle tensors, or blocked maps.
pub(crate) trait Activations: Sized {
    fn max_pool(&self, pool: Pool) -> Result<Self>;
}

impl Activations for Tensor {
    fn max_pool(&self, pool: Pool) -> Result<Self> {
        Ok(match pool {
            // Zero padding equals -inf padding here: the input is post-ReLU.
            Pool::Max3 => {
                let h = self.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
                h.max_pool2d_with_stride(3, 2)?
            }
            Pool::Max2 => self.max_pool2d_with_stride(2, 2)?,
        })
    }
}

impl Activations for Maps {
    fn max_pool(&self, pool: Pool) -> Result<Self> {
        match (self, pool) {
            (Maps::Blocked(b), Pool::Max3) => Ok(Maps::Blocked(blocked::max_pool_3x3_s2(b))),
            _ => crate::bail!(Internal, "blocked maps have only ResNet's max-pool"),
        }
    }
}

/// `x` padded as `padding` says for a `kernel`/`stride` conv, and the
/// symmetric padding left for the conv itself.
pub(crate) fn pad_for(
    x: &Tensor,
    padding: Padding,
    kernel: usize,
    stride: usize,
) -> Result<(Tensor, usize)> {
    match padding {
        Padding::Symmetric(p) => Ok((x.clone(), p)),
        Padding::Same => {
            let (_, _, h, w) = x.dims4()?;
            let (top, bottom) = padding.amounts(h, kernel, stride);
            let (left, right) = padding.amounts(w, kernel, stride);
            Ok((
                x.pad_with_zeros(2, top, bottom)?
                    .pad_with_zeros(3, left, right)?,
                0,
            ))
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
            groups,
        } = self
        else {
            crate::bail!(Internal, "a packed conv runs on blocked activations");
        };
        let (x, pad) = pad_for(x, *padding, weight.dim(3)?, *stride)?;
        let y = x
            .conv2d(weight, pad, *stride, 1, *groups)?
            .broadcast_add(bias)?;
        then.apply(y)
    }

    /// `act(conv(x) + residual)` on blocked maps, image `i` by `convs[i]`
    /// (convs of one shape, all laid out for the blocked path).
    pub(super) fn forward_blocked(
        convs: &[&FoldedConv],
        x: &Maps,
        then: Epilogue<Maps>,
        threads: blocked::Threads,
    ) -> Result<Maps> {
        let depthwise: Option<Vec<&PackedDepthwise>> = (convs.iter())
            .map(|c| match c {
                FoldedConv::Depthwise(d) => Some(d),
                _ => None,
            })
            .collect();
        if let Some(dw) = depthwise {
            let (Maps::Blocked(x), None) = (x, then.residual) else {
                crate::bail!(
                    Internal,
                    "a depthwise conv reads blocked maps and adds no residual"
                );
            };
            return Ok(Maps::Blocked(blocked::depthwise::forward(
                &dw, x, then.act, threads,
            )?));
        }
        let dense = (convs.iter())
            .map(|c| match c {
                FoldedConv::Packed(p) => Ok(p),
                _ => crate::bail!(Internal, "a conv not packed for the CPU"),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Maps::Blocked(blocked::forward(
            &dense,
            x,
            then.residual,
            then.act,
            threads,
        )?))
    }
}

/// What follows a conv inside a unit: a block's shortcut added, then the
/// activation. The blocked path fuses both into the conv; this is the plain form.
#[derive(Debug)]
pub(crate) struct Epilogue<'a, A> {
    pub residual: Option<&'a A>,
    pub act: Act,
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
        Ok(match self.act {
            Act::None => y,
            Act::Relu => y.relu()?,
            Act::Relu6 => y.clamp(0f32, 6f32)?,
        })
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
    let (specs, _) = unit.split();
    let (main, projection) = convs.split_at(specs.len());
    let projected = match projection.first() {
        Some(c) => Some(conv(
            c,
            x,
            Epilogue {
                residual: None,
                act: Act::None,
            },
        )?),
        None => None,
    };
    let shortcut = match unit.shortcut {
        Shortcut::None => None,
        Shortcut::Identity => Some(x),
        Shortcut::Projection => projected.as_ref(),
    };
    let mut h: Option<A> = None;
    for (i, (c, spec)) in main.iter().zip(specs).enumerate() {
        let residual = if i + 1 == specs.len() { shortcut } else { None };
        let then = Epilogue {
            residual,
            act: spec.act,
        };
        h = Some(conv(c, h.as_ref().unwrap_or(x), then)?);
    }
    let h = h.expect("a unit has convs");
    match unit.pool {
        Some(pool) => h.max_pool(pool),
        None => Ok(h),
    }
}

/// The classifier on tensors: the reduction, then each linear layer (its
/// weight transposed, its bias `[1, outputs]`) with ReLU between them.
pub(crate) fn classify_head(
    h: &Tensor,
    reduce: Reduce,
    linears: &[(Tensor, Tensor)],
) -> Result<Tensor> {
    let mut h = match reduce {
        Reduce::GlobalAverage => h.mean((2, 3))?,
        Reduce::Flatten => h.flatten_from(1)?,
    };
    for (i, (weight_t, bias)) in linears.iter().enumerate() {
        if i > 0 {
            h = h.relu()?;
        }
        h = h.matmul(weight_t)?.broadcast_add(bias)?;
    }
    Ok(h)
}
