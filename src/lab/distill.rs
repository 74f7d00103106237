//! Signatures for a model whose training data you do not have: distillation
//! under corruption. Only the patchable stem fine-tunes, so that on a corrupted
//! photo the model says what the clean model says on the same photo clean. The
//! data is what any user has: a few unlabelled photos, cut into random crops and
//! flips. The same fine-tune on the clean crops gives `theta_std`, and
//! [`crate::lab::extract`] makes the signature as usual, against the served base.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use image::{RgbImage, imageops};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::lab::corrupt::{Corruption, Rgb, read_image};
use crate::lab::eval::Served;
use crate::lab::extract::{Checkpoint, load_checkpoint};
use crate::lab::stats::wilson;
use crate::lab::train::{Batchable, Losses, Net, Schedule, checkpoint_name};
use crate::model::repo::ModelConfig;
use crate::patch::signature::Signature;
use crate::rng::Rng;
use crate::{Error, Result, bail};

/// How a distillation run goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillOptions {
    pub kinds: Vec<Corruption>,
    /// Random crops cut from the photos, the pool every fine-tune draws from.
    pub crops: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

/// What a run was made from, written beside its checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillInfo {
    pub photos: Vec<String>,
    pub options: DistillOptions,
    /// KL divergence from the teacher, per run.
    pub losses: Vec<(String, Losses)>,
}

/// `n` random crops of `side`×`side`: a photo drawn uniformly, a region of 25 to
/// 100% of its area with an aspect ratio between 3:4 and 4:3, mirrored half of
/// the time, resized as serving resizes.
pub fn random_crops(photos: &[RgbImage], side: u32, n: usize, seed: u64) -> Vec<Rgb> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let photo = &photos[rng.next_u64() as usize % photos.len()];
            let (w, h) = (photo.width() as f32, photo.height() as f32);
            let area = w * h * (0.25 + 0.75 * rng.uniform());
            let aspect = ((4f32 / 3.0).ln() * (2.0 * rng.uniform() - 1.0)).exp();
            let cw = ((area * aspect).sqrt().round()).clamp(1.0, w);
            let ch = ((area / aspect).sqrt().round()).clamp(1.0, h);
            let x = ((w - cw) * rng.uniform()).floor() as u32;
            let y = ((h - ch) * rng.uniform()).floor() as u32;
            let crop = imageops::crop_imm(photo, x, y, cw as u32, ch as u32).to_image();
            let mut crop = imageops::resize(&crop, side, side, imageops::FilterType::Triangle);
            if rng.uniform() < 0.5 {
                imageops::flip_horizontal_in_place(&mut crop);
            }
            Rgb::from_rgb8(&crop)
        })
        .collect()
}

/// Images as network input, each first corrupted by `kind` (none = clean) with
/// a severity drawn from `severities` and a seed of its own.
pub fn prepare(
    images: &[Rgb],
    cfg: &ModelConfig,
    kind: Option<Corruption>,
    severities: &[u8],
    seed: u64,
) -> Batchable {
    let x: Vec<Vec<f32>> = (images.par_iter().enumerate())
        .map(|(i, img)| {
            let image_seed = seed ^ ((i as u64) << 20);
            let img = match kind {
                Some(k) => {
                    let pick = Rng::new(image_seed).next_u64() as usize % severities.len();
                    k.apply_rgb(img, severities[pick], image_seed)
                }
                None => img.clone(),
            };
            normalize(&img, cfg)
        })
        .collect();
    Batchable {
        size: x.first().map_or(0, Vec::len),
        x: x.concat(),
        y: vec![0; images.len()],
        teacher: None,
    }
}

fn normalize(img: &Rgb, cfg: &ModelConfig) -> Vec<f32> {
    let plane = img.width * img.height;
    (img.planes.iter().enumerate())
        .map(|(i, v)| (v - cfg.mean[i / plane]) / cfg.std[i / plane])
        .collect()
}

