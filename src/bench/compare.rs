//! `rws bench compare`: two ways of serving the same stream, side by side in
//! one run against a running server. Phases alternate A B B A A B ..., so that
//! drift in the machine's speed falls on both sides alike, and each side is
//! reported by the median over its phases.
//!
//! A side is a profile the requests name, optionally with a shadow running
//! during its phases: `clean` against `auto` measures what the detector costs a
//! stream, `clean` against `clean` with a shadow what shadowing adds.

use std::time::Duration;

use serde::Serialize;

use crate::bench::{LoadOptions, LoadReport, load};
use crate::lab::corrupt::Corruption;
use crate::lab::data::Digits;
use crate::lab::detector::{DetectorOptions, samples};
use crate::server::client::RwsClient;
use crate::{Error, Result};

/// One way of serving.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// The profile requests name (empty: the server's default).
    pub profile: String,
    /// A shadow run during this side's phases: candidate profile and fraction.
    pub shadow: Option<(String, f64)>,
}

pub struct CompareOptions {
    pub addr: String,
    pub admin_token: Option<String>,
    pub clients: usize,
    /// Length of one phase.
    pub phase: Duration,
    /// Phases per side.
    pub rounds: usize,
    pub a: Side,
    pub b: Side,
    pub images: Vec<Vec<u8>>,
}

/// One side's phases and their medians.
#[derive(Debug, Clone, Serialize)]
pub struct SideReport {
    pub side: Side,
    pub phases: Vec<LoadReport>,
    pub median_throughput_rps: f64,
    pub median_p50_us: f64,
    pub median_p99_us: f64,
    pub errors: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub a: SideReport,
    pub b: SideReport,
    /// B over A, of the medians.
    pub throughput_ratio: f64,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
}

/// Runs the phases and compares the sides.
pub async fn compare(o: &CompareOptions) -> Result<CompareReport> {
    let mut admin = RwsClient::connect(&o.addr, None, o.admin_token.as_deref()).await?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..o.rounds.max(1) {
        // A B, then B A: each side as often first as second.
        let order = match round % 2 {
            0 => [(&o.a, 0), (&o.b, 1)],
            _ => [(&o.b, 1), (&o.a, 0)],
        };
        for (side, which) in order {
            if let Some((profile, fraction)) = &side.shadow {
                admin.shadow(profile, *fraction).await?;
            }
            let report = load(&LoadOptions {
                addr: o.addr.clone(),
                clients: o.clients,
                duration: o.phase,
                max_requests: None,
                profiles: vec![side.profile.clone()],
                toggle: None,
                images: o.images.clone(),
                admin_token: None,
            })
            .await;
            if let Some((profile, _)) = &side.shadow {
                admin.shadow(profile, 0.0).await?;
            }
            match which {
                0 => a.push(report?),
                _ => b.push(report?),
            }
        }
    }
    let (a, b) = (side_report(&o.a, a), side_report(&o.b, b));
    Ok(CompareReport {
        throughput_ratio: b.median_throughput_rps / a.median_throughput_rps,
        p50_ratio: b.median_p50_us / a.median_p50_us,
        p99_ratio: b.median_p99_us / a.median_p99_us,
        a,
        b,
    })
}

fn side_report(side: &Side, phases: Vec<LoadReport>) -> SideReport {
    let median = |f: &dyn Fn(&LoadReport) -> f64| {
        let mut v: Vec<f64> = phases.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    SideReport {
        side: side.clone(),
        median_throughput_rps: median(&|r| r.throughput_rps),
        median_p50_us: median(&|r| r.latency.p50_us),
        median_p99_us: median(&|r| r.latency.p99_us),
        errors: phases.iter().map(|r| r.errors).sum(),
        phases,
    }
}

/// `n` PNG images of digits: a third clean, the rest drawn from `kinds` at
/// severities 1 to 5 (seeded), like the stream the `auto` results in
/// docs/RESULTS.md are measured on.
pub fn mixed_stream(
    digits: &Digits,
    kinds: &[Corruption],
    n: usize,
    seed: u64,
) -> Result<Vec<Vec<u8>>> {
    let cfg = crate::lab::train::mnist_config();
    let per_class = n.div_ceil(10);
    let opts = DetectorOptions {
        kinds: kinds.to_vec(),
        copies: 1,
        seed,
        ..Default::default()
    };
    let [h, w] = cfg.input_size;
    samples(&digits.take_per_class(per_class), &cfg, &opts)
        .into_iter()
        .take(n)
        .map(|s| {
            let pixels: Vec<u8> = s
                .input
                .iter()
                .map(|v| {
                    ((v * cfg.std[0] + cfg.mean[0]) * 255.0)
                        .round()
                        .clamp(0.0, 255.0) as u8
                })
                .collect();
            let img = image::GrayImage::from_raw(w as u32, h as u32, pixels)
                .ok_or_else(|| Error::Internal("a digit of the wrong size".into()))?;
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)
                .map_err(|e| Error::Internal(format!("cannot encode a PNG: {e}")))?;
            Ok(out.into_inner())
        })
        .collect()
}
