//! Convolutions for training, where candle's own are slow: a depthwise conv
//! (candle splits a grouped conv into one conv per channel, and its backward
//! into as many transposed convs) as a custom op with its own backward, and a
//! 1×1 conv as a matmul, whose backward is two matmuls instead of a transposed
//! conv. Everything else goes to candle's `conv2d`.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// `conv2d(x, weight)` with symmetric `padding` (already applied when 0),
/// choosing the fastest form that has a backward pass.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    let (out_c, in_per_group, kh, kw) = weight.dims4()?;
    let (n, c, h, w) = x.dims4()?;
    if groups == c && groups == out_c && in_per_group == 1 && kh == kw {
        let op = Depthwise {
            kernel: kh,
            stride,
            padding,
        };
        return Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?);
    }
    if groups == 1 && kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        let w2 = weight.reshape((out_c, c))?;
        let y = w2.broadcast_left(n)?.matmul(&x.reshape((n, c, h * w))?)?;
        return Ok(y.reshape((n, out_c, h, w))?);
    }
    Ok(x.conv2d(weight, padding, stride, 1, groups)?)
}

/// A depthwise conv: `[n, c, h, w]` by a `[c, 1, k, k]` kernel.
struct Depthwise {
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// The sizes one depthwise conv works on.
#[derive(Clone, Copy)]
struct Dims {
    planes: usize,
    channels: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Dims {
    /// Calls `f(out_index, in_index, tap)` for every tap of one plane that lands
    /// inside the input; the three loops below all walk this.
    #[inline]
    fn each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        for oy in 0..self.oh {
            for ky in 0..self.k {
                let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                if iy < 0 || iy >= self.h as isize {
                    continue;
                }
                for ox in 0..self.ow {
                    for kx in 0..self.k {
                        let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                        if ix >= 0 && ix < self.w as isize {
                            f(
                                oy * self.ow + ox,
                                iy as usize * self.w + ix as usize,
                                ky * self.k + kx,
                            );
                        }
                    }
                }
            }
        }
    }
}

impl Depthwise {
    fn dims(&self, x: &[usize]) -> Result<Dims> {
        let &[n, c, h, w] = x else {
            crate::bail!(Internal, "a depthwise conv takes [n, c, h, w]");
        };
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if h + 2 * p < k || w + 2 * p < k || s == 0 {
            crate::bail!(
                Internal,
                "depthwise input {h}x{w} is smaller than its kernel"
            );
        }
        Ok(Dims {
            planes: n * c,
            channels: c,
            h,
            w,
            oh: (h + 2 * p - k) / s + 1,
            ow: (w + 2 * p - k) / s + 1,
            k,
            stride: s,
            pad: p,
        })
    }
}

fn forward(x: &[f32], weight: &[f32], d: Dims) -> Vec<f32> {
    let (plane_in, plane_out, taps) = (d.h * d.w, d.oh * d.ow, d.k * d.k);
    let mut out = vec![0f32; d.planes * plane_out];
    out.par_chunks_mut(plane_out)
        .enumerate()
        .for_each(|(p, out)| {
            let x = &x[p * plane_in..(p + 1) * plane_in];
            let w = &weight[(p % d.channels) * taps..][..taps];
            d.each_tap(|o, i, t| out[o] += x[i] * w[t]);
        });
    out
}

fn grad_input(grad: &[f32], weight: &[f32], d: Dims) -> Vec<f32> {
    let (plane_in, plane_out, taps) = (d.h * d.w, d.oh * d.ow, d.k * d.k);
    let mut gx = vec![0f32; d.planes * plane_in];
    gx.par_chunks_mut(plane_in).enumerate().for_each(|(p, gx)| {
        let g = &grad[p * plane_out..(p + 1) * plane_out];
        let w = &weight[(p % d.channels) * taps..][..taps];
        d.each_tap(|o, i, t| gx[i] += g[o] * w[t]);
    });
    gx
}

fn grad_weight(x: &[f32], grad: &[f32], d: Dims) -> Vec<f32> {
    let (plane_in, plane_out, taps) = (d.h * d.w, d.oh * d.ow, d.k * d.k);
    let images = d.planes / d.channels;
    (0..d.channels)
        .into_par_iter()
        .flat_map_iter(|c| {
            let mut gw = vec![0f32; taps];
            for n in 0..images {
                let p = n * d.channels + c;
                let x = &x[p * plane_in..(p + 1) * plane_in];
                let g = &grad[p * plane_out..(p + 1) * plane_out];
                d.each_tap(|o, i, t| gw[t] += g[o] * x[i]);
            }
            gw
        })
        .collect()
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("depthwise conv needs contiguous f32 tensors"),
    }
}

fn to_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "rws-depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self
            .dims(l1.dims())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (x, w) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let out = forward(x, w, d);
        let shape = Shape::from((d.planes / d.channels, d.channels, d.oh, d.ow));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self
            .dims(x.dims())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (ws, gs) = (to_vec(weight)?, to_vec(grad)?);
        let gx = Tensor::from_vec(grad_input(&gs, &ws, d), x.shape(), x.device())?;
        // A frozen kernel (one no variable flows into) needs no gradient, nor
        // a copy of the input.
        let gw = match weight.track_op() {
            true => Some(Tensor::from_vec(
                grad_weight(&to_vec(x)?, &gs, d),
                weight.shape(),
                weight.device(),
            )?),
            false => None,
        };
        Ok((Some(gx), gw))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::rng::Rng;

    fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Forward and both gradients equal candle's grouped conv's, for the
    /// strides, kernels and paddings the architectures use.
    #[test]
    fn depthwise_matches_candles_grouped_conv() {
        let mut rng = Rng::new(7);
        for (k, stride, pad, side) in [(3, 1, 1, 9), (3, 2, 0, 10), (5, 2, 2, 11), (5, 1, 0, 7)] {
            let x = Var::from_tensor(&random(&[2, 4, side, side], &mut rng)).unwrap();
            let w = Var::from_tensor(&random(&[4, 1, k, k], &mut rng)).unwrap();
            let o = (side + 2 * pad - k) / stride + 1;
            let up = random(&[2, 4, o, o], &mut rng);
            let ours = conv2d(&x, &w, pad, stride, 4).unwrap();
            let theirs = x.conv2d(&w, pad, stride, 1, 4).unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(diff(&ours, &theirs) < 1e-5, "forward k{k} s{stride} p{pad}");
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(diff(a, b) < 1e-4, "gradient k{k} s{stride} p{pad}");
            }
        }
    }

    #[test]
    fn pointwise_matches_candles_conv() {
        let mut rng = Rng::new(8);
        let x = random(&[3, 5, 4, 6], &mut rng);
        let w = random(&[7, 5, 1, 1], &mut rng);
        let ours = conv2d(&x, &w, 0, 1, 1).unwrap();
        let theirs = x.conv2d(&w, 0, 1, 1, 1).unwrap();
        let d = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
