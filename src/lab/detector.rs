//! `rws train-detector`: trains the corruption detector that the `auto` profile
//! consults (see [`crate::model::detector`]) on the training digits, each seen
//! clean and under random corruptions at severities 1 to 5, with fixed seeds.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rayon::prelude::*;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::lab::corrupt::Corruption;
use crate::lab::data::Digits;
use crate::lab::train::shuffled;
use crate::model::Model;
use crate::model::detector::{Detection, Detector, FEATURES, features};
use crate::model::repo::ModelConfig;
use crate::patch::signature::Signature;
use crate::rng::Rng;
use crate::serve::auto::{AutoChoice, Policy};
use crate::{Result, bail};

/// One training or evaluation example: an image's statistics and its truth.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The normalized model input.
    pub input: Vec<f32>,
    pub features: Vec<f32>,
    /// 0: clean; k: `kinds[k - 1]`.
    pub kind: usize,
    /// 1 to 5; 0 when clean.
    pub severity: u8,
    /// The digit.
    pub label: u8,
}

/// How the examples are drawn and the detector trained.
#[derive(Debug, Clone)]
pub struct DetectorOptions {
    pub kinds: Vec<Corruption>,
    /// Conditions each digit is seen under (clean or a random kind and severity).
    pub copies: usize,
    /// Share of conditions that are clean.
    pub clean_share: f32,
    pub hidden: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Share of a kind's own training images deemed familiar for it.
    pub familiar_quantile: f32,
    /// Points below the clean model that no kind may fall, served as if the
    /// detector had never seen it, when the policy's threshold is tuned.
    pub unseen_margin: f64,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        DetectorOptions {
            kinds: Vec::new(),
            copies: 4,
            clean_share: 1.0 / 3.0,
            hidden: 64,
            steps: 3000,
            batch: 128,
            lr: 3e-3,
            seed: 7,
            familiar_quantile: 0.99,
            unseen_margin: 0.0,
        }
    }
}

/// Each digit under `copies` seeded conditions: clean with probability
/// `clean_share`, else a uniformly drawn kind at a uniformly drawn severity.
pub fn samples(digits: &Digits, cfg: &ModelConfig, o: &DetectorOptions) -> Vec<Sample> {
    let (mean, std) = (cfg.mean[0], cfg.std[0]);
    (0..digits.len() * o.copies)
        .into_par_iter()
        .map(|n| {
            let (i, copy) = (n / o.copies, n % o.copies);
            let seed = o.seed ^ ((i as u64) << 24) ^ ((copy as u64) << 8) ^ 0xde7ec7;
            let mut rng = Rng::new(seed);
            let (kind, severity) = if o.kinds.is_empty() || rng.uniform() < o.clean_share {
                (0, 0)
            } else {
                let k = (rng.next_u64() % o.kinds.len() as u64) as usize;
                (k + 1, 1 + (rng.next_u64() % 5) as u8)
            };
            let mut g = digits.gray(i);
            if kind > 0 {
                g = o.kinds[kind - 1].apply(&g, severity, seed);
            }
            let input: Vec<f32> = g.pixels.iter().map(|p| (p - mean) / std).collect();
            Sample {
                features: features(&input, cfg),
                input,
                kind,
                severity,
                label: digits.labels[i],
            }
        })
        .collect()
}

