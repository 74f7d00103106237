//! The robustness pipeline end to end, reduced to seconds: train, extract,
//! serve the signature, evaluate and write the report. The training digits are
//! a few of the committed test digits (no network in `cargo test`); the real run
//! is `scripts/reproduce.sh`.

use std::path::Path;
use std::sync::Arc;

use rws::lab::corrupt::Corruption;
use rws::lab::data::Digits;
use rws::lab::detector::{AutoReport, Report, Stream, StreamGroup, Tally, Unseen};
use rws::lab::eval::{self, EvalOptions, Run};
use rws::lab::report::{self, Seed, Study};
use rws::lab::stats::Estimate;
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
    let study = Study::new(
        vec![Seed {
            results,
            analysis: run.analyze(1).unwrap(),
            auto: None,
            unseen: Default::default(),
        }],
        None,
    )
    .unwrap();
    let report = study.markdown("scripts/reproduce.sh --quick");
    assert!(report.contains("| fog | weather | 3 |"));
    assert!(!report.contains('±'), "one seed has no spread to show");
    study.plots(&out.path().join("plots")).unwrap();
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

/// A detector's report whose test stream holds 10 clean images, which every
/// way serves right, and `fog` fogged ones at severity 2, of which the ways
/// get `right` = (clean model, auto, oracle, best fixed) right.
fn auto_report(seed: u64, holdout: Option<&str>, fog: usize, right: [usize; 4]) -> AutoReport {
    let [clean_model, auto, oracle, best_fixed] = right;
    let clean = Tally {
        images: 10,
        clean_model: 10,
        auto: 10,
        oracle: 10,
        best_fixed: 10,
    };
    let fogged = Tally {
        images: fog,
        clean_model,
        auto,
        oracle,
        best_fixed,
    };
    AutoReport {
        seed,
        holdout: holdout.map(String::from),
        detector: Report {
            kinds: vec!["fog".into(), "gaussian_noise".into()],
            steps: 10,
            unseen_margin: 0.0,
            train_samples: 80,
            held_out_samples: 20,
            accuracy: 0.9,
            severity_error: 0.5,
            threshold: 0.9,
            alphas: [("fog".to_string(), [0.5, 0.75, 1.0, 1.0, 1.25])].into(),
            unseen: [(
                "fog".to_string(),
                Unseen {
                    images: fog,
                    clean_model,
                    auto,
                },
            )]
            .into(),
        },
        stream: Some(Stream {
            best_fixed: "fog".into(),
            groups: vec![
                StreamGroup {
                    kind: "clean".into(),
                    severity: 0,
                    tally: clean,
                    chose: [("clean".to_string(), 10)].into(),
                },
                StreamGroup {
                    kind: "fog".into(),
                    severity: 2,
                    tally: fogged,
                    chose: [("fog".to_string(), fog)].into(),
                },
            ],
        }),
    }
}

/// The Markdown table row that starts with `first`.
fn row<'a>(page: &'a str, first: &str) -> Vec<&'a str> {
    let line = page
        .lines()
        .find(|l| l.starts_with(&format!("| {first} |")))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{page}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

