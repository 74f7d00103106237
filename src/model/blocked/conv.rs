//! A convolution with BatchNorm folded in, its weights packed once (when a stem
//! is materialized or the trunk loaded) into the order the microkernel reads
//! them, and its forward pass over blocked activations.

use std::ops::Range;

use rayon::prelude::*;

use super::kernel::{self, GROUP, Isa, LANES, Out, Tile, Walk};
use super::{Blocked, HALO, Maps};
use crate::model::arch::{Act, Padding};
use crate::{Result, bail};

/// Packed weights per K chunk: they stay in L1 (32 KiB on these machines)
/// beside the input rows the tiles read. Unchunked, ResNet-18's 3×3 convs
/// streamed 36-295 KiB per tile from L2 and ran 13-37% slower than the stem,
/// whose weights fit.
const CHUNK_BYTES: usize = 16 << 10;

/// A folded convolution, its weights in the microkernel's order ([`Packing`]).
#[derive(Debug, Clone)]
pub struct PackedConv {
    weights: Vec<f32>,
    /// Zero past the real output channels.
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
    /// Packed for a planar input (channels one by one) rather than a blocked one.
    planar: bool,
}

/// The order a conv's weights are packed in: per group of [`Packing::GROUP_WIDTH`]
/// output channels (the last group one block when the blocks are odd), the K
/// loop's weights in order (input block, ky, kx, channel in block), each a run
/// of one value per output channel of the group, zero past the real channels.
/// The fused kernel writes this order itself from inputs laid out in it once
/// (`crate::patch::kernel::lanes`), so that a profile switch packs nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    pub out_channels: usize,
    pub in_channels: usize,
    pub kernel: usize,
    /// For a planar input (channels one by one) rather than a blocked one.
    pub planar: bool,
}

impl Packing {
    /// Output channels per group: one microkernel call's.
    pub const GROUP_WIDTH: usize = GROUP * LANES;

    /// Input channels per input block.
    fn ci(&self) -> usize {
        if self.planar { 1 } else { LANES }
    }

    /// Runs per group: one per input channel (padded to whole blocks) and tap.
    pub fn runs(&self) -> usize {
        self.in_channels.div_ceil(self.ci()) * self.ci() * self.kernel * self.kernel
    }

    /// Per run: whether it holds weights, or pads the last input block.
    pub fn live_runs(&self) -> Vec<bool> {
        let ci = self.ci();
        (0..self.runs())
            .map(|r| r / (ci * self.kernel * self.kernel) * ci + r % ci < self.in_channels)
            .collect()
    }

    /// Values in the packed order.
    pub fn packed_len(&self) -> usize {
        self.runs() * self.out_channels.div_ceil(LANES) * LANES
    }

    /// Puts `src` (`[out, in, k, k]`, row-major) in the packed order.
    pub fn pack<T: Copy + Default + Send + Sync>(&self, src: &[T]) -> Vec<T> {
        let Packing {
            out_channels,
            in_channels,
            kernel,
            ..
        } = *self;
        let ci = self.ci();
        let in_blocks = in_channels.div_ceil(ci);
        let kk = kernel * kernel;
        assert_eq!(
            src.len(),
            out_channels * in_channels * kk,
            "weights to pack"
        );
        // Per group: `in_blocks` runs of `kk · ci · width` values.
        let block_len = |width: usize| kk * ci * width;
        let mut packed = vec![T::default(); self.packed_len()];
        let group_len = in_blocks * block_len(Self::GROUP_WIDTH);
        // The destination is written front to back, each run of output
        // channels gathered from their rows. (8×8 AVX transposes, or pushing
        // in order with no zero-fill pass, were no faster in `rws bench switch`.)
        let pack = |(g, dst): (usize, &mut [T])| {
            let width = dst.len() / (in_blocks * block_len(1));
            let first_out = g * Self::GROUP_WIDTH;
            let outs = out_channels.saturating_sub(first_out).min(width);
            let rows: Vec<&[T]> = (first_out..first_out + outs)
                .map(|o| &src[o * in_channels * kk..][..in_channels * kk])
                .collect();
            for (b, dst) in dst.chunks_exact_mut(block_len(width)).enumerate() {
                let ins = (in_channels - b * ci).min(ci);
                for t in 0..kk {
                    for i in 0..ins {
                        let at = (b * ci + i) * kk + t;
                        let run = &mut dst[(t * ci + i) * width..][..outs];
                        for (d, row) in run.iter_mut().zip(&rows) {
                            *d = row[at];
                        }
                    }
                }
            }
        };
        // Big convs (the trunk's, at load) pack on the pool; small ones here,
        // where waking the pool would cost more.
        if packed.len() >= 1 << 16 {
            packed.par_chunks_mut(group_len).enumerate().for_each(pack);
        } else {
            packed.chunks_mut(group_len).enumerate().for_each(pack);
        }
        packed
    }
}