/// Trains a detector on `train`: standardized features, one ReLU layer, a
/// softmax over clean and the kinds, and a severity regression on the corrupted
/// examples. Deterministic for a seed: initial weights and batch order come
/// from [`Rng`].
pub fn train(
    train: &[Sample],
    kinds: &[Corruption],
    base_fingerprint: &str,
    o: &DetectorOptions,
) -> Result<Detector> {
    if train.is_empty() || o.batch == 0 || o.hidden == 0 {
        bail!(InvalidArgument, "nothing to train the detector on");
    }
    let dev = Device::Cpu;
    let n = train.len() as f32;
    let mut feature_mean = vec![0f32; FEATURES];
    for s in train {
        for (m, f) in feature_mean.iter_mut().zip(&s.features) {
            *m += f / n;
        }
    }
    let mut feature_std = [0f32; FEATURES];
    for s in train {
        for ((v, f), m) in feature_std.iter_mut().zip(&s.features).zip(&feature_mean) {
            *v += (f - m) * (f - m) / n;
        }
    }
    // A constant feature keeps a unit scale rather than dividing by zero.
    let feature_std: Vec<f32> = feature_std
        .iter()
        .map(|v| if v.sqrt() > 1e-6 { v.sqrt() } else { 1.0 })
        .collect();
    let x: Vec<f32> = train
        .iter()
        .flat_map(|s| {
            s.features
                .iter()
                .zip(&feature_mean)
                .zip(&feature_std)
                .map(|((f, m), sd)| (f - m) / sd)
        })
        .collect();
    let x = Tensor::from_vec(x, (train.len(), FEATURES), &dev)?;
    let kind = Tensor::from_vec(
        train.iter().map(|s| s.kind as u32).collect::<Vec<_>>(),
        train.len(),
        &dev,
    )?;
    let severity = Tensor::from_vec(
        train
            .iter()
            .map(|s| f32::from(s.severity))
            .collect::<Vec<_>>(),
        train.len(),
        &dev,
    )?;
    let corrupted = Tensor::from_vec(
        train
            .iter()
            .map(|s| f32::from(u8::from(s.kind > 0)))
            .collect::<Vec<_>>(),
        train.len(),
        &dev,
    )?;

    let k = kinds.len() + 1;
    let h = o.hidden;
    let mut rng = Rng::new(o.seed);
    let mut var = |rows: usize, cols: usize, scale: f32| -> Result<Var> {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * scale).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &dev)?)?)
    };
    let w1 = var(h, FEATURES, (2.0 / FEATURES as f32).sqrt())?;
    let b1 = Var::zeros(h, DType::F32, &dev)?;
    let w2 = var(k, h, (1.0 / h as f32).sqrt())?;
    let b2 = Var::zeros(k, DType::F32, &dev)?;
    let ws = var(1, h, (1.0 / h as f32).sqrt())?;
    let bs = Var::from_tensor(&Tensor::new(&[3f32], &dev)?)?;
    let params = candle_nn::ParamsAdamW {
        lr: o.lr,
        weight_decay: 1e-4,
        ..Default::default()
    };
    let vars = vec![
        w1.clone(),
        b1.clone(),
        w2.clone(),
        b2.clone(),
        ws.clone(),
        bs.clone(),
    ];
    let mut opt = candle_nn::AdamW::new(vars, params)?;
    let mut order: Vec<usize> = Vec::new();
    for step in 0..o.steps {
        if order.len() < o.batch {
            order = shuffled(train.len(), &mut rng);
        }
        let idx: Vec<u32> = order
            .split_off(order.len() - o.batch.min(order.len()))
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let idx = Tensor::from_vec(idx, o.batch.min(train.len()), &dev)?;
        let xb = x.index_select(&idx, 0)?;
        let hidden = xb.matmul(&w1.t()?)?.broadcast_add(&b1)?.relu()?;
        let logits = hidden.matmul(&w2.t()?)?.broadcast_add(&b2)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &kind.index_select(&idx, 0)?)?;
        let predicted = hidden
            .matmul(&ws.t()?)?
            .squeeze(D::Minus1)?
            .broadcast_add(&bs)?;
        let mask = corrupted.index_select(&idx, 0)?;
        let err = (predicted - severity.index_select(&idx, 0)?)?;
        let mse = (err.sqr()? * &mask)?.sum_all()?
            / (mask.sum_all()?.to_scalar::<f32>()? as f64).max(1.0);
        let loss = (ce + (mse? * 0.1)?)?;
        let lr = o.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / o.steps as f64).cos());
        opt.set_learning_rate(lr);
        opt.backward_step(&loss)?;
    }
    let flat = |v: &Var| -> Result<Vec<f32>> { Ok(v.as_tensor().flatten_all()?.to_vec1()?) };
    let (kind_mean, kind_std) = kind_moments(train, k);
    let mut d = Detector {
        kinds: std::iter::once("clean".to_string())
            .chain(kinds.iter().map(|c| c.name().to_string()))
            .collect(),
        base_fingerprint: base_fingerprint.to_string(),
        feature_mean,
        feature_std,
        w1: flat(&w1)?,
        b1: flat(&b1)?,
        w2: flat(&w2)?,
        b2: flat(&b2)?,
        ws: flat(&ws)?,
        bs: flat(&bs)?[0],
        kind_mean,
        kind_std,
        kind_limit: vec![f32::INFINITY; k],
        metadata: Default::default(),
    };
    // Familiar: within the given quantile of the kind's own training distances.
    for kind in 0..k {
        let mut dist: Vec<f32> = train
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| d.distance(&s.features, kind))
            .collect();
        dist.sort_by(f32::total_cmp);
        if let Some(&last) = dist.last() {
            let at = ((dist.len() - 1) as f32 * o.familiar_quantile) as usize;
            d.kind_limit[kind] = dist[at].min(last);
        }
    }
    Ok(d)
}

