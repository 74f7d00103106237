//! `rws bench abuse`: a hostile flood beside a well-behaved client, against a
//! running server on loopback. The good client first runs alone, then under
//! the flood, so its latencies are compared within one run; the server's
//! memory, decodes in flight and shed counts are scraped every second.
//!
//! The flood: clients that send large noise JPEGs as fast as they are
//! answered, each with a short deadline (so they give up and send again) or
//! with none (so they hold slots as long as the server lets them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;

use super::soak::Scraper;
use super::{Percentiles, check_loopback};
use crate::server::client::server_uri;
use crate::server::pb;
use crate::{Error, Result};

pub struct AbuseOptions {
    pub addr: String,
    pub metrics_url: String,
    /// How long the good client runs alone, then under the flood.
    pub duration: Duration,
    pub hostile_clients: usize,
    /// Side of the square noise JPEG the flood sends.
    pub side: u32,
    /// The flood's deadline; `None` sends without one.
    pub hostile_deadline: Option<Duration>,
    /// How much lower than normal the flood's threads run (Linux nice): on one
    /// machine, a stand-in for a flood sent from others, whose sending takes
    /// no CPU from the server or the good client. 0: the same priority.
    pub flood_nice: i32,
    /// What the good client sends, and how often.
    pub good_image: Vec<u8>,
    pub good_rate: f64,
    pub good_deadline: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct GoodReport {
    pub sent: usize,
    pub answered: usize,
    /// Failures by gRPC code.
    pub failures: BTreeMap<String, usize>,
    pub latency: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    pub second: u32,
    pub rss_bytes: f64,
    pub decodes_small: f64,
    pub decodes_large: f64,
    pub pixels_in_flight: f64,
    /// Cumulative, by reason.
    pub shed: BTreeMap<String, f64>,
    /// Cumulative, by stage.
    pub cancelled: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AbuseReport {
    pub image_bytes: usize,
    pub flood_nice: i32,
    pub alone: GoodReport,
    pub flooded: GoodReport,
    /// Flooded p99 over alone p99.
    pub p99_ratio: f64,
    /// The flood's answers, by gRPC code (`OK` for a classification).
    pub hostile: BTreeMap<String, usize>,
    pub peak_rss_bytes: f64,
    pub ticks: Vec<Tick>,
}

/// A square JPEG of uniform noise: the most expensive image per byte to decode.
pub fn noise_jpeg(side: u32) -> Result<Vec<u8>> {
    let mut rng = crate::rng::Rng::new(7);
    let img = image::RgbImage::from_fn(side, side, |_, _| {
        let v = rng.next_u64();
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)
        .map_err(|e| Error::Internal(format!("cannot encode the noise JPEG: {e}")))?;
    Ok(out.into_inner())
}

fn request(image: &[u8], deadline: Option<Duration>) -> tonic::Request<pb::ClassifyRequest> {
    let mut req = tonic::Request::new(pb::ClassifyRequest {
        input: Some(pb::classify_request::Input::Image(image.to_vec())),
        top_k: 1,
        ..Default::default()
    });
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    req
}

fn code_name(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

async fn channel(addr: &str) -> Result<Channel> {
    Channel::builder(server_uri(addr)?)
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to {addr}: {e}")))
}

/// The good client on a thread and runtime of its own, so that its latencies
/// are the server's, not those of a runtime busy sending the flood.
async fn good(o: &AbuseOptions, for_: Duration) -> Result<GoodReport> {
    let o = AbuseOptions {
        addr: o.addr.clone(),
        metrics_url: String::new(),
        good_image: o.good_image.clone(),
        ..*o
    };
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the good client: {e}")))?
            .block_on(good_here(&o, for_))
    });
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| Error::Internal(format!("the good client failed: {e}")))?
        .map_err(|_| Error::Internal("the good client panicked".into()))?
}

/// The good client: `rate` requests a second, each on time or counted late.
async fn good_here(o: &AbuseOptions, for_: Duration) -> Result<GoodReport> {
    let mut client = pb::inference_client::InferenceClient::new(channel(&o.addr).await?)
        .max_encoding_message_size(usize::MAX);
    let period = Duration::from_secs_f64(1.0 / o.good_rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + for_;
    let (mut sent, mut times, mut failures) = (0, Vec::new(), BTreeMap::new());
    while Instant::now() < end {
        tick.tick().await;
        sent += 1;
        let t = Instant::now();
        match client
            .classify(request(&o.good_image, Some(o.good_deadline)))
            .await
        {
            Ok(_) => times.push(t.elapsed()),
            Err(s) => *failures.entry(code_name(&s)).or_insert(0) += 1,
        }
    }
    Ok(GoodReport {
        sent,
        answered: times.len(),
        failures,
        latency: Percentiles::of(times),
    })
}

/// One hostile client: sends until `stop`, counting answers by code.
async fn hostile(
    addr: String,
    image: Arc<Vec<u8>>,
    deadline: Option<Duration>,
    stop: Arc<AtomicBool>,
) -> Result<BTreeMap<String, usize>> {
    let mut client = pb::inference_client::InferenceClient::new(channel(&addr).await?)
        .max_encoding_message_size(usize::MAX);
    let mut counts = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let code = match client.classify(request(&image, deadline)).await {
            Ok(_) => "OK".to_string(),
            Err(s) => code_name(&s),
        };
        *counts.entry(code).or_insert(0) += 1;
    }
    Ok(counts)
}

fn labelled(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let key = labels
            .split(',')
            .find_map(|kv| {
                kv.strip_prefix(label)?
                    .strip_prefix("=\"")?
                    .strip_suffix('"')
            })
            .unwrap_or("")
            .to_string();
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(key).or_insert(0.0) += v;
        }
    }
    out
}

