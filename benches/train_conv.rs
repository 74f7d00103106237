//! One training step's convolution work (forward, then the backward pass for the
//! input and the weight) for `rws distill`: the depthwise custom op and the 1×1
//! matmul form of `rws::lab::conv` against candle's `conv2d`, side by side on
//! EfficientNet-Lite0 layer shapes at batch 8, 224×224 input.
//!
//! `RAYON_NUM_THREADS=2 cargo bench --bench train_conv`

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// (name, channels in, channels out, kernel, stride, groups, side of the input)
const LAYERS: [(&str, usize, usize, usize, usize, usize, usize); 3] = [
    ("dw3x3_s2_96ch_112px", 96, 96, 3, 2, 96, 112),
    ("dw5x5_s1_480ch_14px", 480, 480, 5, 1, 480, 14),
    ("pw1x1_96to24_56px", 96, 24, 1, 1, 1, 56),
];

fn step(x: &Var, w: &Var, f: impl Fn(&Tensor, &Tensor) -> Tensor) {
    let y = f(x.as_tensor(), w.as_tensor());
    let grads = y.sum_all().unwrap().backward().unwrap();
    black_box(grads.get(w).unwrap());
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_conv");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, cin, cout, k, stride, groups, side) in LAYERS {
        let pad = (k - 1) / 2;
        let x = Var::randn(0f32, 1., (8, cin, side, side), &Device::Cpu).unwrap();
        let w = Var::randn(0f32, 0.1, (cout, cin / groups, k, k), &Device::Cpu).unwrap();
        group.bench_function(BenchmarkId::new("candle", name), |b| {
            b.iter(|| step(&x, &w, |x, w| x.conv2d(w, pad, stride, 1, groups).unwrap()))
        });
        group.bench_function(BenchmarkId::new("rws", name), |b| {
            b.iter(|| {
                step(&x, &w, |x, w| {
                    rws::lab::conv::conv2d(x, w, pad, stride, groups).unwrap()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