/// Per kind (`0..k`), the mean and standard deviation of each raw feature over
/// its samples; a kind without samples, or a constant feature, gets unit scale.
fn kind_moments(samples: &[Sample], k: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f32; k * FEATURES];
    let mut std = vec![1f32; k * FEATURES];
    for kind in 0..k {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.kind == kind).collect();
        let n = of.len() as f32;
        if of.is_empty() {
            continue;
        }
        for i in 0..FEATURES {
            let m = of.iter().map(|s| s.features[i]).sum::<f32>() / n;
            let v = of.iter().map(|s| (s.features[i] - m).powi(2)).sum::<f32>() / n;
            mean[kind * FEATURES + i] = m;
            std[kind * FEATURES + i] = if v.sqrt() > 1e-6 { v.sqrt() } else { 1.0 };
        }
    }
    (mean, std)
}

/// Share of `samples` whose kind the detector names, and the mean absolute
/// error of its severity on the corrupted ones.
pub fn score(d: &Detector, samples: &[Sample]) -> (f32, f32) {
    let (mut right, mut err, mut corrupted) = (0usize, 0f32, 0usize);
    for s in samples {
        let det = d.detect_features(&s.features);
        let best = (0..det.probs.len())
            .max_by(|&a, &b| det.probs[a].total_cmp(&det.probs[b]))
            .unwrap_or(0);
        right += usize::from(best == s.kind);
        if s.kind > 0 {
            err += (det.severity - f32::from(s.severity)).abs();
            corrupted += 1;
        }
    }
    (
        right as f32 / samples.len().max(1) as f32,
        err / corrupted.max(1) as f32,
    )
}

/// How a trained detector did on the digits held out of its training, and the
/// policy tuned on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The corruption kinds it names.
    pub kinds: Vec<String>,
    /// Its training steps.
    pub steps: usize,
    /// [`DetectorOptions::unseen_margin`], which the threshold was tuned for.
    pub unseen_margin: f64,
    pub train_samples: usize,
    pub held_out_samples: usize,
    /// Share of held-out examples whose kind (or "clean") it names.
    pub accuracy: f32,
    /// Mean absolute severity error on the corrupted held-out examples.
    pub severity_error: f32,
    /// The policy's threshold and alphas by kind and severity.
    pub threshold: f32,
    pub alphas: BTreeMap<String, [f32; 5]>,
    /// Per kind, its held-out images served by the tuned policy as if the
    /// detector had never seen the kind ([`without_kind`]).
    pub unseen: BTreeMap<String, Unseen>,
}

/// A kind's held-out images served as if the detector had never seen it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Unseen {
    pub images: usize,
    /// Classified right by the clean model, and by `auto`.
    pub clean_model: usize,
    pub auto: usize,
}

impl Unseen {
    /// Points `auto` gains over the clean model on them.
    pub fn margin(&self) -> f64 {
        100.0 * (self.auto as f64 - self.clean_model as f64) / self.images.max(1) as f64
    }
}

/// Draws the examples, holds every fifth digit out, trains on the rest, scores
/// on the held-out ones and tunes the `auto` policy on them, which the detector
/// then carries. `signatures[k]` is the model's signature for `o.kinds[k]`.
pub fn run(
    digits: &Digits,
    model: &Model,
    signatures: &[Arc<Signature>],
    o: &DetectorOptions,
) -> Result<(Detector, Report)> {
    if signatures.len() != o.kinds.len() {
        bail!(
            InvalidArgument,
            "one signature per kind is needed to tune the policy"
        );
    }
    let copies = o.copies.max(1);
    let (mut held, mut fit) = (Vec::new(), Vec::new());
    for (n, s) in samples(digits, &model.config, o).into_iter().enumerate() {
        match (n / copies) % 5 {
            4 => held.push(s),
            _ => fit.push(s),
        }
    }
    let mut detector = train(&fit, &o.kinds, model.fingerprint(), o)?;
    let (accuracy, severity_error) = score(&detector, &held);
    let (policy, unseen) = tune_policy(&detector, model, &o.kinds, signatures, &held, o)?;
    detector.metadata = policy.to_metadata();
    Ok((
        detector,
        Report {
            kinds: o.kinds.iter().map(|k| k.name().to_string()).collect(),
            steps: o.steps,
            unseen_margin: o.unseen_margin,
            train_samples: fit.len(),
            held_out_samples: held.len(),
            accuracy,
            severity_error,
            threshold: policy.threshold,
            alphas: policy.alphas,
            unseen,
        },
    ))
}

