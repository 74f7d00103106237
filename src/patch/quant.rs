//! Signature delta storage: f32, f16, and per-output-channel affine int8 / packed int4.
//!
//! A conv weight delta of shape `[O, I, kh, kw]` is viewed as a row-major matrix of
//! `rows = O` (output channels) by `cols = I·kh·kw`. The integer forms keep one
//! `scale`/`offset` pair per row, so each output channel gets its own range: deltas of
//! different channels differ in magnitude, and a shared range would waste the codes.
//! 1-D tensors (BatchNorm parameters) are only ever stored as f32 or f16.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// How a delta tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    Int8,
    Int4,
}

impl Quant {
    /// Every form, in the order of the names accepted by [`FromStr`].
    pub const ALL: [Quant; 4] = [Quant::F32, Quant::F16, Quant::Int8, Quant::Int4];

    /// The name used in files, flags and configs.
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Int8 => "int8",
            Quant::Int4 => "int4",
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown quantization name (a real error type, so `?` works with `anyhow`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quantization {0:?}; expected one of: f32, f16, int8, int4")]
pub struct ParseQuantError(pub String);

impl FromStr for Quant {
    type Err = ParseQuantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quant::ALL
            .into_iter()
            .find(|q| q.name() == s)
            .ok_or_else(|| ParseQuantError(s.to_string()))
    }
}

/// One stored delta tensor (owned).
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Per-row affine: `value = q as f32 * scale[row] + offset[row]`.
    Int8 {
        cols: usize,
        q: Vec<u8>,
        scale: Vec<f32>,
        offset: Vec<f32>,
    },
    /// Same, two 4-bit codes per byte: within each row, element `2k` is the LOW nibble of
    /// byte `k` and element `2k+1` the HIGH nibble; each row is padded to `ceil(cols/2)`
    /// bytes (pad nibble 0), so `q.len() = rows · ceil(cols/2)`.
    Int4 {
        cols: usize,
        q: Vec<u8>,
        scale: Vec<f32>,
        offset: Vec<f32>,
    },
}

/// A borrowed delta, as the kernel reads it (straight out of an owned [`Delta`] or a
/// file buffer, without copying).
#[derive(Debug, Clone, Copy)]
pub enum DeltaView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Int8 {
        cols: usize,
        q: &'a [u8],
        scale: &'a [f32],
        offset: &'a [f32],
    },
    Int4 {
        cols: usize,
        q: &'a [u8],
        scale: &'a [f32],
        offset: &'a [f32],
    },
}

/// An int8 or int4 delta's codes, one per element: `value = q · scale[row] + offset[row]`.
#[derive(Debug, Clone)]
pub struct Codes<'a> {
    pub q: Cow<'a, [u8]>,
    pub scale: &'a [f32],
    pub offset: &'a [f32],
}

/// Quantizes each row of `values` to `0..=levels` over its own `[min, max]`.
/// Returns the codes (one per element, row-major), the scales and the offsets.
fn quantize_rows(values: &[f32], rows: usize, levels: f32) -> (usize, Vec<u8>, Vec<f32>, Vec<f32>) {
    let cols = values.len().checked_div(rows).unwrap_or(0);
    let mut q = vec![0u8; rows * cols];
    let mut scale = Vec::with_capacity(rows);
    let mut offset = Vec::with_capacity(rows);
    if cols == 0 {
        scale.resize(rows, 0.0);
        offset.resize(rows, 0.0);
        return (cols, q, scale, offset);
    }
    for (src, dst) in values.chunks_exact(cols).zip(q.chunks_exact_mut(cols)) {
        let lo = src.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // A constant row (or one with no finite value) needs no codes: offset carries it.
        let (lo, s) = if hi > lo {
            (lo, (hi - lo) / levels)
        } else if lo.is_finite() {
            (lo, 0.0)
        } else {
            (0.0, 0.0)
        };
        if s > 0.0 {
            for (d, &x) in dst.iter_mut().zip(src) {
                // `as u8` saturates and maps NaN to 0, so this cannot panic.
                *d = ((x - lo) / s).round().clamp(0.0, levels) as u8;
            }
        }
        scale.push(s);
        offset.push(lo);
    }
    (cols, q, scale, offset)
}

