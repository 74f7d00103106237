//! Admission: which decodes may start, so that no client, however hostile, can
//! take the cores from the others.
//!
//! Decoding is the one stage whose cost a client chooses (a 40-megapixel JPEG
//! costs thousands of times a camera thumbnail), and it cannot be stopped once
//! started. So before a decode starts:
//! - its cost is read from the header ([`preprocess::inspect`]);
//! - small images (the common case) take a slot of their own lane, one per
//!   core, which large images never use, so thumbnails never queue behind them;
//! - large images share fewer slots (one core is always left to the rest), a
//!   bound on the pixels being decoded at once (memory), and at most a few per
//!   peer address, waiting or running: one client cannot take every slot;
//! - a large image whose deadline is too close for its decode, at the speed
//!   decodes have been measured to run here, is refused at once.
//!
//! The permit belongs to the decode, not to the request: a client that cancels
//! or whose deadline passes frees nothing early, so abandoned decodes still
//! count against the bounds.
//!
//! Large decodes run on threads of their own at a lower CPU priority (nice
//! +10 on Linux): when the cores are contended, the reactor, small decodes and
//! the compute workers run first, and a large decode gets what is left.
//!
//! [`preprocess::inspect`]: crate::serve::preprocess::inspect

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::serve::metrics as m;
use crate::serve::preprocess::Cost;
use crate::{Error, Result, bail};

/// The pixel bound counts in units of this many pixels (a semaphore's permits
/// are `u32`, and 40 megapixels must fit many times over).
const PIXEL_UNIT: u64 = 4096;

#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    /// Images of at most this many pixels (and every tensor) use the small lane.
    pub small_pixels: u64,
    /// Decodes at once in the small lane.
    pub small_slots: usize,
    /// Decodes at once in the large lane.
    pub large_slots: usize,
    /// Pixels being decoded at once in the large lane (each needs up to 8 bytes).
    pub large_pixels: u64,
    /// Large images one peer address may have waiting or decoding at once.
    pub large_per_peer: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        AdmissionConfig {
            // A 1024x1024 photo, many times a camera frame the models take.
            small_pixels: 1 << 20,
            small_slots: cores,
            large_slots: cores.saturating_sub(1).max(1),
            // 64 megapixels: under 512 MB of decoded pixels at once.
            large_pixels: 64_000_000,
            large_per_peer: 2,
        }
    }
}

impl AdmissionConfig {
    fn check(&self) -> Result<()> {
        if self.small_slots == 0 || self.large_slots == 0 || self.large_per_peer == 0 {
            bail!(
                InvalidArgument,
                "decode slots and large decodes per peer must be at least 1"
            );
        }
        if self.large_pixels < crate::serve::preprocess::MAX_IMAGE_PIXELS {
            bail!(
                InvalidArgument,
                "the large-decode pixel budget must hold the largest image accepted ({} pixels)",
                crate::serve::preprocess::MAX_IMAGE_PIXELS
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Small,
    Large,
}

impl Lane {
    fn name(self) -> &'static str {
        match self {
            Lane::Small => "small",
            Lane::Large => "large",
        }
    }
}

pub struct Admission {
    cfg: AdmissionConfig,
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    pixels: Arc<Semaphore>,
    /// Large images waiting or decoding, per peer address.
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Measured large-decode speed, nanoseconds per pixel, as f64 bits (0: not yet).
    ns_per_pixel: AtomicU64,
    /// Where large decodes run: one thread per large slot, at low priority.
    background: rayon::ThreadPool,
}

/// A message longer than this holds more than a small image's worth of bytes
/// (a 1-megapixel PNG is at most about 3 MB), so it is taken for a large one.
pub const LARGE_UPLOAD_BYTES: usize = 4 << 20;

/// How much lower than the server's other threads large decodes run.
const LARGE_DECODE_NICE: i32 = 10;

/// The right to run one decode; dropped when the decode ends.
pub struct Permit {
    lane: Lane,
    pixels: u64,
    _slot: OwnedSemaphorePermit,
    _budget: Option<OwnedSemaphorePermit>,
    _peer: Option<PeerSlot>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        metrics::gauge!(m::DECODES_IN_FLIGHT, "lane" => self.lane.name()).decrement(1.0);
        if self.lane == Lane::Large {
            metrics::gauge!(m::DECODE_PIXELS_IN_FLIGHT).decrement(self.pixels as f64);
        }
    }
}

impl Permit {
    /// Whether this is a large decode, whose speed [`Admission::observe`] learns.
    pub fn is_large(&self) -> bool {
        self.lane == Lane::Large
    }