/// Loads `model_dir`'s config and base weights, checking that it takes RGB.
pub fn load_model(model_dir: &Path) -> Result<(ModelConfig, Checkpoint)> {
    let cfg = ModelConfig::load(&model_dir.join("model.toml"))?;
    if cfg.channels != 3 {
        bail!(
            InvalidArgument,
            "{} takes {} channel(s); distillation on photos needs an RGB model",
            model_dir.display(),
            cfg.channels
        );
    }
    Ok((cfg, load_checkpoint(&model_dir.join("base.safetensors"))?))
}

/// Fine-tunes the stem of the model in `model_dir` on crops of `photos`: once
/// clean (`std`), and once per corruption (`rob-<kind>`, severities 1 to 5
/// mixed), every run from the base weights with the same crops, order and
/// seed, so that only the corruption differs. Writes the checkpoints, the
/// config and [`DistillInfo`] into `out`.
pub fn run(model_dir: &Path, photos: &[PathBuf], o: &DistillOptions, out: &Path) -> Result<()> {
    if photos.is_empty() || o.crops == 0 || o.batch == 0 {
        bail!(
            InvalidArgument,
            "distillation needs photos, crops and a batch size"
        );
    }
    let (cfg, base) = load_model(model_dir)?;
    let [h, w] = cfg.input_size;
    if h != w {
        bail!(
            InvalidArgument,
            "distillation crops squares; the model takes {h}x{w}"
        );
    }
    let rgb = (photos.iter())
        .map(|p| Ok(read_image(p)?.to_rgb8()))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let crops = random_crops(&rgb, w as u32, o.crops, o.seed);
    tracing::info!(
        crops = crops.len(),
        "teacher: the clean model on the clean crops"
    );
    let served = Served::new(&cfg, &base)?;
    let mut clean = prepare(&crops, &cfg, None, &[1], o.seed);
    let teacher = served.logits(&served.stem(&[])?, &clean)?;
    clean.teacher = Some(teacher.clone());

    let schedule = Schedule {
        steps: o.steps,
        batch: o.batch,
        lr: o.lr,
        seed: o.seed + 1,
    };
    let mut losses = Vec::new();
    let mut finetune = |data: &Batchable, role: &str| -> Result<()> {
        let net = Net::stem_only(&cfg, &base, &Device::Cpu)?;
        let loss = net.fit(&cfg, data, &schedule, role)?;
        losses.push((role.to_string(), loss));
        candle_core::safetensors::save(&net.tensors()?, out.join(checkpoint_name(role)))?;
        Ok(())
    };
    finetune(&clean, "std")?;
    drop(clean);
    for &kind in &o.kinds {
        let mut data = prepare(&crops, &cfg, Some(kind), &[1, 2, 3, 4, 5], o.seed + 2);
        data.teacher = Some(teacher.clone());
        finetune(&data, &format!("rob-{kind}"))?;
    }
    let toml = toml::to_string_pretty(&cfg).map_err(|e| Error::Internal(e.to_string()))?;
    crate::fsutil::write_atomic(&out.join("model.toml"), toml.as_bytes())?;
    let info = DistillInfo {
        photos: (photos.iter())
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        options: o.clone(),
        losses,
    };
    let info = serde_json::to_string_pretty(&info).map_err(|e| Error::Internal(e.to_string()))?;
    crate::fsutil::write_atomic(&out.join("distill.json"), info.as_bytes())
}

/// Labelled photos: a folder's `labels.json` (file name → class index).
pub fn labelled(dir: &Path) -> Result<Vec<(PathBuf, usize)>> {
    let path = dir.join("labels.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let labels: std::collections::BTreeMap<String, usize> = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    Ok(labels.into_iter().map(|(f, l)| (dir.join(f), l)).collect())
}

/// Counts over one set of images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Top-1 equal to the label.
    pub correct: usize,
    /// Top-1 equal to the clean model's on the clean image.
    pub agree: usize,
    pub n: usize,
}

