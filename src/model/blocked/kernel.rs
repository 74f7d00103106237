//! The direct-convolution microkernel: a tile of up to [`MAX_PX`] output
//! pixels by `OB` blocks of [`LANES`] output channels, accumulated in registers
//! over every input channel and kernel tap, then the epilogue (bias, residual,
//! activation) applied before the one store. AVX2 with FMA where the CPU has them
//! (checked once), a portable loop otherwise.
//!
//! Every output value is one fixed sequence of multiply-adds over its inputs,
//! whichever tile, thread or batch it falls in: an image's output does not
//! depend on what else is computed with it.

pub use crate::model::arch::Act;

/// Output channels per block: one AVX2 register of f32.
pub const LANES: usize = 8;
/// Output pixels per tile: `OB · MAX_PX` accumulators, `OB` weight vectors and
/// one broadcast fit AVX2's 16 registers for `OB` = 2.
pub const MAX_PX: usize = 5;

/// How the K loop walks the input: `blocks` groups of `CI` channels (`CI` = 8
/// for a blocked input, 1 for a planar one), each group `block_stride` floats
/// apart, channels inside a group adjacent; `kh × kw` taps, rows `row_stride`
/// and pixels `pixel_stride` floats apart.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    pub blocks: usize,
    pub block_stride: usize,
    pub kh: usize,
    pub kw: usize,
    pub row_stride: usize,
    pub pixel_stride: usize,
}

/// One tile's operands. Offsets are in floats; `x_at[p]` is where pixel `p`'s
/// window starts in `x`, `out_at[p]` where its output vector goes in each of
/// the `OB` output blocks (`out_stride` apart, likewise in `residual`).
///
/// A conv whose weights outgrow L1 runs its K loop in chunks: the first
/// starts from bias (and residual), each later one (`accumulate`) from the
/// partial sums the previous chunk stored, and only the last applies `act`.
/// Storing and reloading an f32 is exact, so the chunking leaves every output
/// bit for bit as one pass would.
pub struct Tile<'a, const PX: usize> {
    pub x: &'a [f32],
    pub x_at: [usize; PX],
    pub weights: &'a [f32],
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub out_at: [usize; PX],
    pub out_stride: usize,
    pub accumulate: bool,
    pub act: Act,
}

/// Runs one tile into `out`, with the fastest kernel this CPU has.
///
/// `weights` holds `walk.blocks · kh · kw · CI` groups of `OB · LANES` values,
/// in K-loop order; `bias` holds `OB · LANES`.
pub fn run<const OB: usize, const PX: usize, const CI: usize>(
    walk: &Walk,
    t: &Tile<'_, PX>,
    out: &mut [f32],
) {
    check::<OB, PX, CI>(walk, t, out);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above), and `check` bounds
        // every offset the kernel reads or writes.
        unsafe { avx2::tile::<OB, PX, CI>(walk, t, out) };
        return;
    }
    portable::<OB, PX, CI>(walk, t, out);
}

/// The instruction set the CPU kernels run with on this machine, as logged at
/// start-up and shown in `rws_cpu_kernel_info{isa}`.
pub fn isa() -> &'static str {
    match avx2() {
        true => "avx2",
        false => "portable",
    }
}

/// Whether this CPU runs the AVX2 kernel (detected once).
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Panics unless every access of the tile is in bounds: the kernels index
/// unchecked.
fn check<const OB: usize, const PX: usize, const CI: usize>(
    w: &Walk,
    t: &Tile<'_, PX>,
    out: &[f32],
) {
    let taps = w.blocks * w.kh * w.kw * CI;
    assert_eq!(t.weights.len(), taps * OB * LANES, "packed weights");
    assert_eq!(t.bias.len(), OB * LANES, "bias");
    let reach = (w.blocks - 1) * w.block_stride
        + (w.kh - 1) * w.row_stride
        + (w.kw - 1) * w.pixel_stride
        + CI;
    for p in 0..PX {
        assert!(t.x_at[p] + reach <= t.x.len(), "input window");
        let end = t.out_at[p] + (OB - 1) * t.out_stride + LANES;
        assert!(end <= out.len(), "output");
        if let Some(r) = t.residual {
            assert!(end <= r.len(), "residual");
        }
    }
}