    pub fn pixels(&self) -> u64 {
        self.pixels
    }
}

/// One of a peer's large images; the peer's count goes down when it is dropped.
struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

fn shed(reason: &'static str) {
    metrics::counter!(m::SHED, "reason" => reason).increment(1);
}

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Result<Self> {
        cfg.check()?;
        let units = cfg
            .large_pixels
            .div_ceil(PIXEL_UNIT)
            .min(u64::from(u32::MAX)) as usize;
        let background = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.large_slots)
            .thread_name(|i| format!("rws-large-decode-{i}"))
            .start_handler(|_| lower_thread_priority(LARGE_DECODE_NICE))
            .panic_handler(|_| tracing::error!("a large decode panicked outside its guard"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the large-decode threads: {e}")))?;
        Ok(Admission {
            cfg,
            background,
            small: Arc::new(Semaphore::new(cfg.small_slots)),
            large: Arc::new(Semaphore::new(cfg.large_slots)),
            pixels: Arc::new(Semaphore::new(units)),
            peers: Arc::default(),
            ns_per_pixel: AtomicU64::new(0),
        })
    }

    /// Waits for the right to decode an input of `cost` from `peer`, or refuses:
    /// RESOURCE_EXHAUSTED when the peer already has its share of large decodes,
    /// DEADLINE_EXCEEDED when the deadline has passed or is too close for the
    /// decode. Dropping the future while it waits takes nothing.
    pub async fn admit(
        &self,
        cost: Cost,
        peer: Option<IpAddr>,
        deadline: Option<Instant>,
    ) -> Result<Permit> {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            metrics::counter!(m::CANCELLED, "stage" => "decode").increment(1);
            bail!(
                DeadlineExceeded,
                "the request's deadline passed before its input was decoded"
            );
        }
        let lane = match cost.pixels <= self.cfg.small_pixels {
            true => Lane::Small,
            false => Lane::Large,
        };
        let peer = match (lane, peer) {
            (Lane::Large, Some(ip)) => Some(self.take_peer_slot(ip)?),
            _ => None,
        };
        if lane == Lane::Large
            && let Some(d) = deadline
            && let Some(need) = self.estimate(cost.pixels)
            && d.saturating_duration_since(Instant::now()) < need
        {
            shed("decode_deadline");
            bail!(
                DeadlineExceeded,
                "a {:.1}-megapixel image takes about {} ms to decode here, more than the \
                 request's deadline leaves; send a smaller image or allow more time",
                cost.pixels as f64 / 1e6,
                need.as_millis()
            );
        }
        let start = Instant::now();
        let (slot, budget) = match lane {
            Lane::Small => (acquire(&self.small, 1).await?, None),
            Lane::Large => {
                let units = cost.pixels.div_ceil(PIXEL_UNIT) as u32;
                let slot = acquire(&self.large, 1).await?;
                (slot, Some(acquire(&self.pixels, units).await?))
            }
        };
        metrics::histogram!(m::DECODE_WAIT_SECONDS, "lane" => lane.name())
            .record(start.elapsed().as_secs_f64());
        metrics::gauge!(m::DECODES_IN_FLIGHT, "lane" => lane.name()).increment(1.0);
        if lane == Lane::Large {
            metrics::gauge!(m::DECODE_PIXELS_IN_FLIGHT).increment(cost.pixels as f64);
        }
        Ok(Permit {
            lane,
            pixels: cost.pixels,
            _slot: slot,
            _budget: budget,
            _peer: peer,
        })
    }

    /// Runs `decode` with its permit on its lane's threads: small decodes on
    /// tokio's blocking pool, large ones on the low-priority threads.
    pub fn run(&self, permit: Permit, decode: impl FnOnce(Permit) + Send + 'static) {
        match permit.lane {
            Lane::Small => drop(tokio::task::spawn_blocking(move || decode(permit))),
            Lane::Large => self.background.spawn(move || decode(permit)),
        }
    }

