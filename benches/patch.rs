//! Applying a profile (build the patched stem + publish it) against rebuilding
//! the same model from its safetensors file, side by side in one run.
//!
//! `cargo bench --bench patch`

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use rws::model::Model;
use rws::model::repo::ModelDir;
use rws::patch::quant::Quant;
use rws::serve::change::Change;
use rws::serve::profile::{Origin, SignatureRef};
use rws::serve::registry::Registry;

struct Setup {
    name: &'static str,
    _repo: tempfile::TempDir,
    dir: ModelDir,
    registry: Registry,
}

/// A synthetic model with `blocks` patchable blocks and one int8 signature.
fn setup(name: &'static str, arch: &str, blocks: usize) -> Setup {
    let repo = tempfile::tempdir().unwrap();
    let arch = rws::lab::synth::arch_by_name(arch).unwrap();
    rws::lab::synth::write_repo_model(
        &repo.path().join(name),
        arch,
        blocks,
        &["sig".into()],
        Quant::Int8,
        3,
    )
    .unwrap();
    let dir = ModelDir::open(repo.path(), Some(name)).unwrap();
    let model = Model::load(dir.config.clone(), &dir.base_path(), &Device::Cpu).unwrap();
    let registry = Registry::new(Arc::new(model), 4).unwrap();
    let sig =
        rws::patch::signature::Signature::load(&dir.dir.join("signatures/sig.rws.safetensors"))
            .unwrap();
    registry
        .load(
            "sig",
            Arc::new(sig),
            Origin::memory(false),
            &Default::default(),
        )
        .unwrap();
    Setup {
        name,
        _repo: repo,
        dir,
        registry,
    }
}

fn bench(c: &mut Criterion) {
    // ResNet-18 with conv1 + layer1 patched (2 blocks); the shipped-size small model with conv1 + 1 block.
    let setups = [
        setup("resnet18", "resnet18", 2),
        setup("tiny", "resnet-small", 1),
    ];
    let mut g = c.benchmark_group("patch");
    g.warm_up_time(Duration::from_secs(1));
    for s in &setups {
        let profile = vec![SignatureRef {
            name: "sig".into(),
            alpha: 0.8,
        }];
        g.measurement_time(Duration::from_secs(4));
        g.bench_function(format!("apply/{}", s.name), |b| {
            let put = Change::put("p", profile.clone(), true);
            b.iter(|| s.registry.apply(&put, &Default::default()).unwrap())
        });
        g.bench_function(format!("reload/{}", s.name), |b| {
            b.iter(|| Model::load(s.dir.config.clone(), &s.dir.base_path(), &Device::Cpu).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
