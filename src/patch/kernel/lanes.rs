//! The fused kernel writing the blocked CPU convolution's packed order
//! (`crate::model::blocked::Packing`) itself. The clean weights and each
//! signature's weight deltas are laid out in that order once, when they are
//! loaded, so a profile switch is one streaming pass that packs nothing.
//!
//! The order: output channels in groups of [`LaneLayout::width`], each group a
//! sequence of [`LaneLayout::runs`] runs of one value per channel of the group;
//! the last group is narrower (a multiple of [`LaneLayout::align`]) when the
//! channels end early. Lanes past the last channel, and runs the layout marks
//! as padding (input channels past the last), come out zero. Every value goes through the same IEEE operations as in
//! [`super::cpu`], so the output is bit for bit that kernel's, reordered.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::cpu::{MIN_TASK_ELEMS, fold_bn};
use super::{ConvBn, DeltaView, KernelError, LayerDelta};

/// The packed order, as the kernel needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneLayout<'a> {
    pub out_channels: usize,
    /// Lanes per group: 8, 16 or 32.
    pub width: usize,
    /// The last group's lanes are rounded up to a multiple of this.
    pub align: usize,
    /// Runs per group.
    pub runs: usize,
    /// Per run: whether it holds weights (`false`: padding, written as zero).
    pub live: &'a [bool],
}

impl LaneLayout<'_> {
    /// Values in this order, padding lanes included.
    pub fn len(&self) -> usize {
        self.runs * self.out_channels.div_ceil(self.align) * self.align
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per full group.
    fn group_len(&self) -> usize {
        self.runs * self.width
    }
}

/// A weight delta in the packed order.
#[derive(Debug, Clone, Copy)]
pub enum LaneWeights<'a> {
    Values(&'a [f32]),
    /// `value = q as f32 · scale[o] + offset[o]` for output channel `o`: int8
    /// and int4 deltas alike, one code per byte.
    Codes {
        q: &'a [u8],
        scale: &'a [f32],
        offset: &'a [f32],
    },
}

/// An owned [`LaneWeights`].
#[derive(Debug, Clone, PartialEq)]
pub enum LaneBuf {
    Values(Vec<f32>),
    Codes {
        q: Vec<u8>,
        scale: Vec<f32>,
        offset: Vec<f32>,
    },
}

impl LaneBuf {
    /// `delta` (row-major) in the packed order, which the `pack` functions
    /// put values and codes in. f16 values become f32 and int4 codes one per
    /// byte: both exact, so the kernel computes what [`super::cpu`] does from
    /// the stored form.
    pub fn new(
        delta: &DeltaView,
        pack_values: impl Fn(&[f32]) -> Vec<f32>,
        pack_codes: impl Fn(&[u8]) -> Vec<u8>,
    ) -> LaneBuf {
        match delta.codes() {
            Some(c) => LaneBuf::Codes {
                q: pack_codes(&c.q),
                scale: c.scale.to_vec(),
                offset: c.offset.to_vec(),
            },
            None => {
                let mut values = vec![0f32; delta.len()];
                delta.dequantize_into(&mut values);
                LaneBuf::Values(pack_values(&values))
            }
        }
    }

    pub fn view(&self) -> LaneWeights<'_> {
        match self {
            LaneBuf::Values(v) => LaneWeights::Values(v),
            LaneBuf::Codes { q, scale, offset } => LaneWeights::Codes { q, scale, offset },
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            LaneBuf::Values(v) => std::mem::size_of_val(v.as_slice()),
            LaneBuf::Codes { q, scale, offset } => {
                q.len()
                    + std::mem::size_of_val(scale.as_slice())
                    + std::mem::size_of_val(offset.as_slice())
            }
        }
    }
}

/// The served weights of one patched conv layer in the packed order, and its
/// folded bias (one per real channel): `base.weight` and every weight delta are
/// laid out as `layout` says. The same formula and the same errors (the lowest
/// failing channel's) as [`super::cpu::fused_add_scale`].
///
/// # Panics
/// If a length does not match `layout`.
pub fn fused_add_scale(
    base: &ConvBn,
    deltas: &[LayerDelta<LaneWeights>],
    layout: LaneLayout<'_>,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    let channels = base.out_channels;
    // Written without zeroing first: `fill` writes every value (it was a
    // tenth of a profile switch).
    let mut out_w = Vec::with_capacity(layout.len());
    let mut out_b = vec![0f32; channels];
    fill(base, deltas, layout, out_w.spare_capacity_mut(), &mut out_b)?;
    // SAFETY: `fill` succeeded, so it wrote all `layout.len()` values.
    unsafe { out_w.set_len(layout.len()) };
    Ok((out_w, out_b))
}

