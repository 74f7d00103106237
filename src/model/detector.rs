//! The corruption detector behind the `auto` profile: cheap statistics of an
//! image, and a small MLP that names its corruption (or "clean") and estimates
//! its severity.
//!
//! The statistics are computed on the model's own input (un-normalized back to
//! luminance in [0, 1]), so the detector sees exactly what the network sees, and
//! needs no extra decoding. They are chosen for what corruptions do to an image:
//! fog and contrast move the histogram toward the middle, noise raises the
//! difference to the local median, impulse noise adds isolated extremes, blur
//! lowers edge energy (motion blur along one direction), pixelation makes
//! neighbours equal, rain adds streaks along a diagonal, snow bright flakes.
//!
//! The file (`detector.safetensors`, next to `base.safetensors`) is bound to the
//! base weights by their fingerprint, like a signature.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::model::repo::ModelConfig;
use crate::{Error, Result, bail};

/// Format of the detector file.
const FORMAT_VERSION: &str = "1";
/// The length of [`features`]' output.
pub const FEATURES: usize = 35;

/// Image statistics the detector classifies, from a `[C, H, W]` model input.
pub fn features(input: &[f32], cfg: &ModelConfig) -> Vec<f32> {
    let [h, w] = cfg.input_size;
    let c = cfg.channels.max(1);
    // Luminance in [0, 1]: the mean of the un-normalized channels.
    let mut l = vec![0f32; h * w];
    for ch in 0..c {
        let (m, s) = (cfg.mean[ch], cfg.std[ch]);
        for (i, v) in input[ch * h * w..(ch + 1) * h * w].iter().enumerate() {
            l[i] += (v * s + m) / c as f32;
        }
    }
    // Clipped and rounded to 8 bits, as cameras send images: the detector is
    // trained on float corruptions, and exact equalities differ between the two
    // (every fogged test digit sent as a PNG looked unfamiliar to a detector
    // trained on float statistics, and was served clean). Integer codes also
    // make every statistic below exact and cheap.
    let q: Vec<u8> = l
        .iter()
        // Rounded half up (the values are not negative), without a libm call.
        .map(|v| (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8)
        .collect();
    Stats::new(&q, w, h).into_vec()
}

/// Pixels whose 3×3 median is taken at once: the network below runs on whole
/// arrays, which the compiler turns into vector min/max instructions.
const LANES: usize = 32;

/// Lane by lane, the median of nine arrays of values by a fixed network of 19
/// compare-exchanges (the classic one for 3×3 median filters): a sort per
/// pixel, or the network per pixel, dominated the detector.
// Some exchanges near the end write halves the median never reads.
#[allow(unused_assignments)]
fn median9(p: [[u8; LANES]; 9]) -> [u8; LANES] {
    let [
        mut p0,
        mut p1,
        mut p2,
        mut p3,
        mut p4,
        mut p5,
        mut p6,
        mut p7,
        mut p8,
    ] = p;
    let min = |a: [u8; LANES], b: [u8; LANES]| std::array::from_fn(|i| a[i].min(b[i]));
    let max = |a: [u8; LANES], b: [u8; LANES]| std::array::from_fn(|i| a[i].max(b[i]));
    macro_rules! cx {
        ($a:ident, $b:ident) => {
            let lo = min($a, $b);
            $b = max($a, $b);
            $a = lo;
        };
    }
    cx!(p1, p2);
    cx!(p4, p5);
    cx!(p7, p8);
    cx!(p0, p1);
    cx!(p3, p4);
    cx!(p6, p7);
    cx!(p1, p2);
    cx!(p4, p5);
    cx!(p7, p8);
    cx!(p0, p3);
    cx!(p5, p8);
    cx!(p4, p7);
    cx!(p3, p6);
    cx!(p1, p4);
    cx!(p2, p5);
    cx!(p4, p7);
    cx!(p4, p2);
    cx!(p6, p4);
    // The last exchange needs only its lower half.
    min(p4, p2)
}

/// The statistics, named; [`Stats::into_vec`] fixes their order.
struct Stats {
    moments: [f32; 2],
    histogram: [f32; 10],
    percentiles: [f32; 3],
    edges: [f32; 4],
    laplacian: [f32; 2],
    equal_pairs: [f32; 2],
    median_residual: [f32; 2],
    outliers: [f32; 3],
    blocks: [f32; 2],
    bright_spots: [f32; 2],
    anisotropy: [f32; 3],
}

impl Stats {
    /// From 8-bit luminance codes (0 black, 255 white), row by row.
    fn new(q: &[u8], w: usize, h: usize) -> Stats {
        const FULL: f32 = 255.0;
        let n = q.len().max(1) as f32;
        // Everything global comes from the 256-bin histogram of codes.
        let mut counts = [0u32; 256];
        for &v in q {
            counts[usize::from(v)] += 1;
        }
        let (mut sum, mut sum2) = (0u64, 0u64);
        let mut histogram = [0f32; 10];
        for (k, &c) in counts.iter().enumerate() {
            sum += k as u64 * u64::from(c);
            sum2 += (k * k) as u64 * u64::from(c);
            histogram[(k * 10 / 255).min(9)] += c as f32 / n;
        }
        let mean = sum as f32 / n / FULL;
        let var = (sum2 as f32 / n / (FULL * FULL) - mean * mean).max(0.0);
        // The value at rank `p` of the sorted codes.
        let pct = |p: f32| {
            let at = ((q.len().max(1) - 1) as f32 * p) as u32;
            let mut seen = 0;
            for (k, &c) in counts.iter().enumerate() {
                seen += c;
                if seen > at {
                    return k as f32 / FULL;
                }
            }
            1.0
        };
        let percentiles = [pct(0.1), pct(0.5), pct(0.9)];

        // Differences to the right, down and along both diagonals.
        let (mut dx, mut dy, mut d1, mut d2) = (0u32, 0u32, 0u32, 0u32);
        let (mut eq_x, mut eq_y, mut fg_x, mut fg_y) = (0u32, 0u32, 0u32, 0u32);
        // Foreground: brighter than 0.1.
        const FG: u8 = 26;
        for y in 0..h.saturating_sub(1) {
            let (row, below) = (&q[y * w..(y + 1) * w], &q[(y + 1) * w..(y + 2) * w]);
            for x in 0..w.saturating_sub(1) {
                let (v, r, d, rd) = (row[x], row[x + 1], below[x], below[x + 1]);
                dx += u32::from(r.abs_diff(v));
                dy += u32::from(d.abs_diff(v));
                d1 += u32::from(rd.abs_diff(v));
                d2 += u32::from(r.abs_diff(d));
                // Equal neighbours where the image is not flat background.
                let (fx, fy) = (v.max(r) >= FG, v.max(d) >= FG);
                fg_x += u32::from(fx);
                fg_y += u32::from(fy);
                eq_x += u32::from(fx && r == v);
                eq_y += u32::from(fy && d == v);
            }
        }
        let pairs = (h.saturating_sub(1) * w.saturating_sub(1)).max(1) as f32 * FULL;
        let [dx, dy, d1, d2] = [dx, dy, d1, d2].map(|d| d as f32 / pairs);

        // Laplacian and the residual to the 3×3 median, over interior pixels.
        let (mut lap, mut lap2, mut res, mut res2) = (0u32, 0u64, 0u32, 0u64);
        let (mut out_big, mut out_mid, mut out_dark) = (0u32, 0u32, 0u32);
        let (mut spots, mut spot_mass) = (0u32, 0u32);
        for y in 1..h.saturating_sub(1) {
            let rows = [
                &q[(y - 1) * w..y * w],
                &q[y * w..(y + 1) * w],
                &q[(y + 1) * w..(y + 2) * w],
            ];
            for x0 in (1..w.saturating_sub(1)).step_by(LANES) {
                let n = LANES.min(w - 1 - x0);
                // window[3 * row + column], for pixels x0..x0 + n.
                let mut window = [[0u8; LANES]; 9];
                for (k, lane) in window.iter_mut().enumerate() {
                    let from = x0 - 1 + k % 3;
                    lane[..n].copy_from_slice(&rows[k / 3][from..from + n]);
                }
                let median = median9(window);
                for i in 0..n {
                    let at = |k: usize| i32::from(window[k][i]);
                    let v = window[4][i];
                    let lp = 4 * at(4) - at(1) - at(3) - at(5) - at(7);
                    lap += lp.unsigned_abs();
                    lap2 += (lp * lp) as u64;
                    let r = i32::from(v) - i32::from(median[i]);
                    res += r.unsigned_abs();
                    res2 += (r * r) as u64;
                    // Beyond 0.5, 0.15 and below -0.5 of full scale.
                    out_big += u32::from(r.abs() > 127);
                    out_mid += u32::from(r.abs() > 38);
                    out_dark += u32::from(r < -127);
                    // A bright pixel, a local maximum clearly (0.2) above the local median.
                    if r > 51 && (0..9).all(|k| window[k][i] <= v) {
                        spots += 1;
                        spot_mass += r as u32;
                    }
                }
            }
        }
        let interior = (h.saturating_sub(2) * w.saturating_sub(2)).max(1) as f32;

        // Variation of 4×4 block means: large-scale structure (fog, vignettes).
        let (bw, bh) = ((w / 4).max(1), (h / 4).max(1));
        let mut block_means = [0f32; 16];
        for by in 0..4 {
            for bx in 0..4 {
                let (mut s, mut k) = (0u32, 0u32);
                for y in by * bh..((by + 1) * bh).min(h) {
                    let (from, to) = ((bx * bw).min(w), ((bx + 1) * bw).min(w));
                    for &v in &q[y * w + from..y * w + to] {
                        s += u32::from(v);
                        k += 1;
                    }
                }
                block_means[by * 4 + bx] = s as f32 / k.max(1) as f32 / FULL;
            }
        }
        let bm = block_means.iter().sum::<f32>() / 16.0;
        let bvar = block_means.iter().map(|v| (v - bm) * (v - bm)).sum::<f32>() / 16.0;
        let bmin = block_means.iter().copied().fold(f32::INFINITY, f32::min);

        let edge = dx + dy + d1 + d2;
        let scale = interior * FULL;
        Stats {
            moments: [mean, var.sqrt()],
            histogram,
            percentiles,
            edges: [dx, dy, d1, d2],
            laplacian: [lap as f32 / scale, (lap2 as f32 / interior).sqrt() / FULL],
            equal_pairs: [
                eq_x as f32 / fg_x.max(1) as f32,
                eq_y as f32 / fg_y.max(1) as f32,
            ],
            median_residual: [res as f32 / scale, (res2 as f32 / interior).sqrt() / FULL],
            outliers: [
                out_big as f32 / interior,
                out_mid as f32 / interior,
                out_dark as f32 / interior,
            ],
            blocks: [bvar.sqrt(), bmin],
            bright_spots: [spots as f32 / interior, spot_mass as f32 / scale],
            anisotropy: [
                (dx - dy) / (dx + dy + 1e-6),
                (d1 - d2) / (d1 + d2 + 1e-6) * f32::from(edge > 0.0),
                // Blur along one direction leaves its edges weak and the others
                // not: the weakest direction against the strongest, whichever it is.
                {
                    let e = [dx, dy, d1, d2];
                    let lo = e.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = e.iter().copied().fold(0.0, f32::max);
                    lo / (hi + 1e-6)
                },
            ],
        }
    }

    fn into_vec(self) -> Vec<f32> {
        let v: Vec<f32> = [
            &self.moments[..],
            &self.histogram,
            &self.percentiles,
            &self.edges,
            &self.laplacian,
            &self.equal_pairs,
            &self.median_residual,
            &self.outliers,
            &self.blocks,
            &self.bright_spots,
            &self.anisotropy,
        ]
        .concat();
        debug_assert_eq!(v.len(), FEATURES);
        v
    }
}

/// What the detector says about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// One probability per entry of [`Detector::kinds`].
    pub probs: Vec<f32>,
    /// Estimated severity, 1 to 5 (meaningless for "clean").
    pub severity: f32,
    /// Whether the image's statistics lie within what the top kind's training
    /// images showed. A kind the detector never saw is still given the closest
    /// name, often with confidence; this is what tells it apart.
    pub familiar: bool,
}

