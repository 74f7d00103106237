//! What resolving a request's profile costs once activations exist: the lookup
//! with 1,000 scopes (100 of their activations active, the rest ended or not yet
//! begun) against no activations at all, side by side. `Table::resolve` adds the
//! same profile-map lookup to both, so the difference is the added cost.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rws::serve::activation::{Activation, Activations};

const NOW: u64 = 1_000_000;

/// 10 regions × 10 sites × 10 cameras: 1,000 scopes (regions, sites and single
/// cameras), every tenth one active now.
fn loaded() -> Activations {
    let mut list = Vec::new();
    for i in 0..1000u64 {
        let (r, s, c) = (i / 100, (i / 10) % 10, i % 10);
        let scope = match i % 3 {
            0 => format!("region-{r}/site-{s}/cam-{c}"),
            1 => format!("region-{r}/site-{s}/"),
            _ => format!("region-{r}/"),
        };
        let active = i % 10 == 0;
        list.push(Activation {
            id: format!("a{i}"),
            scope,
            profile: "fog".into(),
            since_ms: if active { NOW - 10 } else { NOW - 1000 },
            until_ms: if active { NOW + 1000 } else { NOW - 1 },
            reason: String::new(),
        });
    }
    Activations::new(list)
}

fn bench(c: &mut Criterion) {
    let empty = Activations::default();
    let loaded = loaded();
    assert_eq!(
        loaded.all().iter().filter(|a| a.is_active(NOW)).count(),
        100
    );
    let mut g = c.benchmark_group("resolve");
    for (what, source) in [
        // Found at its site's scope, after the camera's own.
        ("match", "region-3/site-4/cam-0"),
        // Every prefix tried, then `*`: the longest path through the lookup.
        ("deep-miss", "elsewhere/a/b/c/cam-1"),
        ("no-source", ""),
    ] {
        g.bench_function(format!("none/{what}"), |b| {
            b.iter(|| black_box(empty.lookup(black_box(source), NOW)))
        });
        g.bench_function(format!("1000-scopes/{what}"), |b| {
            b.iter(|| black_box(loaded.lookup(black_box(source), NOW)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
