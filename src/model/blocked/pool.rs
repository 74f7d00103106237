//! Pooling on blocked activations: ResNet's 3×3/2 max-pool after the stem, and
//! the global average before the classifier.

use super::{Blocked, HALO, LANES};

/// 3×3 max-pool with stride 2 and padding 1. The border stands in for the
/// padding, which is exact only because the input is post-ReLU (never below 0).
pub fn max_pool_3x3_s2(x: &Blocked) -> Blocked {
    let (ho, wo) = ((x.h + 2 - 3) / 2 + 1, (x.w + 2 - 3) / 2 + 1);
    let mut out = Blocked::output(x.n, x.channels, ho, wo);
    let (wp, wpo) = (x.w + 2 * HALO, wo + 2 * HALO);
    let (src_plane, dst_plane) = (x.plane_len(), out.plane_len());
    for (src, dst) in x
        .data
        .chunks_exact(src_plane)
        .zip(out.data.chunks_exact_mut(dst_plane))
    {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut m = [f32::NEG_INFINITY; LANES];
                for ky in 0..3 {
                    for kx in 0..3 {
                        // Padding 1 = HALO: tap (ky, kx) of (oy, ox) is bordered pixel (2oy + ky, 2ox + kx).
                        let at = ((2 * oy + ky) * wp + 2 * ox + kx) * LANES;
                        for (m, v) in m.iter_mut().zip(&src[at..at + LANES]) {
                            *m = m.max(*v);
                        }
                    }
                }
                let at = ((oy + HALO) * wpo + ox + HALO) * LANES;
                dst[at..at + LANES].copy_from_slice(&m);
            }
        }
    }
    out
}

/// Per image, the mean of each channel over its pixels (`[n][channels]`),
/// summed row by row in a fixed order.
pub fn global_average(x: &Blocked) -> Vec<Vec<f32>> {
    let wp = x.w + 2 * HALO;
    let count = (x.h * x.w) as f32;
    x.data
        .chunks_exact(x.image_len())
        .map(|image| {
            let mut means = Vec::with_capacity(x.blocks * LANES);
            for plane in image.chunks_exact(x.plane_len()) {
                let mut sum = [0f32; LANES];
                for y in 0..x.h {
                    let row = &plane[((y + HALO) * wp + HALO) * LANES..][..x.w * LANES];
                    for px in row.chunks_exact(LANES) {
                        for (s, v) in sum.iter_mut().zip(px) {
                            *s += v;
                        }
                    }
                }
                means.extend(sum.iter().map(|s| s / count));
            }
            means.truncate(x.channels);
            means
        })
        .collect()
}