/// A trained detector: feature standardization, one hidden layer, a kind head
/// and a severity head.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    /// `clean` first, then the corruption kinds it names.
    pub kinds: Vec<String>,
    pub base_fingerprint: String,
    /// Per-feature mean and standard deviation of the training set.
    pub feature_mean: Vec<f32>,
    pub feature_std: Vec<f32>,
    /// `[hidden, FEATURES]`, `[hidden]`.
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    /// `[kinds, hidden]`, `[kinds]`.
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
    /// `[hidden]`, `[1]`: the severity head.
    pub ws: Vec<f32>,
    pub bs: f32,
    /// `[kinds, FEATURES]`: each kind's training features, mean and standard
    /// deviation, and `[kinds]`: the largest mean squared z-score deemed
    /// familiar for it.
    pub kind_mean: Vec<f32>,
    pub kind_std: Vec<f32>,
    pub kind_limit: Vec<f32>,
    /// Extra metadata the serving policy reads (`rws.policy.*`).
    pub metadata: HashMap<String, String>,
}

impl Detector {
    pub fn hidden(&self) -> usize {
        self.b1.len()
    }

    /// Classifies one image's features.
    pub fn detect_features(&self, f: &[f32]) -> Detection {
        let z: Vec<f32> = (0..FEATURES)
            .map(|i| (f[i] - self.feature_mean[i]) / self.feature_std[i])
            .collect();
        let hidden: Vec<f32> = (0..self.hidden())
            .map(|j| {
                let row = &self.w1[j * FEATURES..(j + 1) * FEATURES];
                let a: f32 = row.iter().zip(&z).map(|(w, z)| w * z).sum::<f32>() + self.b1[j];
                a.max(0.0)
            })
            .collect();
        let logits: Vec<f32> = (0..self.kinds.len())
            .map(|k| {
                let row = &self.w2[k * hidden.len()..(k + 1) * hidden.len()];
                row.iter().zip(&hidden).map(|(a, b)| a * b).sum::<f32>() + self.b2[k]
            })
            .collect();
        let severity = self.ws.iter().zip(&hidden).map(|(a, b)| a * b).sum::<f32>() + self.bs;
        let probs = crate::model::softmax(&logits);
        let top = crate::model::argmax(&probs);
        Detection {
            probs,
            severity: severity.clamp(1.0, 5.0),
            familiar: self.distance(f, top) <= self.kind_limit[top],
        }
    }