impl PackedConv {
    /// Packs `weight` (`[out, in, k, k]`, row-major) and `bias` (`[out]`).
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        (out_channels, in_channels, kernel): (usize, usize, usize),
        stride: usize,
        padding: Padding,
        planar: bool,
    ) -> Result<PackedConv> {
        if weight.len() != out_channels * in_channels * kernel * kernel
            || bias.len() != out_channels
            || stride == 0
            || kernel == 0
        {
            bail!(
                Internal,
                "cannot pack a conv of {} weights and {} biases as [{out_channels}, {in_channels}, {kernel}, {kernel}] with stride {stride}",
                weight.len(),
                bias.len()
            );
        }
        if !planar && !padding.within(HALO, kernel) {
            bail!(
                Internal,
                "a conv on blocked activations may pad by at most {HALO}, not {padding:?}"
            );
        }
        let packing = Packing {
            out_channels,
            in_channels,
            kernel,
            planar,
        };
        let weights = packing.pack(weight);
        Self::from_packed(packing, weights, bias, stride, padding)
    }

    /// A conv whose weights `packing` has already put in order (see
    /// [`Packing::pack`]), with its bias (`[out]`).
    pub fn from_packed(
        packing: Packing,
        weights: Vec<f32>,
        bias: &[f32],
        stride: usize,
        padding: Padding,
    ) -> Result<PackedConv> {
        let Packing {
            out_channels,
            in_channels,
            kernel,
            planar,
        } = packing;
        if weights.len() != packing.packed_len() || bias.len() != out_channels {
            bail!(
                Internal,
                "{} packed weights and {} biases do not fit {packing:?}",
                weights.len(),
                bias.len()
            );
        }
        let mut padded = bias.to_vec();
        padded.resize(out_channels.div_ceil(LANES) * LANES, 0.0);
        Ok(PackedConv {
            weights,
            bias: padded,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            planar,
        })
    }

    /// Bytes held: packed weights and bias.
    pub fn bytes(&self) -> usize {
        (self.weights.len() + self.bias.len()) * std::mem::size_of::<f32>()
    }

    /// The output size for an input of `h × w`.
    pub fn out_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        (p.output(h, k, s), p.output(w, k, s))
    }

    /// `act(conv(x) + bias + residual)`, the residual (same shape as the
    /// output) optional.
    pub fn forward(&self, x: &Maps, residual: Option<&Maps>, act: Act) -> Result<Blocked> {
        let n = match x {
            Maps::Planar(p) => p.n,
            Maps::Blocked(b) => b.n,
        };
        forward(&vec![self; n], x, residual, act, Threads::Pool)
    }

    fn same_shape(&self, o: &PackedConv) -> bool {
        (self.in_channels, self.out_channels, self.kernel)
            == (o.in_channels, o.out_channels, o.kernel)
            && (self.stride, self.padding, self.planar) == (o.stride, o.padding, o.planar)
    }
}

/// Where a conv runs: split over the rayon pool when it is big enough to pay
/// for the fork-join, or all on the calling thread (when the caller already
/// splits the batch over the pool, one part per thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    Pool,
    This,
}

