//! What the `auto` profile's detector costs per image, against what the clean
//! model costs to classify one, side by side on the shipped MNIST model: the
//! image statistics, the detector's MLP on them, and the model's forward pass
//! per image at batch 1 and batch 8. The detector's weights are random (their
//! values do not change its cost); the target is at most 10% of inference.

use std::hint::black_box;
use std::path::Path;

use candle_core::{Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use rws::model::Model;
use rws::model::detector::{Detector, FEATURES, features};
use rws::model::repo::ModelDir;
use rws::rng::Rng;

fn bench(c: &mut Criterion) {
    let dir = ModelDir::open(Path::new("models"), Some("mnist-resnet")).unwrap();
    let model = Model::load(dir.config.clone(), &dir.base_path(), &Device::Cpu).unwrap();
    let cfg = &model.config;
    let [h, w] = cfg.input_size;
    let mut rng = Rng::new(1);
    let image: Vec<f32> = rng.vec(h * w, -0.4, 2.8);
    let (hidden, kinds) = (64, 9);
    let detector = Detector {
        kinds: std::iter::once("clean".to_string())
            .chain((1..kinds).map(|k| format!("kind{k}")))
            .collect(),
        base_fingerprint: model.fingerprint().to_string(),
        feature_mean: rng.vec(FEATURES, -1.0, 1.0),
        feature_std: rng.vec(FEATURES, 0.5, 2.0),
        w1: rng.vec(hidden * FEATURES, -0.3, 0.3),
        b1: rng.vec(hidden, -0.1, 0.1),
        w2: rng.vec(kinds * hidden, -0.3, 0.3),
        b2: rng.vec(kinds, -0.1, 0.1),
        ws: rng.vec(hidden, -0.3, 0.3),
        bs: 3.0,
        kind_mean: rng.vec(kinds * FEATURES, -1.0, 1.0),
        kind_std: rng.vec(kinds * FEATURES, 0.5, 2.0),
        kind_limit: vec![1.0; kinds],
        metadata: Default::default(),
    };
    let stem = model.materialize(&[]).unwrap();
    let one = Tensor::from_vec(image.clone(), (1, 1, h, w), &Device::Cpu).unwrap();
    let eight = Tensor::from_vec(image.repeat(8), (8, 1, h, w), &Device::Cpu).unwrap();

    let mut g = c.benchmark_group("detector_vs_inference_per_image");
    g.bench_function("features", |b| b.iter(|| features(black_box(&image), cfg)));
    g.bench_function("detect (features + MLP)", |b| {
        b.iter(|| detector.detect(black_box(&image), cfg))
    });
    g.bench_function("clean model, batch 1", |b| {
        b.iter(|| model.forward(&stem, black_box(&one)).unwrap())
    });
    // Per image: each batch of 8 reports an eighth of its time.
    g.bench_function("clean model, batch 8 (time / 8)", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                black_box(model.forward(&stem, black_box(&eight)).unwrap());
            }
            start.elapsed() / 8
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