fn portable<const OB: usize, const PX: usize, const CI: usize>(
    w: &Walk,
    t: &Tile<'_, PX>,
    out: &mut [f32],
) {
    let mut acc = [[[0f32; LANES]; PX]; OB];
    for (o, acc) in acc.iter_mut().enumerate() {
        for (p, a) in acc.iter_mut().enumerate() {
            if t.accumulate {
                a.copy_from_slice(&out[t.out_at[p] + o * t.out_stride..][..LANES]);
                continue;
            }
            a.copy_from_slice(&t.bias[o * LANES..][..LANES]);
            if let Some(r) = t.residual {
                let r = &r[t.out_at[p] + o * t.out_stride..][..LANES];
                a.iter_mut().zip(r).for_each(|(a, r)| *a += r);
            }
        }
    }
    let mut wt = t.weights.chunks_exact(OB * LANES);
    for b in 0..w.blocks {
        for ky in 0..w.kh {
            for kx in 0..w.kw {
                let at = b * w.block_stride + ky * w.row_stride + kx * w.pixel_stride;
                for i in 0..CI {
                    let wv = wt.next().expect("checked");
                    for p in 0..PX {
                        let x = t.x[t.x_at[p] + at + i];
                        for (o, acc) in acc.iter_mut().enumerate() {
                            let wv = &wv[o * LANES..][..LANES];
                            for l in 0..LANES {
                                acc[p][l] += wv[l] * x;
                            }
                        }
                    }
                }
            }
        }
    }
    for (o, acc) in acc.iter().enumerate() {
        for (p, a) in acc.iter().enumerate() {
            let dst = &mut out[t.out_at[p] + o * t.out_stride..][..LANES];
            for (d, v) in dst.iter_mut().zip(a) {
                *d = t.act.apply(*v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Act, LANES, Tile, Walk};

    // Indices name registers (acc[o][p]); iterators would hide the tile's shape.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const OB: usize, const PX: usize, const CI: usize>(
        w: &Walk,
        t: &Tile<'_, PX>,
        out: &mut [f32],
    ) {
        // SAFETY (whole body): `super::check` bounded every offset used here.
        unsafe {
            let x = t.x.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); PX]; OB];
            let dst = out.as_mut_ptr();
            for o in 0..OB {
                let b = _mm256_loadu_ps(t.bias.as_ptr().add(o * LANES));
                for p in 0..PX {
                    let at = t.out_at[p] + o * t.out_stride;
                    acc[o][p] = match t.residual {
                        _ if t.accumulate => _mm256_loadu_ps(dst.add(at)),
                        Some(r) => _mm256_add_ps(b, _mm256_loadu_ps(r.as_ptr().add(at))),
                        None => b,
                    };
                }
            }
            let mut wp = t.weights.as_ptr();
            let xs: [*const f32; PX] = std::array::from_fn(|p| x.add(t.x_at[p]));
            for b in 0..w.blocks {
                for ky in 0..w.kh {
                    for kx in 0..w.kw {
                        let at = b * w.block_stride + ky * w.row_stride + kx * w.pixel_stride;
                        for i in 0..CI {
                            let mut wv = [_mm256_setzero_ps(); OB];
                            for (o, v) in wv.iter_mut().enumerate() {
                                *v = _mm256_loadu_ps(wp.add(o * LANES));
                            }
                            wp = wp.add(OB * LANES);
                            for p in 0..PX {
                                let xv = _mm256_broadcast_ss(&*xs[p].add(at + i));
                                for o in 0..OB {
                                    acc[o][p] = _mm256_fmadd_ps(wv[o], xv, acc[o][p]);
                                }
                            }
                        }
                    }
                }
            }
            let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
            for o in 0..OB {
                for p in 0..PX {
                    // With NaN in either operand max_ps and min_ps return the
                    // second: NaN stays NaN.
                    let v = match t.act {
                        Act::None => acc[o][p],
                        Act::Relu => _mm256_max_ps(zero, acc[o][p]),
                        Act::Relu6 => _mm256_min_ps(six, _mm256_max_ps(zero, acc[o][p])),
                    };
                    _mm256_storeu_ps(dst.add(t.out_at[p] + o * t.out_stride), v);
                }
            }
        }
    }
}