/// As [`PackedConv::forward`], with image `i` of `x` convolved by `convs[i]`
/// (one conv of the same shape per image): a batch whose images are served
/// by different profiles runs as one batch. Each image's output is computed
/// the same way whatever else is in the batch.
pub fn forward(
    convs: &[&PackedConv],
    x: &Maps,
    residual: Option<&Maps>,
    act: Act,
    threads: Threads,
) -> Result<Blocked> {
    let isa = kernel::isa();
    forward_with((isa, isa.tile_pixels()), convs, x, residual, act, threads)
}

/// [`forward`] with the kernels of `isa` in tiles of `tile` pixels (16 or 5).
fn forward_with(
    (isa, tile): (Isa, usize),
    convs: &[&PackedConv],
    x: &Maps,
    residual: Option<&Maps>,
    act: Act,
    threads: Threads,
) -> Result<Blocked> {
    let (n, c, (h, w), halo, planar) = match x {
        Maps::Planar(p) => (p.n, p.channels, (p.h, p.w), p.pad, true),
        Maps::Blocked(b) => (b.n, b.channels, (b.h, b.w), HALO, false),
    };
    let residual = match residual {
        None => None,
        Some(Maps::Blocked(r)) => Some(r),
        Some(Maps::Planar(_)) => bail!(Internal, "a residual must be blocked"),
    };
    let Some(first) = convs.first() else {
        bail!(Internal, "no conv to run");
    };
    if convs.len() != n || convs.iter().any(|c| !c.same_shape(first)) {
        bail!(
            Internal,
            "{} convs for {n} images, or convs of different shapes",
            convs.len()
        );
    }
    let (k, s) = (first.kernel, first.stride);
    let ((top, bottom), (left, right)) = (
        first.padding.amounts(h, k, s),
        first.padding.amounts(w, k, s),
    );
    if c != first.in_channels
        || planar != first.planar
        || halo < top.max(bottom).max(left).max(right)
        || h + top + bottom < k
        || w + left + right < k
    {
        bail!(
            Internal,
            "a conv packed for {} input channels (planar: {}, padding {:?}) cannot read {c} channels of {h}×{w} (planar: {planar}, border {halo})",
            first.in_channels,
            first.planar,
            first.padding
        );
    }
    let (ho, wo) = first.out_size((h, w));
    let mut out = Blocked::output(n, first.out_channels, ho, wo);
    if let Some(r) = residual
        && (r.n, r.channels, r.h, r.w) != (n, first.out_channels, ho, wo)
    {
        bail!(Internal, "the residual does not match the conv's output");
    }
    let (hp, wp) = (h + 2 * halo, w + 2 * halo);
    let (ci, pixel_stride, block_stride) = match planar {
        true => (1, 1, hp * wp),
        false => (LANES, LANES, hp * wp * LANES),
    };
    let walk = Walk {
        blocks: c.div_ceil(ci),
        block_stride,
        kh: k,
        kw: k,
        row_stride: wp * pixel_stride,
        pixel_stride,
    };
    let x_image = walk.blocks * block_stride;
    let x_data = match x {
        Maps::Planar(p) => &p.data,
        Maps::Blocked(b) => &b.data,
    };
    let plan = Plan {
        // Two groups per tile on AVX-512 (in its own tile width): Lite0 at
        // batch 1 / 8 +3-14% / +6-9%, ResNet-18 +6%; four were slower.
        wide: match (isa, tile) {
            (Isa::Avx512, 16) => 2 * GROUP,
            _ => GROUP,
        },
        walk,
        shift: (halo - top, halo - left),
        stride: first.stride,
        out: (ho, wo),
        linear: s == 1 && wp == wo + 2 * HALO && wo >= 2 * tile,
        act,
        planar,
        isa,
        tile,
    };
    let out_image = out.image_len();
    let plane = out.plane_len();
    let taps = walk.blocks * k * k * ci;
    let work = n * out.blocks * ho * wo * taps * LANES;
    let groups = out.blocks.div_ceil(plan.wide);
    // Small convs run on this thread: waking the pool for a fork-join costs
    // more than they do (2^20 multiply-adds are about 25 µs on one core).
    let threads = match threads {
        Threads::Pool if work >= 1 << 20 => rayon::current_num_threads(),
        _ => 1,
    };
    // Jobs of an image's group of output blocks, split in bands of rows where
    // there are too few groups to keep every thread busy: at batch 1 a
    // projection to 16 or 24 channels is one group, and ran on one thread.
    // Four jobs per thread: groups differ in size (40 channels are a wide
    // group and one block), and the pool steals what is left.
    let bands = match threads {
        1 => 1,
        t => (4 * t).div_ceil(n * groups).min(ho),
    };
    let (blocks_total, mut whole) = (out.blocks, Out::new(&mut out.data));
    // Image `i`, the group of blocks from `g · wide`, rows `rows`: one wide
    // tile's blocks at a time, then what the last group leaves (a pair, or one).
    let job = |i: usize, g: usize, rows: Range<usize>, mut dst: Out<'_>| {
        let x = &x_data[i * x_image..][..x_image];
        let end = blocks_total.min((g + 1) * plan.wide);
        let mut first = g * plan.wide;
        while first < end {
            let blocks = match end - first {
                b if b >= plan.wide => plan.wide,
                b => b.min(GROUP),
            };
            let at = i * out_image + first * plane;
            let len = blocks * plane;
            let o = Operands {
                x,
                weights: &convs[i].weights[first * taps * LANES..][..taps * blocks * LANES],
                group_stride: taps * GROUP * LANES,
                bias: &convs[i].bias[first * LANES..][..blocks * LANES],
                residual: residual.map(|r| &r.data[at..][..len]),
                plane,
            };
            let mut dst = dst.part(at, len);
            let rows = rows.clone();
            match blocks {
                4 => plan.tiles::<4>(&o, &mut dst, rows),
                GROUP => plan.tiles::<GROUP>(&o, &mut dst, rows),
                _ => plan.tiles::<1>(&o, &mut dst, rows),
            }
            first += blocks;
        }
    };
    let band = |j: usize| {
        let (i, g, b) = (j / (groups * bands), j / bands % groups, j % bands);
        (i, g, b * ho / bands..(b + 1) * ho / bands)
    };
    let jobs = n * groups * bands;
    if threads == 1 {
        for j in 0..jobs {
            let (i, g, rows) = band(j);
            job(i, g, rows, whole.part(0, whole.floats()));
        }
    } else {
        let whole = &whole;
        (0..jobs).into_par_iter().for_each(|j| {
            let (i, g, rows) = band(j);
            // SAFETY: each job writes its own image's group's rows only.
            job(i, g, rows, unsafe { whole.share() });
        });
    }
    Ok(out)
}