    /// Refuses, before its message is read, an upload of more than
    /// [`LARGE_UPLOAD_BYTES`] from a peer that already has its share of large
    /// decodes: such a message can only be a large image, and receiving it
    /// whole only to refuse it would cost the transport what admission saves.
    /// A hint, not a reservation: [`Admission::admit`] still decides.
    pub fn refuse_large_upload(&self, ip: IpAddr, bytes: usize) -> Result<()> {
        match bytes > LARGE_UPLOAD_BYTES && self.holds_its_share(ip) {
            true => Err(self.peer_refusal()),
            false => Ok(()),
        }
    }

    /// Whether `ip` has as many large images waiting or decoding as it may.
    fn holds_its_share(&self, ip: IpAddr) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.get(&ip).copied().unwrap_or(0) >= self.cfg.large_per_peer
    }

    fn take_peer_slot(&self, ip: IpAddr) -> Result<PeerSlot> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = peers.entry(ip).or_insert(0);
        if *n >= self.cfg.large_per_peer {
            return Err(self.peer_refusal());
        }
        *n += 1;
        Ok(PeerSlot {
            peers: self.peers.clone(),
            ip,
        })
    }

    fn peer_refusal(&self) -> Error {
        shed("peer_limit");
        Error::ResourceExhausted(format!(
            "this client already has {} large images waiting or being decoded; send the \
             next when one is answered, or send smaller images",
            self.cfg.large_per_peer
        ))
    }

    /// Learns the decode speed from one large decode that took `took`.
    pub fn observe(&self, pixels: u64, took: Duration) {
        if pixels == 0 {
            return;
        }
        let seen = took.as_nanos() as f64 / pixels as f64;
        let old = f64::from_bits(self.ns_per_pixel.load(Ordering::Relaxed));
        // An even mix of the last decode and the ones before: quick to follow a
        // change of load, without trusting one outlier.
        let new = if old == 0.0 {
            seen
        } else {
            0.5 * old + 0.5 * seen
        };
        self.ns_per_pixel.store(new.to_bits(), Ordering::Relaxed);
    }

    /// How long a decode of `pixels` should take, once one has been measured.
    fn estimate(&self, pixels: u64) -> Option<Duration> {
        let ns = f64::from_bits(self.ns_per_pixel.load(Ordering::Relaxed));
        (ns > 0.0).then(|| Duration::from_nanos((ns * pixels as f64) as u64))
    }
}

/// Lowers the calling thread's priority by `by` (Linux nice is per thread);
/// elsewhere it does nothing, and large decodes are bounded by their slots only.
pub fn lower_thread_priority(by: i32) {
    #[cfg(target_os = "linux")]
    if by > 0 {
        // SAFETY: plain system calls on the calling thread's own id.
        let rc = unsafe {
            let tid = libc::gettid() as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, now + by)
        };
        if rc != 0 {
            tracing::warn!("could not lower the priority of a thread by {by}");
        }
    }
}