    /// The largest squared z-score among features `f` against kind `k`'s
    /// training images: one statistic far from that kind's is enough to doubt
    /// the name (a mean over all of them let motion blur pass as fog).
    pub fn distance(&self, f: &[f32], k: usize) -> f32 {
        let (m, s) = (
            &self.kind_mean[k * FEATURES..(k + 1) * FEATURES],
            &self.kind_std[k * FEATURES..(k + 1) * FEATURES],
        );
        (0..FEATURES)
            .map(|i| ((f[i] - m[i]) / s[i]).powi(2))
            .fold(0.0, f32::max)
    }

    /// Classifies one `[C, H, W]` model input.
    pub fn detect(&self, input: &[f32], cfg: &ModelConfig) -> Detection {
        self.detect_features(&features(input, cfg))
    }

    /// Refuses a detector made for other base weights.
    pub fn check_base(&self, fingerprint: &str) -> Result<()> {
        if self.base_fingerprint != fingerprint {
            bail!(
                FailedPrecondition,
                "the detector was trained for base weights {} but the model is {}; train one for this model with `rws train-detector`",
                self.base_fingerprint,
                fingerprint
            );
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        let h = self.hidden();
        let k = self.kinds.len();
        if k < 2 || self.kinds[0] != "clean" {
            bail!(
                InvalidArgument,
                "detector kinds must start with \"clean\" and name at least one corruption"
            );
        }
        for (name, len, want) in [
            ("features.mean", self.feature_mean.len(), FEATURES),
            ("features.std", self.feature_std.len(), FEATURES),
            ("hidden.weight", self.w1.len(), h * FEATURES),
            ("kind.weight", self.w2.len(), k * h),
            ("kind.bias", self.b2.len(), k),
            ("severity.weight", self.ws.len(), h),
            ("kinds.mean", self.kind_mean.len(), k * FEATURES),
            ("kinds.std", self.kind_std.len(), k * FEATURES),
            ("kinds.limit", self.kind_limit.len(), k),
        ] {
            if len != want {
                bail!(
                    InvalidArgument,
                    "detector tensor {name} has {len} values, expected {want}"
                );
            }
        }
        let all = [
            &self.feature_mean,
            &self.feature_std,
            &self.w1,
            &self.b1,
            &self.w2,
            &self.b2,
            &self.ws,
            &self.kind_mean,
            &self.kind_std,
            &self.kind_limit,
        ];
        if !self.bs.is_finite() || all.iter().any(|t| t.iter().any(|v| !v.is_finite())) {
            bail!(InvalidArgument, "the detector holds NaN or Inf");
        }
        if self
            .feature_std
            .iter()
            .chain(&self.kind_std)
            .any(|s| *s <= 0.0)
        {
            bail!(
                InvalidArgument,
                "the detector's feature scales must be positive"
            );
        }
        Ok(())
    }

    /// Parses and checks a detector file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (st, md) = crate::tensorfile::read(bytes, "detector")?;
        md.check_version("rws.detector.format", FORMAT_VERSION)?;
        let tensor = |name: &str| -> Result<Vec<f32>> {
            let v = st
                .tensor(name)
                .map_err(|_| Error::InvalidArgument(format!("the detector lacks {name}")))?;
            if v.dtype() != Dtype::F32 {
                bail!(InvalidArgument, "detector tensor {name} must be F32");
            }
            Ok(v.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let bs = tensor("severity.bias")?;
        let d = Detector {
            kinds: md
                .require("rws.detector.kinds")?
                .split(',')
                .map(str::to_string)
                .collect(),
            base_fingerprint: md.require("rws.base_fingerprint")?,
            feature_mean: tensor("features.mean")?,
            feature_std: tensor("features.std")?,
            w1: tensor("hidden.weight")?,
            b1: tensor("hidden.bias")?,
            w2: tensor("kind.weight")?,
            b2: tensor("kind.bias")?,
            ws: tensor("severity.weight")?,
            bs: match bs.as_slice() {
                [b] => *b,
                _ => bail!(
                    InvalidArgument,
                    "detector tensor severity.bias must hold one value"
                ),
            },
            kind_mean: tensor("kinds.mean")?,
            kind_std: tensor("kinds.std")?,
            kind_limit: tensor("kinds.limit")?,
            metadata: md.with_prefix("rws.policy."),
        };
        d.check()?;
        Ok(d)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.check()?;
        self.encode()
    }

    /// The file's bytes, unchecked.
    fn encode(&self) -> Result<Vec<u8>> {
        let mut md = self.metadata.clone();
        md.insert("rws.detector.format".into(), FORMAT_VERSION.into());
        md.insert("rws.detector.kinds".into(), self.kinds.join(","));
        md.insert("rws.base_fingerprint".into(), self.base_fingerprint.clone());
        let h = self.hidden();
        let bs = [self.bs];
        let parts: [(&str, Vec<usize>, &[f32]); 11] = [
            (
                "features.mean",
                vec![self.feature_mean.len()],
                &self.feature_mean,
            ),
            (
                "features.std",
                vec![self.feature_std.len()],
                &self.feature_std,
            ),
            (
                "hidden.weight",
                vec![self.w1.len() / FEATURES, FEATURES],
                &self.w1,
            ),
            ("hidden.bias", vec![h], &self.b1),
            ("kind.weight", vec![self.w2.len() / h.max(1), h], &self.w2),
            ("kind.bias", vec![self.b2.len()], &self.b2),
            ("severity.weight", vec![1, self.ws.len()], &self.ws),
            ("severity.bias", vec![1], &bs),
            (
                "kinds.mean",
                vec![self.kind_mean.len() / FEATURES, FEATURES],
                &self.kind_mean,
            ),
            (
                "kinds.std",
                vec![self.kind_std.len() / FEATURES, FEATURES],
                &self.kind_std,
            ),
            ("kinds.limit", vec![self.kind_limit.len()], &self.kind_limit),
        ];
        let bytes: Vec<Vec<u8>> = parts
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = parts
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| Ok((*n, TensorView::new(Dtype::F32, s.clone(), b)?)))
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| Error::Internal(format!("cannot serialize the detector: {e}")))?;
        safetensors::serialize(views, Some(md))
            .map_err(|e| Error::Internal(format!("cannot serialize the detector: {e}")))
            .and_then(crate::tensorfile::canonical)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, &self.to_bytes()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn cfg() -> ModelConfig {
        toml::from_str(
            r#"arch = "resnet-small"
widths = [4, 8, 8]
depths = [1, 1, 1]
input_size = [28, 28]
channels = 1
mean = [0.5]
std = [0.25]
labels = ["a", "b"]
patchable_blocks = 1"#,
        )
        .unwrap()
    }

    /// A bright square on black, as model input.
    fn square(noise: f32, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..28 * 28)
            .map(|i| {
                let (x, y) = (i % 28, i / 28);
                let v = if (8..20).contains(&x) && (8..20).contains(&y) {
                    0.9
                } else {
                    0.0
                };
                ((v + noise * rng.normal()) - 0.5) / 0.25
            })
            .collect()
    }