fn plain(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn tick(scraper: &Scraper, second: u32) -> Result<Tick> {
    use crate::serve::metrics as m;
    let text = scraper.text().await?;
    let decodes = labelled(&text, m::DECODES_IN_FLIGHT, "lane");
    Ok(Tick {
        second,
        rss_bytes: plain(&text, m::RESIDENT_BYTES),
        decodes_small: decodes.get("small").copied().unwrap_or(0.0),
        decodes_large: decodes.get("large").copied().unwrap_or(0.0),
        pixels_in_flight: plain(&text, m::DECODE_PIXELS_IN_FLIGHT),
        shed: labelled(&text, m::SHED, "reason"),
        cancelled: labelled(&text, m::CANCELLED, "stage"),
    })
}

pub async fn abuse(o: &AbuseOptions) -> Result<AbuseReport> {
    check_loopback(&o.addr)?;
    let scraper = Scraper::new(&o.metrics_url)?;
    scraper.text().await?;
    let image = Arc::new(noise_jpeg(o.side)?);
    let alone = good(o, o.duration).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let nice = o.flood_nice;
    let sender = tokio::runtime::Builder::new_multi_thread()
        .on_thread_start(move || crate::serve::admission::lower_thread_priority(nice))
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the flood: {e}")))?;
    let flood: Vec<_> = (0..o.hostile_clients)
        .map(|_| {
            sender.spawn(hostile(
                o.addr.clone(),
                image.clone(),
                o.hostile_deadline,
                stop.clone(),
            ))
        })
        .collect();
    let start = Instant::now();
    let watch = {
        let stop = stop.clone();
        async move {
            let mut ticks = Vec::new();
            let mut every = tokio::time::interval(Duration::from_secs(1));
            while !stop.load(Ordering::Relaxed) {
                every.tick().await;
                ticks.push(tick(&scraper, start.elapsed().as_secs() as u32).await?);
            }
            Ok::<_, Error>(ticks)
        }
    };
    let watching = tokio::spawn(watch);
    let flooded = good(o, o.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut hostile_counts = BTreeMap::new();
    for h in flood {
        let counts = h
            .await
            .map_err(|e| Error::Internal(format!("a hostile client failed: {e}")))??;
        for (k, v) in counts {
            *hostile_counts.entry(k).or_insert(0) += v;
        }
    }
    sender.shutdown_background();
    let ticks = watching
        .await
        .map_err(|e| Error::Internal(format!("the scraper failed: {e}")))??;
    let flooded = flooded?;
    let peak = ticks.iter().map(|t| t.rss_bytes).fold(0.0, f64::max);
    Ok(AbuseReport {
        image_bytes: image.len(),
        flood_nice: o.flood_nice,
        p99_ratio: flooded.latency.p99_us / alone.latency.p99_us.max(1.0),
        alone,
        flooded,
        hostile: hostile_counts,
        peak_rss_bytes: peak,
        ticks,
    })
}

impl std::fmt::Display for AbuseReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let good = |f: &mut std::fmt::Formatter<'_>, what: &str, g: &GoodReport| {
            writeln!(
                f,
                "good client {what}: {}/{} answered, failures {:?}; {}",
                g.answered, g.sent, g.failures, g.latency
            )
        };
        good(f, "alone", &self.alone)?;
        good(f, "under the flood", &self.flooded)?;
        writeln!(f, "p99 under the flood / alone: {:.2}x", self.p99_ratio)?;
        writeln!(f, "flood threads at nice +{}", self.flood_nice)?;
        writeln!(
            f,
            "flood ({} KB per image): {:?}",
            self.image_bytes / 1024,
            self.hostile
        )?;
        writeln!(f, "peak RSS {:.0} MB", self.peak_rss_bytes / 1e6)?;
        writeln!(
            f,
            "second  RSS MB  decodes small/large  Mpixels  shed  cancelled"
        )?;
        for t in &self.ticks {
            writeln!(
                f,
                "{:>6}  {:>6.0}  {:>5.0}/{:<5.0}  {:>13.1}  {:?}  {:?}",
                t.second,
                t.rss_bytes / 1e6,
                t.decodes_small,
                t.decodes_large,
                t.pixels_in_flight / 1e6,
                t.shed,
                t.cancelled
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_are_summed_by_their_label() {
        let text = "rws_shed_total{reason=\"peer_limit\"} 3\nrws_shed_total{reason=\"decode_deadline\"} 2\n\
                    rws_decodes_in_flight{lane=\"large\"} 1\nrws_decode_pixels_in_flight 25000000\n";
        let shed = labelled(text, "rws_shed_total", "reason");
        assert_eq!(shed["peer_limit"], 3.0);
        assert_eq!(shed["decode_deadline"], 2.0);
        assert_eq!(
            labelled(text, "rws_decodes_in_flight", "lane")["large"],
            1.0
        );
        assert_eq!(plain(text, "rws_decode_pixels_in_flight"), 25e6);
    }
}
