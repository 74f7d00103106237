//! Every architecture rws serves, checked against forward passes that share no
//! code with it, on random weights and inputs made here: a NumPy implementation
//! for all of them (tests/python/numpy_reference.py, which also applies the
//! signatures itself), and candle-transformers' models where it has the
//! architecture (ResNet, VGG-16). Each prints its maximum relative error, the
//! largest logit difference over the largest reference logit.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::python::{ok, python};
use rws::lab::synth;
use rws::model::Model;
use rws::patch::quant::Quant;
use rws::patch::signature::Signature;

/// Largest difference over the largest reference value.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "logit counts");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let diff = (got.iter().zip(want)).fold(0f64, |m, (g, w)| m.max((f64::from(*g) - w).abs()));
    diff / scale
}

/// A random model of `arch` in a temp dir with synthetic signatures `a` (int8)
/// and `b` (int4) over its first unit and `blocks` blocks.
fn random_model(arch: &str, blocks: usize) -> (tempfile::TempDir, Model, [Arc<Signature>; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let arch = synth::arch_by_name(arch).unwrap();
    let model = synth::write_repo_model(dir.path(), arch, blocks, &[], Quant::Int8, 3).unwrap();
    let sig = |name: &str, seed, quant| {
        let s = synth::signature(&model, name, seed, 0.3, quant).unwrap();
        s.save(
            &dir.path()
                .join(format!("signatures/{name}.rws.safetensors")),
        )
        .unwrap();
        Arc::new(s)
    };
    let sigs = [sig("a", 21, Quant::Int8), sig("b", 22, Quant::Int4)];
    (dir, model, sigs)
}

/// Two random normalised images of the model's input shape.
fn random_input(model: &Model) -> Tensor {
    let [h, w] = model.config.input_size;
    Tensor::randn(0f32, 1.0, (2, model.config.channels, h, w), &Device::Cpu).unwrap()
}

/// The NumPy reference's logits for `x` with `patches` (name, alpha) applied.
fn numpy_logits(dir: &Path, x: &Tensor, patches: &[(&str, f32)]) -> Vec<f64> {
    let py = python().expect("checked by the caller");
    let input = dir.join("input.safetensors");
    candle_core::safetensors::save(&HashMap::from([("input".to_string(), x.clone())]), &input)
        .unwrap();
    let mut cmd = Command::new(py);
    cmd.arg("tests/python/numpy_reference.py")
        .arg("--model-dir")
        .arg(dir)
        .arg("--inputs")
        .arg(&input);
    for (name, alpha) in patches {
        cmd.arg("--patch").arg(format!("{name}={alpha}"));
    }
    let out: serde_json::Value = serde_json::from_str(&ok(&mut cmd)).unwrap();
    (out["logits"].as_array().unwrap().iter())
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect()
}

/// rws's logits for `x` on the CPU, clean and with `a`@0.7 + `b`@-0.4, against
/// the NumPy reference's.
fn matches_numpy(arch: &str, blocks: usize) {
    let Some(_) = python() else { return };
    let (dir, model, [a, b]) = random_model(arch, blocks);
    let x = random_input(&model);
    let mut worst = 0f64;
    for patches in [vec![], vec![(&a, 0.7f32), (&b, -0.4)]] {
        let stem = model.materialize(&patches).unwrap();
        let got = model.forward(&stem, &x).unwrap();
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let names: Vec<(&str, f32)> = (patches.iter())
            .map(|(s, alpha)| (if Arc::ptr_eq(s, &a) { "a" } else { "b" }, *alpha))
            .collect();
        let want = numpy_logits(dir.path(), &x, &names);
        let err = relative_error(&got, &want);
        assert!(err < 1e-4, "{arch} with {names:?}: relative error {err}");
        worst = worst.max(err);
    }
    let _ = writeln!(
        std::io::stderr(),
        "{arch}: max relative error against NumPy {worst:.2e}"
    );
}

#[test]
fn resnet18_matches_numpy() {
    matches_numpy("resnet18", 2);
}

#[test]
fn vgg16_matches_numpy() {
    matches_numpy("vgg16", 2);
}

#[test]
fn vgg16_bn_matches_numpy() {
    matches_numpy("vgg16-bn", 2);
}

#[test]
fn vgg16_cifar_matches_numpy() {
    matches_numpy("vgg16-cifar", 3);
}

#[test]
fn mobilenet_v2_matches_numpy() {
    matches_numpy("mobilenet-v2", 3);
}

#[test]
fn efficientnet_lite0_matches_numpy() {
    matches_numpy("efficientnet-lite0", 3);
}

/// The clean model's weights renamed for candle-transformers.
fn renamed(dir: &Path, rename: impl Fn(&str) -> String) -> HashMap<String, Tensor> {
    let tensors =
        candle_core::safetensors::load(dir.join("base.safetensors"), &Device::Cpu).unwrap();
    tensors.into_iter().map(|(k, v)| (rename(&k), v)).collect()
}

#[test]
fn resnets_match_candle_transformers() {
    use candle_core::Module;
    use candle_transformers::models::resnet;
    for (arch, build) in [
        ("resnet18", resnet::resnet18 as fn(usize, _) -> _),
        ("resnet50", resnet::resnet50),
    ] {
        let (dir, model, _) = random_model(arch, 1);
        let vb = candle_nn::VarBuilder::from_tensors(
            renamed(dir.path(), str::to_string),
            DType::F32,
            &Device::Cpu,
        );
        let theirs = build(model.config.labels.len(), vb).unwrap();
        let x = random_input(&model);
        let want: Vec<f64> = (theirs.forward(&x).unwrap().to_dtype(DType::F64).unwrap())
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = model.forward(&model.materialize(&[]).unwrap(), &x).unwrap();
        let err = relative_error(&got.flatten_all().unwrap().to_vec1().unwrap(), &want);
        assert!(err < 1e-4, "{arch}: relative error {err}");
        let _ = writeln!(
            std::io::stderr(),
            "{arch}: max relative error against candle-transformers {err:.2e}"
        );
    }
}

/// candle-transformers' VGG-16 takes one image, names its classifier as timm
/// does (the first two layers as convs), and applies ReLU to its logits; the
/// comparison allows for all three.
#[test]
fn vgg16_matches_candle_transformers() {
    use candle_nn::ModuleT;
    use candle_transformers::models::vgg;
    let (dir, model, _) = random_model("vgg16", 1);
    let mut tensors = renamed(dir.path(), |k| {
        k.replace("classifier.0.", "pre_logits.fc1.")
            .replace("classifier.3.", "pre_logits.fc2.")
            .replace("classifier.6.", "head.fc.")
    });
    for (name, shape) in [
        ("pre_logits.fc1.weight", (4096, 512, 7, 7)),
        ("pre_logits.fc2.weight", (4096, 4096, 1, 1)),
    ] {
        let t = tensors[name].reshape(shape).unwrap();
        tensors.insert(name.into(), t);
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let theirs = vgg::Vgg::new(vb, vgg::Models::Vgg16).unwrap();
    let x = random_input(&model).narrow(0, 0, 1).unwrap();
    let want: Vec<f64> = (theirs.forward_t(&x.squeeze(0).unwrap(), false).unwrap())
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let got = model.forward(&model.materialize(&[]).unwrap(), &x).unwrap();
    let got: Vec<f32> = got
        .relu()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let err = relative_error(&got, &want);
    assert!(err < 1e-4, "vgg16: relative error {err}");
    assert!(
        want.iter().any(|v| *v > 0.0),
        "some logits survive their ReLU"
    );
    let _ = writeln!(
        std::io::stderr(),
        "vgg16: max relative error against candle-transformers {err:.2e}"
    );
}

/// The NumPy reference itself, against onnxruntime graphs built with the `onnx`
/// package, on small random models of every architecture
/// (tests/python/check_numpy_reference.py): the references check each other.
#[test]
fn the_numpy_reference_matches_onnxruntime() {
    let Some(py) = python() else { return };
    let out = ok(Command::new(py).arg("tests/python/check_numpy_reference.py"));
    assert!(
        out.contains("check_numpy_reference: all checks passed"),
        "{out}"
    );
}