/// Writes every value of `out_w` (`layout.len()` of them) unless it fails.
fn fill(
    base: &ConvBn,
    deltas: &[LayerDelta<LaneWeights>],
    layout: LaneLayout<'_>,
    out_w: &mut [MaybeUninit<f32>],
    out_b: &mut [f32],
) -> Result<(), KernelError> {
    let channels = base.out_channels;
    assert!(
        matches!(layout.width, 8 | 16 | 32) && layout.width.is_multiple_of(layout.align.max(1)),
        "lane width {} (align {})",
        layout.width,
        layout.align
    );
    assert_eq!(layout.out_channels, channels, "layout's channels");
    assert_eq!(layout.live.len(), layout.runs, "live runs");
    assert_eq!(base.weight.len(), layout.len(), "weight length");
    let out_w = &mut out_w[..layout.len()];
    for p in [base.gamma, base.beta, base.mean, base.var] {
        assert_eq!(p.len(), channels, "BatchNorm parameter length");
    }
    for d in deltas {
        match d.weight {
            Some(LaneWeights::Values(v)) => assert_eq!(v.len(), layout.len(), "delta length"),
            Some(LaneWeights::Codes { q, scale, offset }) => {
                assert_eq!(q.len(), layout.len(), "delta length");
                assert_eq!(
                    (scale.len(), offset.len()),
                    (channels, channels),
                    "delta rows"
                );
            }
            None => {}
        }
        for p in [d.gamma, d.beta, d.mean, d.var].into_iter().flatten() {
            assert_eq!(p.len(), channels, "BatchNorm delta length");
        }
    }
    if layout.runs == 0 || channels == 0 {
        // No weights: only the bias remains to fold.
        for (o, b) in out_b.iter_mut().enumerate() {
            let (_, bias) = fold_bn(base, deltas, o)?;
            if !bias.is_finite() {
                return Err(KernelError::NotFinite { channel: o });
            }
            *b = bias;
        }
        return Ok(());
    }
    let job = |(g, (w, b)): (usize, (&mut [MaybeUninit<f32>], &mut [f32]))| {
        group(
            &Job {
                base,
                deltas,
                layout,
            },
            g,
            w,
            b,
        )
    };
    let chunks = layout.group_len();
    // Small layers run here, as in `cpu`: the pool's hand-off costs more.
    if out_w.len() < MIN_TASK_ELEMS {
        let groups = out_w.chunks_mut(chunks).zip(out_b.chunks_mut(layout.width));
        return groups.enumerate().try_for_each(job);
    }
    let failure = (out_w
        .par_chunks_mut(chunks)
        .zip(out_b.par_chunks_mut(layout.width)))
    .enumerate()
    .filter_map(|g| job(g).err())
    .find_first(|_| true);
    failure.map_or(Ok(()), Err)
}

/// One layer's inputs, shared by its groups.
struct Job<'a> {
    base: &'a ConvBn<'a>,
    deltas: &'a [LayerDelta<'a, LaneWeights<'a>>],
    layout: LaneLayout<'a>,
}

/// One group: on x86-64 with AVX2 the same code compiled for AVX2 (no FMA is
/// contracted, so both give the same bits).
fn group(
    job: &Job,
    g: usize,
    out_w: &mut [MaybeUninit<f32>],
    out_b: &mut [f32],
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { group_avx2(job, g, out_w, out_b) };
    }
    group_any(job, g, out_w, out_b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn group_avx2(
    job: &Job,
    g: usize,
    out_w: &mut [MaybeUninit<f32>],
    out_b: &mut [f32],
) -> Result<(), KernelError> {
    group_any(job, g, out_w, out_b)
}

#[inline(always)]
fn group_any(
    job: &Job,
    g: usize,
    out_w: &mut [MaybeUninit<f32>],
    out_b: &mut [f32],
) -> Result<(), KernelError> {
    match out_w.len() / job.layout.runs {
        8 => group_of::<8>(job, g, out_w, out_b),
        16 => group_of::<16>(job, g, out_w, out_b),
        24 => group_of::<24>(job, g, out_w, out_b),
        32 => group_of::<32>(job, g, out_w, out_b),
        w => unreachable!("a group of {w} lanes (align is a multiple of 8)"),
    }
}

/// One weight delta over one group.
enum GroupDelta<'a, const W: usize> {
    Values(ValuesRun<'a>),
    Codes(CodesRun<'a, W>),
}

struct ValuesRun<'a> {
    v: &'a [f32],
    alpha: f32,
}

/// Codes with their per-lane affine, alpha folded in.
struct CodesRun<'a, const W: usize> {
    q: &'a [u8],
    a: [f32; W],
    b: [f32; W],
}

