//! The kernel's formula in plain candle tensor ops: the readable specification that
//! [`super::cpu`] is tested against. Dequantization is done with tensor ops as well,
//! so the reference shares no code with the kernel's hot loops. Not meant to be fast.

use candle_core::{DType, Device, Result, Tensor};

use super::{ConvBn, DeltaView, LayerDelta};

/// Returns `(out_w, out_b)` as `[O, cols]` and `[O]` f32 tensors:
///
/// ```text
/// w      = W + Σ alpha_i · dq(D_i)          (likewise gamma, beta, mean)
/// var'   = var · exp(Σ alpha_i · dq(dvar_i))
/// s      = gamma' / sqrt(var' + eps)
/// out_w  = s[:, None] · w
/// out_b  = beta' − s · mean'
/// ```
///
/// Unlike the kernel it does not check for a negative variance or non-finite output.
pub fn fused_add_scale(
    base: &ConvBn,
    deltas: &[LayerDelta],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let o = base.out_channels;
    let cols = if o == 0 { 0 } else { base.per_channel() };

    let mut w = Tensor::from_slice(base.weight, (o, cols), device)?;
    let mut gamma = Tensor::from_slice(base.gamma, o, device)?;
    let mut beta = Tensor::from_slice(base.beta, o, device)?;
    let mut mean = Tensor::from_slice(base.mean, o, device)?;
    let var = Tensor::from_slice(base.var, o, device)?;
    // Running variance deltas are in log space: var' = var · exp(Σ alpha_i · dvar_i).
    let mut log_var_scale = Tensor::zeros(o, candle_core::DType::F32, device)?;

    // p' = p + alpha · dq(dp), one signature at a time, in order.
    let add = |p: Tensor, d: Option<DeltaView>, alpha: f32| -> Result<Tensor> {
        match d {
            None => Ok(p),
            Some(d) => {
                let dq = dequantize(&d, p.dims(), device)?;
                let alpha = Tensor::new(alpha, device)?;
                p + dq.broadcast_mul(&alpha)?
            }
        }
    };
    for d in deltas {
        w = add(w, d.weight, d.alpha)?;
        gamma = add(gamma, d.gamma, d.alpha)?;
        beta = add(beta, d.beta, d.alpha)?;
        mean = add(mean, d.mean, d.alpha)?;
        log_var_scale = add(log_var_scale, d.var, d.alpha)?;
    }
    let var = (var * log_var_scale.exp()?)?;

    let eps = Tensor::new(base.eps, device)?;
    let s = (gamma / var.broadcast_add(&eps)?.sqrt()?)?;
    let out_w = w.broadcast_mul(&s.unsqueeze(1)?)?;
    let out_b = (beta - (s * mean)?)?;
    Ok((out_w, out_b))
}

/// A delta's values as an f32 tensor of `shape`, computed with tensor ops only.
fn dequantize(d: &DeltaView, shape: &[usize], device: &Device) -> Result<Tensor> {
    let t = match *d {
        DeltaView::F32(v) => Tensor::from_slice(v, v.len(), device)?,
        DeltaView::F16(v) => Tensor::from_slice(v, v.len(), device)?.to_dtype(DType::F32)?,
        DeltaView::Int8 {
            cols,
            q,
            scale,
            offset,
        } => {
            let rows = scale.len();
            let codes = Tensor::from_slice(q, (rows, cols), device)?.to_dtype(DType::F32)?;
            affine_rows(&codes, scale, offset, device)?
        }
        DeltaView::Int4 {
            cols,
            q,
            scale,
            offset,
        } => {
            // byte = lo + 16·hi; element 2k is lo of byte k, element 2k+1 is hi.
            let rows = scale.len();
            let bytes =
                Tensor::from_slice(q, (rows, cols.div_ceil(2)), device)?.to_dtype(DType::F32)?;
            let hi = (&bytes / 16.0)?.floor()?;
            let lo = (&bytes - (&hi * 16.0)?)?;
            let codes = Tensor::stack(&[lo, hi], 2)? // [rows, bytes, 2]
                .flatten_from(1)? // [rows, 2·bytes]: lo0 hi0 lo1 hi1 …
                .narrow(1, 0, cols)?; // drop the pad nibble of an odd row
            affine_rows(&codes, scale, offset, device)?
        }
    };
    t.reshape(shape)
}

/// `codes[r, j] · scale[r] + offset[r]`.
fn affine_rows(codes: &Tensor, scale: &[f32], offset: &[f32], device: &Device) -> Result<Tensor> {
    let scale = Tensor::from_slice(scale, (scale.len(), 1), device)?;
    let offset = Tensor::from_slice(offset, (offset.len(), 1), device)?;
    codes.broadcast_mul(&scale)?.broadcast_add(&offset)
}
