//! `rws train-detector`: trains the corruption detector that the `auto` profile
//! consults (see [`crate::model::detector`]) on the training digits, each seen
//! clean and under random corruptions at severities 1 to 5, with fixed seeds.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rayon::prelude::*;

use crate::lab::corrupt::Corruption;
use crate::lab::data::Digits;
use crate::lab::train::shuffled;
use crate::model::detector::{Detector, FEATURES, features};
use crate::model::repo::ModelConfig;
use crate::rng::Rng;
use crate::{Result, bail};

/// One training or evaluation example: an image's statistics and its truth.
#[derive(Debug, Clone)]
pub struct Sample {
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
    let mut feature_std = vec![0f32; FEATURES];
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
    Ok(Detector {
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
        metadata: Default::default(),
    })
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

/// How a trained detector did on the digits held out of its training.
#[derive(Debug, Clone)]
pub struct Report {
    pub train_samples: usize,
    pub held_out_samples: usize,
    /// Share of held-out examples whose kind (or "clean") it names.
    pub accuracy: f32,
    /// Mean absolute severity error on the corrupted held-out examples.
    pub severity_error: f32,
}

/// Draws the examples, holds every fifth digit out, trains on the rest and
/// scores on the held-out ones.
pub fn run(
    digits: &Digits,
    cfg: &ModelConfig,
    base_fingerprint: &str,
    o: &DetectorOptions,
) -> Result<(Detector, Report)> {
    let all = samples(digits, cfg, o);
    let copies = o.copies.max(1);
    let (held, fit): (Vec<(usize, Sample)>, Vec<(usize, Sample)>) = all
        .into_iter()
        .enumerate()
        .partition(|(n, _)| (n / copies) % 5 == 4);
    let fit: Vec<Sample> = fit.into_iter().map(|(_, s)| s).collect();
    let held: Vec<Sample> = held.into_iter().map(|(_, s)| s).collect();
    let detector = train(&fit, &o.kinds, base_fingerprint, o)?;
    let (accuracy, severity_error) = score(&detector, &held);
    Ok((
        detector,
        Report {
            train_samples: fit.len(),
            held_out_samples: held.len(),
            accuracy,
            severity_error,
        },
    ))
}
