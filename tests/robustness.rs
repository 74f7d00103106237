//! The shipped MNIST model and signatures do what docs/RESULTS.md says, checked
//! on the committed test digits through the serving code.

use std::path::Path;
use std::sync::Arc;

use rws::lab::corrupt::Corruption;
use rws::lab::data::Digits;
use rws::lab::eval::Served;
use rws::lab::extract;
use rws::lab::train::{self, Severity};
use rws::model::repo::ModelDir;
use rws::patch::quant::Quant;
use rws::patch::signature::Signature;
use rws::serve::change::Change;
use rws::serve::profile::Origin;

fn shipped() -> (ModelDir, Served, Digits, serde_json::Value) {
    let dir = ModelDir::open(Path::new("models"), Some("mnist-resnet")).unwrap();
    let base = extract::load_checkpoint(&dir.base_path()).unwrap();
    let served = Served::new(&dir.config, &base).unwrap();
    let test = Digits::load(Path::new("data/mnist/test.safetensors")).unwrap();
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("docs/results.json").unwrap()).unwrap();
    (dir, served, test, results)
}

fn signature(dir: &ModelDir, kind: &str) -> Arc<Signature> {
    let sig = Signature::load(&dir.dir.join(format!("signatures/{kind}.rws.safetensors"))).unwrap();
    assert!(!sig.meta.synthetic);
    assert_eq!(sig.meta.corruption, kind);
    Arc::new(sig)
}

#[test]
fn every_shipped_signature_beats_the_clean_model_as_the_eval_reports() {
    let (dir, served, test, results) = shipped();
    let files = dir.signature_files().unwrap();
    assert!(files.len() >= 6, "at least 6 shipped signatures");
    let rows = results["per_corruption"].as_array().unwrap();
    for path in files {
        let kind = rws::model::repo::signature_name(&path);
        let sig = signature(&dir, &kind);
        served
            .model
            .check_signature(&sig, false)
            .expect("made against the shipped base");
        let corruption: Corruption = kind.parse().unwrap();
        let data = train::prepare(&test, &dir.config, &[corruption], Severity::Fixed(3), 1);
        let clean_acc = served.accuracy_with(&[], &data).unwrap();
        let patched_acc = served.accuracy_with(&[(&sig, 1.0)], &data).unwrap();
        let row = rows
            .iter()
            .find(|r| r["kind"] == kind.as_str() && r["severity"] == 3)
            .unwrap_or_else(|| panic!("{kind} is in the eval"));
        // Same code, data and seeds as the eval: the figures agree.
        assert!(
            (clean_acc - row["std_corrupted"].as_f64().unwrap()).abs() < 0.01,
            "{kind}: {clean_acc}"
        );
        assert!(
            (patched_acc - row["patched_corrupted"].as_f64().unwrap()).abs() < 0.01,
            "{kind}: {patched_acc}"
        );
        assert!(
            patched_acc >= clean_acc + 0.5,
            "{kind}: patched {patched_acc} vs clean {clean_acc}"
        );
    }
}

#[test]
fn removing_a_shipped_signature_restores_outputs_bitwise() {
    let (dir, served, test, _) = shipped();
    let sig = signature(&dir, "fog");
    let data = train::prepare(
        &test.take_per_class(20),
        &dir.config,
        &[],
        Severity::Fixed(1),
        1,
    );
    let registry = rws::serve::registry::Registry::new(served.model.clone(), 4).unwrap();
    let bits = |registry: &rws::serve::registry::Registry| -> Vec<u32> {
        let table = registry.snapshot();
        let stem = registry.stem(&table, table.profile(None).unwrap()).unwrap();
        served
            .logits(&stem, &data)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let before = bits(&registry);
    registry
        .load("fog", sig, Origin::memory(false), &Default::default())
        .unwrap();
    let fog = rws::serve::profile::SignatureRef {
        name: "fog".into(),
        alpha: 1.0,
    };
    let apply = |c: Change| registry.apply(&c, &Default::default()).unwrap();
    apply(Change::put("fog", vec![fog], false));
    apply(Change::SetDefault("fog".into()));
    assert_ne!(bits(&registry), before);
    apply(Change::SetDefault("clean".into()));
    apply(Change::Delete("fog".into()));
    apply(Change::Unload("fog".into()));
    assert_eq!(bits(&registry), before);
}

#[test]
fn quantizing_shipped_signatures_further_costs_little_accuracy() {
    let (dir, served, test, _) = shipped();
    let test = test.take_per_class(60);
    for kind in ["fog", "gaussian_noise"] {
        let int8 = signature(&dir, kind);
        assert_eq!(int8.quant_summary(), "int8");
        let int4 = Arc::new(int8.quantized(Quant::Int4));
        assert!(
            int4.stored_bytes() * 10 < int8.stored_bytes() * 7,
            "int4 is smaller"
        );
        let data = train::prepare(
            &test,
            &dir.config,
            &[kind.parse().unwrap()],
            Severity::Fixed(3),
            1,
        );
        let a8 = served.accuracy_with(&[(&int8, 1.0)], &data).unwrap();
        let a4 = served.accuracy_with(&[(&int4, 1.0)], &data).unwrap();
        assert!((a8 - a4).abs() <= 5.0, "{kind}: int8 {a8} vs int4 {a4}");
    }
}

#[test]
fn corrupted_test_data_is_deterministic() {
    let (dir, _, test, _) = shipped();
    let test = test.take_per_class(5);
    for kind in [Corruption::Fog, Corruption::GaussianNoise, Corruption::Snow] {
        let a = train::prepare(&test, &dir.config, &[kind], Severity::Fixed(5), 7);
        let b = train::prepare(&test, &dir.config, &[kind], Severity::Fixed(5), 7);
        let c = train::prepare(&test, &dir.config, &[kind], Severity::Fixed(5), 8);
        assert_eq!(
            a.x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_ne!(a.x, c.x, "{kind}: the seed matters");
    }
}
