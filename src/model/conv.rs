//! A CPU convolution with the bias fused in: im2col into a `[K, Ho·Wo]` buffer,
//! then one gemm per image that writes NCHW directly onto rows pre-filled with
//! the bias. candle 0.11's default CPU conv converts to NHWC, runs small gemms
//! per tile and transposes back; this path skips the layout changes and the
//! separate bias pass. Each image is its own gemm, so an image's output does not
//! depend on what else is in the batch.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, bail};

pub struct Conv2dBias<'a> {
    pub stride: usize,
    pub padding: usize,
    /// Added to the output before the ReLU (a residual block's shortcut): it
    /// seeds the gemm's accumulator together with the bias, so the add costs
    /// no pass of its own.
    pub residual: Option<&'a Tensor>,
    /// Apply ReLU to the output while it is still in cache, instead of a
    /// separate pass over a new tensor.
    pub relu: bool,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("conv2d_bias: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("conv2d_bias: {what} must be contiguous"),
    }
}

impl CustomOp3 for Conv2dBias<'_> {
    fn name(&self) -> &'static str {
        "conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (
            contiguous(s1, l1, "input")?,
            contiguous(s2, l2, "weight")?,
            contiguous(s3, l3, "bias")?,
        );
        let (&[n, c, h, wd], &[o, c2, kh, kw]) = (l1.dims(), l2.dims()) else {
            bail!("conv2d_bias: expected NCHW input and OIHW weight")
        };
        let (s, p) = (self.stride, self.padding);
        if c != c2 || bias.len() != o || h + 2 * p < kh || wd + 2 * p < kw || s == 0 {
            bail!(
                "conv2d_bias: shapes {:?} and {:?} do not fit",
                l1.dims(),
                l2.dims()
            );
        }
        let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
        let (k, m) = (c * kh * kw, ho * wo);
        let pointwise = kh == 1 && kw == 1 && s == 1 && p == 0;
        let mut out = vec![0f32; n * o * m];
        let residual = self.residual.map(|r| r.storage_and_layout());
        let residual = match &residual {
            None => None,
            Some((storage, layout)) => {
                let Storage::Cpu(storage) = &**storage else {
                    bail!("conv2d_bias: residual must be on the CPU")
                };
                let r = contiguous(storage, layout, "residual")?;
                if r.len() != out.len() {
                    bail!(
                        "conv2d_bias: residual {:?} does not fit the output",
                        layout.dims()
                    );
                }
                Some(r)
            }
        };
        let new_col = || {
            if pointwise {
                Vec::new()
            } else {
                vec![0f32; k * m]
            }
        };
        // One image: im2col, seed the accumulator with bias (+ residual), gemm, ReLU.
        let image = |i: usize, dst: &mut [f32], col: &mut Vec<f32>, par: gemm::Parallelism| {
            let img = &x[i * c * h * wd..][..c * h * wd];
            let rhs: &[f32] = if pointwise {
                img
            } else {
                im2col(img, (c, h, wd), (kh, kw), s, p, (ho, wo), col);
                col
            };
            match residual {
                Some(r) => {
                    let r = &r[i * o * m..][..o * m];
                    for ((row, src), b) in dst.chunks_exact_mut(m).zip(r.chunks_exact(m)).zip(bias)
                    {
                        for (d, s) in row.iter_mut().zip(src) {
                            *d = s + b;
                        }
                    }
                }
                None => {
                    for (row, b) in dst.chunks_exact_mut(m).zip(bias) {
                        row.fill(*b);
                    }
                }
            }
            // dst[O, M] = bias + W[O, K] · rhs[K, M], all row-major.
            // SAFETY: the pointers cover o·m, o·k and k·m elements with the strides given.
            unsafe {
                gemm::gemm(
                    o,
                    m,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    m as isize,
                    true,
                    w.as_ptr(),
                    1,
                    k as isize,
                    rhs.as_ptr(),
                    1,
                    m as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            if self.relu {
                for v in dst.iter_mut() {
                    *v = v.max(0.0);
                }
            }
        };
        // With at least an image per thread, images run in parallel and each gemm
        // on one thread (no fork-join per gemm); otherwise the gemm itself splits.
        // gemm splits output tiles, never the K sum, so either way gives the same bits.
        let threads = rayon::current_num_threads();
        if threads > 1 && n >= threads {
            use rayon::prelude::*;
            out.par_chunks_exact_mut(o * m)
                .enumerate()
                .for_each_init(new_col, |col, (i, dst)| {
                    image(i, dst, col, gemm::Parallelism::None)
                });
        } else {
            let par = if threads > 1 && o * m * k > 1 << 16 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            let mut col = new_col();
            for (i, dst) in out.chunks_exact_mut(o * m).enumerate() {
                image(i, dst, &mut col, par);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, o, ho, wo))))
    }
}

