//! `rws bench soak`: a long run against a live server, looking for growth.
//!
//! Traffic is paced (open loop) at a fraction of the capacity measured first, so
//! that latency shows the server and not the client's own queue. Meanwhile the
//! default profile is toggled, a signature is loaded, used, refused and unloaded in
//! a loop, and the server's `/metrics` are scraped for resident memory, heap,
//! descriptors and threads: the numbers that grow when something leaks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{LoadOptions, Percentiles, check_loopback, load};
use crate::serve::metrics::{
    HEAP_BYTES, OPEN_FDS, PATCH_APPLY_SECONDS, RESIDENT_BYTES, RESIDENT_PROFILES, THREADS,
};
use crate::serve::profile::SignatureRef;
use crate::server::client::{RwsClient, SignatureUpload};
use crate::{Error, Result, bail};

pub struct SoakOptions {
    pub addr: String,
    pub admin_token: Option<String>,
    /// The server's Prometheus endpoint, e.g. `http://127.0.0.1:9464/metrics`.
    pub metrics_url: String,
    pub duration: Duration,
    /// The point whose resident memory the end is compared with: by then caches,
    /// arenas and connection pools have reached their working size.
    pub settle: Duration,
    /// How long the capacity is measured for, before the soak.
    pub calibrate: Duration,
    /// Concurrent clients while calibrating.
    pub clients: usize,
    /// Share of the measured capacity the soak sends.
    pub load_fraction: f64,
    /// Profiles requests name, round robin (empty: every profile the server
    /// defines, and the default).
    pub profiles: Vec<String>,
    /// The default profile is switched between these two.
    pub toggle: (String, String),
    pub toggle_every: Duration,
    /// A signature file to churn: uploaded on even cycles, loaded on odd ones by
    /// its path under the model directory's `signatures/`.
    pub signature: std::path::PathBuf,
    pub churn_every: Duration,
    pub sample_every: Duration,
    /// Latency percentiles are reported per window of this length.
    pub window: Duration,
    pub images: Vec<Vec<u8>>,
}

