//! Training with candle on the CPU: the trainable twin of [`crate::model`]
//! (conv and BatchNorm modules instead of folded convs, same torchvision names),
//! and the fine-tuning loop the RWS method needs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, ModuleT, Optimizer, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::lab::conv;
use crate::lab::corrupt::Corruption;
use crate::lab::data::{self, Digits};
use crate::model::arch::Reduce;
use crate::model::repo::ModelConfig;
use crate::model::{Arch, ConvSpec, UnitSpec, classify_head, forward_unit, pad_for};
use crate::rng::Rng;
use crate::{Result, bail};

/// Images ready for the network: normalized `[n, C, H, W]` values and labels.
#[derive(Debug, Clone)]
pub struct Batchable {
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    /// Values per image.
    pub size: usize,
    /// A teacher's logits for each image (`classes` values each): when present,
    /// training matches them (distillation) instead of the labels.
    pub teacher: Option<Vec<f32>>,
}

impl Batchable {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The images at `idx` as a batch tensor and label tensor.
    pub fn batch(
        &self,
        idx: &[usize],
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let [h, w] = cfg.input_size;
        let mut x = Vec::with_capacity(idx.len() * self.size);
        for &i in idx {
            x.extend_from_slice(&self.x[i * self.size..(i + 1) * self.size]);
        }
        let y: Vec<u32> = idx.iter().map(|&i| self.y[i]).collect();
        Ok((
            Tensor::from_vec(x, (idx.len(), cfg.channels, h, w), device)?,
            Tensor::from_vec(y, idx.len(), device)?,
        ))
    }
}

/// How one training run goes.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub steps: usize,
    pub batch: usize,
    /// Peak learning rate; it decays to zero on a cosine.
    pub lr: f64,
    /// Seeds the order in which examples are drawn.
    pub seed: u64,
}