/// `col[(ci·kh + ky)·kw + kx][oy·wo + ox]` = the input pixel under that kernel tap, 0 in the padding.
fn im2col(
    img: &[f32],
    (c, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    s: usize,
    p: usize,
    (ho, wo): (usize, usize),
    col: &mut [f32],
) {
    let m = ho * wo;
    for ci in 0..c {
        let plane = &img[ci * h * w..][..h * w];
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = &mut col[((ci * kh + ky) * kw + kx) * m..][..m];
                for oy in 0..ho {
                    let row = &mut dst[oy * wo..][..wo];
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        row.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    // Output columns whose tap lands inside the row: ix = ox·s + kx - p in [0, w).
                    let lo = p.saturating_sub(kx).div_ceil(s).min(wo);
                    let hi = ((w + p).saturating_sub(kx).div_ceil(s)).clamp(lo, wo);
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    if lo == hi {
                        continue;
                    }
                    let first = lo * s + kx - p;
                    if s == 1 {
                        row[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                    } else {
                        for (v, x) in row[lo..hi].iter_mut().zip(src[first..].iter().step_by(s)) {
                            *v = *x;
                        }
                    }
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

    #[test]
    fn matches_candle_conv2d_plus_bias() {
        let mut rng = Rng::new(4);
        // (n, c, h, w, o, k, stride, pad)
        for (n, c, h, w, o, k, s, p) in [
            (2, 3, 17, 13, 8, 7, 2, 3),
            (3, 16, 14, 14, 32, 3, 1, 1),
            (1, 16, 14, 14, 32, 3, 2, 1),
            (2, 32, 9, 9, 64, 1, 2, 0),
            (2, 32, 9, 9, 16, 1, 1, 0),
            (1, 1, 5, 5, 4, 3, 1, 0),
            (1, 2, 4, 3, 3, 5, 3, 2),
            (1, 2, 2, 2, 3, 3, 2, 2),
        ] {
            let x = Tensor::from_vec(
                rng.vec(n * c * h * w, -1.0, 1.0),
                (n, c, h, w),
                &Device::Cpu,
            )
            .unwrap();
            let wt = Tensor::from_vec(
                rng.vec(o * c * k * k, -0.5, 0.5),
                (o, c, k, k),
                &Device::Cpu,
            )
            .unwrap();
            let b = Tensor::from_vec(rng.vec(o, -1.0, 1.0), (1, o, 1, 1), &Device::Cpu).unwrap();
            let conv = x
                .conv2d(&wt, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let r = Tensor::from_vec(
                rng.vec(conv.elem_count(), -1.0, 1.0),
                conv.dims(),
                &Device::Cpu,
            )
            .unwrap();
            for (relu, residual) in [
                (false, None),
                (true, None),
                (false, Some(&r)),
                (true, Some(&r)),
            ] {
                let then = crate::model::folded::Epilogue { residual, relu };
                let want = then.apply(conv.clone()).unwrap();
                let op = Conv2dBias {
                    stride: s,
                    padding: p,
                    residual,
                    relu,
                };
                let got = x.apply_op3_no_bwd(&wt, &b, &op).unwrap();
                assert_eq!(got.dims(), want.dims());
                let max = |t: Tensor| {
                    t.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                let (diff, scale) = (max((got - &want).unwrap()), max(want));
                assert!(
                    diff <= 1e-5 * scale,
                    "{n}x{c}x{h}x{w} k{k} s{s} p{p} relu {relu} residual {}: {diff} vs {scale}",
                    residual.is_some()
                );
            }
        }
    }

    #[test]
    fn an_image_does_not_depend_on_its_batch() {
        let mut rng = Rng::new(5);
        let x = Tensor::from_vec(
            rng.vec(4 * 8 * 10 * 10, -1.0, 1.0),
            (4, 8, 10, 10),
            &Device::Cpu,
        )
        .unwrap();
        let w =
            Tensor::from_vec(rng.vec(16 * 8 * 9, -0.5, 0.5), (16, 8, 3, 3), &Device::Cpu).unwrap();
        let b = Tensor::zeros((1, 16, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let op = Conv2dBias {
            stride: 1,
            padding: 1,
            residual: None,
            relu: true,
        };
        let all = x.apply_op3_no_bwd(&w, &b, &op).unwrap();
        let one = x
            .narrow(0, 2, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .apply_op3_no_bwd(&w, &b, &op)
            .unwrap();
        let all2 = all
            .narrow(0, 2, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(all2, one.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
