//! Depthwise convolution on blocked activations, BatchNorm folded in: each
//! channel convolved with its own k×k kernel, the [`LANES`] channels of a block
//! together (one vector multiply-add per tap). MobileNetV2's and
//! EfficientNet's 3×3 and 5×5, stride 1 or 2, any padding: taps that fall
//! outside the image are skipped, so the border's width does not matter.
//!
//! The dense microkernel ([`super::kernel`]) would spend a whole tile of
//! accumulators on one input channel's worth of work here; this is a plain
//! loop over output pixels, one AVX2 register per pixel where the CPU has it.

use rayon::prelude::*;

use super::kernel::{Act, Isa, LANES, isa};
use super::{Blocked, HALO, Threads};
use crate::model::arch::Padding;
use crate::{Result, bail};

/// A folded depthwise conv, its weights laid out per block, tap and lane.
#[derive(Debug, Clone)]
pub struct PackedDepthwise {
    /// `[block][ky][kx][lane]`, zero past the real channels.
    weights: Vec<f32>,
    /// Zero past the real channels.
    bias: Vec<f32>,
    channels: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
}

impl PackedDepthwise {
    /// Lays out `weight` (`[channels, 1, k, k]`, row-major) and `bias` (`[channels]`).
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        (channels, kernel): (usize, usize),
        stride: usize,
        padding: Padding,
    ) -> Result<PackedDepthwise> {
        let taps = kernel * kernel;
        if weight.len() != channels * taps || bias.len() != channels || stride == 0 || kernel == 0 {
            bail!(
                Internal,
                "cannot lay out a depthwise conv of {} weights and {} biases as [{channels}, 1, {kernel}, {kernel}] with stride {stride}",
                weight.len(),
                bias.len()
            );
        }
        let blocks = channels.div_ceil(LANES);
        let mut weights = vec![0f32; blocks * taps * LANES];
        for (c, taps_of_c) in weight.chunks_exact(taps).enumerate() {
            for (t, w) in taps_of_c.iter().enumerate() {
                weights[((c / LANES) * taps + t) * LANES + c % LANES] = *w;
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(blocks * LANES, 0.0);
        Ok(PackedDepthwise {
            weights,
            bias: padded,
            channels,
            kernel,
            stride,
            padding,
        })
    }

    /// Bytes held: weights and bias.
    pub fn bytes(&self) -> usize {
        (self.weights.len() + self.bias.len()) * std::mem::size_of::<f32>()
    }

    pub fn out_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        (p.output(h, k, s), p.output(w, k, s))
    }

    fn same_shape(&self, o: &PackedDepthwise) -> bool {
        (self.channels, self.kernel, self.stride, self.padding)
            == (o.channels, o.kernel, o.stride, o.padding)
    }
}

/// `act(depthwise(x) + bias)`, image `i` of `x` convolved by `convs[i]` (as
/// [`super::forward`] does for dense convs): a batch of mixed profiles runs as
/// one, each image computed the same way whatever else is in it.
pub fn forward(
    convs: &[&PackedDepthwise],
    x: &Blocked,
    act: Act,
    threads: Threads,
) -> Result<Blocked> {
    let Some(first) = convs.first() else {
        bail!(Internal, "no conv to run");
    };
    if convs.len() != x.n
        || convs.iter().any(|c| !c.same_shape(first))
        || x.channels != first.channels
    {
        bail!(
            Internal,
            "{} depthwise convs of {} channels for {} images of {}",
            convs.len(),
            first.channels,
            x.n,
            x.channels
        );
    }
    let (ho, wo) = first.out_size((x.h, x.w));
    let mut out = Blocked::output(x.n, x.channels, ho, wo);
    let (src_plane, dst_plane) = (x.plane_len(), out.plane_len());
    let taps = first.kernel * first.kernel * LANES;
    // One output plane (an image's block of channels) per job.
    let job = |(i, dst): (usize, &mut [f32])| {
        let (image, block) = (i / x.blocks, i % x.blocks);
        let conv = convs[image];
        let plane = Plane {
            src: &x.data[i * src_plane..][..src_plane],
            weights: &conv.weights[block * taps..][..taps],
            bias: &conv.bias[block * LANES..][..LANES],
            size: (x.h, x.w),
            out: (ho, wo),
            kernel: conv.kernel,
            stride: conv.stride,
            before: (
                conv.padding.amounts(x.h, conv.kernel, conv.stride).0,
                conv.padding.amounts(x.w, conv.kernel, conv.stride).0,
            ),
            act,
        };
        if isa() >= Isa::Avx2 {
            // SAFETY: the CPU has AVX2 and FMA (every ISA from AVX2 up does).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                plane.run_avx2(dst)
            };
        } else {
            plane.run(dst);
        }
    };
    // Big enough to pay for the fork-join.
    match threads == Threads::Pool && x.n * x.blocks * ho * wo * taps >= 1 << 18 {
        true => out
            .data
            .par_chunks_exact_mut(dst_plane)
            .enumerate()
            .for_each(job),
        false => out
            .data
            .chunks_exact_mut(dst_plane)
            .enumerate()
            .for_each(job),
    }
    Ok(out)
}

