//! The production CPU kernel: add the signature deltas, fold the BatchNorm, in one pass.
//!
//! Each output channel is one task. Its row of `W` is read once, with the first weight
//! delta added on the way in (and, when it is the only one, the BatchNorm scale applied
//! in the same pass); further deltas are accumulated into the row and the scale applied
//! afterwards while the row is still in L1. So memory sees one read of every input byte
//! and one write of the output, and there are no heap temporaries. Channels are
//! computed independently (no cross-thread reductions), so the result is bitwise the
//! same whatever the thread count, scheduling or SIMD width.

use rayon::prelude::*;

use super::{ConvBn, DeltaView, KernelError, LayerDelta, rows};

/// Elements of work below which a rayon task is not split further: tiny layers run on
/// the calling thread instead of paying task overhead per channel.
pub(super) const MIN_TASK_ELEMS: usize = 128 * 1024;

/// Writes the served weights of one patched conv layer (see the formula in
/// [`crate::patch::kernel`]): `out_w` is `[out_channels, per_channel]` like `base.weight`,
/// `out_b` is the folded bias `[out_channels]`.
///
/// On error the outputs hold partial results and must not be served. The reported
/// channel is the lowest failing one, so the error is deterministic too.
///
/// # Panics
/// If the output lengths do not match `base`, or a delta is smaller than the layer (the
/// loader validates deltas with [`crate::patch::quant::DeltaView::check_layout`]).
pub fn fused_add_scale(
    base: &ConvBn,
    deltas: &[LayerDelta],
    out_w: &mut [f32],
    out_b: &mut [f32],
) -> Result<(), KernelError> {
    let channels = base.out_channels;
    assert_eq!(out_w.len(), base.weight.len(), "out_w length");
    assert_eq!(out_b.len(), channels, "out_b length");
    if channels == 0 {
        return Ok(());
    }
    let cols = base.per_channel();
    assert_eq!(
        cols * channels,
        base.weight.len(),
        "weight is not [O, cols]"
    );
    for p in [base.gamma, base.beta, base.mean, base.var] {
        assert_eq!(p.len(), channels, "BatchNorm parameter length");
    }
    // Check delta sizes up front, so a bad one panics here with a message rather than
    // inside a worker thread.
    for d in deltas {
        if let Some(w) = d.weight {
            assert_eq!(w.len(), base.weight.len(), "weight delta length");
        }
        for p in [d.gamma, d.beta, d.mean, d.var].into_iter().flatten() {
            assert_eq!(p.len(), channels, "BatchNorm delta length");
        }
    }
    if cols == 0 {
        // No weights: only the bias remains to fold.
        for (o, b) in out_b.iter_mut().enumerate() {
            fold_channel(base, deltas, o, &mut [], b)?;
        }
        return Ok(());
    }

    // A layer below one task runs here: a rayon call from outside the pool
    // would hand it to a worker and wait, which costs more than a small layer.
    if out_w.len() < MIN_TASK_ELEMS {
        return (out_w.chunks_mut(cols).zip(out_b.iter_mut()).enumerate())
            .try_for_each(|(o, (row, b))| fold_channel(base, deltas, o, row, b));
    }
    let min_len = (MIN_TASK_ELEMS / cols).max(1);
    let failure = out_w
        .par_chunks_mut(cols)
        .zip(out_b.par_iter_mut())
        .enumerate()
        .with_min_len(min_len)
        .filter_map(|(o, (row, b))| fold_channel(base, deltas, o, row, b).err())
        .find_first(|_| true);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Patched BatchNorm parameter: `p[o] + Σ alpha_i · dp_i[o]`, in signature order.
/// (The running variance is patched multiplicatively instead, in [`fold_bn`].)
#[inline(always)]
fn patched<'a, W>(
    base: &[f32],
    deltas: &[LayerDelta<'a, W>],
    o: usize,
    pick: impl Fn(&LayerDelta<'a, W>) -> Option<DeltaView<'a>>,
) -> f32 {
    let mut v = base[o];
    for d in deltas {
        if let Some(dv) = pick(d) {
            v += d.alpha * dv.at(o);
        }
    }
    v
}

/// Channel `o`'s patched BatchNorm folded: its scale `s` and bias
/// `beta' − s · mean'` (the caller checks that the bias is finite, with the
/// weights). Shared by both weight orders, so they fold alike.
#[inline(always)]
pub(super) fn fold_bn<W>(
    base: &ConvBn,
    deltas: &[LayerDelta<'_, W>],
    o: usize,
) -> Result<(f32, f32), KernelError> {
    let gamma = patched(base.gamma, deltas, o, |d| d.gamma);
    let beta = patched(base.beta, deltas, o, |d| d.beta);
    let mean = patched(base.mean, deltas, o, |d| d.mean);
    // Running variance deltas are in log space, so no alpha can make it negative.
    let mut log_scale = None;
    for d in deltas {
        if let Some(dv) = d.var {
            *log_scale.get_or_insert(0.0f32) += d.alpha * dv.at(o);
        }
    }
    // With no variance delta, skip `exp(0) = 1`: the same value, cheaper.
    let var = log_scale.map_or(base.var[o], |l| base.var[o] * l.exp());
    let denom = var + base.eps;
    // NaN counts as negative: it cannot be folded either.
    if denom.is_nan() || denom <= 0.0 {
        return Err(KernelError::NegativeVariance { channel: o, var });
    }
    let s = gamma / denom.sqrt();
    Ok((s, beta - s * mean))
}

/// One output channel: the whole formula for row `o`, written into `row` and `b`.
///
/// On x86-64 CPUs with AVX2 the same code is run compiled for AVX2 (twice the vector
/// width; the build's baseline is SSE2). Rust never contracts `a * b + c` into an FMA,
/// so both versions perform the same IEEE operations per element and give bitwise
/// identical results.
#[inline]
fn fold_channel(
    base: &ConvBn,
    deltas: &[LayerDelta],
    o: usize,
    row: &mut [f32],
    b: &mut f32,
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { fold_channel_avx2(base, deltas, o, row, b) };
    }
    fold_channel_impl(base, deltas, o, row, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fold_channel_avx2(
    base: &ConvBn,
    deltas: &[LayerDelta],
    o: usize,
    row: &mut [f32],
    b: &mut f32,
) -> Result<(), KernelError> {
    fold_channel_impl(base, deltas, o, row, b)
}

#[inline(always)]
fn fold_channel_impl(
    base: &ConvBn,
    deltas: &[LayerDelta],
    o: usize,
    row: &mut [f32],
    b: &mut f32,
) -> Result<(), KernelError> {
    let (s, bias) = fold_bn(base, deltas, o)?;

    let cols = row.len();
    let w = &base.weight[o * cols..][..cols];
    let mut weight_deltas = deltas.iter().filter_map(|d| Some((d.weight?, d.alpha)));
    match weight_deltas.next() {
        None => {
            for (x, &w) in row.iter_mut().zip(w) {
                *x = w * s;
            }
        }
        Some((first, alpha)) => {
            // The first delta is added while copying W in; with no other delta the
            // scale is applied in that same pass, so the row is written once.
            let more = deltas.iter().filter(|d| d.weight.is_some()).count() > 1;
            rows::add_scale_row(&first, o, cols, alpha, w, if more { 1.0 } else { s }, row);
            if more {
                for (d, alpha) in weight_deltas {
                    rows::accumulate_row(&d, o, cols, alpha, row);
                }
                for x in row.iter_mut() {
                    *x *= s;
                }
            }
        }
    }
    // Count non-finite values with an integer test on the exponent bits, so the loop
    // vectorizes (an early exit would not). The row is in L1: this pass is cheap.
    let bad = row
        .iter()
        .map(|x| (x.to_bits() & 0x7f80_0000 == 0x7f80_0000) as u32)
        .sum::<u32>();
    if bad != 0 || !bias.is_finite() {
        return Err(KernelError::NotFinite { channel: o });
    }
    *b = bias;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::patch::kernel::reference;
    use crate::patch::quant::{Delta, Quant};
    use crate::rng::Rng;

    /// Owned storage for a clean conv + BatchNorm.
    pub(crate) struct Layer {
        pub(crate) weight: Vec<f32>,
        pub(crate) out_channels: usize,
        pub(crate) gamma: Vec<f32>,
        pub(crate) beta: Vec<f32>,
        pub(crate) mean: Vec<f32>,
        pub(crate) var: Vec<f32>,
    }

    impl Layer {
        pub(crate) fn random(rng: &mut Rng, out_channels: usize, cols: usize) -> Layer {
            Layer {
                weight: rng.vec(out_channels * cols, -0.2, 0.2),
                out_channels,
                gamma: rng.vec(out_channels, 0.5, 1.5),
                beta: rng.vec(out_channels, -0.5, 0.5),
                mean: rng.vec(out_channels, -0.3, 0.3),
                var: rng.vec(out_channels, 0.2, 2.0),
            }
        }

        pub(crate) fn conv_bn(&self) -> ConvBn<'_> {
            ConvBn {
                weight: &self.weight,
                out_channels: self.out_channels,
                gamma: &self.gamma,
                beta: &self.beta,
                mean: &self.mean,
                var: &self.var,
                eps: 1e-5,
            }
        }
    }

    /// Owned storage for one signature's deltas on a layer.
    pub(crate) struct Sig {
        pub(crate) alpha: f32,
        pub(crate) weight: Option<Delta>,
        pub(crate) bn: Option<[Delta; 4]>,
    }

    impl Sig {
        pub(crate) fn random(
            rng: &mut Rng,
            layer: &Layer,
            alpha: f32,
            quant: Quant,
            bn: Option<Quant>,
        ) -> Sig {
            let o = layer.out_channels;
            let w = rng.vec(layer.weight.len(), -0.05, 0.05);
            Sig {
                alpha,
                weight: Some(Delta::quantize(&w, o, quant)),
                bn: bn.map(|q| {
                    // Var deltas stay small enough that var' > 0 for |alpha| <= 1.
                    [(-0.1, 0.1), (-0.1, 0.1), (-0.05, 0.05), (-0.1, 0.1)]
                        .map(|(lo, hi)| Delta::quantize(&rng.vec(o, lo, hi), o, q))
                }),
            }
        }

        pub(crate) fn layer_delta(&self) -> LayerDelta<'_> {
            let bn = |i: usize| self.bn.as_ref().map(|b| b[i].view());
            LayerDelta {
                alpha: self.alpha,
                weight: self.weight.as_ref().map(Delta::view),
                gamma: bn(0),
                beta: bn(1),
                mean: bn(2),
                var: bn(3),
            }
        }
    }

    pub(crate) fn run_cpu(
        layer: &Layer,
        sigs: &[Sig],
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
        let deltas: Vec<_> = sigs.iter().map(Sig::layer_delta).collect();
        let mut w = vec![f32::NAN; layer.weight.len()];
        let mut b = vec![f32::NAN; layer.out_channels];
        fused_add_scale(&layer.conv_bn(), &deltas, &mut w, &mut b)?;
        Ok((w, b))
    }

    /// max|a - b| / max|b| over one output tensor.
    fn rel_err(a: &[f32], b: &Tensor) -> f32 {
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        let scale = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
        diff / scale
    }

    fn assert_matches_reference(layer: &Layer, sigs: &[Sig]) {
        let (w, b) = run_cpu(layer, sigs).unwrap();
        let deltas: Vec<_> = sigs.iter().map(Sig::layer_delta).collect();
        let (rw, rb) = reference::fused_add_scale(&layer.conv_bn(), &deltas, &Device::Cpu).unwrap();
        let cols = layer.weight.len() / layer.out_channels;
        assert_eq!(rw.dims(), &[layer.out_channels, cols]);
        assert_eq!(rb.dims(), &[layer.out_channels]);
        let (ew, eb) = (rel_err(&w, &rw), rel_err(&b, &rb));
        assert!(ew <= 1e-6, "weight rel err {ew}");
        assert!(eb <= 1e-6, "bias rel err {eb}");
    }

    #[test]
    fn no_deltas_is_the_batchnorm_fold() {
        let mut rng = Rng::new(10);
        let layer = Layer::random(&mut rng, 64, 64 * 9);
        assert_matches_reference(&layer, &[]);
        let (w, b) = run_cpu(&layer, &[]).unwrap();
        let cols = 64 * 9;
        for o in 0..64 {
            let s = layer.gamma[o] / (layer.var[o] + 1e-5).sqrt();
            for j in 0..cols {
                assert_eq!(w[o * cols + j], layer.weight[o * cols + j] * s);
            }
            assert_eq!(b[o], layer.beta[o] - s * layer.mean[o]);
        }
    }

    #[test]
    fn each_form_matches_reference() {
        let mut rng = Rng::new(11);
        // (out_channels, cols): 3x3 conv, 1x1 conv, odd cols (3x3 over 3 channels), conv1.
        for (o, cols) in [(64, 64 * 9), (64, 64), (16, 27), (64, 3 * 49)] {
            let layer = Layer::random(&mut rng, o, cols);
            for quant in Quant::ALL {
                let sig = Sig::random(&mut rng, &layer, 0.8, quant, None);
                assert_matches_reference(&layer, &[sig]);
            }
        }
    }

    #[test]
    fn mixed_signatures_with_batchnorm_deltas_match_reference() {
        let mut rng = Rng::new(12);
        for (o, cols) in [(64, 64 * 9), (128, 64), (33, 75)] {
            let layer = Layer::random(&mut rng, o, cols);
            let sigs = [
                Sig::random(&mut rng, &layer, 0.7, Quant::Int8, Some(Quant::F32)),
                Sig::random(&mut rng, &layer, 0.5, Quant::Int4, Some(Quant::F16)),
                Sig::random(&mut rng, &layer, -0.3, Quant::F16, None),
            ];
            assert_matches_reference(&layer, &sigs);
            let sigs = [
                Sig::random(&mut rng, &layer, 1.0, Quant::F32, Some(Quant::F16)),
                Sig::random(&mut rng, &layer, -0.6, Quant::Int4, Some(Quant::F32)),
            ];
            assert_matches_reference(&layer, &sigs);
            // A signature without a weight delta ahead of ones with weight deltas.
            let mut bn_only = Sig::random(&mut rng, &layer, 0.4, Quant::F32, Some(Quant::F32));
            bn_only.weight = None;
            let sigs = [
                bn_only,
                Sig::random(&mut rng, &layer, 0.9, Quant::Int8, None),
                Sig::random(&mut rng, &layer, -0.2, Quant::Int4, Some(Quant::F16)),
            ];
            assert_matches_reference(&layer, &sigs);
        }
    }

    /// The kernel (AVX2 where the CPU has it) against the baseline build of the same
    /// per-channel code: bitwise equal, so results do not depend on the CPU's features.
    #[test]
    fn simd_dispatch_is_bitwise_equal_to_baseline() {
        let mut rng = Rng::new(18);
        for (o, cols) in [(64, 64 * 9), (16, 27)] {
            let layer = Layer::random(&mut rng, o, cols);
            for sigs in [
                vec![],
                vec![Sig::random(&mut rng, &layer, 0.7, Quant::Int8, None)],
                vec![Sig::random(
                    &mut rng,
                    &layer,
                    0.7,
                    Quant::F16,
                    Some(Quant::F16),
                )],
                vec![
                    Sig::random(&mut rng, &layer, 0.7, Quant::Int4, Some(Quant::F32)),
                    Sig::random(&mut rng, &layer, -0.3, Quant::F32, None),
                ],
            ] {
                let (w, b) = run_cpu(&layer, &sigs).unwrap();
                let deltas: Vec<_> = sigs.iter().map(Sig::layer_delta).collect();
                let base = layer.conv_bn();
                let mut row = vec![0.0; cols];
                for ch in 0..o {
                    let mut bias = 0.0;
                    fold_channel_impl(&base, &deltas, ch, &mut row, &mut bias).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&row), bits(&w[ch * cols..][..cols]), "channel {ch}");
                    assert_eq!(bias.to_bits(), b[ch].to_bits(), "channel {ch}");
                }
            }
        }
    }

    #[test]
    fn bn_only_delta_matches_reference() {
        let mut rng = Rng::new(13);
        let layer = Layer::random(&mut rng, 40, 9);
        let mut sig = Sig::random(&mut rng, &layer, 0.9, Quant::F32, Some(Quant::F32));
        sig.weight = None;
        assert_matches_reference(&layer, &[sig]);
    }

    #[test]
    fn bitwise_deterministic() {
        let mut rng = Rng::new(14);
        let layer = Layer::random(&mut rng, 512, 256 * 9);
        let sigs = [
            Sig::random(&mut rng, &layer, 0.7, Quant::Int8, Some(Quant::F32)),
            Sig::random(&mut rng, &layer, 0.5, Quant::Int4, None),
        ];
        let first = run_cpu(&layer, &sigs).unwrap();
        for _ in 0..3 {
            let again = run_cpu(&layer, &sigs).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&again.0), bits(&first.0));
            assert_eq!(bits(&again.1), bits(&first.1));
        }
        // Same answer on a single thread, i.e. independent of scheduling.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let single = pool.install(|| run_cpu(&layer, &sigs).unwrap());
        assert!(
            single
                .0
                .iter()
                .zip(&first.0)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert!(
            single
                .1
                .iter()
                .zip(&first.1)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }

    #[test]
    fn negative_variance_is_reported_at_the_lowest_channel() {
        let mut rng = Rng::new(15);
        let mut layer = Layer::random(&mut rng, 256, 64);
        for c in [200, 37, 90] {
            layer.var[c] = -1.0;
        }
        let mut w = vec![0.0; layer.weight.len()];
        let mut b = vec![0.0; 256];
        for _ in 0..5 {
            let err = fused_add_scale(&layer.conv_bn(), &[], &mut w, &mut b).unwrap_err();
            assert_eq!(
                err,
                KernelError::NegativeVariance {
                    channel: 37,
                    var: -1.0
                }
            );
        }
    }

    #[test]
    fn log_space_variance_stays_positive_for_any_alpha() {
        let mut rng = Rng::new(19);
        let layer = Layer::random(&mut rng, 32, 9);
        let dvar = Delta::F32(vec![-3.0; 32]);
        let mut w = vec![0.0; layer.weight.len()];
        let mut b = vec![0.0; 32];
        for alpha in [-2.0, 0.5, 1.5, 4.0] {
            let d = LayerDelta {
                alpha,
                weight: None,
                gamma: None,
                beta: None,
                mean: None,
                var: Some(dvar.view()),
            };
            fused_add_scale(&layer.conv_bn(), &[d], &mut w, &mut b).unwrap();
            let (rw, _) = reference::fused_add_scale(&layer.conv_bn(), &[d], &Device::Cpu).unwrap();
            let rw = rw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let worst = w
                .iter()
                .zip(&rw)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = rw.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(worst <= 1e-6 * scale, "alpha {alpha}: {worst} vs {scale}");
        }
    }

    #[test]
    fn huge_alpha_is_not_finite() {
        let mut rng = Rng::new(16);
        let layer = Layer::random(&mut rng, 64, 64 * 9);
        let big = Delta::F32(rng.vec(layer.weight.len(), 50.0, 100.0));
        let delta = LayerDelta {
            alpha: 1e38,
            weight: Some(big.view()),
            gamma: None,
            beta: None,
            mean: None,
            var: None,
        };
        let mut w = vec![0.0; layer.weight.len()];
        let mut b = vec![0.0; 64];
        let err = fused_add_scale(&layer.conv_bn(), &[delta], &mut w, &mut b).unwrap_err();
        assert_eq!(err, KernelError::NotFinite { channel: 0 });

        // Only one channel overflowing is caught too (int8, via the folded affine).
        let mut vals = vec![0.01f32; layer.weight.len()];
        vals[40 * 576 + 17] = 1e30;
        let q = Delta::quantize(&vals, 64, Quant::Int8);
        let delta = LayerDelta {
            alpha: 1e10,
            weight: Some(q.view()),
            ..delta
        };
        let err = fused_add_scale(&layer.conv_bn(), &[delta], &mut w, &mut b).unwrap_err();
        assert_eq!(err, KernelError::NotFinite { channel: 40 });

        // A non-finite bias (huge mean delta) is caught as well.
        let dmean = Delta::F32(vec![1e30; 64]);
        let delta = LayerDelta {
            alpha: 1e30,
            weight: None,
            mean: Some(dmean.view()),
            ..delta
        };
        let err = fused_add_scale(&layer.conv_bn(), &[delta], &mut w, &mut b).unwrap_err();
        assert_eq!(err, KernelError::NotFinite { channel: 0 });
    }

    #[test]
    fn empty_and_tiny_layers() {
        let layer = Layer {
            weight: vec![],
            out_channels: 0,
            gamma: vec![],
            beta: vec![],
            mean: vec![],
            var: vec![],
        };
        let (w, b) = run_cpu(&layer, &[]).unwrap();
        assert!(w.is_empty() && b.is_empty());
        let mut rng = Rng::new(17);
        let layer = Layer::random(&mut rng, 1, 1);
        let sig = Sig::random(&mut rng, &layer, 0.5, Quant::Int4, Some(Quant::F16));
        assert_matches_reference(&layer, &[sig]);
    }
}