/// One corruption at one severity (none: the clean images), served clean and
/// patched.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub corruption: Option<Corruption>,
    pub severity: u8,
    pub signature: String,
    pub unpatched: Counts,
    pub patched: Counts,
    /// Images the patch brought into agreement, and out of it.
    pub fixed: usize,
    pub broken: usize,
}

/// Evaluates each signature on the labelled `images` (held out from training),
/// clean and under its own corruption at each of `severities`.
pub fn evaluate(
    cfg: &ModelConfig,
    base: &Checkpoint,
    signatures: &[Arc<Signature>],
    images: &[(PathBuf, usize)],
    severities: &[u8],
    seed: u64,
) -> Result<Vec<Row>> {
    let served = Served::new(cfg, base)?;
    let fitted = (images.iter())
        .map(|(p, _)| {
            let img = crate::serve::preprocess::fit(read_image(p)?.to_rgb8(), cfg);
            Ok(Rgb::from_rgb8(&img))
        })
        .collect::<Result<Vec<_>>>()?;
    let labels: Vec<usize> = images.iter().map(|(_, l)| *l).collect();
    let clean_stem = served.stem(&[])?;
    let predict = |stem: &_, data: &Batchable| -> Result<Vec<usize>> {
        let logits = served.logits(stem, data)?;
        Ok(logits
            .chunks(cfg.labels.len())
            .map(crate::model::argmax)
            .collect())
    };
    let clean_data = prepare(&fitted, cfg, None, &[1], seed);
    let reference = predict(&clean_stem, &clean_data)?;
    let counts = |pred: &[usize]| Counts {
        correct: pred.iter().zip(&labels).filter(|(p, l)| p == l).count(),
        agree: pred.iter().zip(&reference).filter(|(p, r)| p == r).count(),
        n: pred.len(),
    };
    let mut rows = Vec::new();
    for sig in signatures {
        let kind: Option<Corruption> = sig.meta.corruption.parse().ok();
        let patched_stem = served.stem(&[(sig, sig.meta.default_alpha)])?;
        let mut cases = vec![(None, 0u8)];
        if let Some(k) = kind {
            cases.extend(severities.iter().map(|&s| (Some(k), s)));
        }
        for (corruption, severity) in cases {
            // On clean images the unpatched answers are the reference itself.
            let corrupted;
            let (data, before) = match corruption {
                Some(k) => {
                    corrupted = prepare(&fitted, cfg, Some(k), &[severity], seed);
                    (&corrupted, predict(&clean_stem, &corrupted)?)
                }
                None => (&clean_data, reference.clone()),
            };
            let after = predict(&patched_stem, data)?;
            let agrees = |p: &[usize], i: usize| p[i] == reference[i];
            rows.push(Row {
                corruption,
                severity,
                signature: sig.meta.corruption.clone(),
                unpatched: counts(&before),
                patched: counts(&after),
                fixed: (0..data.len())
                    .filter(|&i| !agrees(&before, i) && agrees(&after, i))
                    .count(),
                broken: (0..data.len())
                    .filter(|&i| agrees(&before, i) && !agrees(&after, i))
                    .count(),
            });
        }
    }
    Ok(rows)
}

/// `k/n` as a percentage with its 95% Wilson interval.
fn cell(k: usize, n: usize) -> String {
    let (lo, hi) = wilson(k, n);
    format!(
        "{k}/{n} = {:.0}% [{:.0}, {:.0}]",
        100.0 * k as f64 / n.max(1) as f64,
        100.0 * lo,
        100.0 * hi
    )
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| signature | images | top-1 unpatched | top-1 patched | agreement unpatched | agreement patched | fixed / broken |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let images = match r.corruption {
            Some(k) => format!("{k} {}", r.severity),
            None => "clean".into(),
        };
        s += &format!(
            "| {} | {images} | {} | {} | {} | {} | {} / {} |\n",
            r.signature,
            cell(r.unpatched.correct, r.unpatched.n),
            cell(r.patched.correct, r.patched.n),
            cell(r.unpatched.agree, r.unpatched.n),
            cell(r.patched.agree, r.patched.n),
            r.fixed,
            r.broken
        );
    }
    s
}
