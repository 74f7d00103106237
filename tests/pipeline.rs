//! The robustness pipeline end to end, reduced to seconds: train, extract,
//! serve the signature, evaluate and write the report. The training digits are
//! a few of the committed test digits (no network in `cargo test`); the real run
//! is `scripts/reproduce.sh`.

use std::path::Path;
use std::sync::Arc;

use rws::lab::corrupt::Corruption;
use rws::lab::data::Digits;
use rws::lab::eval::{self, EvalOptions, Run};
use rws::lab::train::PipelineOptions;

#[test]
fn reduced_pipeline_trains_extracts_serves_and_reports() {
    let digits = Digits::load(Path::new("data/mnist/test.safetensors"))
        .unwrap()
        .take_per_class(12);
    let out = tempfile::tempdir().unwrap();
    let run_dir = out.path().join("run");
    let opts = PipelineOptions {
        kinds: vec![Corruption::Fog, Corruption::GaussianNoise],
        pre_steps: 12,
        finetune_steps: 4,
        batch: 16,
        seed: 3,
    };
    rws::lab::train::run_pipeline(&digits, &opts, &run_dir).unwrap();
    for role in ["pre", "std", "std_v2", "rob-fog", "rob-gaussian_noise"] {
        assert!(
            run_dir.join(format!("{role}.safetensors")).is_file(),
            "{role}"
        );
    }

    // The extracted signature round-trips through the file format and loads into a server registry.
    let run = Run::load(&run_dir).unwrap();
    let sig = run
        .signature(Corruption::Fog, 1, rws::patch::quant::Quant::Int4, true)
        .unwrap();
    let path = out.path().join("fog.rws.safetensors");
    sig.save(&path).unwrap();
    let loaded = rws::patch::signature::Signature::load(&path).unwrap();
    assert_eq!(loaded, *sig);
    let served = eval::Served::new(&run.cfg, &run.std).unwrap();
    let registry = rws::serve::registry::Registry::new(Arc::clone(&served.model), 2).unwrap();
    registry
        .load(
            "fog",
            Arc::new(loaded),
            rws::serve::profile::Origin::memory(false),
            &Default::default(),
        )
        .unwrap();
    let fog = rws::serve::profile::SignatureRef {
        name: "fog".into(),
        alpha: 1.0,
    };
    registry
        .apply(
            &rws::serve::change::Change::put("fog", vec![fog], false),
            &Default::default(),
        )
        .unwrap();

    let test = digits.take_per_class(3);
    let opts = EvalOptions {
        blocks: 1,
        pairs: eval::default_pairs(),
        seed: 1,
    };
    let results = eval::evaluate(&run, &test, &opts).unwrap();
    assert_eq!(results.per_corruption.len(), 4, "2 kinds x 2 severities");
    assert!(results.per_corruption.iter().all(|r| r.removal_bitwise));
    assert_eq!(results.sweeps.len(), 2);
    assert_eq!(
        results.compositions.len(),
        1,
        "only fog + gaussian_noise were trained"
    );
    let report = results.markdown("scripts/reproduce.sh --quick", &run.analyze(1).unwrap());
    assert!(report.contains("| fog | weather | 3 |"));
    results.plots(&out.path().join("plots")).unwrap();
    for png in [
        "alpha_corrupted.png",
        "alpha_clean.png",
        "per_corruption.png",
        "quantization.png",
    ] {
        image::open(out.path().join("plots").join(png)).unwrap();
    }
}

/// Training gives the same bytes whatever the thread count: gemm splits work
/// across threads by output tiles, never along a sum, and every random draw
/// comes from a seed. Run through the binary, since rayon's pool is sized once
/// per process; the extracted signature must match byte for byte too.
#[test]
fn training_is_bit_for_bit_reproducible_whatever_the_thread_count() {
    let out = tempfile::tempdir().unwrap();
    let run = |threads: &str| {
        let dir = out.path().join(format!("t{threads}"));
        let rws = env!("CARGO_BIN_EXE_rws");
        let status = std::process::Command::new(rws)
            .args([
                "train",
                "--data",
                "data/mnist/test.safetensors",
                "--kinds",
                "fog",
            ])
            .args([
                "--per-class",
                "12",
                "--pre-steps",
                "12",
                "--finetune-steps",
                "4",
            ])
            .args(["--batch", "16", "--seed", "5", "--out"])
            .arg(&dir)
            .env("RAYON_NUM_THREADS", threads)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let sig = dir.join("fog.rws.safetensors");
        let status = std::process::Command::new(rws)
            .args(["extract", "--units", "1", "--quant", "int8"])
            .arg("--pre")
            .arg(dir.join("pre.safetensors"))
            .arg("--std")
            .arg(dir.join("std.safetensors"))
            .arg("--robust")
            .arg(dir.join("rob-fog.safetensors"))
            .arg("--out")
            .arg(&sig)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        ["pre", "std", "std_v2", "rob-fog", "fog.rws"]
            .map(|f| std::fs::read(dir.join(format!("{f}.safetensors"))).unwrap())
    };
    let one = run("1");
    let three = run("3");
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        assert!(a == b, "file {i} differs between 1 and 3 threads");
    }
}