/// A weight delta's values over one run, as `rows::accumulate_row` computes
/// them.
trait Run<const W: usize> {
    fn run(&self, r: usize) -> [f32; W];
}

impl<const W: usize> Run<W> for ValuesRun<'_> {
    #[inline(always)]
    fn run(&self, r: usize) -> [f32; W] {
        let v: &[f32; W] = self.v[r * W..][..W].try_into().unwrap();
        std::array::from_fn(|l| self.alpha * v[l])
    }
}

impl<const W: usize> Run<W> for CodesRun<'_, W> {
    #[inline(always)]
    fn run(&self, r: usize) -> [f32; W] {
        let q: &[u8; W] = self.q[r * W..][..W].try_into().unwrap();
        std::array::from_fn(|l| q[l] as f32 * self.a[l] + self.b[l])
    }
}

impl<const W: usize> Run<W> for GroupDelta<'_, W> {
    #[inline(always)]
    fn run(&self, r: usize) -> [f32; W] {
        match self {
            GroupDelta::Values(d) => d.run(r),
            GroupDelta::Codes(d) => d.run(r),
        }
    }
}

/// One group's runs: the clean weights, which runs are live, the scales.
struct Sweep<'a, const W: usize> {
    w: &'a [f32],
    live: &'a [bool],
    s: [f32; W],
}

/// A run's value before the BatchNorm scale. Traits rather than closures:
/// a closure the compiler leaves out of line is built without AVX2 (3× slower).
trait Unscaled<const W: usize> {
    fn unscaled(&self, r: usize, w: &[f32; W]) -> [f32; W];
}

/// No weight delta: `w`.
struct Clean;

/// One weight delta: `w + d`.
struct One<'a, D>(&'a D);

/// Several: `w + d_1 + d_2 + …`, in signature order.
struct Many<'a, 'b, const W: usize>(&'a [GroupDelta<'b, W>]);

impl<const W: usize> Unscaled<W> for Clean {
    #[inline(always)]
    fn unscaled(&self, _: usize, w: &[f32; W]) -> [f32; W] {
        *w
    }
}

impl<const W: usize, D: Run<W>> Unscaled<W> for One<'_, D> {
    #[inline(always)]
    fn unscaled(&self, r: usize, w: &[f32; W]) -> [f32; W] {
        let x = self.0.run(r);
        std::array::from_fn(|l| w[l] + x[l])
    }
}

impl<const W: usize> Unscaled<W> for Many<'_, '_, W> {
    #[inline(always)]
    fn unscaled(&self, r: usize, w: &[f32; W]) -> [f32; W] {
        let mut v = *w;
        for d in self.0 {
            let x = d.run(r);
            for l in 0..W {
                v[l] += x[l];
            }
        }
        v
    }
}

impl<const W: usize> Sweep<'_, W> {
    /// Writes `unscaled(r, w) · s` for every live run `r` and zero for the
    /// rest. Returns, per lane, nonzero where a value is not finite.
    #[inline(always)]
    fn run(&self, out: &mut [MaybeUninit<f32>], value: &impl Unscaled<W>) -> [u32; W] {
        let mut bad = [0u32; W];
        for (r, (out, w)) in out
            .chunks_exact_mut(W)
            .zip(self.w.chunks_exact(W))
            .enumerate()
        {
            let out: &mut [MaybeUninit<f32>; W] = out.try_into().unwrap();
            // Padding runs are zero, as packing leaves them: a code's offset would not be.
            if !self.live[r] {
                *out = [MaybeUninit::new(0.0); W];
                continue;
            }
            let v = value.unscaled(r, w.try_into().unwrap());
            for l in 0..W {
                let v = v[l] * self.s[l];
                out[l] = MaybeUninit::new(v);
                // `x − x` is +0 for every finite x and NaN otherwise.
                #[allow(clippy::eq_op)]
                let nan_unless_finite = v - v;
                bad[l] |= nan_unless_finite.to_bits();
            }
        }
        bad
    }
}