/// One conv's geometry, shared by its tiles.
struct Plan {
    /// Output blocks per tile where the channels allow: one [`GROUP`], or
    /// two on AVX-512 ([`Plan::tile_for`]).
    wide: usize,
    walk: Walk,
    /// Input border minus the conv's padding before the first row and column:
    /// where tap (0, 0) of output pixel (0, 0) sits in the bordered input.
    shift: (usize, usize),
    stride: usize,
    out: (usize, usize),
    /// Stride 1 over an input as wide as the output, borders included: the
    /// output is one run of pixels, border columns and all (each input pixel
    /// to the next a step on), so tiles cross rows. The border columns get
    /// sums of wrapped windows, zeroed again after the last pass. Only for
    /// rows of two tiles or more: on narrower ones (7×7, 14×14 at 16 pixels)
    /// a row's one tail tile costs less than the two border columns per row
    /// (one thread: 512 channels at 7×7 133 against 120 GFLOP/s, 256 at
    /// 14×14 151-156 against 141; at 56×56 the run wins, 164 against 153-157).
    linear: bool,
    act: Act,
    planar: bool,
    isa: Isa,
    /// Pixels per tile: [`Isa::tile_pixels`] of some ISA.
    tile: usize,
}

/// One image's input and one group's weights, bias and residual.
#[derive(Clone, Copy)]
struct Operands<'a> {
    x: &'a [f32],
    weights: &'a [f32],
    /// Floats from one group's packed weights to the next's.
    group_stride: usize,
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    /// Floats per output block.
    plane: usize,
}

