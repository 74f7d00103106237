//! Live traffic, per profile, over the last few minutes: requests per second and
//! latency percentiles, for the console's chart. Prometheus keeps the long
//! history; this keeps a small ring of one-second buckets in memory, so the
//! console can draw without a metrics stack.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds of history kept.
pub const WINDOW: usize = 300;
/// Latency buckets: upper bounds in microseconds, roughly 25% apart, up to 10 s.
const BOUNDS_US: usize = 64;

fn bucket_of(us: u64) -> usize {
    // Bucket i holds latencies up to 50 µs · 1.25^i.
    let mut bound = 50.0f64;
    for i in 0..BOUNDS_US {
        if us as f64 <= bound {
            return i;
        }
        bound *= 1.25;
    }
    BOUNDS_US - 1
}

fn bound_us(i: usize) -> f64 {
    50.0 * 1.25f64.powi(i as i32)
}

#[derive(Clone)]
struct Second {
    /// Seconds since the recorder started.
    at: u64,
    count: u64,
    errors: u64,
    latency: [u32; BOUNDS_US],
}

impl Second {
    fn empty(at: u64) -> Self {
        Second {
            at,
            count: 0,
            errors: 0,
            latency: [0; BOUNDS_US],
        }
    }
}

/// One profile's figures for one second.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Point {
    /// Seconds before now (0: the second in progress).
    pub ago: u64,
    pub requests: u64,
    pub errors: u64,
    /// Upper bounds of the latency percentiles, microseconds; 0 without requests.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One profile's seconds, and the last second it saw a request.
struct Ring {
    last: u64,
    seconds: Vec<Second>,
}

impl Ring {
    /// Whether it holds no request of the window before `now`: it shows only zeros.
    fn idle(&self, now: u64) -> bool {
        now.saturating_sub(self.last) >= WINDOW as u64
    }
}

/// Rings kept at most: a chart of more profiles is unreadable, and each ring
/// takes about 80 KiB.
pub const MAX_RINGS: usize = 64;

pub struct Traffic {
    start: Instant,
    profiles: Mutex<BTreeMap<String, Ring>>,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            start: Instant::now(),
            profiles: Mutex::default(),
        }
    }
}

impl Traffic {
    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// Records one answered (or refused) request of `profile`.
    pub fn record(&self, profile: &str, latency: Duration, ok: bool) {
        self.record_at(self.now(), profile, latency, ok);
    }

    /// Records at second `at`. With [`MAX_RINGS`] rings, a new profile takes the
    /// place of idle ones; while all of them are busy it is not charted, rather
    /// than pushing out a busy one (which would reallocate a ring per request).
    fn record_at(&self, at: u64, profile: &str, latency: Duration, ok: bool) {
        let mut profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        // A name is allocated once per profile, not per request.
        if !profiles.contains_key(profile) {
            if profiles.len() >= MAX_RINGS {
                profiles.retain(|_, ring| !ring.idle(at));
                if profiles.len() >= MAX_RINGS {
                    return;
                }
            }
            let seconds = vec![Second::empty(u64::MAX); WINDOW];
            profiles.insert(profile.to_string(), Ring { last: at, seconds });
        }
        let ring = profiles.get_mut(profile).expect("inserted above");
        ring.last = at;
        let slot = &mut ring.seconds[(at % WINDOW as u64) as usize];
        if slot.at != at {
            *slot = Second::empty(at);
        }
        slot.count += 1;
        slot.errors += u64::from(!ok);
        slot.latency[bucket_of(latency.as_micros() as u64)] += 1;
    }

    /// Forgets the profiles `exists` no longer knows once their window holds no
    /// request, so deleted profiles leave the chart (and memory) for good.
    pub fn retain(&self, exists: impl Fn(&str) -> bool) {
        self.retain_at(self.now(), exists);
    }

    fn retain_at(&self, now: u64, exists: impl Fn(&str) -> bool) {
        let mut profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        profiles.retain(|name, ring| !ring.idle(now) || exists(name));
    }

    /// The last `seconds` (at most [`WINDOW`]) of each profile, newest first.
    pub fn recent(&self, seconds: usize) -> BTreeMap<String, Vec<Point>> {
        let now = self.now();
        let seconds = seconds.min(WINDOW) as u64;
        let profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        profiles
            .iter()
            .map(|(name, Ring { seconds: ring, .. })| {
                // Seconds before the recorder started, or not seen since, are empty.
                let points = (0..seconds)
                    .map(|ago| match now.checked_sub(ago) {
                        Some(at) if ring[(at % WINDOW as u64) as usize].at == at => {
                            point(ago, &ring[(at % WINDOW as u64) as usize])
                        }
                        _ => point(ago, &Second::empty(0)),
                    })
                    .collect();
                (name.clone(), points)
            })
            .collect()
    }
}

fn point(ago: u64, s: &Second) -> Point {
    let pct = |q: f64| {
        if s.count == 0 {
            return 0.0;
        }
        let rank = (q * s.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in s.latency.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                return bound_us(i);
            }
        }
        bound_us(BOUNDS_US - 1)
    };
    Point {
        ago,
        requests: s.count,
        errors: s.errors,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_hold_counts_and_percentile_bounds() {
        let t = Traffic::default();
        for us in [100, 120, 130, 5000] {
            t.record("fog", Duration::from_micros(us), true);
        }
        t.record("fog", Duration::from_micros(90), false);
        let r = t.recent(3);
        let now = &r["fog"][0];
        assert_eq!((now.requests, now.errors), (5, 1));
        assert!(
            now.p50_us >= 120.0 && now.p50_us < 120.0 * 1.25 + 1.0,
            "{now:?}"
        );
        assert!(
            now.p99_us >= 5000.0 && now.p99_us < 5000.0 * 1.25,
            "{now:?}"
        );
        assert_eq!(r["fog"].len(), 3);
        assert_eq!(r["fog"][1].requests, 0);
    }

    #[test]
    fn buckets_grow_by_a_quarter() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(50), 0);
        assert_eq!(bucket_of(51), 1);
        assert!(bound_us(bucket_of(1_000_000)) >= 1_000_000.0);
        assert_eq!(bucket_of(u64::MAX), BOUNDS_US - 1);
    }

    #[test]
    fn rings_of_gone_profiles_go_once_idle_for_the_window() {
        let t = Traffic::default();
        let ms = Duration::from_millis(1);
        t.record_at(10, "gone", ms, true);
        t.record_at(10, "idle", ms, true);
        let exists = |name: &str| name != "gone";
        t.retain_at(10 + WINDOW as u64 - 1, exists);
        assert_eq!(
            t.recent(1).len(),
            2,
            "gone still has a request in its window"
        );
        t.retain_at(10 + WINDOW as u64, exists);
        let names: Vec<_> = t.recent(1).into_keys().collect();
        assert_eq!(names, ["idle"], "an idle profile that exists stays");
    }

    #[test]
    fn rings_are_bounded_and_idle_ones_make_room() {
        let t = Traffic::default();
        let ms = Duration::from_millis(1);
        for i in 0..MAX_RINGS - 1 {
            t.record_at(0, &format!("p{i}"), ms, true);
        }
        t.record_at(10, "busy", ms, true);
        let window = WINDOW as u64;
        t.record_at(window - 1, "new", ms, true);
        assert!(
            !t.recent(1).contains_key("new"),
            "no busy ring is pushed out"
        );
        t.record_at(window, "new", ms, true);
        let names: Vec<_> = t.recent(1).into_keys().collect();
        assert_eq!(names, ["busy", "new"], "the idle rings made room");
    }
}
