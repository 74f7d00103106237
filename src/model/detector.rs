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

use safetensors::SafeTensors;
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
    Stats::new(&l, w, h).into_vec()
}

/// The median of nine values by a fixed network of 19 compare-exchanges (the
/// classic one for 3×3 median filters), straight-line on registers: a sort per
/// pixel, or the same network looped over an index table, dominated the detector.
// Some exchanges near the end write halves the median never reads.
#[allow(unused_assignments)]
fn median9(p: &[f32; 9]) -> f32 {
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
    ] = *p;
    macro_rules! cx {
        ($a:ident, $b:ident) => {
            let lo = $a.min($b);
            $b = $a.max($b);
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
    p4.min(p2)
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
    fn new(l: &[f32], w: usize, h: usize) -> Stats {
        let n = l.len().max(1) as f32;
        let mean = l.iter().sum::<f32>() / n;
        let var = l.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let mut histogram = [0f32; 10];
        for v in l {
            histogram[((v.clamp(0.0, 1.0) * 10.0) as usize).min(9)] += 1.0 / n;
        }
        // Three selections, not a sort: this runs on every `auto` request.
        let mut order = l.to_vec();
        let mut pct = |p: f32| {
            let at = ((order.len() - 1) as f32 * p) as usize;
            *order.select_nth_unstable_by(at, f32::total_cmp).1
        };
        let percentiles = [pct(0.1), pct(0.5), pct(0.9)];
        let at = |x: usize, y: usize| l[y * w + x];

        // Differences to the right, down and along both diagonals.
        let (mut dx, mut dy, mut d1, mut d2) = (0f32, 0f32, 0f32, 0f32);
        let (mut eq_x, mut eq_y, mut fg_x, mut fg_y) = (0f32, 0f32, 0f32, 0f32);
        let mut pairs = 0f32;
        for y in 0..h.saturating_sub(1) {
            for x in 0..w.saturating_sub(1) {
                let v = at(x, y);
                let (r, d) = (at(x + 1, y), at(x, y + 1));
                dx += (r - v).abs();
                dy += (d - v).abs();
                d1 += (at(x + 1, y + 1) - v).abs();
                d2 += (r - d).abs();
                pairs += 1.0;
                // Equal neighbours where the image is not flat background.
                if v.max(r) > 0.1 {
                    fg_x += 1.0;
                    eq_x += f32::from((r - v).abs() < 1e-4);
                }
                if v.max(d) > 0.1 {
                    fg_y += 1.0;
                    eq_y += f32::from((d - v).abs() < 1e-4);
                }
            }
        }
        let pairs = pairs.max(1.0);

        // Laplacian and the residual to the 3×3 median, over interior pixels.
        let (mut lap, mut lap2, mut res, mut res2, mut interior) = (0f32, 0f32, 0f32, 0f32, 0f32);
        let (mut out_big, mut out_mid, mut out_dark) = (0f32, 0f32, 0f32);
        let (mut spots, mut spot_mass) = (0f32, 0f32);
        let mut window = [0f32; 9];
        for y in 1..h.saturating_sub(1) {
            for x in 1..w.saturating_sub(1) {
                let v = at(x, y);
                let lp = 4.0 * v - at(x - 1, y) - at(x + 1, y) - at(x, y - 1) - at(x, y + 1);
                lap += lp.abs();
                lap2 += lp * lp;
                let mut k = 0;
                for yy in y - 1..=y + 1 {
                    for xx in x - 1..=x + 1 {
                        window[k] = at(xx, yy);
                        k += 1;
                    }
                }
                let brightest_neighbour = window
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 4)
                    .map(|(_, x)| *x)
                    .fold(f32::NEG_INFINITY, f32::max);
                let r = v - median9(&window);
                res += r.abs();
                res2 += r * r;
                out_big += f32::from(r.abs() > 0.5);
                out_mid += f32::from(r.abs() > 0.15);
                out_dark += f32::from(r < -0.5);
                // A bright pixel, a local maximum clearly above the local median.
                if r > 0.2 && v >= brightest_neighbour {
                    spots += 1.0;
                    spot_mass += r;
                }
                interior += 1.0;
            }
        }
        let interior = interior.max(1.0);

        // Variation of 4×4 block means: large-scale structure (fog, vignettes).
        let (bw, bh) = ((w / 4).max(1), (h / 4).max(1));
        let mut block_means = Vec::with_capacity(16);
        for by in 0..4 {
            for bx in 0..4 {
                let mut s = 0f32;
                let mut k = 0f32;
                for y in by * bh..((by + 1) * bh).min(h) {
                    for x in bx * bw..((bx + 1) * bw).min(w) {
                        s += at(x, y);
                        k += 1.0;
                    }
                }
                block_means.push(s / k.max(1.0));
            }
        }
        let bm = block_means.iter().sum::<f32>() / 16.0;
        let bvar = block_means.iter().map(|v| (v - bm) * (v - bm)).sum::<f32>() / 16.0;
        let bmin = block_means.iter().copied().fold(f32::INFINITY, f32::min);

        let edge = (dx + dy + d1 + d2) / pairs;
        Stats {
            moments: [mean, var.sqrt()],
            histogram,
            percentiles,
            edges: [dx / pairs, dy / pairs, d1 / pairs, d2 / pairs],
            laplacian: [lap / interior, (lap2 / interior).sqrt()],
            equal_pairs: [eq_x / fg_x.max(1.0), eq_y / fg_y.max(1.0)],
            median_residual: [res / interior, (res2 / interior).sqrt()],
            outliers: [out_big / interior, out_mid / interior, out_dark / interior],
            blocks: [bvar.sqrt(), bmin],
            bright_spots: [spots / interior, spot_mass / interior],
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
        let hidden: Vec<f32> = (0..self.hidden())
            .map(|j| {
                let row = &self.w1[j * FEATURES..(j + 1) * FEATURES];
                let z: f32 = (0..FEATURES)
                    .map(|i| row[i] * (f[i] - self.feature_mean[i]) / self.feature_std[i])
                    .sum::<f32>()
                    + self.b1[j];
                z.max(0.0)
            })
            .collect();
        let logits: Vec<f32> = (0..self.kinds.len())
            .map(|k| {
                let row = &self.w2[k * hidden.len()..(k + 1) * hidden.len()];
                row.iter().zip(&hidden).map(|(a, b)| a * b).sum::<f32>() + self.b2[k]
            })
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        let severity = self.ws.iter().zip(&hidden).map(|(a, b)| a * b).sum::<f32>() + self.bs;
        let probs: Vec<f32> = exp.iter().map(|e| e / sum).collect();
        let top = (0..probs.len())
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(b.cmp(&a)))
            .unwrap_or(0);
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
        let bad = |e: safetensors::SafeTensorError| {
            Error::InvalidArgument(format!("not a valid safetensors file: {e}"))
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
        let st = SafeTensors::deserialize(bytes).map_err(bad)?;
        let md = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| Error::InvalidArgument(format!("detector metadata lacks {k:?}")))
        };
        let version = get("rws.detector.format")?;
        if version != FORMAT_VERSION {
            bail!(
                InvalidArgument,
                "detector format version {} is not supported (expected {FORMAT_VERSION})",
                crate::error::clip(&version)
            );
        }
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
            kinds: get("rws.detector.kinds")?
                .split(',')
                .map(str::to_string)
                .collect(),
            base_fingerprint: get("rws.base_fingerprint")?,
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
            metadata: md
                .into_iter()
                .filter(|(k, _)| k.starts_with("rws.policy."))
                .collect(),
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
    fn the_median_network_agrees_with_sorting() {
        let mut rng = Rng::new(9);
        for _ in 0..2000 {
            let mut w = [0f32; 9];
            for v in &mut w {
                // Few distinct values: ties exercise the network too.
                *v = (rng.uniform() * 4.0).floor();
            }
            let mut sorted = w;
            sorted.sort_by(f32::total_cmp);
            assert_eq!(median9(&w), sorted[4]);
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