/// Initial weights: Kaiming-normal convs, identity BatchNorm, small classifier.
pub fn init_tensors(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    let head = cfg.arch.head(cfg.channels, cfg.labels.len());
    for (name, shape) in cfg.arch.tensor_shapes(cfg.channels, cfg.labels.len()) {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let linear = (head.linears.iter()).any(|l| name == format!("{}.weight", l.name));
        let gain = if linear { 1.0 } else { 2.0 };
        let values: Vec<f32> = if shape.len() > 1 {
            let std = (gain / fan_in as f32).sqrt();
            (0..n).map(|_| rng.normal() * std).collect()
        } else if name.ends_with("running_var") || name.ends_with(".weight") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// One trainable conv: its weight and bias (run by [`conv::conv2d`], after
/// [`pad_for`]) and its BatchNorm.
struct TrainConv {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<BatchNorm>,
    spec: ConvSpec,
}

/// A trainable network. Its variables start as copies of the given tensors.
pub struct Net {
    varmap: VarMap,
    /// Tensors held constant: the units from `trainable_units` on and the head,
    /// when only the stem trains.
    frozen: HashMap<String, Tensor>,
    units: Vec<(UnitSpec, Vec<TrainConv>)>,
    /// Whether training normalizes with batch statistics (and updates the
    /// running ones), as when every parameter trains, or, like inference, with
    /// the running statistics. Frozen units have BatchNorm folded in either way.
    batch_statistics: bool,
    reduce: Reduce,
    linears: Vec<Linear>,
}

impl Net {
    /// Every parameter trains, BatchNorm on batch statistics.
    pub fn new(cfg: &ModelConfig, init: &HashMap<String, Tensor>, device: &Device) -> Result<Net> {
        Net::build(cfg, init, usize::MAX, device)
    }

    /// Only the patchable stem (conv1 plus `patchable_blocks` blocks) trains: what
    /// a signature keeps is all that moves, and the frozen trunk needs no weight
    /// gradients. BatchNorm keeps its running statistics, so that the network
    /// starts out giving exactly the served model's answers (distillation's
    /// teacher); batch statistics of a few photos' crops would change every
    /// answer from the first step, clean ones included.
    pub fn stem_only(
        cfg: &ModelConfig,
        init: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Net> {
        Net::build(cfg, init, cfg.patchable_blocks + 1, device)
    }

    fn build(
        cfg: &ModelConfig,
        init: &HashMap<String, Tensor>,
        trainable_units: usize,
        device: &Device,
    ) -> Result<Net> {
        let specs = cfg.arch.units(cfg.channels);
        let all_train = trainable_units >= specs.len();
        let trains: std::collections::HashSet<String> = match all_train {
            true => init.keys().cloned().collect(),
            false => (specs[..trainable_units].iter())
                .flat_map(|u| u.convs.iter().flat_map(|c| c.tensors()))
                .map(|(name, _)| name)
                .collect(),
        };
        let varmap = VarMap::new();
        let mut frozen = HashMap::new();
        {
            let mut vars = varmap.data().lock().expect("fresh varmap");
            for (name, t) in init {
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                match trains.contains(name) {
                    true => {
                        vars.insert(name.clone(), Var::from_tensor(&t)?);
                    }
                    false => {
                        frozen.insert(name.clone(), t);
                    }
                }
            }
        }
        let train_vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let frozen_vb = VarBuilder::from_tensors(frozen.clone(), DType::F32, device);
        let vb_for = |unit: usize| match unit < trainable_units {
            true => &train_vb,
            false => &frozen_vb,
        };
        let bn_cfg = BatchNormConfig {
            eps: cfg.bn_eps as f64,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        };
        let mut units = Vec::new();
        for (u, unit) in specs.into_iter().enumerate() {
            let vb = vb_for(u);
            let convs = (unit.convs.iter())
                .map(|c| {
                    let (o, at) = (c.out_channels, vb.pp(&c.conv));
                    let shape = (o, c.in_channels / c.groups, c.kernel, c.kernel);
                    let weight = at.get(shape, "weight")?;
                    let bias = c.bias.then(|| at.get(o, "bias")).transpose()?;
                    let bn = (c.bn.as_ref())
                        .map(|bn| candle_nn::batch_norm(o, bn_cfg, vb.pp(bn)))
                        .transpose()?;
                    if u >= trainable_units
                        && let Some(bn) = &bn
                    {
                        // Frozen: BatchNorm folded in saves its four
                        // elementwise passes forward and back.
                        let (weight, bias) =
                            fold_batch_norm(&weight, bias.as_ref(), bn, cfg.bn_eps)?;
                        return Ok(TrainConv {
                            weight,
                            bias: Some(bias),
                            bn: None,
                            spec: c.clone(),
                        });
                    }
                    Ok(TrainConv {
                        weight,
                        bias,
                        bn,
                        spec: c.clone(),
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            units.push((unit, convs));
        }
        let head = cfg.arch.head(cfg.channels, cfg.labels.len());
        let vb = if all_train { &train_vb } else { &frozen_vb };
        let linears = (head.linears.iter())
            .map(|l| candle_nn::linear(l.inputs, l.outputs, vb.pp(&l.name)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if varmap.all_vars().len() + frozen.len() != init.len() {
            bail!(
                InvalidArgument,
                "initial tensors do not match the architecture's parameters"
            );
        }
        Ok(Net {
            varmap,
            frozen,
            units,
            batch_statistics: all_train,
            reduce: head.reduce,
            linears,
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        let batch_statistics = train && self.batch_statistics;
        for (unit, convs) in &self.units {
            h = forward_unit(unit, convs, &h, |c, x, then| {
                let s = &c.spec;
                let (x, pad) = pad_for(x, s.padding, s.kernel, s.stride)?;
                let mut y = conv::conv2d(&x, &c.weight, pad, s.stride, s.groups)?;
                if let Some(b) = &c.bias {
                    y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
                }
                then.apply(match &c.bn {
                    Some(bn) => bn.forward_t(&y, batch_statistics)?,
                    None => y,
                })
            })?;
        }
        let linears = (self.linears.iter())
            .map(|l| {
                let bias = l.bias().expect("linear has a bias").unsqueeze(0)?;
                Ok((l.weight().t()?, bias))
            })
            .collect::<Result<Vec<_>>>()?;
        classify_head(&h, self.reduce, &linears)
    }

    /// A snapshot of every parameter and running statistic, copied out of the variables.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let vars = self.varmap.data().lock().expect("varmap");
        (vars.iter().map(|(k, v)| (k, v.as_tensor())))
            .chain(&self.frozen)
            .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.copy()?)))
            .collect()
    }

    /// Trains on `data`.
    pub fn fit(
        &self,
        cfg: &ModelConfig,
        data: &Batchable,
        s: &Schedule,
        label: &str,
    ) -> Result<Losses> {
        if data.is_empty() || s.batch == 0 {
            bail!(InvalidArgument, "nothing to train on");
        }
        let device = self.varmap.all_vars()[0].device().clone();
        let params = candle_nn::ParamsAdamW {
            lr: s.lr,
            weight_decay: 1e-4,
            ..Default::default()
        };
        let mut opt = candle_nn::AdamW::new(self.varmap.all_vars(), params)?;
        let mut rng = Rng::new(s.seed);
        let mut order: Vec<usize> = Vec::new();
        let bar = ProgressBar::new(s.steps as u64).with_style(
            ProgressStyle::with_template(
                "{prefix:>14} {bar:30} {pos}/{len} steps, loss {msg} [{elapsed}<{eta}]",
            )
            .expect("valid template"),
        );
        bar.set_prefix(label.to_string());
        let tenth = (s.steps / 10).max(1);
        let mut losses = Losses::default();
        for step in 0..s.steps {
            if order.len() < s.batch {
                order = shuffled(data.len(), &mut rng);
            }
            let idx: Vec<usize> = order.split_off(order.len() - s.batch.min(order.len()));
            let (x, y) = data.batch(&idx, cfg, &device)?;
            let lr =
                s.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / s.steps as f64).cos());
            opt.set_learning_rate(lr);
            let logits = self.forward_t(&x, true)?;
            let loss = match &data.teacher {
                None => candle_nn::loss::cross_entropy(&logits, &y)?,
                Some(teacher) => {
                    let classes = logits.dim(1)?;
                    let t: Vec<f32> = (idx.iter())
                        .flat_map(|&i| &teacher[i * classes..(i + 1) * classes])
                        .copied()
                        .collect();
                    distillation_loss(&logits, &Tensor::from_vec(t, logits.shape(), &device)?)?
                }
            };
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()?;
            if step < tenth {
                losses.first += l / tenth as f32;
            }
            if step >= s.steps.saturating_sub(tenth) {
                losses.last += l / tenth as f32;
            }
            bar.set_message(format!("{l:.3}"));
            bar.inc(1);
        }
        bar.finish();
        Ok(losses)
    }
}

/// The mean training loss over the first and the last tenth of the steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Losses {
    pub first: f32,
    pub last: f32,
}

/// A frozen conv's weight and bias with its BatchNorm (on running statistics)
/// folded in.
fn fold_batch_norm(
    weight: &Tensor,
    bias: Option<&Tensor>,
    bn: &BatchNorm,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (gamma, beta) = bn.weight_and_bias().expect("BatchNorm built affine");
    let scale = (gamma / (bn.running_var() + f64::from(eps))?.sqrt()?)?;
    let mean = match bias {
        Some(b) => (bn.running_mean() - b)?,
        None => bn.running_mean().clone(),
    };
    let weight = weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
    // BatchNorm keeps its statistics in variables; the folded copy must not
    // track them, or backward would give the frozen weights gradients.
    Ok((weight.detach(), (beta - (mean * scale)?)?.detach()))
}

/// KL(teacher || student) over the classes, averaged over the batch: zero
/// exactly when the student's output distribution is the teacher's.
fn distillation_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    use candle_nn::ops::log_softmax;
    let log_t = log_softmax(teacher, 1)?;
    let kl = (log_t.exp()? * (&log_t - log_softmax(student, 1)?)?)?.sum(1)?;
    Ok(kl.mean_all()?)
}

/// 0..n in a seeded random order (Fisher-Yates).
pub fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// The severities training or evaluation data is corrupted at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fixed(u8),
    /// Each image draws one of 1..=5 (seeded), as robust fine-tuning uses.
    Mixed,
}

/// Digits as network input: each corrupted by every kind in `kinds` in turn
/// (none = clean), then normalized with the model's mean and std.
pub fn prepare(
    digits: &Digits,
    cfg: &ModelConfig,
    kinds: &[Corruption],
    severity: Severity,
    seed: u64,
) -> Batchable {
    let (mean, std) = (cfg.mean[0], cfg.std[0]);
    let images: Vec<Vec<f32>> = (0..digits.len())
        .into_par_iter()
        .map(|i| {
            let mut g = digits.gray(i);
            for (k, kind) in kinds.iter().enumerate() {
                let image_seed = seed ^ ((i as u64) << 20) ^ ((k as u64) << 8) ^ (*kind as u64);
                let sev = match severity {
                    Severity::Fixed(s) => s,
                    Severity::Mixed => 1 + (Rng::new(image_seed).next_u64() % 5) as u8,
                };
                g = kind.apply(&g, sev, image_seed);
            }
            g.pixels.iter().map(|p| (p - mean) / std).collect()
        })
        .collect();
    Batchable {
        x: images.concat(),
        y: digits.labels.iter().map(|&l| u32::from(l)).collect(),
        size: data::PIXELS,
        teacher: None,
    }
}

/// The digit model the pipeline trains: the small ResNet (16/32/64 channels, one
/// block per stage) with a stride-2 stem, which trains 4× faster than stride 1
/// on two cores; conv1 + layer1 form the patchable stem.
pub fn mnist_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Small {
            widths: vec![16, 32, 64],
            depths: vec![1, 1, 1],
            stem_stride: 2,
        },
        input_size: [data::SIDE, data::SIDE],
        resize: None,
        channels: 1,
        mean: vec![0.1307],
        std: vec![0.3081],
        labels: (0..10).map(|d| d.to_string()).collect(),
        patchable_blocks: 1,
        bn_eps: 1e-5,
        synthetic: false,
    }
}