/// The server's process as `/metrics` showed it at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub seconds: f64,
    pub rss_bytes: f64,
    /// Absent where the allocator cannot say (not glibc).
    pub heap_bytes: Option<f64>,
    pub open_fds: f64,
    pub threads: f64,
    pub resident_profiles: f64,
    /// Patched stems built so far: with few resident slots, evictions refill them.
    #[serde(default)]
    pub stems_built: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Window {
    pub start_s: f64,
    pub requests: usize,
    pub errors: usize,
    pub latency: Percentiles,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakReport {
    pub capacity_rps: f64,
    pub target_rps: f64,
    pub achieved_rps: f64,
    pub requests: usize,
    pub errors: usize,
    /// Sends not made because the in-flight cap was reached: the server fell behind.
    pub skipped: usize,
    pub switches: usize,
    pub switch_errors: usize,
    pub churn_cycles: usize,
    /// Churn steps that failed, or a refusal that did not come.
    pub churn_errors: usize,
    /// Unloads of a signature a profile still uses, refused as they must be.
    pub expected_refusals: usize,
    /// Errors by what failed and how, with the first message of each.
    #[serde(default)]
    pub error_kinds: Vec<ErrorKind>,
    pub window_s: f64,
    pub windows: Vec<Window>,
    pub samples: Vec<Sample>,
    /// Resident memory at the end over resident memory at `settle`, minus one.
    pub rss_growth: f64,
    pub heap_growth: Option<f64>,
    /// Median window p99 of the last third over that of the first third, minus one.
    pub p99_change: f64,
    /// Lowest and highest after `settle`.
    pub fds_range: (f64, f64),
    pub threads_range: (f64, f64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorKind {
    /// The step that failed, e.g. `classify` or `put profile`.
    pub what: String,
    /// The gRPC-like kind, e.g. `resource_exhausted`.
    pub kind: String,
    pub count: usize,
    pub example: String,
}

/// Requests in flight at most; beyond it a paced send is skipped and counted.
const MAX_IN_FLIGHT: usize = 512;
const CHURN_SIGNATURE: &str = "soak-signature";
const CHURN_PROFILE: &str = "soak-profile";

/// What the concurrent parts of the soak write to.
#[derive(Default)]
struct Log {
    /// (window, microseconds, ok) of each request.
    requests: Vec<(u32, u32, bool)>,
    errors: std::collections::BTreeMap<(String, &'static str), (usize, String)>,
}

impl Log {
    fn note(&mut self, what: &str, e: &Error) {
        let (count, _) = self
            .errors
            .entry((what.to_string(), e.kind()))
            .or_insert_with(|| (0, e.to_string()));
        *count += 1;
    }
}

pub async fn soak(o: &SoakOptions) -> Result<SoakReport> {
    check_loopback(&o.addr)?;
    if o.images.is_empty() {
        bail!(InvalidArgument, "the soak needs at least one image to send");
    }
    if !(o.load_fraction > 0.0 && o.load_fraction <= 1.0) {
        bail!(InvalidArgument, "--load must be in (0, 1]");
    }
    let upload = std::fs::read(&o.signature).map_err(|e| Error::io(&o.signature, e))?;
    let by_path = o
        .signature
        .file_name()
        .map(|n| format!("signatures/{}", n.to_string_lossy()))
        .ok_or_else(|| Error::InvalidArgument("--signature must name a file".into()))?;
    let scraper = Scraper::new(&o.metrics_url)?;
    scraper.sample(0.0).await?;
    let mut client = RwsClient::connect(&o.addr, None, o.admin_token.as_deref()).await?;
    let profiles = match o.profiles.is_empty() {
        false => o.profiles.clone(),
        true => {
            let listed = client.list_profiles().await?.profiles;
            std::iter::once(String::new())
                .chain(listed.into_iter().map(|p| p.name))
                .collect()
        }
    };
    // Leftovers of an interrupted soak would make the first cycle fail.
    let _ = client.delete_profile(CHURN_PROFILE, false).await;
    let _ = client.unload_signature(CHURN_SIGNATURE, false).await;

    let capacity = load(&LoadOptions {
        addr: o.addr.clone(),
        clients: o.clients,
        duration: o.calibrate,
        max_requests: None,
        profiles: profiles.clone(),
        toggle: None,
        images: o.images.clone(),
        admin_token: o.admin_token.clone(),
    })
    .await?
    .throughput_rps;
    let target = capacity * o.load_fraction;
    if target < 1.0 {
        bail!(
            Unavailable,
            "the server answered {capacity:.1} requests a second while calibrating; too few to soak"
        );
    }

    let start = Instant::now();
    let stop = start + o.duration;
    let log = Arc::new(Mutex::new(Log::default()));
    let toggler = tokio::spawn(toggle(
        client.clone(),
        o.toggle.clone(),
        o.toggle_every,
        stop,
        log.clone(),
    ));
    let churner = tokio::spawn(churn(
        client.clone(),
        Churn {
            upload,
            by_path,
            image: o.images[0].clone(),
            every: o.churn_every,
        },
        stop,
        log.clone(),
    ));
    let sampler = {
        let every = o.sample_every;
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(every);
            while Instant::now() < stop {
                tick.tick().await;
                samples.push(scraper.sample(start.elapsed().as_secs_f64()).await);
            }
            samples.into_iter().collect::<Result<Vec<_>>>()
        })
    };

    let (sent, skipped) = pace(&client, o, &profiles, target, start, stop, &log).await;
    let (switches, switch_errors) = join(toggler).await?;
    let (churn_cycles, churn_errors, expected_refusals) = join(churner).await?;
    let samples = join(sampler).await??;
    let seconds = start.elapsed().as_secs_f64();

    let log = std::mem::take(&mut *log.lock().unwrap());
    let windows = windows(&log.requests, o.window);
    let errors = log.requests.iter().filter(|r| !r.2).count();
    let after = |s: &&Sample| s.seconds >= o.settle.as_secs_f64();
    let settled = samples.iter().find(after).or(samples.first());
    let last = samples.last();
    let growth = |f: fn(&Sample) -> Option<f64>| match (settled.and_then(f), last.and_then(f)) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a - 1.0),
        _ => None,
    };
    let range = |f: fn(&Sample) -> f64| {
        samples
            .iter()
            .filter(after)
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    Ok(SoakReport {
        capacity_rps: capacity,
        target_rps: target,
        achieved_rps: (sent - errors) as f64 / seconds,
        requests: sent,
        errors,
        skipped,
        switches,
        switch_errors,
        churn_cycles,
        churn_errors,
        expected_refusals,
        error_kinds: log
            .errors
            .into_iter()
            .map(|((what, kind), (count, example))| ErrorKind {
                what,
                kind: kind.into(),
                count,
                example,
            })
            .collect(),
        p99_change: p99_change(&windows),
        window_s: o.window.as_secs_f64(),
        windows,
        rss_growth: growth(|s| Some(s.rss_bytes)).unwrap_or(f64::NAN),
        heap_growth: growth(|s| s.heap_bytes),
        fds_range: range(|s| s.open_fds),
        threads_range: range(|s| s.threads),
        samples,
    })
}

async fn join<T>(task: tokio::task::JoinHandle<T>) -> Result<T> {
    task.await.map_err(|e| Error::Internal(e.to_string()))
}

/// Sends at `rate` until `stop`; the requests sent and the sends skipped.
async fn pace(
    client: &RwsClient,
    o: &SoakOptions,
    profiles: &[String],
    rate: f64,
    start: Instant,
    stop: Instant,
    log: &Arc<Mutex<Log>>,
) -> (usize, usize) {
    let period = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let window = o.window.as_secs_f64();
    let (mut sent, mut skipped, mut next) = (0usize, 0usize, start);
    while next < stop {
        tokio::time::sleep_until(next.into()).await;
        // Windowed by when it was due, so none falls past the end.
        let slot = (next.duration_since(start).as_secs_f64() / window) as u32;
        next += period;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let i = sent;
        sent += 1;
        let (mut client, log) = (client.clone(), log.clone());
        let (image, profile) = (
            o.images[i % o.images.len()].clone(),
            profiles[i % profiles.len()].clone(),
        );
        tokio::spawn(async move {
            let t = Instant::now();
            let r = client.classify(image, &profile, "", 1, false).await;
            let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
            let mut log = log.lock().unwrap();
            log.requests.push((slot, us, r.is_ok()));
            if let Err(e) = r {
                log.note("classify", &e);
            }
            drop(permit);
        });
    }
    // Every permit back means every request has answered.
    let _ = in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
    (sent, skipped)
}

/// Switches the default profile between two until `stop`: switches, errors.
async fn toggle(
    mut client: RwsClient,
    (a, b): (String, String),
    every: Duration,
    stop: Instant,
    log: Arc<Mutex<Log>>,
) -> (usize, usize) {
    let (mut n, mut errors) = (0, 0);
    let mut tick = tokio::time::interval(every);
    while Instant::now() < stop {
        tick.tick().await;
        let name = if n % 2 == 0 { &a } else { &b };
        n += 1;
        if let Err(e) = client.set_default(name, false).await {
            log.lock().unwrap().note("set default", &e);
            errors += 1;
        }
    }
    (n, errors)
}

struct Churn {
    upload: Vec<u8>,
    by_path: String,
    image: Vec<u8>,
    every: Duration,
}

/// Loads a signature, defines a profile on it, serves one image with it, checks
/// that unloading it is refused while the profile uses it, then deletes both,
/// until `stop`: cycles, errors, refusals seen.
async fn churn(
    mut client: RwsClient,
    c: Churn,
    stop: Instant,
    log: Arc<Mutex<Log>>,
) -> (usize, usize, usize) {
    let (mut cycles, mut errors, mut refusals) = (0, 0, 0);
    let refs = [SignatureRef {
        name: CHURN_SIGNATURE.into(),
        alpha: 0.7,
    }];
    let fail = |what: &str, e: &Error| {
        log.lock().unwrap().note(what, e);
        1
    };
    while Instant::now() < stop {
        let source = match cycles % 2 {
            0 => SignatureUpload::Bytes(c.upload.clone()),
            _ => SignatureUpload::Path(c.by_path.clone()),
        };
        cycles += 1;
        if let Err(e) = client
            .load_signature(CHURN_SIGNATURE, source, false, false)
            .await
        {
            errors += fail("load signature", &e);
            tokio::time::sleep(c.every).await;
            continue;
        }
        match client.put_profile(CHURN_PROFILE, &refs, false, false).await {
            Err(e) => errors += fail("put profile", &e),
            Ok(_) => {
                if let Err(e) = client
                    .classify(c.image.clone(), CHURN_PROFILE, "", 1, false)
                    .await
                {
                    errors += fail("classify with the churned profile", &e);
                }
                match client.unload_signature(CHURN_SIGNATURE, false).await {
                    Err(Error::FailedPrecondition(_)) => refusals += 1,
                    Err(e) => errors += fail("unload of a signature in use", &e),
                    Ok(()) => {
                        let e = Error::Internal("accepted, while a profile uses it".into());
                        errors += fail("unload of a signature in use", &e);
                    }
                }
                if let Err(e) = client.delete_profile(CHURN_PROFILE, false).await {
                    errors += fail("delete profile", &e);
                }
            }
        }
        if let Err(e) = client.unload_signature(CHURN_SIGNATURE, false).await {
            errors += fail("unload signature", &e);
        }
        tokio::time::sleep(c.every).await;
    }
    (cycles, errors, refusals)
}

/// Percentiles of each window, in time order.
fn windows(requests: &[(u32, u32, bool)], window: Duration) -> Vec<Window> {
    let n = requests.iter().map(|r| r.0 as usize + 1).max().unwrap_or(0);
    let mut w: Vec<(Vec<Duration>, usize)> = vec![(Vec::new(), 0); n];
    for &(slot, us, ok) in requests {
        let slot = &mut w[slot as usize];
        match ok {
            true => slot.0.push(Duration::from_micros(us as u64)),
            false => slot.1 += 1,
        }
    }
    w.into_iter()
        .enumerate()
        .map(|(i, (lat, errors))| Window {
            start_s: i as f64 * window.as_secs_f64(),
            requests: lat.len() + errors,
            errors,
            latency: Percentiles::of(lat),
        })
        .collect()
}

/// How much the typical window p99 rose from the first third of the run to the
/// last: medians, so that one noisy window does not make a trend.
fn p99_change(windows: &[Window]) -> f64 {
    let third = windows.len() / 3;
    if third == 0 {
        return f64::NAN;
    }
    let median = |w: &[Window]| {
        let mut v: Vec<f64> = w.iter().map(|w| w.latency.p99_us).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    median(&windows[windows.len() - third..]) / median(&windows[..third]) - 1.0
}

/// Reads the process gauges from a server's Prometheus text.
pub(super) struct Scraper {
    url: hyper::Uri,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl Scraper {
    pub(super) fn new(url: &str) -> Result<Scraper> {
        let url: hyper::Uri = url
            .parse()
            .map_err(|_| Error::InvalidArgument("--metrics-url is not a URL".into()))?;
        check_loopback(&format!(
            "http://{}",
            url.authority().map_or("", |a| a.as_str())
        ))?;
        Ok(Scraper {
            url,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        })
    }

    /// The exposition text, as of now.
    pub(super) async fn text(&self) -> Result<String> {
        use http_body_util::BodyExt;
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::Unavailable(format!(
                "cannot scrape {} ({e}); is the server's --metrics-addr there?",
                self.url
            ))
        };
        let response = self
            .client
            .get(self.url.clone())
            .await
            .map_err(|e| unreachable(&e))?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    async fn sample(&self, seconds: f64) -> Result<Sample> {
        let text = self.text().await?;
        let gauge = |name: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .find_map(|v| v.trim().parse::<f64>().ok())
        };
        let need = |name: &str| {
            gauge(name).ok_or_else(|| {
                Error::Unavailable(format!(
                    "{} has no {name}; is it an rws server's /metrics?",
                    self.url
                ))
            })
        };
        Ok(Sample {
            seconds,
            rss_bytes: need(RESIDENT_BYTES)?,
            heap_bytes: gauge(HEAP_BYTES),
            open_fds: need(OPEN_FDS)?,
            threads: need(THREADS)?,
            resident_profiles: gauge(RESIDENT_PROFILES).unwrap_or(0.0),
            stems_built: gauge(&format!("{}_count", PATCH_APPLY_SECONDS)).unwrap_or(0.0),
        })
    }
}

/// Charts of the report: memory, latency by window, descriptors and threads.
pub fn plot(r: &SoakReport, dir: &std::path::Path) -> Result<()> {
    use crate::lab::plot::{Estimate, Series, line_chart};
    let series = |name: &str, points: Vec<(f64, f64)>| Series {
        name: name.into(),
        points: points
            .into_iter()
            .map(|(x, y)| (x, Estimate::of(&[y])))
            .collect(),
    };
    let minutes = |s: &Sample| s.seconds / 60.0;
    let mb = 1.0 / (1024.0 * 1024.0);
    let mut memory = vec![series(
        "resident",
        r.samples
            .iter()
            .map(|s| (minutes(s), s.rss_bytes * mb))
            .collect(),
    )];
    if r.samples.iter().all(|s| s.heap_bytes.is_some()) {
        memory.push(series(
            "heap in use",
            r.samples
                .iter()
                .map(|s| (minutes(s), s.heap_bytes.unwrap_or(0.0) * mb))
                .collect(),
        ));
    }
    let top = |v: &[Series]| {
        let hi = v
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1.mean))
            .fold(0.0, f64::max);
        0.0..(hi * 1.15).max(1.0)
    };
    line_chart(
        &dir.join("soak-memory.png"),
        "Server memory during the soak",
        "minutes",
        "MiB",
        top(&memory),
        &memory,
    )?;
    let window_ms = |f: fn(&Percentiles) -> f64| {
        r.windows
            .iter()
            .map(|w| ((w.start_s + 0.5 * r.window_s) / 60.0, f(&w.latency) / 1e3))
            .collect()
    };
    let latency = [
        series("p50", window_ms(|p| p.p50_us)),
        series("p99", window_ms(|p| p.p99_us)),
    ];
    line_chart(
        &dir.join("soak-latency.png"),
        "Latency per window during the soak",
        "minutes",
        "ms",
        top(&latency),
        &latency,
    )?;
    let counts = [
        series(
            "open descriptors",
            r.samples.iter().map(|s| (minutes(s), s.open_fds)).collect(),
        ),
        series(
            "threads",
            r.samples.iter().map(|s| (minutes(s), s.threads)).collect(),
        ),
    ];
    line_chart(
        &dir.join("soak-handles.png"),
        "Descriptors and threads during the soak",
        "minutes",
        "count",
        top(&counts),
        &counts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_split_requests_by_slot_and_count_errors() {
        let r = [(0, 100, true), (0, 300, false), (2, 50, true)];
        let w = windows(&r, Duration::from_secs(60));
        assert_eq!(w.len(), 3);
        assert_eq!((w[0].requests, w[0].errors, w[0].latency.count), (2, 1, 1));
        assert_eq!((w[1].requests, w[2].start_s), (0, 120.0));
    }

    #[test]
    fn p99_change_compares_the_outer_thirds_by_median() {
        let w = |p99: f64| Window {
            start_s: 0.0,
            requests: 1,
            errors: 0,
            latency: Percentiles {
                p99_us: p99,
                ..Default::default()
            },
        };
        let flat_with_a_spike: Vec<_> = [10.0, 10.0, 99.0, 10.0, 10.0, 10.0].map(w).into();
        assert_eq!(p99_change(&flat_with_a_spike), 0.0);
        let rising: Vec<_> = [10.0, 10.0, 15.0, 15.0, 20.0, 20.0].map(w).into();
        assert_eq!(p99_change(&rising), 1.0);
        assert!(p99_change(&rising[..2]).is_nan());
    }
}
