//! The fused add-scale kernel against a memcpy that moves the same memory traffic.
//!
//! The kernel reads `W` (f32) and the int8 delta, and writes the output once; that is
//! its memory traffic in bytes. A `copy_from_slice` of half that many bytes reads and
//! writes exactly the same traffic, so with the same `Throughput::Bytes` on both, the
//! two GB/s figures are directly comparable: a kernel at the memcpy figure is running
//! at memory (or cache) speed.
//!
//! `lanes_int8` is the same kernel writing the blocked convs' packed order
//! (`rws::patch::kernel::lanes`), which the CPU serving path runs.
//!
//! Cases: ResNet-18 conv1 + layer1 (one 64x3x7x7 and four 64x64x3x3 convs; cache
//! resident) and one 512x512x3x3 conv (~21 MB of traffic; DRAM bound).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rws::patch::kernel::lanes::{self, LaneBuf, LaneLayout};
use rws::patch::kernel::{ConvBn, LayerDelta, cpu};
use rws::patch::quant::{Delta, Quant};

/// Owned clean layer + one int8 signature, and the output buffers.
struct Case {
    weight: Vec<f32>,
    out_channels: usize,
    bn: [Vec<f32>; 4],
    delta: Delta,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
}

impl Case {
    fn new(out_channels: usize, cols: usize, seed: u64) -> Case {
        let mut rng = rws::rng::Rng::new(seed);
        let mut next = move || rng.uniform() * 2.0 - 1.0;
        let n = out_channels * cols;
        let weight: Vec<f32> = (0..n).map(|_| next() * 0.1).collect();
        let dw: Vec<f32> = (0..n).map(|_| next() * 0.01).collect();
        let mut bn = || {
            (0..out_channels)
                .map(|_| 1.0 + 0.5 * next())
                .collect::<Vec<f32>>()
        };
        Case {
            weight,
            out_channels,
            bn: [bn(), bn(), bn(), bn()],
            delta: Delta::quantize(&dw, out_channels, Quant::Int8),
            out_w: vec![0.0; n],
            out_b: vec![0.0; out_channels],
        }
    }

    /// Bytes the kernel moves: W read, delta read, output written (BN vectors included).
    fn traffic(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        self.weight.len() * f
            + self.delta.stored_bytes()
            + self.out_w.len() * f
            + (4 + 1) * self.out_channels * f
    }

    fn conv_bn(&self) -> ConvBn<'_> {
        ConvBn {
            weight: &self.weight,
            out_channels: self.out_channels,
            gamma: &self.bn[0],
            beta: &self.bn[1],
            mean: &self.bn[2],
            var: &self.bn[3],
            eps: 1e-5,
        }
    }

    /// The lanes kernel on the same layer, its inputs taken as laid out in
    /// lane order (16 lanes, every run live): what a CPU profile switch runs.
    /// It allocates its output, as the switch does.
    fn run_lanes(&self, live: &[bool], codes: &LaneBuf) -> Vec<f32> {
        let base = self.conv_bn();
        let layout = LaneLayout {
            out_channels: self.out_channels,
            width: 16,
            align: 8,
            runs: live.len(),
            live,
        };
        let delta = LayerDelta {
            alpha: 0.7,
            weight: Some(codes.view()),
            gamma: None,
            beta: None,
            mean: None,
            var: None,
        };
        lanes::fused_add_scale(&base, &[delta], layout).unwrap().0
    }

    fn lane_inputs(&self) -> (Vec<bool>, LaneBuf) {
        let Delta::Int8 {
            q, scale, offset, ..
        } = &self.delta
        else {
            unreachable!("int8")
        };
        let runs = self.weight.len() / self.out_channels;
        let codes = LaneBuf::Codes {
            q: q.clone(),
            scale: scale.clone(),
            offset: offset.clone(),
        };
        (vec![true; runs], codes)
    }

    fn run(&mut self) {
        let (mut w, mut b) = (
            std::mem::take(&mut self.out_w),
            std::mem::take(&mut self.out_b),
        );
        let base = self.conv_bn();
        let delta = LayerDelta {
            alpha: 0.7,
            weight: Some(self.delta.view()),
            gamma: None,
            beta: None,
            mean: None,
            var: None,
        };
        cpu::fused_add_scale(&base, &[delta], &mut w, &mut b).unwrap();
        (self.out_w, self.out_b) = (w, b);
    }
}

fn kernel_vs_memcpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernel_vs_memcpy");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let sets: [(&str, Vec<(usize, usize)>); 2] = [
        (
            "resnet18_conv1_layer1",
            vec![(64, 3 * 49), (64, 576), (64, 576), (64, 576), (64, 576)],
        ),
        ("conv_512x512x3x3", vec![(512, 512 * 9)]),
    ];
    for (name, shapes) in sets {
        let mut cases: Vec<Case> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(o, cols))| Case::new(o, cols, i as u64 + 1))
            .collect();
        let bytes: usize = cases.iter().map(Case::traffic).sum();
        group.throughput(Throughput::Bytes(bytes as u64));

        group.bench_function(BenchmarkId::new("fused_add_scale_int8", name), |b| {
            b.iter(|| {
                for case in cases.iter_mut() {
                    case.run();
                }
                black_box(&cases);
            })
        });

        let inputs: Vec<_> = cases.iter().map(Case::lane_inputs).collect();
        group.bench_function(BenchmarkId::new("lanes_int8", name), |b| {
            b.iter(|| {
                for (case, (live, codes)) in cases.iter().zip(&inputs) {
                    black_box(case.run_lanes(live, codes));
                }
            })
        });

        // Same traffic: read bytes/2, write bytes/2.
        let src = vec![1u8; bytes / 2];
        let mut dst = vec![0u8; bytes / 2];
        group.bench_function(BenchmarkId::new("memcpy_same_traffic", name), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, kernel_vs_memcpy);
criterion_main!(benches);