/// One image's block of channels: its input plane (bordered), its weights and
/// bias, and where the output goes.
struct Plane<'a> {
    src: &'a [f32],
    weights: &'a [f32],
    bias: &'a [f32],
    size: (usize, usize),
    out: (usize, usize),
    kernel: usize,
    stride: usize,
    /// Padding before the first row and column.
    before: (usize, usize),
    act: Act,
}

impl Plane<'_> {
    /// [`Plane::run`] with one AVX2 register per pixel: the same multiply-adds
    /// in the same order, so the same bits. (Left to the compiler, the loop
    /// split each pixel into 2-lane pieces around slice checks: 48% of
    /// EfficientNet-Lite0's time went there.) Pixels whose window lies inside
    /// the image go 8, 4 or 2 at a time: one pixel alone waits on its one
    /// accumulator's chain of k² multiply-adds (7 GFLOP/s at 3×3), several
    /// interleave.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, dst: &mut [f32]) {
        use std::arch::x86_64::*;

        use super::kernel::x86::Lanes;
        const { assert!(LANES == 8) };
        let (h, w) = self.size;
        let (ho, wo) = self.out;
        let (wp, wpo, k, s) = (w + 2 * HALO, wo + 2 * HALO, self.kernel, self.stride);
        // Every pixel read is inside the bordered input plane (`taps` keeps rows
        // and columns inside the image) and every one written inside the output's.
        assert!(self.src.len() >= (h + 2 * HALO) * wp * LANES, "input plane");
        assert!(dst.len() >= (ho + 2 * HALO) * wpo * LANES, "output plane");
        assert!(self.weights.len() >= k * k * LANES && self.bias.len() >= LANES);
        // Output columns whose whole window is inside the image.
        let left = self.before.1;
        let inner = left.div_ceil(s)..(w + left).checked_sub(k).map_or(0, |r| r / s + 1);
        // SAFETY (whole body): the asserts above bound every offset used; an
        // inner column's window is inside the image by `inner`'s bounds.
        unsafe {
            let (src, weights, out) = (self.src.as_ptr(), self.weights.as_ptr(), dst.as_mut_ptr());
            let bias = _mm256_loadu_ps(self.bias.as_ptr());
            // The microkernel's epilogue: NaN stays NaN, as in `Act::apply`.
            let act = |acc: __m256| acc.act(self.act);
            // `PX` pixels from column `ox` of row `oy`, their windows inside the image.
            macro_rules! inner_pixels {
                ($px:literal, $oy:expr, $y0:expr, $ox:expr) => {{
                    let mut acc = [bias; $px];
                    for ky in 0..k {
                        let row = (($y0 + ky as isize) as usize + HALO) * wp;
                        let first = row + $ox * s - left + HALO;
                        for kx in 0..k {
                            let wv = _mm256_loadu_ps(weights.add((ky * k + kx) * LANES));
                            for (p, acc) in acc.iter_mut().enumerate() {
                                let xv = _mm256_loadu_ps(src.add((first + p * s + kx) * LANES));
                                *acc = _mm256_fmadd_ps(xv, wv, *acc);
                            }
                        }
                    }
                    for (p, acc) in acc.into_iter().enumerate() {
                        let at = (($oy + HALO) * wpo + $ox + p + HALO) * LANES;
                        _mm256_storeu_ps(out.add(at), act(acc));
                    }
                }};
            }
            for oy in 0..ho {
                let y0 = (oy * s) as isize - self.before.0 as isize;
                let rows = self.taps(y0, h);
                let mut ox = 0;
                while ox < wo {
                    if rows.len() == k && inner.contains(&ox) {
                        if ox + 8 <= inner.end {
                            inner_pixels!(8, oy, y0, ox);
                            ox += 8;
                            continue;
                        }
                        if ox + 4 <= inner.end {
                            inner_pixels!(4, oy, y0, ox);
                            ox += 4;
                            continue;
                        }
                        if ox + 2 <= inner.end {
                            inner_pixels!(2, oy, y0, ox);
                            ox += 2;
                            continue;
                        }
                    }
                    let x0 = (ox * s) as isize - left as isize;
                    let cols = self.taps(x0, w);
                    let mut acc = bias;
                    for ky in rows.clone() {
                        let row = ((y0 + ky as isize) as usize + HALO) * wp;
                        for kx in cols.clone() {
                            let at = (row + (x0 + kx as isize) as usize + HALO) * LANES;
                            let xv = _mm256_loadu_ps(src.add(at));
                            let wv = _mm256_loadu_ps(weights.add((ky * k + kx) * LANES));
                            acc = _mm256_fmadd_ps(xv, wv, acc);
                        }
                    }
                    _mm256_storeu_ps(out.add(((oy + HALO) * wpo + ox + HALO) * LANES), act(acc));
                    ox += 1;
                }
            }
        }
    }

    /// The taps of a `kernel`-wide window starting at `start` (padding
    /// included) that fall inside `0..len`.
    fn taps(&self, start: isize, len: usize) -> std::ops::Range<usize> {
        let lo = (-start).max(0) as usize;
        let hi = (len as isize - start).clamp(0, self.kernel as isize) as usize;
        lo..hi.max(lo)
    }

    fn run(&self, dst: &mut [f32]) {
        let (h, w) = self.size;
        let (ho, wo) = self.out;
        let (wp, wpo, k) = (w + 2 * HALO, wo + 2 * HALO, self.kernel);
        let bias: [f32; LANES] = self.bias.try_into().expect("one block");
        for oy in 0..ho {
            let y0 = (oy * self.stride) as isize - self.before.0 as isize;
            let rows = self.taps(y0, h);
            for ox in 0..wo {
                let x0 = (ox * self.stride) as isize - self.before.1 as isize;
                let cols = self.taps(x0, w);
                let mut acc = bias;
                for ky in rows.clone() {
                    let row = ((y0 + ky as isize) as usize + HALO) * wp;
                    for kx in cols.clone() {
                        let at = (row + (x0 + kx as isize) as usize + HALO) * LANES;
                        let xv: &[f32; LANES] =
                            self.src[at..at + LANES].try_into().expect("a pixel");
                        let wv: &[f32; LANES] = self.weights[(ky * k + kx) * LANES..][..LANES]
                            .try_into()
                            .expect("a tap");
                        for l in 0..LANES {
                            acc[l] = xv[l].mul_add(wv[l], acc[l]);
                        }
                    }
                }
                let at = ((oy + HALO) * wpo + ox + HALO) * LANES;
                for (d, v) in dst[at..at + LANES].iter_mut().zip(acc) {
                    *d = self.act.apply(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::rng::Rng;

    /// candle's grouped conv2d plus bias and activation: the reference.
    #[test]
    fn matches_candle_grouped_conv2d() {
        let mut rng = Rng::new(9);
        let d = Device::Cpu;
        // (channels, size, kernel, stride, padding)
        let cases = [
            (32, 14, 3, 1, Padding::Symmetric(1)),
            (16, 14, 3, 2, Padding::Symmetric(1)),
            (20, 9, 5, 1, Padding::Same),
            (24, 10, 5, 2, Padding::Same),
            (12, 11, 3, 2, Padding::Same),
            (8, 2, 5, 1, Padding::Same),
        ];
        for (c, size, k, s, p) in cases {
            let n = 3;
            let x: Vec<f32> = (0..n * c * size * size)
                .map(|_| 4.0 * rng.normal())
                .collect();
            let weight: Vec<f32> = (0..c * k * k).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..c).map(|_| rng.normal()).collect();
            let conv = PackedDepthwise::new(&weight, &bias, (c, k), s, p).unwrap();
            let xt = Tensor::from_slice(&x, (n, c, size, size), &d).unwrap();
            let (xt, pad) = crate::model::pad_for(&xt, p, k, s).unwrap();
            let wt = Tensor::from_slice(&weight, (c, 1, k, k), &d).unwrap();
            let bt = Tensor::from_slice(&bias, (1, c, 1, 1), &d).unwrap();
            let want = xt
                .conv2d(&wt, pad, s, 1, c)
                .unwrap()
                .broadcast_add(&bt)
                .unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let input = Blocked::from_nchw(&x, (n, c, size, size));
            for act in [Act::None, Act::Relu6] {
                let got = forward(&vec![&conv; n], &input, act, Threads::Pool).unwrap();
                assert_eq!(got.to_nchw().len(), want.len(), "{c} k{k} s{s} {p:?}");
                for (g, w) in got.to_nchw().iter().zip(&want) {
                    let w = act.apply(*w);
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{c} k{k} s{s} {p:?}: {g} vs {w}"
                    );
                }
                // Borders and padding channels stay zero.
                let all: f32 = got.data.iter().map(|v| v.abs()).sum();
                let real: f32 = got.to_nchw().iter().map(|v| v.abs()).sum();
                assert!(
                    (all - real).abs() <= 1e-3 * real.max(1.0),
                    "{c} k{k}: {all} vs {real}"
                );
            }
        }
    }

    /// The AVX2 loop and the portable one give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_loop_is_the_portable_loop() {
        if !Isa::Avx2.supported() {
            println!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = Rng::new(6);
        for (size, k, s, p) in [
            (13, 3, 2, Padding::Same),
            (12, 5, 1, Padding::Same),
            (9, 3, 1, Padding::Symmetric(1)),
        ] {
            let x = Blocked::from_nchw(
                &(0..8 * size * size)
                    .map(|_| rng.normal())
                    .collect::<Vec<_>>(),
                (1, 8, size, size),
            );
            let weights: Vec<f32> = (0..k * k * LANES).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..LANES).map(|_| rng.normal()).collect();
            let out = p.output(size, k, s);
            let plane = Plane {
                src: &x.data,
                weights: &weights,
                bias: &bias,
                size: (size, size),
                out: (out, out),
                kernel: k,
                stride: s,
                before: (p.amounts(size, k, s).0, p.amounts(size, k, s).0),
                act: Act::Relu6,
            };
            let len = (out + 2 * HALO) * (out + 2 * HALO) * LANES;
            let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
            plane.run(&mut a);
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { plane.run_avx2(&mut b) };
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn an_image_does_not_depend_on_its_batch() {
        let mut rng = Rng::new(4);
        let (c, size, k) = (64, 40, 5);
        let weight: Vec<f32> = (0..c * k * k).map(|_| rng.normal()).collect();
        let conv = PackedDepthwise::new(&weight, &vec![0.5; c], (c, k), 1, Padding::Same).unwrap();
        let x: Vec<f32> = (0..4 * c * size * size).map(|_| rng.normal()).collect();
        let run = |x: &[f32], n: usize| {
            let x = Blocked::from_nchw(x, (n, c, size, size));
            forward(&vec![&conv; n], &x, Act::Relu6, Threads::Pool).unwrap()
        };
        let all = run(&x, 4);
        let one = run(&x[2 * c * size * size..][..c * size * size], 1);
        assert_eq!(one.data, all.data[2 * all.image_len()..][..all.image_len()]);
    }
}
