//! The CPU kernel's hot loops: one row of a weight delta added onto a row of
//! weights, for each storage form. They live with the kernel, not with the storage
//! types, because their shape (exact-length slices, alpha folded into the row's
//! affine, no bounds checks) is there for the kernel's speed.

use half::f16;

use crate::patch::quant::DeltaView;

/// Exact f16 -> f32 conversion in branch-free integer arithmetic (F. Giesen's
/// `half_to_float_fast`), so the f16 loop in [`accumulate_row`] vectorizes;
/// `f16::to_f32` checks for F16C at run time on every call, which stops that.
#[inline(always)]
pub(crate) fn f16_to_f32(h: f16) -> f32 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let h = h.to_bits() as u32;
    let o = ((h & 0x7fff) << 13) + ((127 - 15) << 23);
    let exp = (h << 13) & SHIFTED_EXP;
    // Inf/NaN: move the exponent to all ones. Zero/subnormal: renormalize through a float
    // subtraction of 2^-14.
    let inf_nan = o + ((128 - 16) << 23);
    let sub = (f32::from_bits(o + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let o = if exp == SHIFTED_EXP {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        o
    };
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// `out[j] += alpha · value(row, j)` for `j in 0..cols`: the kernel's hot loop.
///
/// Every form works on exact-length subslices so the loops carry no bounds checks
/// and vectorize; the int forms fold `alpha` into the row's affine once, so each
/// element costs one convert and one multiply-add. Panics if the buffers are shorter
/// than `row`/`cols` imply (check the layout with [`DeltaView::check_layout`] first).
#[inline(always)]
pub fn accumulate_row(d: &DeltaView, row: usize, cols: usize, alpha: f32, out: &mut [f32]) {
    let out = &mut out[..cols];
    match *d {
        DeltaView::F32(v) => {
            let src = &v[row * cols..][..cols];
            for (o, &d) in out.iter_mut().zip(src) {
                *o += alpha * d;
            }
        }
        DeltaView::F16(v) => {
            let src = &v[row * cols..][..cols];
            for (o, &d) in out.iter_mut().zip(src) {
                *o += alpha * f16_to_f32(d);
            }
        }
        DeltaView::Int8 {
            cols: c,
            q,
            scale,
            offset,
        } => {
            debug_assert_eq!(c, cols, "int8 delta has {c} cols, caller asked for {cols}");
            let q = &q[row * cols..][..cols];
            let a = alpha * scale[row];
            let b = alpha * offset[row];
            for (o, &x) in out.iter_mut().zip(q) {
                *o += x as f32 * a + b;
            }
        }
        DeltaView::Int4 {
            cols: c,
            q,
            scale,
            offset,
        } => {
            debug_assert_eq!(c, cols, "int4 delta has {c} cols, caller asked for {cols}");
            let row_bytes = cols.div_ceil(2);
            let q = &q[row * row_bytes..][..row_bytes];
            let a = alpha * scale[row];
            let b = alpha * offset[row];
            let (pairs, tail) = out.as_chunks_mut::<2>();
            for (o, &x) in pairs.iter_mut().zip(q) {
                o[0] += (x & 0x0f) as f32 * a + b;
                o[1] += (x >> 4) as f32 * a + b;
            }
            if let [o] = tail {
                *o += (q[row_bytes - 1] & 0x0f) as f32 * a + b;
            }
        }
    }
}

/// `out[j] = (base[j] + alpha · value(row, j)) · scale` for `j in 0..cols`.
///
/// The same arithmetic as copying `base` into `out`, [`accumulate_row`],
/// then multiplying by `scale` (bitwise: `scale = 1.0` leaves the sum as is), but in
/// one pass, so the kernel's common one-signature case reads and writes its row
/// once. Panics like [`accumulate_row`], or if `base` is shorter than `cols`.
#[inline(always)]
pub fn add_scale_row(
    d: &DeltaView,
    row: usize,
    cols: usize,
    alpha: f32,
    base: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let out = &mut out[..cols];
    let base = &base[..cols];
    match *d {
        DeltaView::F32(v) => {
            let src = &v[row * cols..][..cols];
            for ((o, &w), &d) in out.iter_mut().zip(base).zip(src) {
                *o = (w + alpha * d) * scale;
            }
        }
        DeltaView::F16(v) => {
            let src = &v[row * cols..][..cols];
            for ((o, &w), &d) in out.iter_mut().zip(base).zip(src) {
                *o = (w + alpha * f16_to_f32(d)) * scale;
            }
        }
        DeltaView::Int8 {
            cols: c,
            q,
            scale: sc,
            offset,
        } => {
            debug_assert_eq!(c, cols, "int8 delta has {c} cols, caller asked for {cols}");
            let q = &q[row * cols..][..cols];
            let a = alpha * sc[row];
            let b = alpha * offset[row];
            for ((o, &w), &x) in out.iter_mut().zip(base).zip(q) {
                *o = (w + (x as f32 * a + b)) * scale;
            }
        }
        DeltaView::Int4 {
            cols: c,
            q,
            scale: sc,
            offset,
        } => {
            debug_assert_eq!(c, cols, "int4 delta has {c} cols, caller asked for {cols}");
            let row_bytes = cols.div_ceil(2);
            let q = &q[row * row_bytes..][..row_bytes];
            let a = alpha * sc[row];
            let b = alpha * offset[row];
            let (pairs, tail) = out.as_chunks_mut::<2>();
            let (base_pairs, base_tail) = base.as_chunks::<2>();
            for ((o, w), &x) in pairs.iter_mut().zip(base_pairs).zip(q) {
                o[0] = (w[0] + ((x & 0x0f) as f32 * a + b)) * scale;
                o[1] = (w[1] + ((x >> 4) as f32 * a + b)) * scale;
            }
            if let ([o], [w]) = (tail, base_tail) {
                *o = (w + ((q[row_bytes - 1] & 0x0f) as f32 * a + b)) * scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::quant::tests::matrix;
    use crate::patch::quant::{Delta, Quant};
    use crate::rng::Rng;

    #[test]
    fn f16_to_f32_is_exact_for_every_f16() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (a, b) = (f16_to_f32(h), h.to_f32());
            if b.is_nan() {
                assert!(a.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn accumulate_row_matches_dequantize() {
        let mut rng = Rng::new(5);
        for (rows, cols) in [(8, 576), (6, 27), (4, 1), (3, 131)] {
            let v = matrix(&mut rng, rows, cols);
            for quant in Quant::ALL {
                let d = Delta::quantize(&v, rows, quant);
                let dq = d.dequantize();
                let view = d.view();
                for r in 0..rows {
                    let want = &dq[r * cols..][..cols];
                    // alpha = 1 onto zeros reproduces the dequantized values exactly.
                    let mut out = vec![0.0; cols];
                    accumulate_row(&view, r, cols, 1.0, &mut out);
                    assert_eq!(out, want, "{quant} row {r}");
                    // General alpha onto a base, within float rounding.
                    let base: Vec<f32> = (0..cols).map(|_| rng.range(-1.0, 1.0)).collect();
                    let mut out = base.clone();
                    let alpha = -0.7;
                    accumulate_row(&view, r, cols, alpha, &mut out);
                    for (j, (&o, &w)) in out.iter().zip(want).enumerate() {
                        let e = base[j] + alpha * w;
                        assert!((o - e).abs() <= 1e-6 * (1.0 + e.abs()), "{quant} {r},{j}");
                    }
                    for (j, &w) in want.iter().enumerate() {
                        assert_eq!(view.at(r * cols + j), w, "{quant} at({r},{j})");
                    }
                    // The fused form is bitwise the three-step form.
                    for s in [1.0, 0.37] {
                        let mut fused = vec![f32::NAN; cols];
                        add_scale_row(&view, r, cols, alpha, &base, s, &mut fused);
                        let mut steps = base.clone();
                        accumulate_row(&view, r, cols, alpha, &mut steps);
                        steps.iter_mut().for_each(|x| *x *= s);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&fused), bits(&steps), "{quant} row {r} s {s}");
                    }
                }
            }
        }
    }
}
