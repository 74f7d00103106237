//! Inference on the CPU in a blocked channel layout (NCHWc): activations are
//! stored as blocks of [`LANES`] channels, each a plane of pixels whose
//! [`LANES`] values sit together, so the convolution microkernel
//! ([`kernel`]) multiplies one vector of output channels by one broadcast input
//! value at a time, with no im2col and no per-call weight packing. Activations
//! stay blocked from the first conv to the pooling before the classifier.
//!
//! Every plane has a zero border of [`HALO`] pixels, so 3×3 convs with padding
//! 1 read it instead of testing bounds. The model's input is planar (any
//! channel count) with a border of the stem conv's padding.

mod conv;
pub mod depthwise;
pub mod kernel;
mod pool;
mod spare;

pub use conv::{PackedConv, Packing, Threads, forward};
pub use depthwise::PackedDepthwise;
pub use kernel::LANES;
pub use pool::{global_average, max_pool_3x3_s2};

/// Whether the blocked path runs every layer of a model of `units` and `head`:
/// dense convs padded within the border (the first may pad more: it reads the
/// planar input), depthwise ones (after the first), ResNet's max-pool, and a
/// classifier after global average pooling. Other grouped convs, VGG's pools
/// and its flattening classifier run on candle's ops.
pub fn covers(units: &[crate::model::UnitSpec], head: &crate::model::HeadSpec) -> bool {
    use crate::model::arch::{Pool, Reduce};
    let mut convs = units.iter().flat_map(|u| &u.convs).enumerate();
    let convs_ok = convs.all(|(i, c)| match i {
        0 => c.groups == 1,
        _ => c.is_depthwise() || (c.groups == 1 && c.padding.within(HALO, c.kernel)),
    });
    convs_ok
        && units.iter().all(|u| u.pool.is_none_or(|p| p == Pool::Max3))
        && head.reduce == Reduce::GlobalAverage
}

/// What a layer reads or writes: the model's planar input, or blocked activations.
#[derive(Debug, Clone)]
pub enum Maps {
    Planar(Planar),
    Blocked(Blocked),
}

/// The zero border around every plane of blocked activations.
pub const HALO: usize = 1;

/// A batch of blocked activations: per image, `blocks` planes of
/// `(h + 2·HALO) × (w + 2·HALO)` pixels of [`LANES`] channels; the border and
/// the channels past `channels` are zero.
#[derive(Debug, Clone)]
pub struct Blocked {
    pub n: usize,
    pub channels: usize,
    pub blocks: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Blocked {
    pub fn zeros(n: usize, channels: usize, h: usize, w: usize) -> Blocked {
        let blocks = channels.div_ceil(LANES);
        let len = n * blocks * (h + 2 * HALO) * (w + 2 * HALO) * LANES;
        Blocked {
            n,
            channels,
            blocks,
            h,
            w,
            data: vec![0.0; len],
        }
    }

    /// Activations whose every pixel (all [`LANES`] of every block) the caller
    /// writes: the border is zero, the rest stale values from a reused buffer.
    pub fn output(n: usize, channels: usize, h: usize, w: usize) -> Blocked {
        let blocks = channels.div_ceil(LANES);
        let (hp, wp) = (h + 2 * HALO, w + 2 * HALO);
        let mut data = spare::take(n * blocks * hp * wp * LANES);
        for plane in data.chunks_exact_mut(hp * wp * LANES) {
            let row = wp * LANES;
            let (top, rest) = plane.split_at_mut(HALO * row);
            let (middle, bottom) = rest.split_at_mut(h * row);
            top.fill(0.0);
            bottom.fill(0.0);
            // Fixed lengths: stores, not a memset call per row.
            for r in middle.chunks_exact_mut(row) {
                r[..HALO * LANES].fill(0.0);
                r[(w + HALO) * LANES..][..HALO * LANES].fill(0.0);
            }
        }
        Blocked {
            n,
            channels,
            blocks,
            h,
            w,
            data,
        }
    }

    /// Blocked activations holding NCHW `data`.
    pub fn from_nchw(data: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> Blocked {
        assert_eq!(data.len(), n * c * h * w, "NCHW data");
        let mut b = Blocked::zeros(n, c, h, w);
        let (plane, wp) = (b.plane_len(), w + 2 * HALO);
        for (dst, src) in b
            .data
            .chunks_exact_mut(b.blocks * plane)
            .zip(data.chunks_exact(c * h * w))
        {
            for (ch, src) in src.chunks_exact(h * w).enumerate() {
                let dst = &mut dst[ch / LANES * plane..][..plane];
                for (i, v) in src.iter().enumerate() {
                    dst[((i / w + HALO) * wp + i % w + HALO) * LANES + ch % LANES] = *v;
                }
            }
        }
        b
    }

    /// Floats in one block's plane, border included.
    pub fn plane_len(&self) -> usize {
        (self.h + 2 * HALO) * (self.w + 2 * HALO) * LANES
    }

    /// Floats per image.
    pub fn image_len(&self) -> usize {
        self.blocks * self.plane_len()
    }

    /// The values as NCHW, borders and padding channels dropped.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (h, w, c) = (self.h, self.w, self.channels);
        let wp = w + 2 * HALO;
        let mut out = Vec::with_capacity(self.n * c * h * w);
        for image in self.data.chunks_exact(self.image_len()) {
            for ch in 0..c {
                let plane = &image[(ch / LANES) * self.plane_len()..][..self.plane_len()];
                for y in 0..h {
                    for x in 0..w {
                        out.push(plane[((y + HALO) * wp + x + HALO) * LANES + ch % LANES]);
                    }
                }
            }
        }
        out
    }
}

/// The buffer goes back for the next layer or pass on this thread.
impl Drop for Blocked {
    fn drop(&mut self) {
        spare::give(std::mem::take(&mut self.data));
    }
}

/// A batch of planar images (NCHW) with a zero border of `pad` pixels: the
/// stem conv's input.
#[derive(Debug, Clone)]
pub struct Planar {
    pub n: usize,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    pub pad: usize,
    pub data: Vec<f32>,
}

impl Planar {
    /// Copies NCHW `data` into bordered planes.
    pub fn new(
        data: &[f32],
        (n, channels, h, w): (usize, usize, usize, usize),
        pad: usize,
    ) -> Planar {
        assert_eq!(data.len(), n * channels * h * w, "NCHW data");
        let wp = w + 2 * pad;
        let plane = (h + 2 * pad) * wp;
        let mut out = vec![0.0; n * channels * plane];
        for (dst, src) in out.chunks_exact_mut(plane).zip(data.chunks_exact(h * w)) {
            for (y, row) in src.chunks_exact(w).enumerate() {
                dst[(y + pad) * wp + pad..][..w].copy_from_slice(row);
            }
        }
        Planar {
            n,
            channels,
            h,
            w,
            pad,
            data: out,
        }
    }
}