/// Alphas the policy may choose from; 0 serves clean.
pub const ALPHA_GRID: [f32; 7] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5];
/// Thresholds tried for the top kind's probability.
pub const THRESHOLD_GRID: [f32; 12] = [
    0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998,
];

/// For each sample, whether the model classifies it right with each kind's
/// signature at each alpha of [`ALPHA_GRID`] (`[kind][alpha]`; alpha 0 is the
/// clean model).
fn correctness(
    model: &Model,
    signatures: &[Arc<Signature>],
    samples: &[Sample],
) -> Result<Vec<Vec<Vec<bool>>>> {
    let cfg = &model.config;
    let [h, w] = cfg.input_size;
    let mut per_choice = Vec::new();
    for sig in signatures {
        let mut per_alpha = Vec::new();
        for alpha in ALPHA_GRID {
            let stem = model.materialize(&[(sig, alpha)])?;
            let mut right = Vec::with_capacity(samples.len());
            for chunk in samples.chunks(256) {
                let x: Vec<f32> = chunk.iter().flat_map(|s| s.input.iter().copied()).collect();
                let x = Tensor::from_vec(x, (chunk.len(), cfg.channels, h, w), model.device())?;
                let logits = model.forward(&stem, &x)?.to_vec2::<f32>()?;
                for (l, s) in logits.iter().zip(chunk) {
                    let best = (0..l.len())
                        .max_by(|&a, &b| l[a].total_cmp(&l[b]))
                        .unwrap_or(0);
                    right.push(best == usize::from(s.label));
                }
            }
            per_alpha.push(right);
        }
        per_choice.push(per_alpha);
    }
    // Transposed to [sample][kind][alpha].
    Ok((0..samples.len())
        .map(|i| {
            per_choice
                .iter()
                .map(|a| a.iter().map(|r| r[i]).collect())
                .collect()
        })
        .collect())
}

/// The alphas, one per severity, that classify the most images right under
/// the constraint that alpha never falls as severity rises (the sweep's
/// finding; per-severity maxima on a few dozen images each came out jagged).
/// `hits[s][a]` counts images at severity `s + 1` right with `ALPHA_GRID[a]`;
/// ties go to the smaller alpha. Exact, by dynamic programming over severities.
fn rising_alphas(hits: &[Vec<usize>]) -> [f32; 5] {
    let n = ALPHA_GRID.len();
    // best[s][a]: most hits over severities 0..=s with alpha a at severity s,
    // and the alpha at s - 1 that achieved it.
    let mut best: Vec<Vec<(usize, usize)>> = Vec::with_capacity(5);
    for s in 0..5 {
        let row = (0..n)
            .map(|a| match s {
                0 => (hits[0][a], 0),
                _ => {
                    let (prev, from) = (0..=a)
                        .map(|p| (best[s - 1][p].0, p))
                        .max_by_key(|&(h, p)| (h, std::cmp::Reverse(p)))
                        .unwrap_or((0, 0));
                    (prev + hits[s][a], from)
                }
            })
            .collect();
        best.push(row);
    }
    let mut a = (0..n)
        .max_by_key(|&a| (best[4][a].0, std::cmp::Reverse(a)))
        .unwrap_or(0);
    let mut five = [0f32; 5];
    for s in (0..5).rev() {
        five[s] = ALPHA_GRID[a];
        a = best[s][a].1;
    }
    five
}