impl Delta {
    /// Stores `values` (a row-major `rows × cols` matrix, `cols = values.len() / rows`)
    /// in the given form. The int forms use a per-row `[min, max]` range, so the round
    /// trip error of each element is at most half that row's scale.
    pub fn quantize(values: &[f32], rows: usize, quant: Quant) -> Delta {
        debug_assert!(
            values.len().is_multiple_of(rows),
            "rows ({rows}) must divide the element count ({})",
            values.len()
        );
        match quant {
            Quant::F32 => Delta::F32(values.to_vec()),
            Quant::F16 => {
                let mut h = vec![f16::ZERO; values.len()];
                h.convert_from_f32_slice(values);
                Delta::F16(h)
            }
            Quant::Int8 => {
                let (cols, q, scale, offset) = quantize_rows(values, rows, 255.0);
                Delta::Int8 {
                    cols,
                    q,
                    scale,
                    offset,
                }
            }
            Quant::Int4 => {
                let (cols, codes, scale, offset) = quantize_rows(values, rows, 15.0);
                let row_bytes = cols.div_ceil(2);
                let mut q = vec![0u8; rows * row_bytes];
                if cols > 0 {
                    for (src, dst) in codes.chunks_exact(cols).zip(q.chunks_exact_mut(row_bytes)) {
                        for (k, byte) in dst.iter_mut().enumerate() {
                            let lo = src[2 * k];
                            let hi = src.get(2 * k + 1).copied().unwrap_or(0);
                            *byte = lo | (hi << 4);
                        }
                    }
                }
                Delta::Int4 {
                    cols,
                    q,
                    scale,
                    offset,
                }
            }
        }
    }

    /// Borrows this delta in the form the kernel reads.
    pub fn view(&self) -> DeltaView<'_> {
        match self {
            Delta::F32(v) => DeltaView::F32(v),
            Delta::F16(v) => DeltaView::F16(v),
            Delta::Int8 {
                cols,
                q,
                scale,
                offset,
            } => DeltaView::Int8 {
                cols: *cols,
                q,
                scale,
                offset,
            },
            Delta::Int4 {
                cols,
                q,
                scale,
                offset,
            } => DeltaView::Int4 {
                cols: *cols,
                q,
                scale,
                offset,
            },
        }
    }

    pub fn quant(&self) -> Quant {
        self.view().quant()
    }

    /// Logical element count (not the stored byte count).
    pub fn len(&self) -> usize {
        self.view().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of every stored buffer, scale and offset included: what the delta costs in
    /// memory and what the kernel reads per application.
    pub fn stored_bytes(&self) -> usize {
        self.view().stored_bytes()
    }

    /// The values as f32 (for tests, exports and the reference path; the kernel never
    /// materializes this).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.view().dequantize_into(&mut out);
        out
    }
}

