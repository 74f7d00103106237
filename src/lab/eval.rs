//! The evaluation behind docs/RESULTS.md: every claim of the RWS method checked
//! on held-out digits, through the same code path the server uses (folded base,
//! fused add-scale kernel, profile registry).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde::Serialize;

use crate::lab::corrupt::Corruption;
use crate::lab::data::Digits;
use crate::lab::extract::{self, Checkpoint, Extraction};
use crate::lab::stats::mean;
use crate::lab::train::{self, Batchable, RunInfo, Severity};
use crate::model::repo::ModelConfig;
use crate::model::{Model, Stem};
use crate::patch::quant::Quant;
use crate::patch::signature::Signature;
use crate::serve::change::Change;
use crate::serve::profile::{CLEAN, Origin, SignatureRef};
use crate::serve::registry::Registry;
use crate::{Error, Result};

/// Alphas of the sweep.
pub const ALPHAS: [f32; 7] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5];

/// A trained run: `model.toml`, [`RunInfo`] and the checkpoints `rws train` writes.
pub struct Run {
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub info: RunInfo,
    pub pre: Checkpoint,
    pub std: Checkpoint,
    pub std_v2: Checkpoint,
    pub robust: BTreeMap<Corruption, Checkpoint>,
}

impl Run {
    pub fn load(dir: &Path) -> Result<Run> {
        let cfg = ModelConfig::load(&dir.join("model.toml"))?;
        let ck = |role: &str| extract::load_checkpoint(&dir.join(train::checkpoint_name(role)));
        let mut robust = BTreeMap::new();
        for kind in Corruption::ALL {
            let path = dir.join(train::checkpoint_name(&format!("rob-{kind}")));
            if path.exists() {
                robust.insert(kind, extract::load_checkpoint(&path)?);
            }
        }
        if robust.is_empty() {
            return Err(Error::NotFound(format!(
                "no rob-*.safetensors in {}; run `rws train` first",
                dir.display()
            )));
        }
        Ok(Run {
            dir: dir.to_path_buf(),
            cfg,
            info: RunInfo::load(dir)?,
            pre: ck("pre")?,
            std: ck("std")?,
            std_v2: ck("std_v2")?,
            robust,
        })
    }

    /// `rws analyze`'s report for this run.
    pub fn analyze(&self, blocks: usize) -> Result<String> {
        let robust: Vec<(String, Checkpoint)> = self
            .robust
            .iter()
            .map(|(k, c)| (k.to_string(), c.clone()))
            .collect();
        extract::analyze(&self.cfg, &self.pre, &self.std, &robust, blocks)
    }

    /// The signature of `kind` against theta_std.
    pub fn signature(
        &self,
        kind: Corruption,
        blocks: usize,
        quant: Quant,
        batch_norm: bool,
    ) -> Result<Arc<Signature>> {
        extract::extract(&Extraction {
            cfg: &self.cfg,
            pre: &self.pre,
            std: &self.std,
            robust: &self.robust[&kind],
            served: &self.std,
            blocks,
            quant,
            batch_norm,
            corruption: kind.to_string(),
            default_alpha: 1.0,
        })
        .map(Arc::new)
    }
}

/// A served model: the folded base plus a way to patch its stem.
pub struct Served {
    pub model: Arc<Model>,
}

impl Served {
    pub fn new(cfg: &ModelConfig, ck: &Checkpoint) -> Result<Served> {
        Ok(Served {
            model: Arc::new(Model::from_tensors(cfg.clone(), ck, &Device::Cpu)?),
        })
    }

    pub fn stem(&self, patches: &[(&Arc<Signature>, f32)]) -> Result<Stem> {
        self.model.materialize(patches)
    }