/// Tunes the `auto` policy on held-out samples: per kind, the alphas of
/// [`ALPHA_GRID`] by severity that classify most of them right, never falling
/// as severity rises ([`rising_alphas`]); then the threshold of
/// [`THRESHOLD_GRID`]. The held-out kinds alone favour the lowest threshold, so
/// it is chosen on them and on their corrupted images once more as a detector
/// that never saw their kind might take them ([`without_kind`]): first so that
/// no kind served so falls more than `o.unseen_margin` points below the clean
/// model (or the least below, when none does), then for the most images right
/// in both. `signatures[k]` is the signature of `kinds[k]`. Returns the policy
/// and, per kind, its images served as unseen.
pub fn tune_policy(
    detector: &Detector,
    model: &Model,
    kinds: &[Corruption],
    signatures: &[Arc<Signature>],
    held: &[Sample],
    o: &DetectorOptions,
) -> Result<(Policy, BTreeMap<String, Unseen>)> {
    let right = correctness(model, signatures, held)?;
    let mut alphas = BTreeMap::new();
    for (k, kind) in kinds.iter().enumerate() {
        // hits[s][a]: held-out images of this kind at severity s+1 classified
        // right with alpha ALPHA_GRID[a].
        let hits: Vec<Vec<usize>> = (1..=5u8)
            .map(|sev| {
                let of: Vec<usize> = (0..held.len())
                    .filter(|&i| held[i].kind == k + 1 && held[i].severity == sev)
                    .collect();
                (0..ALPHA_GRID.len())
                    .map(|a| of.iter().filter(|&&i| right[i][k][a]).count())
                    .collect()
            })
            .collect();
        let five = rising_alphas(&hits);
        alphas.insert(kind.name().to_string(), five);
    }
    let known: Vec<Detection> = held
        .iter()
        .map(|s| detector.detect_features(&s.features))
        .collect();
    let unseen: Vec<(usize, Detection)> = held
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind > 0)
        .map(|(i, s)| (i, without_kind(detector, &known[i], &s.features, s.kind)))
        .collect();
    let tuned = THRESHOLD_GRID.map(|threshold| {
        let policy = Policy {
            threshold,
            alphas: alphas.clone(),
        };
        let served = |i: usize, d: &Detection| {
            served_right(&right[i], kinds, &policy.choose(d, &detector.kinds))
        };
        let mut per_kind = BTreeMap::new();
        for (k, kind) in kinds.iter().enumerate() {
            let of = unseen.iter().filter(|(i, _)| held[*i].kind == k + 1);
            let tally = of.fold(Unseen::default(), |t, (i, d)| Unseen {
                images: t.images + 1,
                clean_model: t.clean_model + usize::from(right[*i][0][0]),
                auto: t.auto + usize::from(served(*i, d)),
            });
            per_kind.insert(kind.name().to_string(), tally);
        }
        let worst = per_kind
            .values()
            .map(Unseen::margin)
            .fold(f64::INFINITY, f64::min)
            .min(-o.unseen_margin);
        let right_known = known.iter().enumerate().filter(|(i, d)| served(*i, d));
        let correct = right_known.count() + per_kind.values().map(|t| t.auto).sum::<usize>();
        ((worst, correct), policy, per_kind)
    });
    // The best score; of equals, the lowest threshold.
    let (_, policy, unseen) = (tuned.into_iter())
        .reduce(|best, t| if t.0 > best.0 { t } else { best })
        .expect("THRESHOLD_GRID is not empty");
    Ok((policy, unseen))
}

/// What a detector trained without `kind` might say of an image of it: that
/// kind's probability taken out and the rest renormalized, familiarity judged
/// against the new top kind.
fn without_kind(detector: &Detector, d: &Detection, features: &[f32], kind: usize) -> Detection {
    let rest = (1.0 - d.probs[kind]).max(f32::MIN_POSITIVE);
    let probs: Vec<f32> = (0..d.probs.len())
        .map(|k| if k == kind { 0.0 } else { d.probs[k] / rest })
        .collect();
    let top = (0..probs.len())
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(b.cmp(&a)))
        .unwrap_or(0);
    Detection {
        familiar: detector.distance(features, top) <= detector.kind_limit[top],
        probs,
        severity: d.severity,
    }
}

/// Whether the image whose [`correctness`] row is `right` is classified right
/// when served as `choice` says; `kinds[k]` is the signature of row `k`.
fn served_right(right: &[Vec<bool>], kinds: &[Corruption], choice: &AutoChoice) -> bool {
    match choice.signatures.first() {
        None => right[0][0],
        Some(r) => {
            let k = kinds.iter().position(|c| c.name() == r.name).unwrap_or(0);
            let a = ALPHA_GRID.iter().position(|x| *x == r.alpha).unwrap_or(0);
            right[k][a]
        }
    }
}

