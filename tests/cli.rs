//! The `rws` binary end to end: serve the shipped model, then drive it with the
//! client subcommands, as the README shows.

use std::process::Command;

mod common;
use common::RwsProcess;

const BIN: &str = env!("CARGO_BIN_EXE_rws");

fn rws(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rws {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rws_err(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "rws {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn serve_shipped_model_and_drive_it_with_the_cli() {
    let server = RwsProcess::start(&["--repo", "models", "--model", "mnist-resnet"]);
    let addr = server.addr.clone();

    let (label, png) = (common::showcase_label(), common::SHOWCASE_PNG);
    let clean = rws(&["classify", png, "--profile", "clean", "--addr", &addr]);
    assert_ne!(common::top_label(&clean), label, "{clean}");
    let fog = rws(&["classify", png, "--profile", "fog", "--addr", &addr]);
    assert_eq!(common::top_label(&fog), label, "{fog}");

    let out = rws(&["classify", png, "--addr", &addr]);
    assert!(
        out.starts_with("profile clean (generation 0, default)"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 6, "profile line + top 5: {out}");

    let out = rws(&["signature", "ls", "--addr", &addr]);
    assert!(
        out.contains("fog") && out.contains("int8") && !out.contains("synthetic"),
        "{out}"
    );
    let out = rws(&[
        "profile",
        "put",
        "storm",
        "fog@0.5",
        "gaussian_noise@0.5",
        "--addr",
        &addr,
    ]);
    assert!(out.contains("profile storm generation"), "{out}");
    let out = rws(&["profile", "default", "storm", "--addr", &addr]);
    assert!(out.contains("profile storm"), "{out}");
    let out = rws(&["classify", png, "--addr", &addr]);
    assert!(out.starts_with("profile storm"), "{out}");
    let out = rws(&["profile", "ls", "--addr", &addr]);
    assert!(out.contains("* storm"), "{out}");

    let err = rws_err(&["profile", "rm", "storm", "--addr", &addr]);
    assert!(err.contains("default profile"), "{err}");
    let err = rws_err(&["profile", "put", "x", "fog", "--addr", &addr]);
    assert!(err.contains("SIGNATURE@ALPHA"), "{err}");

    // Fog at one site: an activation, a classification from there, the record.
    let out = rws(&[
        "activate",
        "fog",
        "--scope",
        "site-a/",
        "--for",
        "1h",
        "--reason",
        "fog warning",
        "--addr",
        &addr,
    ]);
    let id = out.split_whitespace().next().unwrap().to_string();
    assert!(out.contains("site-a/") && out.contains("ends in "), "{out}");
    let out = rws(&["classify", png, "--source", "site-a/cam-1", "--addr", &addr]);
    assert!(out.starts_with("profile fog (generation"), "{out}");
    assert!(out.contains(&format!("activation {id})")), "{out}");
    let out = rws(&["classify", png, "--source", "site-b/cam-1", "--addr", &addr]);
    assert!(out.starts_with("profile storm"), "{out}");
    let out = rws(&["activations", "--addr", &addr]);
    assert!(out.contains(&id) && out.contains("fog warning"), "{out}");
    let out = rws(&["history", "--scope", "site-a/", "--addr", &addr]);
    assert!(
        out.contains("activate") && out.contains("fog warning"),
        "{out}"
    );
    rws(&["deactivate", &id, "--addr", &addr]);
    assert!(rws(&["activations", "--addr", &addr]).contains("no activations"));
    let err = rws_err(&[
        "activate", "fog", "--scope", "/x", "--for", "1h", "--addr", &addr,
    ]);
    assert!(err.contains("scope"), "{err}");

    let out = rws(&[
        "inspect",
        "models/mnist-resnet/signatures/fog.rws.safetensors",
    ]);
    assert!(
        out.contains("conv1.weight") && out.contains("int8") && out.contains("fingerprint"),
        "{out}"
    );
}

/// `classify --json` carries every logit. Patching and then removing every signature
/// of a profile refolds its stem from the untouched base weights: the logits come
/// back bit for bit (the check scripts/gpu-check.sh repeats on a GPU).
#[test]
fn classify_json_logits_survive_patch_and_removal_bitwise() {
    let server = RwsProcess::start(&["--repo", "models", "--model", "mnist-resnet"]);
    let addr = server.addr.as_str();
    let png = common::SHOWCASE_PNG;
    let logits = |profile: &str| -> Vec<f32> {
        let out = rws(&[
            "classify",
            png,
            "--json",
            "--profile",
            profile,
            "--addr",
            addr,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
        assert_eq!(v["profile"], profile, "{out}");
        assert_eq!(v["top_k"].as_array().map(Vec::len), Some(5), "{out}");
        let l: Vec<f32> = serde_json::from_value(v["logits"].clone()).expect(&out);
        assert_eq!(l.len(), 10, "{out}");
        l
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let clean = logits("clean");
    rws(&[
        "profile",
        "put",
        "p",
        "fog@0.7",
        "gaussian_noise@0.5",
        "--addr",
        addr,
    ]);
    assert_ne!(bits(&logits("p")), bits(&clean));
    rws(&["profile", "put", "p", "--replace", "--addr", addr]);
    assert_eq!(bits(&logits("p")), bits(&clean));
}

/// A reader that closes stdout early (`rws classify | head`) ends the command
/// quietly with success, where `println!` would panic on the broken pipe.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let server = RwsProcess::start(&["--repo", "models", "--model", "mnist-resnet"]);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["classify", common::SHOWCASE_PNG, "--addr", &server.addr])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