impl Plan {
    /// Every tile of one image's output, for `OB` output blocks: the K loop in
    /// chunks of input blocks whose packed weights stay in L1, each chunk
    /// swept over every tile before the next.
    fn tiles<const OB: usize>(&self, o: &Operands<'_>, dst: &mut Out<'_>, rows: Range<usize>) {
        let w = self.walk;
        let ci = if self.planar { 1 } else { LANES };
        let (width, groups) = (OB.min(GROUP), OB.div_ceil(GROUP));
        // One input block's weights in one group's run.
        let per_block = w.kh * w.kw * ci * width * LANES;
        let chunk = (CHUNK_BYTES / (groups * per_block * size_of::<f32>())).max(1);
        for first in (0..w.blocks).step_by(chunk) {
            let blocks = chunk.min(w.blocks - first);
            let part = Operands {
                x: &o.x[first * w.block_stride..],
                weights: &o.weights[first * per_block..]
                    [..(groups - 1) * o.group_stride + blocks * per_block],
                residual: o.residual.filter(|_| first == 0),
                ..*o
            };
            let pass = Pass {
                walk: Walk { blocks, ..w },
                accumulate: first > 0,
                act: match first + blocks == w.blocks {
                    true => self.act,
                    false => Act::None,
                },
            };
            self.pass::<OB>(&pass, &part, dst, rows.clone());
        }
        if self.linear {
            self.clear_borders(dst, o.plane, rows);
        }
    }

    /// One chunk of the K loop over every tile.
    fn pass<const OB: usize>(
        &self,
        pass: &Pass,
        o: &Operands<'_>,
        dst: &mut Out<'_>,
        rows: Range<usize>,
    ) {
        const WIDE: usize = Isa::Avx512.tile_pixels();
        const NARROW: usize = Isa::Avx2.tile_pixels();
        match (self.tile_for(OB), self.stride) {
            (WIDE, 1) => self.sweep::<OB, WIDE, 1>(pass, o, dst, rows),
            (WIDE, 2) => self.sweep::<OB, WIDE, 2>(pass, o, dst, rows),
            (12, 1) => self.sweep::<OB, 12, 1>(pass, o, dst, rows),
            (12, 2) => self.sweep::<OB, 12, 2>(pass, o, dst, rows),
            (_, 1) => self.sweep::<OB, NARROW, 1>(pass, o, dst, rows),
            (_, 2) => self.sweep::<OB, NARROW, 2>(pass, o, dst, rows),
            // Other strides (no shipped model has one) pixel by pixel, where
            // the step between pixels does not matter.
            _ => self.sweep::<OB, 1, 1>(pass, o, dst, rows),
        }
    }

    /// Pixels per tile of `ob` blocks: as many accumulators as leave
    /// registers for a K step's weights and a broadcast (24 of 32 for two
    /// groups on AVX-512).
    fn tile_for(&self, ob: usize) -> usize {
        match ob {
            4 => 12,
            _ => self.tile,
        }
    }