#[inline(always)]
fn group_of<const W: usize>(
    job: &Job,
    g: usize,
    out_w: &mut [MaybeUninit<f32>],
    out_b: &mut [f32],
) -> Result<(), KernelError> {
    let Job {
        base,
        deltas,
        layout,
    } = *job;
    let first = g * layout.width;
    let real = out_b.len();
    let span = first * layout.runs..first * layout.runs + out_w.len();
    // Failed lanes fold with scale 0 and report below, lowest channel first.
    let folds: [Result<(f32, f32), KernelError>; W] = std::array::from_fn(|l| match l < real {
        true => fold_bn(base, deltas, first + l),
        false => Ok((0.0, 0.0)),
    });
    let s: [f32; W] = std::array::from_fn(|l| folds[l].as_ref().map_or(0.0, |f| f.0));
    let weights: Vec<GroupDelta<W>> = deltas
        .iter()
        .filter_map(|d| {
            Some(match d.weight? {
                LaneWeights::Values(v) => GroupDelta::Values(ValuesRun {
                    v: &v[span.clone()],
                    alpha: d.alpha,
                }),
                LaneWeights::Codes { q, scale, offset } => {
                    let lane = |p: &[f32]| -> [f32; W] {
                        std::array::from_fn(|l| match l < real {
                            true => d.alpha * p[first + l],
                            false => 0.0,
                        })
                    };
                    GroupDelta::Codes(CodesRun {
                        q: &q[span.clone()],
                        a: lane(scale),
                        b: lane(offset),
                    })
                }
            })
        })
        .collect();
    let w = &base.weight[span];
    let sweep = Sweep {
        w,
        live: layout.live,
        s,
    };
    // One loop per case, each with its delta's form fixed, so that no run
    // branches on either.
    let bad = match weights.as_slice() {
        [] => sweep.run(out_w, &Clean),
        [GroupDelta::Values(d)] => sweep.run(out_w, &One(d)),
        [GroupDelta::Codes(d)] => sweep.run(out_w, &One(d)),
        many => sweep.run(out_w, &Many(many)),
    };
    for (l, b) in out_b.iter_mut().enumerate() {
        let (_, bias) = folds[l].clone()?;
        if bad[l] != 0 || !bias.is_finite() {
            return Err(KernelError::NotFinite { channel: first + l });
        }
        *b = bias;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::kernel::cpu::tests::{Layer, Sig, run_cpu};
    use crate::patch::quant::{Delta, Quant};
    use crate::rng::Rng;

    /// Row-major `[o, cols]` in lane order, run `r` holding column `r` (zero
    /// where the run is padding): the layout the kernel defines, with the
    /// simplest run order.
    fn interleave<T: Copy + Default>(src: &[T], layout: LaneLayout) -> Vec<T> {
        let cols = layout.runs;
        let mut out = Vec::with_capacity(layout.len());
        let lanes = layout.out_channels.div_ceil(layout.align) * layout.align;
        for first in (0..lanes).step_by(layout.width) {
            let width = layout.width.min(lanes - first);
            for r in 0..cols {
                for o in first..first + width {
                    let real = o < layout.out_channels && layout.live[r];
                    out.push(if real {
                        src[o * cols + r]
                    } else {
                        T::default()
                    });
                }
            }
        }
        out
    }

    fn layout<'a>(layer: &Layer, width: usize, live: &'a [bool]) -> LaneLayout<'a> {
        LaneLayout {
            out_channels: layer.out_channels,
            width,
            align: 8,
            runs: layer.weight.len() / layer.out_channels,
            live,
        }
    }

    /// Every run live but every fifth, and the last.
    fn live(layer: &Layer, all: bool) -> Vec<bool> {
        let runs = layer.weight.len() / layer.out_channels;
        (0..runs)
            .map(|r| all || (r % 5 != 3 && r + 1 != runs))
            .collect()
    }

    fn run_lanes(
        layer: &Layer,
        sigs: &[Sig],
        layout: LaneLayout<'_>,
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
        let bufs: Vec<Option<LaneBuf>> = (sigs.iter())
            .map(|s| {
                let d = s.weight.as_ref()?;
                let buf = LaneBuf::new(
                    &d.view(),
                    |v| interleave(v, layout),
                    |q| interleave(q, layout),
                );
                Some(buf)
            })
            .collect();
        let deltas: Vec<LayerDelta<LaneWeights>> = (sigs.iter().zip(&bufs))
            .map(|(s, b)| {
                let d = s.layer_delta();
                LayerDelta {
                    alpha: d.alpha,
                    weight: b.as_ref().map(LaneBuf::view),
                    gamma: d.gamma,
                    beta: d.beta,
                    mean: d.mean,
                    var: d.var,
                }
            })
            .collect();
        let weight = interleave(&layer.weight, layout);
        let base = ConvBn {
            weight: &weight,
            ..layer.conv_bn()
        };
        fused_add_scale(&base, &deltas, layout)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Bit for bit the row kernel's output, reordered, and the same errors.
    fn assert_same_as_rows(layer: &Layer, sigs: &[Sig]) {
        for (width, all) in [(8, true), (16, true), (16, false), (32, false)] {
            let live = live(layer, all);
            let layout = layout(layer, width, &live);
            match (run_lanes(layer, sigs, layout), run_cpu(layer, sigs)) {
                (Ok((w, b)), Ok((rw, rb))) => {
                    let want = interleave(&rw, layout);
                    assert_eq!(bits(&w), bits(&want), "width {width}, all live {all}");
                    assert_eq!(bits(&b), bits(&rb), "width {width}");
                }
                (lanes, rows) => assert_eq!(lanes.err(), rows.err(), "width {width}"),
            }
        }
    }

    #[test]
    fn every_form_and_mix_is_the_row_kernel_reordered() {
        let mut rng = Rng::new(31);
        // Channels a multiple of the width, one block short of it, and ragged.
        for (o, cols) in [(64, 576), (24, 27), (3, 49), (33, 75), (16, 9)] {
            let layer = Layer::random(&mut rng, o, cols);
            assert_same_as_rows(&layer, &[]);
            for quant in Quant::ALL {
                let sig = Sig::random(&mut rng, &layer, 0.8, quant, Some(quant));
                assert_same_as_rows(&layer, &[sig]);
            }
            let mut bn_only = Sig::random(&mut rng, &layer, 0.4, Quant::F32, Some(Quant::F32));
            bn_only.weight = None;
            let sigs = [
                bn_only,
                Sig::random(&mut rng, &layer, 0.7, Quant::Int8, Some(Quant::F32)),
                Sig::random(&mut rng, &layer, 0.5, Quant::Int4, Some(Quant::F16)),
                Sig::random(&mut rng, &layer, -0.3, Quant::F16, None),
            ];
            assert_same_as_rows(&layer, &sigs);
        }
    }

    #[test]
    fn large_layers_split_over_the_pool_give_the_same_bits() {
        let mut rng = Rng::new(32);
        let layer = Layer::random(&mut rng, 136, 128 * 9);
        let sigs = [
            Sig::random(&mut rng, &layer, 0.7, Quant::Int8, Some(Quant::F32)),
            Sig::random(&mut rng, &layer, 0.5, Quant::Int4, None),
        ];
        assert!(layer.weight.len() >= MIN_TASK_ELEMS);
        assert_same_as_rows(&layer, &sigs);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let live = live(&layer, false);
        let layout = layout(&layer, 16, &live);
        let one = pool.install(|| run_lanes(&layer, &sigs, layout).unwrap());
        let many = run_lanes(&layer, &sigs, layout).unwrap();
        assert_eq!((bits(&one.0), bits(&one.1)), (bits(&many.0), bits(&many.1)));
    }

    #[test]
    fn errors_name_the_lowest_failing_channel_as_the_row_kernel_does() {
        let mut rng = Rng::new(33);
        for o in [40, 256] {
            let mut layer = Layer::random(&mut rng, o, 64);
            // A bad variance after a channel whose weights overflow, in one group.
            layer.var[37] = -1.0;
            let mut vals = vec![0.01f32; layer.weight.len()];
            vals[35 * 64 + 17] = 1e30;
            let big = Sig {
                alpha: 1e10,
                weight: Some(Delta::quantize(&vals, o, Quant::Int8)),
                bn: None,
            };
            assert_same_as_rows(&layer, &[big]);
            let live = live(&layer, true);
            assert_eq!(
                run_lanes(&layer, &[], layout(&layer, 16, &live)).unwrap_err(),
                KernelError::NegativeVariance {
                    channel: 37,
                    var: -1.0
                }
            );
        }
    }
}
