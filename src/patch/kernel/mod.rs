//! The fused add-scale kernel: the served weights of one patched conv layer.
//!
//! For output channel `o`, element `j`, and signatures `i` with scale `alpha_i`:
//!
//! ```text
//! w[o,j]     = W[o,j] + Σ alpha_i · dq_i(D_i[o,j])
//! g[o]       = gamma[o] + Σ alpha_i · dgamma_i[o]     (likewise beta, mean)
//! var'[o]    = var[o] · exp(Σ alpha_i · dlogvar_i[o])
//! s[o]       = g[o] / sqrt(var'[o] + eps)
//! out_w[o,j] = s[o] · w[o,j]
//! out_b[o]   = beta'[o] − s[o] · mean'[o]
//! ```
//!
//! [`cpu`] is the production kernel (one read of every input, one write of the
//! output, parallel over output channels); [`lanes`] is the same kernel writing
//! the blocked CPU convolution's packed order, from inputs laid out in it; `cuda` (the `cuda` feature) is the same
//! kernel for a GPU, in CUDA C (`add_scale.cu`) mirroring [`cpu`] operation for
//! operation; [`reference`] is the same math in plain candle ops, kept only to test
//! the kernels against.
//!
//! Running-variance deltas are log ratios, not differences: a variance is a
//! scale, so scaling it by `exp(alpha · d)` interpolates geometrically and stays
//! positive for every alpha, where an additive delta could drive it negative
//! (and it did: at alpha = 1 for a projected fog signature on MNIST).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod descriptor;
pub mod lanes;
pub mod reference;
pub mod rows;

pub use crate::patch::quant::DeltaView;

/// The clean weights of one conv layer and the BatchNorm that follows it.
#[derive(Debug, Clone, Copy)]
pub struct ConvBn<'a> {
    /// Conv weight, row-major `[out_channels, per_channel]`.
    pub weight: &'a [f32],
    pub out_channels: usize,
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub mean: &'a [f32],
    pub var: &'a [f32],
    pub eps: f32,
}

impl ConvBn<'_> {
    /// Elements per output channel (`in_channels · kh · kw`).
    pub fn per_channel(&self) -> usize {
        self.weight.len() / self.out_channels
    }
}

/// One signature's contribution to one layer. Absent parts contribute nothing.
/// The weight delta is row-major like [`ConvBn::weight`], or, for [`lanes`],
/// in the packed order.
#[derive(Debug, Clone, Copy)]
pub struct LayerDelta<'a, W = DeltaView<'a>> {
    pub alpha: f32,
    pub weight: Option<W>,
    pub gamma: Option<DeltaView<'a>>,
    pub beta: Option<DeltaView<'a>>,
    pub mean: Option<DeltaView<'a>>,
    pub var: Option<DeltaView<'a>>,
}

/// Why a patch cannot be folded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    #[error(
        "patched running variance is {var} at output channel {channel}; the BatchNorm cannot be folded (lower the alpha)"
    )]
    NegativeVariance { channel: usize, var: f32 },
    #[error("patched weights are not finite at output channel {channel} (alpha too large?)")]
    NotFinite { channel: usize },
}