    /// Each run of output pixels in tiles of `PX`, then the rest in one tile of
    /// as many pixels (which gives the same bits: each output is its own
    /// sequence of multiply-adds). A run is a row, or the band's rows in one when
    /// [`Plan::linear`]. One tail tile, not tiles of 8, 4, 2 and 1: a tile of
    /// one pixel waits on its one accumulator's chain, and on a 7×7 plane
    /// (a run of 61 pixels) the tiles of 8, 4 and 1 took a third of the time.
    fn sweep<const OB: usize, const PX: usize, const S: usize>(
        &self,
        pass: &Pass,
        o: &Operands<'_>,
        dst: &mut Out<'_>,
        rows: Range<usize>,
    ) {
        let (wo, w) = (self.out.1, &pass.walk);
        let wpo = wo + 2 * HALO;
        let row = |y: usize| {
            let x_at =
                (y * self.stride + self.shift.0) * w.row_stride + self.shift.1 * w.pixel_stride;
            (x_at, ((y + HALO) * wpo + HALO) * LANES)
        };
        let mut run = |(x_at, out_at): (usize, usize), len: usize| {
            let step = self.stride * w.pixel_stride;
            let at = |j: usize| (x_at + j * step, out_at + j * LANES);
            let mut j = 0;
            while j + PX <= len {
                self.tile::<OB, PX, S>(at(j), pass, o, dst);
                j += PX;
            }
            let at = at(j);
            macro_rules! tail {
                ($($n:literal)*) => {
                    match len - j {
                        0 => {}
                        $($n if $n < PX => self.tile::<OB, $n, S>(at, pass, o, dst),)*
                        n => unreachable!("a tail of {n} pixels in tiles of {PX}"),
                    }
                };
            }
            tail!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        };
        match self.linear {
            true => run(row(rows.start), (rows.len() - 1) * wpo + wo),
            false => rows.for_each(|y| run(row(y), wo)),
        }
    }

    /// Zeroes the border columns a linear sweep wrote into `blocks` output
    /// planes: the right border of each of the band's rows but its last and
    /// the left border of the next lie side by side.
    fn clear_borders(&self, dst: &mut Out<'_>, plane: usize, rows: Range<usize>) {
        let wo = self.out.1;
        let wpo = wo + 2 * HALO;
        for start in (0..dst.floats()).step_by(plane) {
            for y in rows.start..rows.end - 1 {
                let at = ((y + HALO) * wpo + HALO + wo) * LANES;
                dst.zero(start + at, 2 * HALO * LANES);
            }
        }
    }

    /// The tile of `PX` pixels whose first input window and output are at
    /// `(x_at, out_at)`.
    fn tile<const OB: usize, const PX: usize, const S: usize>(
        &self,
        (x_at, out_at): (usize, usize),
        pass: &Pass,
        o: &Operands<'_>,
        dst: &mut Out<'_>,
    ) {
        let t = Tile {
            x: o.x,
            x_at,
            weights: o.weights,
            group_stride: o.group_stride,
            bias: o.bias,
            residual: o.residual,
            out_at,
            out_stride: o.plane,
            accumulate: pass.accumulate,
            act: pass.act,
        };
        match self.planar {
            true => kernel::run::<OB, PX, 1, S>(self.isa, &pass.walk, &t, dst),
            false => kernel::run::<OB, PX, LANES, S>(self.isa, &pass.walk, &t, dst),
        }
    }
}