/// How many images of a group each way of serving them classified right.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub images: usize,
    pub clean_model: usize,
    pub auto: usize,
    /// The true kind's signature at alpha 1 (clean images served clean).
    pub oracle: usize,
    /// The single profile (one kind at alpha 1) that serves the whole stream best.
    pub best_fixed: usize,
}

/// A way of serving a stream's images, as a [`Tally`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    CleanModel,
    Auto,
    Oracle,
    BestFixed,
}

impl Way {
    pub const ALL: [Way; 4] = [Way::CleanModel, Way::Auto, Way::Oracle, Way::BestFixed];

    pub fn name(self) -> &'static str {
        match self {
            Way::CleanModel => "clean model",
            Way::Auto => "auto",
            Way::Oracle => "oracle",
            Way::BestFixed => "best fixed",
        }
    }
}

impl Tally {
    /// Accuracy of `way`, in percent (0 without images).
    pub fn percent(&self, way: Way) -> f64 {
        let hits = match way {
            Way::CleanModel => self.clean_model,
            Way::Auto => self.auto,
            Way::Oracle => self.oracle,
            Way::BestFixed => self.best_fixed,
        };
        100.0 * hits as f64 / self.images.max(1) as f64
    }
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, o: Tally) -> Tally {
        Tally {
            images: self.images + o.images,
            clean_model: self.clean_model + o.clean_model,
            auto: self.auto + o.auto,
            oracle: self.oracle + o.oracle,
            best_fixed: self.best_fixed + o.best_fixed,
        }
    }
}

/// The images of one corruption kind at one severity (`clean`, severity 0, for
/// clean images) in a served stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamGroup {
    pub kind: String,
    pub severity: u8,
    pub tally: Tally,
    /// How often `auto` served them with each signature (`clean` for none).
    pub chose: BTreeMap<String, usize>,
}

/// One stream of samples served every [`Way`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stream {
    /// The name of the best single profile.
    pub best_fixed: String,
    pub groups: Vec<StreamGroup>,
}

impl Stream {
    /// The groups `keep` selects, summed.
    pub fn tally(&self, keep: impl Fn(&StreamGroup) -> bool) -> Tally {
        self.groups
            .iter()
            .filter(|g| keep(g))
            .fold(Tally::default(), |t, g| t + g.tally)
    }

    /// What `auto` served the groups `keep` selects with, most often first.
    pub fn chose(&self, keep: impl Fn(&StreamGroup) -> bool) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for g in self.groups.iter().filter(|g| keep(g)) {
            for (c, n) in &g.chose {
                *counts.entry(c.as_str()).or_default() += n;
            }
        }
        let mut counts: Vec<(String, usize)> = counts
            .into_iter()
            .map(|(c, n)| (c.to_string(), n))
            .collect();
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }
}

/// What `rws train-detector` measured, saved as JSON for `rws eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoReport {
    /// The training run's seed, which the detector and its test stream drew from.
    pub seed: u64,
    /// The kind the detector was trained without, if any.
    pub holdout: Option<String>,
    pub detector: Report,
    /// The test stream, when one was served.
    pub stream: Option<Stream>,
}

