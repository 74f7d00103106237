//! How busy the compute workers are, for work that must yield to requests
//! (shadow samples): requests waiting, batches running, and the share of the
//! last second the workers spent computing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The length of the window utilization is measured over.
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Load {
    /// Requests queued for a compute worker.
    pub waiting: AtomicUsize,
    /// Batches being computed.
    running: AtomicUsize,
    /// The current window: when it began, and the compute time in it.
    window: Mutex<(Instant, Duration)>,
    /// The last complete window's utilization, in thousandths per worker.
    last: AtomicU32,
    workers: u32,
}

impl Load {
    pub fn new(workers: usize) -> Load {
        Load {
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            window: Mutex::new((Instant::now(), Duration::ZERO)),
            last: AtomicU32::new(0),
            workers: workers.max(1) as u32,
        }
    }

    /// Runs one batch, counted as running and timed.
    pub fn run<T>(&self, batch: impl FnOnce() -> T) -> T {
        self.running.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let out = batch();
        self.running.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.1 += now - start;
        let span = now - w.0;
        if span >= WINDOW {
            let share = w.1.as_secs_f64() / span.as_secs_f64() / f64::from(self.workers);
            self.last
                .store((share * 1000.0).round() as u32, Ordering::Relaxed);
            *w = (now, Duration::ZERO);
        }
        out
    }

    /// Share of the last second the workers spent computing, 0 to 1.
    pub fn utilization(&self) -> f64 {
        f64::from(self.last.load(Ordering::Relaxed)) / 1000.0
    }

    /// Whether a request waits, or a batch is being computed.
    pub fn active(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0 || self.running.load(Ordering::Relaxed) > 0
    }

    /// Whether requests wait now, or the workers were mostly busy over the
    /// last second: then optional work is dropped rather than queued.
    pub fn busy(&self, max_utilization: f64) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0 || self.utilization() > max_utilization
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_is_the_computing_share_of_the_last_window() {
        let load = Load::new(1);
        assert_eq!(load.utilization(), 0.0);
        let start = Instant::now();
        while start.elapsed() < WINDOW + Duration::from_millis(50) {
            load.run(|| std::thread::sleep(Duration::from_millis(20)));
            std::thread::sleep(Duration::from_millis(20));
        }
        let u = load.utilization();
        assert!((0.3..0.7).contains(&u), "half busy, measured {u}");
        assert!(!load.active());
        load.run(|| assert!(load.active()));
    }
}
