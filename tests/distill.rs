//! Signatures for a model without its training data, end to end on a small
//! random MobileNetV2 and generated photos: `rws distill` moves only the stem and
//! brings the student towards the teacher under corruption, `rws extract
//! --served` makes a signature for the untouched base, and `rws distill-eval`
//! reports on labelled photos. The real run is scripts/imagenet-signatures.sh.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::Tensor;
use rws::lab::synth;
use rws::model::Model;
use rws::rng::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_rws");

fn rws(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = rws(args);
    assert!(
        out.status.success(),
        "rws {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A photo-like test image: a colour gradient with a few bright discs.
fn photo(path: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    let tint: Vec<f32> = (0..3).map(|_| rng.uniform()).collect();
    let discs: Vec<(f32, f32, f32)> = (0..4)
        .map(|_| {
            (
                rng.uniform() * 64.0,
                rng.uniform() * 48.0,
                4.0 + 8.0 * rng.uniform(),
            )
        })
        .collect();
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        let (x, y) = (x as f32, y as f32);
        let lit = discs
            .iter()
            .any(|(cx, cy, r)| (x - cx).powi(2) + (y - cy).powi(2) < r * r);
        image::Rgb([0, 1, 2].map(|c| {
            let v = tint[c] * (0.3 + 0.7 * x / 64.0) * (0.5 + 0.5 * y / 48.0);
            ((if lit { 1.0 - v } else { v }) * 255.0) as u8
        }))
    });
    img.save(path).unwrap();
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn distill_moves_only_the_stem_and_extracts_a_signature_for_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let arch = synth::arch_by_name("mobilenet-v2").unwrap();
    let cfg = synth::config(arch, 3, 32, 10, 1);
    let base = synth::base_tensors(&cfg, 5).unwrap();
    synth::write_model_dir(&model, &cfg, &base).unwrap();
    let photos: Vec<String> = (0..4)
        .map(|i| {
            let p = dir.path().join(format!("photo{i}.png"));
            photo(&p, i);
            p.to_string_lossy().into_owned()
        })
        .collect();
    let run = dir.path().join("run");
    let (model_s, run_s) = (model.to_str().unwrap(), run.to_str().unwrap());
    let mut args = vec![
        "distill",
        "--model",
        model_s,
        "--crops",
        "24",
        "--steps",
        "30",
        "--batch",
        "6",
        "--kinds",
        "fog,gaussian_noise",
        "--lr",
        "3e-3",
        "--out",
        run_s,
    ];
    args.extend(photos[..3].iter().map(String::as_str));
    ok(&args);

    // Under corruption the student ends closer to the teacher than it starts.
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("distill.json")).unwrap()).unwrap();
    let losses = info["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 3, "{info}");
    for run in &losses[1..] {
        let (first, last) = (
            run[1]["first"].as_f64().unwrap(),
            run[1]["last"].as_f64().unwrap(),
        );
        assert!(last < 0.8 * first, "{run}: KL {first} -> {last}");
    }

    // Only the stem's parameters (features.0 and features.1) moved. Its running
    // statistics, the trunk and the head are the base's.
    let stem: Vec<String> = (cfg.arch.units(3)[..2].iter())
        .flat_map(|u| u.convs.iter().flat_map(|c| c.tensors()))
        .map(|(name, _)| name)
        .filter(|name| !name.contains("running_"))
        .collect();
    let fog = load(&run.join("rob-fog.safetensors"));
    assert_eq!(fog.len(), base.len());
    for (name, t) in &base {
        assert_eq!(same(t, &fog[name]), !stem.contains(name), "{name}");
    }

    // The signature is made for the base that is served, not for `std`.
    let sig = model.join("signatures/fog.rws.safetensors");
    let base_file = model.join("base.safetensors");
    ok(&[
        "extract",
        "--pre",
        base_file.to_str().unwrap(),
        "--served",
        base_file.to_str().unwrap(),
        "--std",
        run.join("std.safetensors").to_str().unwrap(),
        "--robust",
        run.join("rob-fog.safetensors").to_str().unwrap(),
        "--config",
        run.join("model.toml").to_str().unwrap(),
        "--out",
        sig.to_str().unwrap(),
    ]);
    let fingerprint = Model::from_tensors(cfg.clone(), &base, &candle_core::Device::Cpu)
        .unwrap()
        .fingerprint()
        .to_string();
    assert!(ok(&["inspect", sig.to_str().unwrap()]).contains(&fingerprint));

    // Evaluation on labelled held-out photos: one row clean, one per severity.
    let labels: HashMap<String, usize> = [("photo3.png".to_string(), 4)].into();
    std::fs::write(
        dir.path().join("labels.json"),
        serde_json::to_string(&labels).unwrap(),
    )
    .unwrap();
    let table = ok(&[
        "distill-eval",
        "--model",
        model_s,
        "--images",
        dir.path().to_str().unwrap(),
        sig.to_str().unwrap(),
    ]);
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| fog |")).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[0].contains("| clean |") && rows[2].contains("| fog 5 |"),
        "{table}"
    );
    // The clean model agrees with itself on the clean photo.
    assert!(rows[0].contains("| 1/1 = 100% [21, 100] | "), "{table}");
}

#[test]
fn distill_refuses_a_grayscale_model_and_bad_photos() {
    let err = rws(&[
        "distill",
        "--model",
        "models/mnist-resnet",
        "docs/fog-digit.png",
    ]);
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(stderr.contains("needs an RGB model"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let cfg = synth::config(synth::arch_by_name("mobilenet-v2").unwrap(), 3, 32, 10, 1);
    synth::write_model_dir(&model, &cfg, &synth::base_tensors(&cfg, 1).unwrap()).unwrap();
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let out = dir.path().join("run");
    let err = rws(&[
        "distill",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        junk.to_str().unwrap(),
    ]);
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        stderr.contains("junk.png") && stderr.contains("PNG or JPEG"),
        "{stderr}"
    );
    assert!(!out.exists(), "a failed run must not leave a run directory");
}

/// The student starts as the teacher: the training network, in inference mode,
/// gives the served model's logits, for every architecture distillation trains.
#[test]
fn the_training_network_matches_the_served_model() {
    let mut rng = Rng::new(3);
    for (arch, input) in [
        ("mobilenet-v2", 40),
        ("efficientnet-lite0", 37),
        ("resnet18", 33),
    ] {
        let cfg = synth::config(synth::arch_by_name(arch).unwrap(), 3, input, 10, 1);
        let base = synth::base_tensors(&cfg, 9).unwrap();
        let x: Vec<f32> = (0..2 * 3 * input * input).map(|_| rng.normal()).collect();
        let x = Tensor::from_vec(x, (2, 3, input, input), &candle_core::Device::Cpu).unwrap();
        let model = Model::from_tensors(cfg.clone(), &base, &candle_core::Device::Cpu).unwrap();
        let served = model.forward(&model.materialize(&[]).unwrap(), &x).unwrap();
        let net = rws::lab::train::Net::stem_only(&cfg, &base, &candle_core::Device::Cpu).unwrap();
        let trained = net.forward_t(&x, false).unwrap();
        let scale = served
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (served - trained)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        let diff = diff.to_scalar::<f32>().unwrap() / scale;
        assert!(diff < 1e-4, "{arch}: relative difference {diff}");
    }
}