/// Serves `stream` every [`Way`], with the policy the detector
/// carries. `signatures[k]` is the signature of `kinds[k]`, the kinds the
/// stream's samples index.
pub fn serve_stream(
    detector: &Detector,
    model: &Model,
    kinds: &[Corruption],
    signatures: &[Arc<Signature>],
    stream: &[Sample],
) -> Result<Stream> {
    let policy = Policy::from_metadata(&detector.metadata)?;
    let right = correctness(model, signatures, stream)?;
    let one = ALPHA_GRID.iter().position(|a| *a == 1.0).unwrap_or(0);
    let (best_fixed, best_name) = (0..kinds.len())
        .map(|k| (right.iter().filter(|r| r[k][one]).count(), k))
        .max_by_key(|&(hits, k)| (hits, std::cmp::Reverse(k)))
        .map(|(_, k)| (k, kinds[k].name().to_string()))
        .unwrap_or((0, String::new()));
    let mut groups: BTreeMap<(usize, u8), StreamGroup> = BTreeMap::new();
    for (s, right) in stream.iter().zip(&right) {
        let choice = policy.choose(&detector.detect_features(&s.features), &detector.kinds);
        let chose = choice
            .signatures
            .first()
            .map_or_else(|| "clean".to_string(), |r| r.name.clone());
        let g = groups
            .entry((s.kind, s.severity))
            .or_insert_with(|| StreamGroup {
                kind: match s.kind {
                    0 => "clean".to_string(),
                    k => kinds[k - 1].name().to_string(),
                },
                severity: s.severity,
                tally: Tally::default(),
                chose: BTreeMap::new(),
            });
        g.tally = g.tally
            + Tally {
                images: 1,
                clean_model: usize::from(right[0][0]),
                auto: usize::from(served_right(right, kinds, &choice)),
                oracle: usize::from(match s.kind {
                    0 => right[0][0],
                    k => right[k - 1][one],
                }),
                best_fixed: usize::from(right[best_fixed][one]),
            };
        *g.chose.entry(chose).or_default() += 1;
    }
    Ok(Stream {
        best_fixed: best_name,
        groups: groups.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kinds clean, fog and snow; each kind's statistics centred on 0 with
    /// unit spread; fog familiar only within a squared z-score of 1.
    fn detector() -> Detector {
        Detector {
            kinds: ["clean", "fog", "snow"].map(String::from).to_vec(),
            base_fingerprint: String::new(),
            feature_mean: vec![0.0; FEATURES],
            feature_std: vec![1.0; FEATURES],
            w1: vec![0.0; FEATURES],
            b1: vec![0.0],
            w2: vec![0.0; 3],
            b2: vec![0.0; 3],
            ws: vec![0.0],
            bs: 3.0,
            kind_mean: vec![0.0; 3 * FEATURES],
            kind_std: vec![1.0; 3 * FEATURES],
            kind_limit: vec![f32::INFINITY, 1.0, f32::INFINITY],
            metadata: Default::default(),
        }
    }

    #[test]
    fn an_unseen_kinds_images_go_to_the_next_likeliest_kind_if_familiar() {
        let d = detector();
        let mut features = vec![0.0; FEATURES];
        features[0] = 2.0;
        let seen = Detection {
            probs: vec![0.1, 0.3, 0.6],
            severity: 2.4,
            familiar: true,
        };
        // Without snow: fog at 0.3 / 0.4, but 2 standard deviations off fog's.
        let no_snow = without_kind(&d, &seen, &features, 2);
        let near = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(
            near(&no_snow.probs, &[0.25, 0.75, 0.0]),
            "{:?}",
            no_snow.probs
        );
        assert!(!no_snow.familiar);
        assert_eq!(no_snow.severity, 2.4);
        // Without fog: snow at 0.6 / 0.7, familiar with any statistics.
        let no_fog = without_kind(&d, &seen, &features, 1);
        assert!(near(&no_fog.probs, &[0.1 / 0.7, 0.0, 0.6 / 0.7]) && no_fog.familiar);
        // Served so: snow at severity 2's alpha, or clean below the threshold.
        let policy = Policy {
            threshold: 0.8,
            alphas: [("snow".to_string(), [0.25, 0.5, 0.75, 1.0, 1.25])].into(),
        };
        let choice = policy.choose(&no_fog, &d.kinds);
        assert_eq!(choice.signatures[0].alpha, 0.5);
        // right[kind][alpha]: snow's signature (row 1) at alpha 0.5 (column 2).
        let mut right = vec![vec![false; ALPHA_GRID.len()]; 2];
        right[1][2] = true;
        let kinds = [Corruption::Fog, Corruption::Snow];
        assert!(served_right(&right, &kinds, &choice));
        let unsure = Policy {
            threshold: 0.9,
            ..policy
        };
        assert!(!served_right(
            &right,
            &kinds,
            &unsure.choose(&no_fog, &d.kinds)
        ));
    }

    #[test]
    fn alphas_rise_with_severity_and_maximize_hits() {
        // Severity 2 alone would pick alpha 0.25 (index 1) after 1.0 at
        // severity 1; rising, 1.0 at both loses 1 hit there but no more.
        let mut hits = vec![vec![0usize; ALPHA_GRID.len()]; 5];
        hits[0][4] = 10;
        hits[1][1] = 10;
        hits[1][4] = 9;
        hits[2][4] = 10;
        hits[3][5] = 10;
        hits[4][6] = 10;
        assert_eq!(rising_alphas(&hits), [1.0, 1.0, 1.0, 1.25, 1.5]);
        // No data: the smallest alpha everywhere.
        let none = vec![vec![0usize; ALPHA_GRID.len()]; 5];
        assert_eq!(rising_alphas(&none), [0.0; 5]);
    }
}
