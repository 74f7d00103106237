//! Throughput of a batch of 8 spread over 4 profiles against a batch of 8 on
//! one profile, side by side, through the batcher's own batch function.
//!
//! `RAYON_NUM_THREADS=2 cargo bench --bench batch`

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rws::rng::Rng;
use rws::serve::batch::{Job, run_batch};
use rws::serve::change::Change;
use rws::serve::profile::{Origin, SignatureRef};
use rws::serve::registry::Registry;

/// A registry with `clean` plus three one-signature profiles.
fn shipped() -> Registry {
    let dir = rws::model::repo::ModelDir::open(Path::new("models"), Some("mnist-resnet")).unwrap();
    let model = rws::model::Model::load(
        dir.config.clone(),
        &dir.base_path(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let registry = Registry::new(Arc::new(model), 16).unwrap();
    for kind in ["fog", "snow", "gaussian_noise"] {
        let sig = rws::patch::signature::Signature::load(
            &dir.dir.join(format!("signatures/{kind}.rws.safetensors")),
        )
        .unwrap();
        registry
            .load(
                kind,
                Arc::new(sig),
                Origin::memory(false),
                &Default::default(),
            )
            .unwrap();
        let refs = vec![SignatureRef {
            name: kind.into(),
            alpha: 1.0,
        }];
        registry
            .apply(&Change::put(kind, refs, false), &Default::default())
            .unwrap();
    }
    registry
}

fn synthetic(arch: &str) -> rws::bench::Fixture {
    let f = rws::bench::Fixture::new(arch, 2, &candle_core::Device::Cpu).unwrap();
    for (i, name) in ["fog", "snow", "gaussian_noise"].iter().enumerate() {
        let r = SignatureRef {
            name: "sig".into(),
            alpha: 0.3 * (i + 1) as f32,
        };
        f.registry
            .apply(&Change::put(name, vec![r], false), &Default::default())
            .unwrap();
    }
    f
}

fn run(registry: &Registry, inputs: &[Vec<f32>], profiles: &[&str]) {
    let mut answers = Vec::new();
    let jobs = inputs
        .iter()
        .zip(profiles.iter().cycle())
        .map(|(x, p)| {
            let (reply, rx) = tokio::sync::oneshot::channel();
            answers.push(rx);
            Job {
                input: x.clone(),
                profile: p.to_string(),
                source: String::new(),
                top_k: 1,
                with_logits: false,
                deadline: None,
                queued: std::time::Instant::now(),
                span: tracing::Span::none(),
                reply,
            }
        })
        .collect();
    run_batch(registry, jobs, None);
    for mut a in answers {
        a.try_recv().unwrap().unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let resnet = synthetic("resnet18");
    let cases: [(&str, &Registry, [usize; 3]); 2] = [
        ("mnist", &shipped(), [1, 28, 28]),
        ("resnet18", &resnet.registry, [3, 224, 224]),
    ];
    let mut g = c.benchmark_group("batch8");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10);
    g.throughput(Throughput::Elements(8));
    for (name, registry, shape) in cases {
        let mut rng = Rng::new(1);
        let inputs: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..shape.iter().product()).map(|_| rng.normal()).collect())
            .collect();
        g.bench_function(format!("{name}/one_profile"), |b| {
            b.iter(|| run(registry, &inputs, &["fog"]))
        });
        g.bench_function(format!("{name}/four_profiles"), |b| {
            b.iter(|| {
                run(
                    registry,
                    &inputs,
                    &["clean", "fog", "snow", "gaussian_noise"],
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
