//! Real third-party Python clients against the server: Triton's `tritonclient`
//! over the Open Inference Protocol, grpcio's reflection client, and the rws.v1
//! example in examples/python. They need the pinned clients that scripts/test.sh
//! installs into .venv; without them each test says so and passes, unless
//! RWS_REQUIRE_PYTHON=1 (which scripts/test.sh sets).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::python::{ok, python, run};
use common::*;
use rws::serve::engine::EngineOptions;

/// Runs a blocking script off the reactor that serves the in-process server.
async fn ok_off_reactor(mut cmd: Command) -> String {
    tokio::task::spawn_blocking(move || ok(&mut cmd))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_classifies_over_the_open_inference_protocol() {
    let Some(py) = python() else { return };
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    wait_ready(&server.channel).await;
    let mut inf = server.inference();
    let image = png(28, 28);
    let png_path = repo.path().join("digit.png");
    std::fs::write(&png_path, &image).unwrap();
    let case = serde_json::json!({
        "url": server.addr.strip_prefix("http://").unwrap(),
        "model": MODEL,
        "shape": [1, 1, 28, 28],
        "input_bits": bits(&input(1).data),
        "clean_bits": logits(&mut inf, tensor_request(1, "")).await,
        "fog_bits": logits(&mut inf, tensor_request(1, "fog")).await,
        "png": png_path,
        "png_bits": logits(&mut inf, image_request(image, "")).await,
    });
    let case_path = repo.path().join("case.json");
    std::fs::write(&case_path, case.to_string()).unwrap();

    let mut cmd = Command::new(py);
    cmd.arg("tests/python/kserve_tritonclient.py")
        .arg(&case_path);
    let out = ok_off_reactor(cmd).await;
    assert!(out.contains("all checks passed"), "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service() {
    let Some(py) = python() else { return };
    let repo = tiny_repo();
    let server = TestServer::start(repo.path(), EngineOptions::default()).await;
    let mut cmd = Command::new(py);
    cmd.arg("tests/python/reflection.py")
        .arg(server.addr.strip_prefix("http://").unwrap());
    let out = ok_off_reactor(cmd).await;
    assert!(out.contains("inference.GRPCInferenceService"), "{out}");
    server.stop().await;
}

#[test]
fn python_example_classifies_and_switches_profiles() {
    let Some(py) = python() else { return };
    let stubs = tempfile::tempdir().unwrap();
    ok(Command::new("bash")
        .arg("examples/python/generate.sh")
        .arg(stubs.path())
        .env("PYTHON", &py));
    let server = RwsProcess::start(&["--repo", "models", "--model", "mnist-resnet"]);
    let addr = server.addr.strip_prefix("http://").unwrap().to_string();
    let example = |args: &[&str]| {
        let mut cmd = Command::new(&py);
        cmd.arg("examples/python/classify.py")
            .args(["--addr", &addr])
            .args(args)
            .env("PYTHONPATH", stubs.path());
        cmd
    };
    let (label, png) = (common::showcase_label(), common::SHOWCASE_PNG);
    let clean = ok(&mut example(&["classify", png, "--profile", "clean"]));
    assert!(clean.starts_with("profile clean (generation 0)"), "{clean}");
    assert_ne!(common::top_label(&clean), label, "{clean}");
    let fog = ok(&mut example(&["classify", png, "--profile", "fog"]));
    assert_eq!(common::top_label(&fog), label, "{fog}");

    let profiles = ok(&mut example(&["profiles"]));
    assert!(profiles.contains("clean: -  (default)"), "{profiles}");
    assert!(profiles.contains("fog: fog@"), "{profiles}");
    let out = ok(&mut example(&["default", "fog"]));
    assert!(out.starts_with("default profile is now fog"), "{out}");
    let out = ok(&mut example(&["classify", png, "--top-k", "2"]));
    assert!(out.starts_with("profile fog "), "{out}");
    assert_eq!(out.lines().count(), 3, "profile line + top 2: {out}");

    let (success, _, err) = run(&mut example(&["classify", png, "--profile", "nope"]));
    assert!(!success && err.contains("NOT_FOUND"), "{err}");
}

/// The CUDA kernel's source (src/patch/kernel/add_scale.cu), compiled for the host with
/// stand-ins for the CUDA built-ins, against an independent NumPy implementation of
/// the formula: every storage form, several signatures and layers per launch, NaN-
/// poisoned outputs, the error cases. Keeps the GPU kernel's logic tested where CI has
/// no GPU (scripts/gpu-check.sh runs the same script on one, under CuPy).
#[test]
fn cuda_kernel_source_matches_numpy_when_emulated() {
    let Some(py) = python() else { return };
    let out = ok(Command::new(py)
        .arg("scripts/gpu/check_kernel_cupy.py")
        .arg("--emulate"));
    assert!(out.contains("\"passed\": true"), "{out}");
}

/// Accuracy through the serving path against a reference that shares no code with
/// rws: held-out MNIST digits (the committed test split), clean and under each shipped
/// signature's corruption at severity 3, sent as PNGs over gRPC under `clean`, their
/// own profile, `auto` and a mix of three signatures at other alphas. The logits must
/// match the ONNX graph of benches/onnx_baseline.py run by onnxruntime on weights
/// patched in NumPy (tests/python/onnx_reference.py), and so must the accuracy.
#[test]
fn serving_path_matches_the_onnx_reference_on_corrupted_digits() {
    use rws::lab::corrupt::Corruption;
    use rws::lab::data::Digits;

    let Some(py) = python() else { return };
    let stubs = tempfile::tempdir().unwrap();
    ok(Command::new("bash")
        .arg("examples/python/generate.sh")
        .arg(stubs.path())
        .env("PYTHON", &py));
    let model = Path::new("models/mnist-resnet");
    let test = Digits::load(Path::new("data/mnist/test.safetensors"))
        .unwrap()
        .take_per_class(4);
    let images = tempfile::tempdir().unwrap();
    let mut kinds = vec![None];
    for file in std::fs::read_dir(model.join("signatures")).unwrap() {
        let name = file.unwrap().file_name().into_string().unwrap();
        let kind = name.strip_suffix(".rws.safetensors").unwrap();
        kinds.push(Some(kind.parse::<Corruption>().unwrap()));
    }
    assert!(kinds.len() >= 7, "the shipped signatures: {kinds:?}");
    for kind in &kinds {
        for i in 0..test.len() {
            let (name, img) = match kind {
                None => ("clean", test.gray(i)),
                Some(c) => (c.name(), c.apply(&test.gray(i), 3, i as u64)),
            };
            let path = images
                .path()
                .join(format!("{name}_{i}_{}.png", test.labels[i]));
            img.to_luma().save(path).unwrap();
        }
    }

    let server = RwsProcess::start(&["--repo", "models", "--model", "mnist-resnet"]);
    let addr = server.addr.strip_prefix("http://").unwrap();
    let out = ok(Command::new(&py)
        .arg("tests/python/onnx_reference.py")
        .args(["--addr", addr])
        .arg("--model-dir")
        .arg(model)
        .arg("--images")
        .arg(images.path())
        .env("PYTHONPATH", stubs.path()));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Straight to stderr: the numbers docs/RELIABILITY.md quotes.
    let _ = writeln!(std::io::stderr(), "{out}");
    assert_eq!(report["passed"], true, "{out}");
    let expected = test.len() * (3 * kinds.len() + kinds.len() - 1);
    assert_eq!(report["answers"], expected, "{out}");
    // The signatures do their job on these digits too: the mean gain of the own
    // profile over the clean model, across corruptions (RESULTS.md: +41 points).
    let acc = |key: String| report["accuracy"][&key]["server"].as_f64().unwrap();
    let gains: Vec<f64> = kinds
        .iter()
        .flatten()
        .map(|c| acc(format!("{}/own", c.name())) - acc(format!("{}/clean", c.name())))
        .collect();
    let mean = gains.iter().sum::<f64>() / gains.len() as f64;
    assert!(mean > 0.2, "mean gain {mean}: {out}");
}