    /// Logits for every image, batch by batch.
    pub fn logits(&self, stem: &Stem, data: &Batchable) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(data.len() * self.model.config.labels.len());
        let idx: Vec<usize> = (0..data.len()).collect();
        for chunk in idx.chunks(256) {
            let (x, _) = data.batch(chunk, &self.model.config, self.model.device())?;
            out.extend(
                self.model
                    .forward(stem, &x)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    /// Top-1 accuracy in percent.
    pub fn accuracy(&self, stem: &Stem, data: &Batchable) -> Result<f64> {
        let logits = self.logits(stem, data)?;
        let classes = self.model.config.labels.len();
        let correct = logits
            .chunks(classes)
            .zip(&data.y)
            .filter(|(l, y)| {
                let best = l
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i);
                best == Some(**y as usize)
            })
            .count();
        Ok(100.0 * correct as f64 / data.len().max(1) as f64)
    }

    pub fn accuracy_with(
        &self,
        patches: &[(&Arc<Signature>, f32)],
        data: &Batchable,
    ) -> Result<f64> {
        self.accuracy(&self.stem(patches)?, data)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PerCorruption {
    pub kind: String,
    pub weather: bool,
    pub severity: u8,
    /// Accuracies in percent on the corrupted test set.
    pub std_corrupted: f64,
    pub rob_corrupted: f64,
    pub patched_corrupted: f64,
    /// ... and on the clean test set.
    pub std_clean: f64,
    pub rob_clean: f64,
    pub patched_clean: f64,
    /// Patched accuracy with conv deltas only (no BatchNorm deltas).
    pub patched_conv_only_corrupted: f64,
    /// Outputs after applying then removing the signature equal the clean outputs bit for bit.
    pub removal_bitwise: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub kind: String,
    pub alphas: Vec<f32>,
    pub clean: Vec<f64>,
    pub corrupted: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Composition {
    pub kinds: [String; 2],
    pub std: f64,
    pub first: f64,
    pub second: f64,
    pub both: f64,
    pub both_clean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub kind: String,
    pub v2_corrupted: f64,
    pub v2_patched_corrupted: f64,
    pub v2_clean: f64,
    pub v2_patched_clean: f64,
    pub std_patched_corrupted: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quantization {
    pub kind: String,
    /// (quant, bytes, accuracy on corrupted data)
    pub forms: Vec<(String, usize, f64)>,
}

/// A fogged test digit the clean model gets wrong and the fog profile gets right.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Showcase {
    pub label: u8,
    pub clean_says: usize,
    pub fog_says: usize,
    pub severity: u8,
    #[serde(skip)]
    pub image: Option<image::GrayImage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The run's training seed and digits.
    pub seed: u64,
    pub train_digits: usize,
    pub showcase: Option<Showcase>,
    pub test_digits: usize,
    pub blocks: usize,
    pub checkpoint_bytes: usize,
    pub shallow_params: usize,
    pub total_params: usize,
    pub per_corruption: Vec<PerCorruption>,
    pub sweeps: Vec<Sweep>,
    pub compositions: Vec<Composition>,
    pub transfer: Vec<Transfer>,
    pub quantization: Vec<Quantization>,
}

pub struct EvalOptions {
    pub blocks: usize,
    /// Pairs evaluated together on doubly corrupted data.
    pub pairs: Vec<(Corruption, Corruption)>,
    pub seed: u64,
}

pub const SWEEP_SEVERITY: u8 = 3;

/// Weather-then-sensor pairs for the composition study.
pub fn default_pairs() -> Vec<(Corruption, Corruption)> {
    use Corruption::*;
    vec![
        (Fog, GaussianNoise),
        (Snow, MotionBlur),
        (Rain, ImpulseNoise),
        (Contrast, Pixelate),
    ]
}

/// Runs the whole evaluation on `test`.
pub fn evaluate(run: &Run, test: &Digits, o: &EvalOptions) -> Result<Results> {
    let cfg = &run.cfg;
    let std = Served::new(cfg, &run.std)?;
    let v2 = Served::new(cfg, &run.std_v2)?;
    let clean = train::prepare(test, cfg, &[], Severity::Fixed(1), o.seed);
    let corrupted = |kinds: &[Corruption], sev: u8| {
        train::prepare(test, cfg, kinds, Severity::Fixed(sev), o.seed)
    };
    let std_clean = std.accuracy_with(&[], &clean)?;
    let v2_clean = v2.accuracy_with(&[], &clean)?;

    let mut sigs: BTreeMap<Corruption, Arc<Signature>> = BTreeMap::new();
    let mut per_corruption = Vec::new();
    let mut sweeps = Vec::new();
    let mut transfer = Vec::new();
    let mut quantization = Vec::new();
    for (&kind, rob_ck) in &run.robust {
        tracing::info!(%kind, "evaluating");
        let rob = Served::new(cfg, rob_ck)?;
        let sig = run.signature(kind, o.blocks, Quant::Int8, true)?;
        let conv_only = run.signature(kind, o.blocks, Quant::Int8, false)?;
        let rob_clean = rob.accuracy_with(&[], &clean)?;
        let patched_clean = std.accuracy_with(&[(&sig, 1.0)], &clean)?;
        let removal_bitwise = removal_is_bitwise(&std, &sig, &clean)?;
        for severity in [3, 5] {
            let data = corrupted(&[kind], severity);
            per_corruption.push(PerCorruption {
                kind: kind.to_string(),
                weather: kind.is_weather(),
                severity,
                std_corrupted: std.accuracy_with(&[], &data)?,
                rob_corrupted: rob.accuracy_with(&[], &data)?,
                patched_corrupted: std.accuracy_with(&[(&sig, 1.0)], &data)?,
                std_clean,
                rob_clean,
                patched_clean,
                patched_conv_only_corrupted: std.accuracy_with(&[(&conv_only, 1.0)], &data)?,
                removal_bitwise,
            });
        }
        let data = corrupted(&[kind], SWEEP_SEVERITY);
        let mut sweep = Sweep {
            kind: kind.to_string(),
            alphas: ALPHAS.to_vec(),
            clean: vec![],
            corrupted: vec![],
        };
        for a in ALPHAS {
            sweep.clean.push(std.accuracy_with(&[(&sig, a)], &clean)?);
            sweep
                .corrupted
                .push(std.accuracy_with(&[(&sig, a)], &data)?);
        }
        sweeps.push(sweep);
        transfer.push(Transfer {
            kind: kind.to_string(),
            v2_corrupted: v2.accuracy_with(&[], &data)?,
            v2_patched_corrupted: v2.accuracy_with(&[(&sig, 1.0)], &data)?,
            v2_clean,
            v2_patched_clean: v2.accuracy_with(&[(&sig, 1.0)], &clean)?,
            std_patched_corrupted: std.accuracy_with(&[(&sig, 1.0)], &data)?,
        });
        let mut forms = Vec::new();
        for q in [Quant::F32, Quant::F16, Quant::Int8, Quant::Int4] {
            let s = run.signature(kind, o.blocks, q, true)?;
            forms.push((
                q.to_string(),
                s.stored_bytes(),
                std.accuracy_with(&[(&s, 1.0)], &data)?,
            ));
        }
        quantization.push(Quantization {
            kind: kind.to_string(),
            forms,
        });
        sigs.insert(kind, sig);
    }

    let mut compositions = Vec::new();
    for &(a, b) in &o.pairs {
        let (Some(sa), Some(sb)) = (sigs.get(&a), sigs.get(&b)) else {
            continue;
        };
        let data = corrupted(&[a, b], SWEEP_SEVERITY);
        compositions.push(Composition {
            kinds: [a.to_string(), b.to_string()],
            std: std.accuracy_with(&[], &data)?,
            first: std.accuracy_with(&[(sa, 1.0)], &data)?,
            second: std.accuracy_with(&[(sb, 1.0)], &data)?,
            both: std.accuracy_with(&[(sa, 1.0), (sb, 1.0)], &data)?,
            both_clean: std.accuracy_with(&[(sa, 1.0), (sb, 1.0)], &clean)?,
        });
    }

    let checkpoint_bytes = std::fs::metadata(run.dir.join(train::checkpoint_name("std")))
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let total_params = cfg
        .arch
        .tensor_shapes(cfg.channels, cfg.labels.len())
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let shallow_params = extract::shallow_tensors(cfg, o.blocks)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let showcase = match sigs.get(&Corruption::Fog) {
        Some(sig) => showcase(&std, sig, test, Corruption::Fog, 5, o.seed)?,
        None => None,
    };
    Ok(Results {
        seed: run.info.seed,
        train_digits: run.info.train_digits,
        showcase,
        test_digits: test.len(),
        blocks: o.blocks,
        checkpoint_bytes,
        shallow_params,
        total_params,
        per_corruption,
        sweeps,
        compositions,
        transfer,
        quantization,
    })
}

/// Applies `sig` through a real profile registry, removes it, and compares the
/// clean logits before and after bit for bit.
fn removal_is_bitwise(served: &Served, sig: &Arc<Signature>, data: &Batchable) -> Result<bool> {
    let registry = Registry::new(served.model.clone(), 4)?;
    let logits = |registry: &Registry| -> Result<Vec<u32>> {
        let table = registry.snapshot();
        let profile = table.profile(None)?;
        let stem = registry.stem(&table, profile)?;
        Ok(served
            .logits(&stem, data)?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    let before = logits(&registry)?;
    registry.load("s", sig.clone(), Origin::memory(false), &Default::default())?;
    let refs = vec![SignatureRef {
        name: "s".into(),
        alpha: 1.0,
    }];
    registry.apply(&Change::put("p", refs, false), &Default::default())?;
    registry.apply(&Change::SetDefault("p".into()), &Default::default())?;
    let patched = logits(&registry)?;
    registry.apply(&Change::SetDefault(CLEAN.into()), &Default::default())?;
    registry.apply(&Change::Delete("p".into()), &Default::default())?;
    registry.apply(&Change::Unload("s".into()), &Default::default())?;
    Ok(before == logits(&registry)? && patched != before)
}

impl Results {
    /// Mean gain of the patch over the unpatched base on corrupted data, per severity.
    pub fn mean_gain(&self, severity: u8) -> f64 {
        mean(
            self.per_corruption
                .iter()
                .filter(|r| r.severity == severity)
                .map(|r| r.patched_corrupted - r.std_corrupted),
        )
    }

    /// Mean share of the robust model's gain that the shallow patch recovers.
    pub fn recovery(&self, severity: u8) -> f64 {
        mean(
            self.per_corruption
                .iter()
                .filter(|r| r.severity == severity && r.rob_corrupted > r.std_corrupted)
                .map(|r| {
                    (r.patched_corrupted - r.std_corrupted) / (r.rob_corrupted - r.std_corrupted)
                }),
        )
    }

    /// The rows, their labels and the sizes, which every seed of a study
    /// must share for its rows to be averaged.
    pub(crate) fn layout(&self) -> String {
        let rows: Vec<String> = (self.per_corruption.iter())
            .map(|r| format!("{} {}", r.kind, r.severity))
            .chain(
                self.sweeps
                    .iter()
                    .map(|w| format!("{} {:?}", w.kind, w.alphas)),
            )
            .chain(self.compositions.iter().map(|c| c.kinds.join("+")))
            .chain(self.transfer.iter().map(|t| t.kind.clone()))
            .chain(self.quantization.iter().map(|q| {
                let forms: Vec<String> =
                    q.forms.iter().map(|f| format!("{} {}", f.0, f.1)).collect();
                format!("{} {}", q.kind, forms.join(" "))
            }))
            .collect();
        format!(
            "{} test digits, {} blocks, {} B checkpoint: {}",
            self.test_digits,
            self.blocks,
            self.checkpoint_bytes,
            rows.join(", ")
        )
    }
}

/// The first test digit that the clean model gets wrong under `kind` and the
/// patched model gets right, as the 8-bit image a client would send.
fn showcase(
    served: &Served,
    sig: &Arc<Signature>,
    test: &Digits,
    kind: Corruption,
    severity: u8,
    seed: u64,
) -> Result<Option<Showcase>> {
    let cfg = &served.model.config;
    let clean = served.stem(&[])?;
    let patched = served.stem(&[(sig, 1.0)])?;
    for i in 0..test.len() {
        let img = kind.apply(&test.gray(i), severity, seed).to_luma();
        let x: Vec<f32> = img
            .pixels()
            .map(|p| (f32::from(p.0[0]) / 255.0 - cfg.mean[0]) / cfg.std[0])
            .collect();
        let one = Batchable {
            x,
            y: vec![u32::from(test.labels[i])],
            size: crate::lab::data::PIXELS,
            teacher: None,
        };
        let predict = |stem: &Stem| -> Result<usize> {
            let l = served.logits(stem, &one)?;
            Ok(l.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap_or(0))
        };
        let (clean_says, fog_says) = (predict(&clean)?, predict(&patched)?);
        let label = test.labels[i];
        if clean_says != label as usize && fog_says == label as usize {
            return Ok(Some(Showcase {
                label,
                clean_says,
                fog_says,
                severity,
                image: Some(img),
            }));
        }
    }
    Ok(None)
}