/// The pipeline's steps and sizes.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub kinds: Vec<Corruption>,
    /// Steps for theta_pre, from scratch.
    pub pre_steps: usize,
    /// Steps for each fine-tune (std, robust, std_v2).
    pub finetune_steps: usize,
    pub batch: usize,
    pub seed: u64,
}

/// What a run was trained with, recorded next to its checkpoints
/// ([`RUN_INFO`]) so that a report can name its seed and sizes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub seed: u64,
    pub train_digits: usize,
    pub pre_steps: usize,
    pub finetune_steps: usize,
    pub batch: usize,
}

/// The file in a run directory that holds its [`RunInfo`].
pub const RUN_INFO: &str = "train.json";

impl RunInfo {
    pub fn load(dir: &Path) -> Result<RunInfo> {
        let path = dir.join(RUN_INFO);
        let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            crate::Error::InvalidArgument(format!(
                "{}: {e}; retrain the run with `rws train`",
                path.display()
            ))
        })
    }
}

/// Checkpoint file names in a run directory.
pub fn checkpoint_name(role: &str) -> String {
    format!("{role}.safetensors")
}

/// Trains theta_pre on clean digits; fine-tunes theta_std (clean) and one
/// theta_rob per corruption kind (that kind, mixed severities) from it, with the
/// same seeds and data order so that only the data differs; then trains theta_std
/// further into theta_std_v2, the "updated backbone". Writes every checkpoint and
/// `model.toml` and [`RunInfo`] into `out`.
pub fn run_pipeline(train: &Digits, o: &PipelineOptions, out: &Path) -> Result<()> {
    let cfg = mnist_config();
    let device = Device::Cpu;
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let toml = toml::to_string_pretty(&cfg).map_err(|e| crate::Error::Internal(e.to_string()))?;
    crate::fsutil::write_atomic(&out.join("model.toml"), toml.as_bytes())?;
    let info = RunInfo {
        seed: o.seed,
        train_digits: train.len(),
        pre_steps: o.pre_steps,
        finetune_steps: o.finetune_steps,
        batch: o.batch,
    };
    let info =
        serde_json::to_string_pretty(&info).map_err(|e| crate::Error::Internal(e.to_string()))?;
    crate::fsutil::write_atomic(&out.join(RUN_INFO), info.as_bytes())?;
    let save = |role: &str, t: &HashMap<String, Tensor>| -> Result<()> {
        Ok(candle_core::safetensors::save(
            t,
            out.join(checkpoint_name(role)),
        )?)
    };
    let clean = prepare(train, &cfg, &[], Severity::Mixed, o.seed);
    let sched = |steps: usize, lr: f64, seed: u64| Schedule {
        steps,
        batch: o.batch,
        lr,
        seed,
    };
    let finetune = |from: &HashMap<String, Tensor>,
                    data: &Batchable,
                    seed: u64,
                    role: &str|
     -> Result<HashMap<String, Tensor>> {
        let net = Net::new(&cfg, from, &device)?;
        let loss = net.fit(&cfg, data, &sched(o.finetune_steps, 5e-4, seed), role)?;
        tracing::info!(role, loss = loss.last, "fine-tuned");
        net.tensors()
    };

    let net = Net::new(&cfg, &init_tensors(&cfg, o.seed)?, &device)?;
    net.fit(&cfg, &clean, &sched(o.pre_steps, 2e-3, o.seed + 1), "pre")?;
    let pre = net.tensors()?;
    save("pre", &pre)?;
    let std = finetune(&pre, &clean, o.seed + 2, "std")?;
    save("std", &std)?;
    for kind in &o.kinds {
        let data = prepare(train, &cfg, &[*kind], Severity::Mixed, o.seed + 3);
        let rob = finetune(&pre, &data, o.seed + 2, &format!("rob-{kind}"))?;
        save(&format!("rob-{kind}"), &rob)?;
    }
    let v2 = finetune(&std, &clean, o.seed + 4, "std_v2")?;
    save("std_v2", &v2)?;
    Ok(())
}