async fn acquire(s: &Arc<Semaphore>, n: u32) -> Result<OwnedSemaphorePermit> {
    // Never closed, so this cannot fail; an error would be a bug, said as such.
    s.clone()
        .acquire_many_owned(n)
        .await
        .map_err(|e| Error::Internal(format!("decode admission: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(large_per_peer: usize) -> Admission {
        Admission::new(AdmissionConfig {
            small_pixels: 100,
            small_slots: 2,
            large_slots: 1,
            large_pixels: crate::serve::preprocess::MAX_IMAGE_PIXELS,
            large_per_peer,
        })
        .unwrap()
    }

    const SMALL: Cost = Cost { pixels: 50 };
    const LARGE: Cost = Cost { pixels: 10_000_000 };

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[cfg(target_os = "linux")]
    fn this_threads_nice() -> i32 {
        // SAFETY: reads the calling thread's own priority.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn large_decodes_run_below_the_priority_of_small_ones() {
        let a = admission(4);
        let mut seen = Vec::new();
        for cost in [SMALL, LARGE] {
            let permit = a.admit(cost, ip("10.0.0.1"), None).await.unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            a.run(permit, move |_permit| {
                let _ = tx.send(this_threads_nice());
            });
            seen.push(rx.await.unwrap());
        }
        assert_eq!(
            seen[1] - seen[0],
            LARGE_DECODE_NICE,
            "nice of small, large: {seen:?}"
        );
    }

    #[tokio::test]
    async fn an_upload_too_large_for_a_small_image_is_refused_unread_once_its_peer_is_full() {
        let a = admission(1);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let big = LARGE_UPLOAD_BYTES + 1;
        a.refuse_large_upload(peer, big).unwrap();
        let held = a.admit(LARGE, Some(peer), None).await.unwrap();
        let e = a.refuse_large_upload(peer, big).unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
        // Small uploads, and other peers, still go on to be read.
        a.refuse_large_upload(peer, LARGE_UPLOAD_BYTES).unwrap();
        a.refuse_large_upload("10.0.0.2".parse().unwrap(), big)
            .unwrap();
        drop(held);
        a.refuse_large_upload(peer, big).unwrap();
    }

    #[tokio::test]
    async fn small_images_never_wait_behind_large_ones() {
        let a = admission(4);
        let _big = a.admit(LARGE, ip("10.0.0.1"), None).await.unwrap();
        // The large lane is full: the next large one waits...
        let next = a.admit(LARGE, ip("10.0.0.2"), None);
        tokio::pin!(next);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut next)
                .await
                .is_err()
        );
        // ...but small ones go straight through.
        let s1 = a.admit(SMALL, ip("10.0.0.1"), None).await.unwrap();
        let s2 = a.admit(SMALL, ip("10.0.0.1"), None).await.unwrap();
        assert!(!s1.is_large() && !s2.is_large());
    }

    #[tokio::test]
    async fn one_peer_cannot_take_every_large_slot_and_a_dropped_wait_frees_its_share() {
        let a = admission(2);
        let first = a.admit(LARGE, ip("10.0.0.1"), None).await.unwrap();
        {
            // The second waits for the slot; while it waits it counts.
            let waiting = a.admit(LARGE, ip("10.0.0.1"), None);
            tokio::pin!(waiting);
            assert!(
                tokio::time::timeout(Duration::from_millis(20), &mut waiting)
                    .await
                    .is_err()
            );
            let e = a.admit(LARGE, ip("10.0.0.1"), None).await.err().unwrap();
            assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
            // Another peer is still let in to wait.
            let other = a.admit(LARGE, ip("10.0.0.2"), None);
            tokio::pin!(other);
            assert!(
                tokio::time::timeout(Duration::from_millis(20), &mut other)
                    .await
                    .is_err()
            );
        }
        // The waits were dropped: the peer has one large image again.
        assert_eq!(
            a.peers.lock().unwrap().get(&"10.0.0.1".parse().unwrap()),
            Some(&1)
        );
        drop(first);
        assert!(a.peers.lock().unwrap().is_empty());
        let again = a.admit(LARGE, ip("10.0.0.1"), None).await.unwrap();
        assert!(again.is_large());
    }

    #[tokio::test]
    async fn a_deadline_too_close_for_the_measured_decode_speed_is_refused_at_once() {
        let a = admission(4);
        let soon = Some(Instant::now() + Duration::from_millis(50));
        // Nothing measured yet: admitted.
        drop(a.admit(LARGE, None, soon).await.unwrap());
        // 10 megapixels in 1 s: 100 ms per megapixel.
        a.observe(LARGE.pixels, Duration::from_secs(1));
        let e = a.admit(LARGE, None, soon).await.err().unwrap();
        assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");
        // Small images are never refused for it, and a generous deadline passes.
        a.admit(SMALL, None, soon).await.unwrap();
        let later = Some(Instant::now() + Duration::from_secs(5));
        a.admit(LARGE, None, later).await.unwrap();
        // A passed deadline is refused in any lane.
        let past = Some(Instant::now() - Duration::from_millis(1));
        let e = a.admit(SMALL, None, past).await.err().unwrap();
        assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");
    }

    #[test]
    fn a_budget_smaller_than_the_largest_image_is_refused() {
        let cfg = AdmissionConfig {
            large_pixels: 1000,
            ..AdmissionConfig::default()
        };
        assert!(Admission::new(cfg).is_err());
    }
}