/// One chunk of a conv's K loop: its input blocks, whether it continues from
/// stored partial sums, and the activation it ends with (none but the last's).
struct Pass {
    walk: Walk,
    accumulate: bool,
    act: Act,
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::blocked::Planar;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
    }

    /// The kernels to check on this CPU: each SIMD ISA it has in its own tile
    /// width and in AVX2's, and AVX2 in AVX-512's (so that the wide tiling
    /// runs on any x86 CPU); then the portable one.
    fn kernels_here() -> (Vec<(Isa, usize)>, (Isa, usize)) {
        let (wide, narrow) = (Isa::Avx512.tile_pixels(), Isa::Avx2.tile_pixels());
        let simd: Vec<(Isa, usize)> = [(Isa::Avx512, wide), (Isa::Avx512, narrow)]
            .into_iter()
            .chain([(Isa::Avx2, narrow), (Isa::Avx2, wide)])
            .filter(|(i, _)| i.supported())
            .collect();
        if !Isa::Avx512.supported() {
            println!("skipped: this CPU has no AVX-512");
        }
        let tested: Vec<String> = (simd.iter().chain([&(Isa::Portable, narrow)]))
            .map(|(i, px)| format!("{i} in {px}-pixel tiles"))
            .collect();
        println!("conv kernels tested on this CPU: {}", tested.join(", "));
        (simd, (Isa::Portable, narrow))
    }

    /// candle's conv2d plus bias, residual and activation: the reference.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        weight: &[f32],
        bias: &[f32],
        (o, k, s, p): (usize, usize, usize, Padding),
        residual: Option<&[f32]>,
        act: Act,
    ) -> Vec<f32> {
        let d = Device::Cpu;
        let x = Tensor::from_slice(x, (n, c, h, w), &d).unwrap();
        let (x, pad) = crate::model::pad_for(&x, p, k, s).unwrap();
        let wt = Tensor::from_slice(weight, (o, c, k, k), &d).unwrap();
        let b = Tensor::from_slice(bias, (1, o, 1, 1), &d).unwrap();
        let mut y = x
            .conv2d(&wt, pad, s, 1, 1)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        if let Some(r) = residual {
            y = (y.clone() + Tensor::from_slice(r, y.shape(), &d).unwrap()).unwrap();
        }
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        y.into_iter().map(|v| act.apply(v)).collect()
    }

    #[test]
    fn matches_candle_conv2d_with_bias_residual_and_activation() {
        let mut rng = Rng::new(3);
        let sym = Padding::Symmetric;
        // (in, out, size, kernel, stride, padding, planar input)
        let cases = [
            (3, 16, 20, 7, 2, sym(3), true),
            (1, 16, 28, 3, 2, sym(1), true),
            // TensorFlow's padding: none before and one after, then one each side.
            (3, 16, 20, 3, 2, Padding::Same, true),
            // Stride 1 over a planar input bordered as wide as the output: one
            // run across rows, as for blocked ones.
            (3, 16, 20, 3, 1, sym(1), true),
            // A stride with no tiling of its own: pixel by pixel.
            (16, 16, 11, 3, 3, sym(1), false),
            (16, 16, 9, 3, 1, sym(1), false),
            (16, 16, 10, 3, 2, Padding::Same, false),
            (16, 16, 9, 3, 1, Padding::Same, false),
            (16, 32, 9, 3, 2, sym(1), false),
            (16, 32, 9, 1, 2, sym(0), false),
            (32, 24, 7, 1, 1, sym(0), false),
            (12, 20, 5, 3, 1, sym(1), false),
            (8, 8, 3, 3, 1, sym(1), false),
            // 5 input blocks of 3×3: the K loop runs in two chunks.
            (40, 24, 6, 3, 1, sym(1), false),
            // Wide enough for one run across rows in either tile width, in
            // one K chunk and in two.
            (16, 24, 34, 3, 1, sym(1), false),
            // Large enough for the pool, with fewer groups than threads: in
            // bands of rows (with two threads or more).
            (40, 16, 33, 3, 1, sym(1), false),
            // Tiles of several groups, and what their channels leave over.
            (16, 64, 9, 1, 1, sym(0), false),
            (24, 80, 14, 1, 1, sym(0), false),
            (40, 72, 9, 3, 1, sym(1), false),
            (16, 96, 34, 1, 1, sym(0), false),
        ];
        for (c, o, size, k, s, p, planar) in cases {
            let n = 2;
            let shape = (n, c, size, size);
            // Wide enough to meet ReLU6's cap.
            let x: Vec<f32> = random(&mut rng, n * c * size * size)
                .iter()
                .map(|v| 4.0 * v)
                .collect();
            let weight = random(&mut rng, o * c * k * k);
            let bias = random(&mut rng, o);
            let conv = PackedConv::new(&weight, &bias, (o, c, k), s, p, planar).unwrap();
            let (ho, wo) = conv.out_size((size, size));
            let res_nchw = random(&mut rng, n * o * ho * wo);
            let residual = Maps::Blocked(Blocked::from_nchw(&res_nchw, (n, o, ho, wo)));
            let border = p.amounts(size, k, s).1.max(p.amounts(size, k, s).0);
            let input = match planar {
                true => Maps::Planar(Planar::new(&x, shape, border)),
                false => Maps::Blocked(Blocked::from_nchw(&x, shape)),
            };
            for (res, act) in [
                (None, Act::None),
                (Some(&residual), Act::Relu),
                (None, Act::Relu6),
            ] {
                let (simd, portable) = kernels_here();
                let run =
                    |kern| forward_with(kern, &vec![&conv; n], &input, res, act, Threads::Pool);
                let bits = |b: &Blocked| b.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let outputs: Vec<((Isa, usize), Blocked)> = (simd.iter().chain([&portable]))
                    .map(|kern| (*kern, run(*kern).unwrap()))
                    .collect();
                // Every SIMD kernel, whatever its tile, gives the same bits.
                let (first, got) = &outputs[0];
                for (kern, theirs) in &outputs[1..simd.len().max(1)] {
                    assert!(
                        bits(theirs) == bits(got),
                        "{kern:?} vs {first:?}: {c}->{o} k{k} s{s}"
                    );
                }
                let want = reference(
                    &x,
                    shape,
                    &weight,
                    &bias,
                    (o, k, s, p),
                    res.map(|_| res_nchw.as_slice()),
                    act,
                );
                // And each, the portable one too, candle's values.
                for (kern, got) in &outputs {
                    let got = got.to_nchw();
                    assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{kern:?} {c}->{o} k{k} s{s} {p:?} {act:?}: {g} vs {w}"
                        );
                    }
                }
                if act == Act::Relu6 {
                    assert!(
                        want.contains(&6.0),
                        "{c}->{o} k{k}: the cap was never reached"
                    );
                }
                // Borders and padding channels stay zero.
                for (kern, got) in &outputs {
                    let sum_abs: f32 = got.data.iter().map(|v| v.abs()).sum();
                    let real: f32 = got.to_nchw().iter().map(|v| v.abs()).sum();
                    assert!(
                        (sum_abs - real).abs() <= 1e-3 * real.max(1.0),
                        "{kern:?} {c}->{o} k{k} s{s}: a border is not zero"
                    );
                }
            }
        }
    }

    #[test]
    fn an_image_does_not_depend_on_its_batch() {
        let mut rng = Rng::new(5);
        let (c, o, size) = (16, 64, 30);
        let weight = random(&mut rng, o * c * 9);
        let bias = random(&mut rng, o);
        let conv =
            PackedConv::new(&weight, &bias, (o, c, 3), 1, Padding::Symmetric(1), false).unwrap();
        let x = random(&mut rng, 4 * c * size * size);
        // Large enough to run in parallel: over images and groups at 4, and
        // at 1 over bands of rows as well (with two threads or more).
        let run = |x: &[f32], n: usize| {
            let x = Maps::Blocked(Blocked::from_nchw(x, (n, c, size, size)));
            conv.forward(&x, None, Act::Relu).unwrap()
        };
        let all = run(&x, 4);
        let one = run(&x[2 * c * size * size..][..c * size * size], 1);
        assert_eq!(one.data, all.data[2 * all.image_len()..][..all.image_len()]);
    }

    #[test]
    fn overflow_stays_visible_through_relu() {
        let conv = PackedConv::new(
            &[f32::MAX; 8 * 8],
            &[f32::MAX; 8],
            (8, 8, 1),
            1,
            Padding::Symmetric(0),
            false,
        )
        .unwrap();
        let mut x = Blocked::zeros(1, 8, 1, 1);
        x.data.fill(f32::MAX);
        let y = conv
            .forward(&Maps::Blocked(x.clone()), None, Act::Relu)
            .unwrap();
        assert!(y.to_nchw().iter().all(|v| *v == f32::INFINITY));
        // An earlier overflow meets weights of both signs: inf - inf is NaN,
        // which ReLU must not turn into 0.
        let signs: Vec<f32> = (0..64)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let mixed = PackedConv::new(
            &signs,
            &[0.0; 8],
            (8, 8, 1),
            1,
            Padding::Symmetric(0),
            false,
        )
        .unwrap();
        x.data.fill(f32::INFINITY);
        let y = mixed.forward(&Maps::Blocked(x), None, Act::Relu).unwrap();
        assert!(y.to_nchw().iter().all(|v| v.is_nan()));
    }
}