impl<'a> DeltaView<'a> {
    /// Logical element count.
    pub fn len(&self) -> usize {
        match *self {
            DeltaView::F32(v) => v.len(),
            DeltaView::F16(v) => v.len(),
            DeltaView::Int8 { cols, scale, .. } | DeltaView::Int4 { cols, scale, .. } => {
                scale.len() * cols
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn quant(&self) -> Quant {
        match self {
            DeltaView::F32(_) => Quant::F32,
            DeltaView::F16(_) => Quant::F16,
            DeltaView::Int8 { .. } => Quant::Int8,
            DeltaView::Int4 { .. } => Quant::Int4,
        }
    }

    /// Row count where the form records it (the int forms: one scale per row). The float
    /// forms are flat, so callers pass the row count themselves.
    pub fn rows(&self) -> Option<usize> {
        match *self {
            DeltaView::F32(_) | DeltaView::F16(_) => None,
            DeltaView::Int8 { scale, .. } | DeltaView::Int4 { scale, .. } => Some(scale.len()),
        }
    }

    /// Bytes of every stored buffer, scale and offset included.
    pub fn stored_bytes(&self) -> usize {
        match *self {
            DeltaView::F32(v) => std::mem::size_of_val(v),
            DeltaView::F16(v) => std::mem::size_of_val(v),
            DeltaView::Int8 {
                q, scale, offset, ..
            }
            | DeltaView::Int4 {
                q, scale, offset, ..
            } => q.len() + std::mem::size_of_val(scale) + std::mem::size_of_val(offset),
        }
    }

    /// For int8 and int4 deltas: one code per element (row-major, int4
    /// unpacked), with the per-row scales and offsets. `None` for f32 and f16.
    pub fn codes(&self) -> Option<Codes<'a>> {
        match *self {
            DeltaView::F32(_) | DeltaView::F16(_) => None,
            DeltaView::Int8 {
                q, scale, offset, ..
            } => Some(Codes {
                q: Cow::Borrowed(q),
                scale,
                offset,
            }),
            DeltaView::Int4 {
                cols,
                q,
                scale,
                offset,
            } => {
                let row_bytes = cols.div_ceil(2);
                let codes = (q.chunks(row_bytes.max(1)).take(scale.len()))
                    .flat_map(|row| row.iter().flat_map(|b| [b & 0x0f, b >> 4]).take(cols))
                    .collect();
                Some(Codes {
                    q: Cow::Owned(codes),
                    scale,
                    offset,
                })
            }
        }
    }

    /// Element `i` of a 1-D delta (BatchNorm parameters), i.e. the flat row-major index.
    /// Panics if `i >= self.len()`.
    #[inline]
    pub fn at(&self, i: usize) -> f32 {
        match *self {
            DeltaView::F32(v) => v[i],
            DeltaView::F16(v) => v[i].to_f32(),
            DeltaView::Int8 {
                cols,
                q,
                scale,
                offset,
            } => {
                let r = i / cols;
                q[i] as f32 * scale[r] + offset[r]
            }
            DeltaView::Int4 {
                cols,
                q,
                scale,
                offset,
            } => {
                let (r, c) = (i / cols, i % cols);
                let byte = q[r * cols.div_ceil(2) + c / 2];
                let code = if c % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                code as f32 * scale[r] + offset[r]
            }
        }
    }

    /// Writes every value as f32 into `out` (`out.len() == self.len()`).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len(), "dequantize_into: output length");
        match *self {
            DeltaView::F32(v) => out.copy_from_slice(v),
            DeltaView::F16(v) => v.convert_to_f32_slice(out),
            DeltaView::Int8 { cols, scale, .. } | DeltaView::Int4 { cols, scale, .. } => {
                if cols == 0 {
                    return;
                }
                out.fill(0.0);
                // `0.0 + value`, as the kernel's rows accumulate onto zeros (which
                // also turns a -0.0 into 0.0, like them).
                let n = (scale.len() * cols).min(out.len());
                for (i, o) in out[..n].iter_mut().enumerate() {
                    *o += self.at(i);
                }
            }
        }
    }

    /// Checks that the buffers are consistent with a `rows × cols` tensor (use `(len, 1)`
    /// for a 1-D one) and that scale/offset are finite, so a file cannot make the
    /// kernel index out of bounds. Returns a message naming what is wrong.
    pub fn check_layout(&self, rows: usize, cols: usize) -> Result<(), String> {
        let want = rows
            .checked_mul(cols)
            .ok_or_else(|| format!("shape {rows}x{cols} overflows"))?;
        match *self {
            DeltaView::F32(v) if v.len() != want => Err(format!(
                "f32 delta has {} elements, expected {rows}x{cols} = {want}",
                v.len()
            )),
            DeltaView::F16(v) if v.len() != want => Err(format!(
                "f16 delta has {} elements, expected {rows}x{cols} = {want}",
                v.len()
            )),
            DeltaView::F32(_) | DeltaView::F16(_) => Ok(()),
            DeltaView::Int8 {
                cols: c,
                q,
                scale,
                offset,
            }
            | DeltaView::Int4 {
                cols: c,
                q,
                scale,
                offset,
            } => {
                let name = self.quant();
                // An int delta of a 1-D tensor may be stored as one row or one per element.
                let shape_ok = c == cols && scale.len() == rows
                    || cols == 1 && c.checked_mul(scale.len()) == Some(rows);
                if !shape_ok {
                    return Err(format!(
                        "{name} delta is {}x{c}, expected {rows}x{cols}",
                        scale.len()
                    ));
                }
                if offset.len() != scale.len() {
                    return Err(format!(
                        "{name} delta has {} scales but {} offsets",
                        scale.len(),
                        offset.len()
                    ));
                }
                let row_bytes = if name == Quant::Int8 {
                    c
                } else {
                    c.div_ceil(2)
                };
                let want_q = scale.len() * row_bytes;
                if q.len() != want_q {
                    return Err(format!(
                        "{name} delta has {} code bytes, expected {want_q} for {}x{c}",
                        q.len(),
                        scale.len()
                    ));
                }
                if let Some(r) = scale.iter().position(|s| !s.is_finite()) {
                    return Err(format!("{name} delta scale of row {r} is {}", scale[r]));
                }
                if let Some(r) = offset.iter().position(|s| !s.is_finite()) {
                    return Err(format!("{name} delta offset of row {r} is {}", offset[r]));
                }
                Ok(())
            }
        }
    }

    /// Index of the first element whose value is NaN or infinite, judged on the
    /// dequantized values, so a bad f16/f32 entry, a bad scale/offset, or an affine that
    /// overflows are all caught. Assumes a consistent layout.
    pub fn first_non_finite(&self) -> Option<usize> {
        match *self {
            DeltaView::F32(v) => v.iter().position(|x| !x.is_finite()),
            DeltaView::F16(v) => v.iter().position(|x| !x.is_finite()),
            DeltaView::Int8 { .. } | DeltaView::Int4 { .. } => {
                (0..self.len()).find(|&i| !self.at(i).is_finite())
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Rows with different magnitudes, signs and offsets, like real per-channel deltas.
    pub(crate) fn matrix(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(rows * cols);
        for _ in 0..rows {
            let mag = 10f32.powf(rng.range(-1.0, 1.0) * 2.0) * 0.01;
            let shift = rng.range(-1.0, 1.0) * mag;
            v.extend((0..cols).map(|_| rng.range(-1.0, 1.0) * mag + shift));
        }
        v
    }

    fn check_round_trip(values: &[f32], rows: usize, quant: Quant) {
        let d = Delta::quantize(values, rows, quant);
        assert_eq!(d.quant(), quant);
        assert_eq!(d.len(), values.len());
        let back = d.dequantize();
        assert_eq!(back.len(), values.len());
        let (cols, scale) = match &d {
            Delta::Int8 { cols, scale, .. } | Delta::Int4 { cols, scale, .. } => (*cols, scale),
            _ => unreachable!(),
        };
        assert_eq!(cols * rows, values.len());
        for (i, (&x, &y)) in values.iter().zip(&back).enumerate() {
            let r = i / cols;
            let tol = scale[r] / 2.0 + 4.0 * f32::EPSILON * x.abs().max(y.abs()).max(1e-30);
            assert!(
                (x - y).abs() <= tol,
                "{quant} elem {i} (row {r}): {x} vs {y}, scale {}",
                scale[r]
            );
        }
        d.view().check_layout(rows, cols).unwrap();
        assert_eq!(d.view().first_non_finite(), None);
    }

    #[test]
    fn quant_names_round_trip() {
        for q in Quant::ALL {
            assert_eq!(q.to_string().parse::<Quant>().unwrap(), q);
        }
        let err = "int2".parse::<Quant>().unwrap_err().to_string();
        for name in ["f32", "f16", "int8", "int4"] {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn int8_round_trip_within_half_scale() {
        let mut rng = Rng::new(1);
        for (rows, cols) in [(64, 576), (7, 1), (3, 49), (1, 1000)] {
            check_round_trip(&matrix(&mut rng, rows, cols), rows, Quant::Int8);
        }
    }

    #[test]
    fn int4_round_trip_within_half_scale_odd_cols() {
        let mut rng = Rng::new(2);
        for (rows, cols) in [(64, 576), (16, 27), (5, 1), (9, 147), (2, 2)] {
            let v = matrix(&mut rng, rows, cols);
            check_round_trip(&v, rows, Quant::Int4);
            let d = Delta::quantize(&v, rows, Quant::Int4);
            let Delta::Int4 { q, .. } = &d else {
                unreachable!()
            };
            assert_eq!(q.len(), rows * cols.div_ceil(2));
            if cols % 2 == 1 {
                // Pad nibble is zero.
                for r in 0..rows {
                    assert_eq!(q[r * cols.div_ceil(2) + cols / 2] >> 4, 0);
                }
            }
        }
    }

    #[test]
    fn constant_rows_are_exact() {
        let mut v = vec![0.25f32; 3 * 5];
        v[5..10].fill(-1.5);
        v[10..15].fill(0.0);
        for quant in [Quant::Int8, Quant::Int4] {
            let d = Delta::quantize(&v, 3, quant);
            assert_eq!(d.dequantize(), v, "{quant}");
            match &d {
                Delta::Int8 { scale, .. } | Delta::Int4 { scale, .. } => {
                    assert_eq!(scale, &[0.0; 3])
                }
                _ => unreachable!(),
            }
        }
    }

    #[test]
    fn degenerate_shapes_do_not_panic() {
        for quant in Quant::ALL {
            let d = Delta::quantize(&[], 0, quant);
            assert_eq!(d.len(), 0);
            assert!(d.dequantize().is_empty());
            let d = Delta::quantize(&[], 4, quant);
            assert_eq!(d.len(), 0);
            // Non-finite input must not panic either; the loader rejects it afterwards.
            let d = Delta::quantize(&[1.0, f32::NAN, f32::INFINITY, 2.0], 2, quant);
            assert_eq!(d.len(), 4);
        }
    }

    #[test]
    fn f16_round_trip_within_f16_precision() {
        let mut rng = Rng::new(3);
        let v = matrix(&mut rng, 64, 576);
        let d = Delta::quantize(&v, 64, Quant::F16);
        assert_eq!(d.quant(), Quant::F16);
        for (&x, y) in v.iter().zip(d.dequantize()) {
            // f16 has 11 significant bits: relative error <= 2^-11 for normal values,
            // absolute <= 2^-25 in the subnormal range.
            assert!(
                (x - y).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                "{x} vs {y}"
            );
        }
        assert_eq!(Delta::quantize(&v, 64, Quant::F32).dequantize(), v);
    }

    #[test]
    fn stored_bytes_shrink_as_expected() {
        let v = matrix(&mut Rng::new(4), 64, 576);
        let f32_bytes = Delta::quantize(&v, 64, Quant::F32).stored_bytes();
        assert_eq!(f32_bytes, 64 * 576 * 4);
        let ratio = |q| Delta::quantize(&v, 64, q).stored_bytes() as f64 / f32_bytes as f64;
        assert_eq!(ratio(Quant::F16), 0.5);
        let r8 = ratio(Quant::Int8);
        let r4 = ratio(Quant::Int4);
        assert!((0.25..0.26).contains(&r8), "int8 ratio {r8}");
        assert!((0.125..0.135).contains(&r4), "int4 ratio {r4}");
    }

    #[test]
    fn check_layout_rejects_inconsistent_buffers() {
        let v = matrix(&mut Rng::new(6), 4, 9);
        for quant in Quant::ALL {
            let d = Delta::quantize(&v, 4, quant);
            d.view().check_layout(4, 9).unwrap();
            assert!(d.view().check_layout(4, 8).is_err(), "{quant}");
            assert!(d.view().check_layout(3, 9).is_err(), "{quant}");
        }
        let q = [0u8; 10];
        let bad_scale = DeltaView::Int8 {
            cols: 5,
            q: &q,
            scale: &[1.0, f32::NAN],
            offset: &[0.0, 0.0],
        };
        assert!(bad_scale.check_layout(2, 5).unwrap_err().contains("scale"));
        let short_q = DeltaView::Int4 {
            cols: 5,
            q: &q[..5],
            scale: &[1.0, 1.0],
            offset: &[0.0, 0.0],
        };
        assert!(short_q.check_layout(2, 5).is_err());
        // 1-D int deltas: one row of `len`, or `len` rows of one.
        let one_row = Delta::quantize(&v[..9], 1, Quant::Int8);
        one_row.view().check_layout(9, 1).unwrap();
        let d = Delta::quantize(&v[..9], 9, Quant::Int4);
        d.view().check_layout(9, 1).unwrap();
        assert!(d.view().check_layout(3, 3).is_err());
        assert!(DeltaView::F32(&v).check_layout(usize::MAX, 2).is_err());
    }

    #[test]
    fn first_non_finite_sees_dequantized_values() {
        let mut v = vec![0.5f32; 12];
        assert_eq!(DeltaView::F32(&v).first_non_finite(), None);
        v[7] = f32::NAN;
        assert_eq!(DeltaView::F32(&v).first_non_finite(), Some(7));
        let h = Delta::quantize(&[1.0, 70000.0, 2.0], 1, Quant::F16); // 70000 overflows f16
        assert_eq!(h.view().first_non_finite(), Some(1));
        let q = [255u8, 0, 0, 255];
        let v = DeltaView::Int8 {
            cols: 2,
            q: &q,
            scale: &[1.0, f32::INFINITY],
            offset: &[0.0, 0.0],
        };
        assert_eq!(v.first_non_finite(), Some(2)); // 0 * inf is NaN
        let v = DeltaView::Int8 {
            cols: 2,
            q: &q,
            scale: &[f32::MAX, 0.0],
            offset: &[0.0, f32::NAN],
        };
        assert_eq!(v.first_non_finite(), Some(0)); // 255 * MAX overflows
        let q4 = [0x10u8, 0x00];
        let v = DeltaView::Int4 {
            cols: 2,
            q: &q4,
            scale: &[f32::MAX, 1.0],
            offset: &[0.0, 0.0],
        };
        assert_eq!(v.first_non_finite(), None); // codes 0 and 1 stay finite
        let q4 = [0x20u8, 0x00];
        let v = DeltaView::Int4 {
            cols: 2,
            q: &q4,
            scale: &[f32::MAX, 1.0],
            offset: &[0.0, 0.0],
        };
        assert_eq!(v.first_non_finite(), Some(1));
    }
}
