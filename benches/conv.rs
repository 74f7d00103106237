//! One conv of each ResNet-18 stage, batch 1, as rws's blocked direct
//! convolution and as candle's stock `conv2d` (bias added after), with
//! `Throughput::Elements` set to the conv's FLOPs (2 per multiply-add) so that
//! criterion's "elem/s" reads as FLOP/s; and the packing of its weights (on
//! every profile switch) beside a plain copy of them. Run it with
//! `RAYON_NUM_THREADS` set.

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rws::model::arch::{Act, Padding};
use rws::model::blocked::{Blocked, Maps, PackedConv, Planar};

/// (name, in, out, size, kernel, stride, padding)
const CASES: [(&str, usize, usize, usize, usize, usize, usize); 6] = [
    ("conv1", 3, 64, 224, 7, 2, 3),
    ("layer1", 64, 64, 56, 3, 1, 1),
    ("layer2", 128, 128, 28, 3, 1, 1),
    ("layer3", 256, 256, 14, 3, 1, 1),
    ("layer4", 512, 512, 7, 3, 1, 1),
    ("layer4-1x1", 256, 512, 14, 1, 2, 0),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv");
    let mut rng = rws::rng::Rng::new(1);
    for (name, ci, co, size, k, s, p) in CASES {
        let weight = rng.vec(co * ci * k * k, -0.1, 0.1);
        let bias = rng.vec(co, -0.1, 0.1);
        let x = rng.vec(ci * size * size, -1.0, 1.0);
        let planar = name == "conv1";
        let conv = PackedConv::new(
            &weight,
            &bias,
            (co, ci, k),
            s,
            Padding::Symmetric(p),
            planar,
        )
        .unwrap();
        g.throughput(Throughput::Bytes((weight.len() * 4) as u64));
        g.bench_function(BenchmarkId::new("pack", name), |b| {
            b.iter(|| {
                black_box(
                    PackedConv::new(
                        &weight,
                        &bias,
                        (co, ci, k),
                        s,
                        Padding::Symmetric(p),
                        planar,
                    )
                    .unwrap(),
                )
            })
        });
        g.bench_function(BenchmarkId::new("copy", name), |b| {
            b.iter(|| black_box(weight.to_vec()))
        });
        let (ho, wo) = conv.out_size((size, size));
        g.throughput(Throughput::Elements((2 * co * ci * k * k * ho * wo) as u64));
        let input = match planar {
            true => Maps::Planar(Planar::new(&x, (1, ci, size, size), p)),
            false => Maps::Blocked(Blocked::from_nchw(&x, (1, ci, size, size))),
        };
        g.bench_function(BenchmarkId::new("blocked", name), |b| {
            b.iter(|| black_box(conv.forward(black_box(&input), None, Act::Relu).unwrap()))
        });
        let d = Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (1, ci, size, size), &d).unwrap();
        let wt = Tensor::from_vec(weight.clone(), (co, ci, k, k), &d).unwrap();
        let bt = Tensor::from_vec(bias.clone(), (1, co, 1, 1), &d).unwrap();
        g.bench_function(BenchmarkId::new("candle", name), |b| {
            b.iter(|| {
                let y = xt
                    .conv2d(&wt, p, s, 1, 1)
                    .unwrap()
                    .broadcast_add(&bt)
                    .unwrap();
                black_box(y.relu().unwrap())
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