/// Two seeds, each trained, evaluated and given `auto` reports, make one page
/// whose every figure is the mean ± sample standard deviation of the two.
#[test]
fn several_seeds_make_one_page_of_means_and_spreads() {
    let digits = Digits::load(Path::new("data/mnist/test.safetensors"))
        .unwrap()
        .take_per_class(10);
    let test = digits.take_per_class(3);
    let out = tempfile::tempdir().unwrap();
    let opts = EvalOptions {
        blocks: 1,
        pairs: eval::default_pairs(),
        seed: 1,
    };
    let fogged = [(8, [2, 6, 7, 5]), (9, [3, 5, 9, 4])];
    let mut seeds = Vec::new();
    for (seed, (fog, right)) in [3u64, 4].into_iter().zip(fogged) {
        let dir = out.path().join(format!("seed-{seed}"));
        let pipeline = PipelineOptions {
            kinds: vec![Corruption::Fog, Corruption::GaussianNoise],
            pre_steps: 8,
            finetune_steps: 3,
            batch: 16,
            seed,
        };
        rws::lab::train::run_pipeline(&digits, &pipeline, &dir).unwrap();
        let auto = dir.join(report::AUTO_DIR);
        std::fs::create_dir_all(&auto).unwrap();
        for (file, holdout) in [("all", None), ("without-fog", Some("fog"))] {
            let report = auto_report(seed, holdout, fog, right);
            let json = serde_json::to_string(&report).unwrap();
            std::fs::write(auto.join(format!("{file}.json")), json).unwrap();
        }
        seeds.push(Seed::evaluate(&dir, &test, &opts).unwrap());
    }
    let (a, b) = (seeds[0].results.clone(), seeds[1].results.clone());
    assert_ne!(
        a.per_corruption[0].std_corrupted, b.per_corruption[0].std_corrupted,
        "the seeds train different models"
    );
    let expect = |f: &dyn Fn(&eval::Results) -> f64| Estimate::of(&[f(&a), f(&b)]);

    // Same rows or no page; one seed each.
    let mut twice = seeds.clone();
    twice[1].results.seed = 3;
    assert!(Study::new(twice, None).is_err(), "two runs of one seed");
    let mut fewer = seeds.clone();
    fewer[1].results.per_corruption.pop();
    assert!(
        Study::new(fewer, None).is_err(),
        "runs evaluated differently"
    );
    assert!(
        Study::new(seeds.clone(), Some(5)).is_err(),
        "shipped seed 5 is no run"
    );

    let study = Study::new(seeds, Some(4)).unwrap();
    assert_eq!(study.main().results.seed, 4);
    let page = study.markdown("scripts/reproduce.sh");
    assert!(page.contains("n = 2 training seeds (3/4)"), "{page}");
    assert!(page.contains("are seed 4's"));
    let fog3 = row(&page, "fog");
    assert_eq!(fog3[..3], ["fog", "weather", "3"]);
    let std = expect(&|r| r.per_corruption[0].std_corrupted);
    assert_eq!(fog3[3], std.cell());
    assert!(fog3[3].contains(" ± "));
    // The cell's mean is the mean of the two seeds' values.
    let shown: f64 = fog3[3].split(' ').next().unwrap().parse().unwrap();
    let (x, y) = (
        a.per_corruption[0].std_corrupted,
        b.per_corruption[0].std_corrupted,
    );
    assert!(
        (shown - (x + y) / 2.0).abs() <= 0.05,
        "{shown} vs {x} and {y}"
    );
    let gain = expect(&|r| r.mean_gain(3));
    assert!(page.contains(&format!("by **{} points**", gain.gain())));

    // `auto`: the stream's 10 clean images and 8 or 9 fogged ones.
    let all = row(&page, "all");
    let percent = |hits: f64, images: f64| 100.0 * hits / images;
    let auto_all = Estimate::of(&[percent(16.0, 18.0), percent(15.0, 19.0)]);
    assert_eq!(all[1], "18/19");
    assert_eq!(all[3], auto_all.cell());
    // By kind, the first table whose fog row counts 8/9 images.
    let by_kind = row(&page, "fog | 8/9");
    let fog_auto = Estimate::of(&[percent(6.0, 8.0), percent(5.0, 9.0)]);
    assert_eq!(by_kind[3], fog_auto.cell());
    // Never seen: auto 6/8 and 5/9 against the clean model's 2/8 and 3/9.
    let unseen = Estimate::of(&[percent(4.0, 8.0), percent(2.0, 9.0)]);
    assert!(
        page.contains(&format!("| {} | met |", unseen.gain())),
        "{page}"
    );
    study.plots(&out.path().join("plots")).unwrap();
    for png in [
        "per_corruption.png",
        "auto_by_kind.png",
        "auto_by_severity.png",
        "auto_unseen.png",
    ] {
        image::open(out.path().join("plots").join(png)).unwrap();
    }
}