    fn detector(seed: u64) -> Detector {
        let mut rng = Rng::new(seed);
        let h = 5;
        Detector {
            kinds: vec!["clean".into(), "fog".into(), "gaussian_noise".into()],
            base_fingerprint: "sha256:ab".into(),
            feature_mean: rng.vec(FEATURES, -1.0, 1.0),
            feature_std: rng.vec(FEATURES, 0.5, 2.0),
            w1: rng.vec(h * FEATURES, -1.0, 1.0),
            b1: rng.vec(h, -1.0, 1.0),
            w2: rng.vec(3 * h, -1.0, 1.0),
            b2: rng.vec(3, -1.0, 1.0),
            ws: rng.vec(h, -1.0, 1.0),
            bs: 2.5,
            kind_mean: rng.vec(3 * FEATURES, -1.0, 1.0),
            kind_std: rng.vec(3 * FEATURES, 0.5, 2.0),
            kind_limit: vec![1e9; 3],
            metadata: HashMap::from([("rws.policy.threshold".into(), "0.6".into())]),
        }
    }

    #[test]
    fn an_image_and_its_8_bit_encoding_give_the_same_statistics() {
        let cfg = cfg();
        for seed in 0..20 {
            let float = square(0.1, seed);
            // What a PNG of it decodes to.
            let png: Vec<f32> = float
                .iter()
                .map(|v| {
                    (((v * 0.25 + 0.5) * 255.0).round().clamp(0.0, 255.0) / 255.0 - 0.5) / 0.25
                })
                .collect();
            let (a, b) = (features(&float, &cfg), features(&png, &cfg));
            let bits = |f: &[f32]| f.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "seed {seed}");
        }
    }

    #[test]
    fn the_median_network_agrees_with_sorting() {
        let mut rng = Rng::new(9);
        for _ in 0..200 {
            let mut lanes = [[0u8; LANES]; 9];
            for lane in &mut lanes {
                for v in lane.iter_mut() {
                    // Few distinct values: ties exercise the network too.
                    *v = (rng.uniform() * 4.0) as u8;
                }
            }
            let median = median9(lanes);
            for (i, m) in median.into_iter().enumerate() {
                let mut sorted = lanes.map(|l| l[i]);
                sorted.sort();
                assert_eq!(m, sorted[4]);
            }
        }
    }

    #[test]
    fn features_are_finite_and_see_noise() {
        let clean = features(&square(0.0, 1), &cfg());
        let noisy = features(&square(0.2, 1), &cfg());
        assert_eq!(clean.len(), FEATURES);
        assert!(clean.iter().chain(&noisy).all(|v| v.is_finite()));
        // The residual to the local median: index of median_residual[0].
        let at = 2 + 10 + 3 + 4 + 2 + 2;
        assert!(
            noisy[at] > 5.0 * clean[at].max(1e-3),
            "{} vs {}",
            noisy[at],
            clean[at]
        );
        // A blank image, and a one-pixel one, do not divide by zero.
        let tiny: ModelConfig = ModelConfig {
            input_size: [1, 1],
            ..cfg()
        };
        assert!(features(&[0.0], &tiny).iter().all(|v| v.is_finite()));
        assert!(
            features(&vec![-2.0; 784], &cfg())
                .iter()
                .all(|v| v.is_finite())
        );
    }

    #[test]
    fn a_detector_file_round_trips_and_is_checked() {
        let d = detector(3);
        let back = Detector::from_bytes(&d.to_bytes().unwrap()).unwrap();
        assert_eq!(back, d);
        let det = back.detect(&square(0.1, 2), &cfg());
        assert_eq!(det.probs.len(), 3);
        assert!((det.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!((1.0..=5.0).contains(&det.severity));
        assert!(d.check_base("sha256:ab").is_ok());
        let e = d.check_base("sha256:cd").unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");

        // NaN, a missing value, a foreign format: refused on writing and reading.
        let mut nan = detector(3);
        nan.w2[4] = f32::NAN;
        assert!(nan.to_bytes().is_err());
        let e = Detector::from_bytes(&nan.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        let mut short = detector(3);
        short.w2.truncate(2 * short.hidden());
        let e = Detector::from_bytes(&short.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("kind.weight"), "{e}");
        let mut other = detector(3);
        other
            .metadata
            .insert("rws.detector.format".into(), "x".repeat(500));
        let bytes = other.encode().unwrap();
        assert!(
            Detector::from_bytes(&bytes).is_ok(),
            "encode sets the format"
        );
        assert!(Detector::from_bytes(b"not a file").is_err());
    }
}
