//! Shadow evaluation: would profile X help on today's traffic?
//!
//! A shadow runs a candidate profile on a sampled share of live requests, off
//! the response path, and compares its answer with the one served: how often
//! they agree on the class, and the confidence and entropy of each. Responses
//! are never touched: a sample is a copy of an input and the logits computed
//! for it, and the candidate runs on its own thread.
//!
//! The added latency is bounded by yielding and dropping rather than queueing:
//! samples are taken only while no request waits and the compute workers were
//! busy less than half of the last second; the queue holds [`QUEUE`] of them;
//! the worker computes one sample at a time, each only once no batch is running
//! and none waits, and drops a sample [`MAX_WAIT`] after it was taken. Its
//! thread is its own one-thread pool, under SCHED_IDLE on Linux, so a sample
//! under way gives its core to any request.
//! Shadows live on one replica and are not persisted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};

use crate::serve::activation::now_ms;
use crate::serve::compute::compute;
use crate::serve::load::Load;
use crate::serve::metrics as m;
use crate::serve::profile::validate_name;
use crate::serve::registry::Registry;
use crate::{Error, Result, bail};

/// Samples waiting for the shadow worker, all shadows together.
pub const QUEUE: usize = 64;
/// Shadows running at once.
pub const MAX_SHADOWS: usize = 4;
/// Above this share of time computing, the server is too busy to sample.
const MAX_UTILIZATION: f64 = 0.5;
/// How long after it was taken a sample may still be computed.
const MAX_WAIT: Duration = Duration::from_millis(20);

/// The shadows of one server, and the queue to their worker.
pub struct Shadows {
    active: ArcSwap<BTreeMap<String, Arc<Shadow>>>,
    /// Serializes changes to `active`.
    write: Mutex<()>,
    tx: Sender<Sample>,
    /// How busy the compute workers are.
    load: Arc<Load>,
    /// The worker's own one-thread pool: a sample's computation never queues
    /// work in the pool that computes requests.
    _pool: rayon::ThreadPool,
}

/// One candidate profile under evaluation.
pub struct Shadow {
    pub profile: String,
    /// Share of requests sampled, in (0, 1].
    pub fraction: f64,
    pub since_ms: u64,
    /// Requests seen, for sampling an exact share without randomness.
    seen: AtomicU64,
    tally: Mutex<Tally>,
}

/// What a shadow found so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Requests picked for sampling.
    pub sampled: u64,
    /// Of those, dropped: the server was busy or the queue full.
    pub dropped: u64,
    /// Computed and compared.
    pub compared: u64,
    /// The candidate could not run (its profile was deleted, ...).
    pub failed: u64,
    /// Compared samples where both answered the same class.
    pub agreed: u64,
    /// Sums over compared samples, for the means.
    pub served_confidence: f64,
    pub candidate_confidence: f64,
    pub served_entropy: f64,
    pub candidate_entropy: f64,
}

impl Tally {
    /// The share of compared samples where the candidate agreed (0 when none).
    pub fn agreement(&self) -> f64 {
        self.agreed as f64 / self.compared.max(1) as f64
    }

    /// Mean of a sum over the compared samples.
    pub fn mean(&self, sum: f64) -> f64 {
        sum / self.compared.max(1) as f64
    }
}

/// A shadow and its findings, for listings.
#[derive(Debug, Clone)]
pub struct Report {
    pub profile: String,
    pub fraction: f64,
    pub since_ms: u64,
    pub tally: Tally,
}

struct Sample {
    shadow: Arc<Shadow>,
    input: Vec<f32>,
    served: Vec<f32>,
    taken: Instant,
}

impl Shadows {
    /// Starts the shadow worker on its own thread, yielding to the compute
    /// workers whose `load` is given.
    pub fn start(registry: Arc<Registry>, load: Arc<Load>) -> Result<Shadows> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let yield_to = load.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "rws-shadow".into())
            .start_handler(|_| run_when_idle())
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the shadow thread: {e}")))?;
        pool.spawn(move || worker(&registry, &rx, &yield_to));
        Ok(Shadows {
            active: ArcSwap::default(),
            write: Mutex::new(()),
            tx,
            load,
            _pool: pool,
        })
    }

    /// Runs `profile` on `fraction` of the requests from now on, starting its
    /// tally afresh; a fraction of 0 stops it. `exists` says whether the
    /// profile is defined. Returns the shadow as it now stands (as it ended,
    /// when stopped).
    pub fn set(&self, profile: &str, fraction: f64, exists: bool) -> Result<Report> {
        validate_name("profile", profile)?;
        if !(0.0..=1.0).contains(&fraction) {
            bail!(
                InvalidArgument,
                "the fraction is a share of requests, from 0 (stop) to 1; got {fraction}"
            );
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut active = (**self.active.load()).clone();
        if fraction == 0.0 {
            let Some(ended) = active.remove(profile) else {
                bail!(NotFound, "no shadow of profile {profile:?} is running");
            };
            self.active.store(Arc::new(active));
            return Ok(ended.report());
        }
        if !exists {
            bail!(NotFound, "no profile named {profile:?}; define it first");
        }
        if !active.contains_key(profile) && active.len() >= MAX_SHADOWS {
            bail!(
                ResourceExhausted,
                "{MAX_SHADOWS} shadows are running; stop one first (fraction 0)"
            );
        }
        let shadow = Arc::new(Shadow {
            profile: profile.into(),
            fraction,
            since_ms: now_ms(),
            seen: AtomicU64::new(0),
            tally: Mutex::default(),
        });
        active.insert(profile.into(), shadow.clone());
        self.active.store(Arc::new(active));
        Ok(shadow.report())
    }

    /// Every running shadow, by profile name.
    pub fn list(&self) -> Vec<Report> {
        self.active.load().values().map(|s| s.report()).collect()
    }

    /// Samples waiting for the shadow worker.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Offers one computed request to every shadow but that of the profile
    /// that served it: a sample copies its input and logits, nothing more.
    pub(crate) fn offer(&self, input: &[f32], served: &[f32], served_by: &str) {
        let active = self.active.load();
        for shadow in active.values().filter(|s| s.profile != served_by) {
            if !shadow.pick() {
                continue;
            }
            let idle = !self.load.busy(MAX_UTILIZATION);
            let sent = idle
                && self
                    .tx
                    .try_send(Sample {
                        shadow: shadow.clone(),
                        input: input.to_vec(),
                        served: served.to_vec(),
                        taken: Instant::now(),
                    })
                    .is_ok();
            let mut t = shadow.lock();
            t.sampled += 1;
            if !sent {
                t.dropped += 1;
                metrics::counter!(m::SHADOW_SAMPLES, "candidate" => shadow.profile.clone(), "outcome" => "dropped")
                    .increment(1);
            }
        }
    }
}

impl Shadow {
    /// Whether the next request is sampled: exactly `fraction` of them, evenly spread.
    fn pick(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.fraction).floor() > (n * self.fraction).floor()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self) -> Report {
        Report {
            profile: self.profile.clone(),
            fraction: self.fraction,
            since_ms: self.since_ms,
            tally: self.lock().clone(),
        }
    }
}

/// Runs each shadow's candidate on its samples, one at a time and only while
/// the compute workers are idle; ends when [`Shadows`] is dropped. It runs on
/// the shadow pool's only thread, so whatever the model would run in parallel
/// runs on that thread alone.
fn worker(registry: &Registry, rx: &Receiver<Sample>, load: &Load) {
    while let Ok(s) = rx.recv() {
        while load.active() && s.taken.elapsed() < MAX_WAIT {
            std::thread::sleep(Duration::from_micros(100));
        }
        // Stale too when this thread itself waited: a machine too busy to give
        // it a core drops samples rather than compare them late.
        if load.active() || load.busy(MAX_UTILIZATION) || s.taken.elapsed() >= MAX_WAIT {
            s.shadow.lock().dropped += 1;
            metrics::counter!(m::SHADOW_SAMPLES, "candidate" => s.shadow.profile.clone(), "outcome" => "dropped")
                .increment(1);
            continue;
        }
        let _span = tracing::debug_span!("shadow", candidate = %s.shadow.profile).entered();
        let table = registry.snapshot();
        let Ok(profile) = table.profile(Some(&s.shadow.profile)) else {
            failed(&s.shadow);
            continue;
        };
        match compute(registry, &table, &[(s.input.as_slice(), profile)]).pop() {
            Some(Ok(candidate)) => compare(&s.shadow, &s.served, &candidate.logits),
            _ => failed(&s.shadow),
        }
    }
}

/// Asks the kernel to run this thread only on a core nothing else wants
/// (Linux's SCHED_IDLE), so that a sample under way never holds a core a
/// request needs; elsewhere the worker's own yielding is all there is.
fn run_when_idle() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a system call on the calling thread (pid 0) with a valid parameter.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::warn!(
                "the shadow thread keeps its priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn failed(shadow: &Shadow) {
    shadow.lock().failed += 1;
    metrics::counter!(m::SHADOW_SAMPLES, "candidate" => shadow.profile.clone(), "outcome" => "failed")
        .increment(1);
}

fn compare(shadow: &Shadow, served: &[f32], candidate: &[f32]) {
    let (a, b) = (Answer::of(served), Answer::of(candidate));
    {
        let mut t = shadow.lock();
        t.compared += 1;
        t.agreed += u64::from(a.class == b.class);
        t.served_confidence += a.confidence;
        t.candidate_confidence += b.confidence;
        t.served_entropy += a.entropy;
        t.candidate_entropy += b.entropy;
    }
    let name = shadow.profile.clone();
    let outcome = if a.class == b.class {
        "agreed"
    } else {
        "disagreed"
    };
    metrics::counter!(m::SHADOW_SAMPLES, "candidate" => name.clone(), "outcome" => outcome)
        .increment(1);
    for (side, x) in [("served", &a), ("candidate", &b)] {
        metrics::histogram!(m::SHADOW_PROBABILITY, "candidate" => name.clone(), "side" => side)
            .record(x.confidence);
        metrics::histogram!(m::SHADOW_ENTROPY, "candidate" => name.clone(), "side" => side)
            .record(x.entropy);
    }
}

/// The class, top-1 probability and entropy (in nats) of one set of logits.
struct Answer {
    class: usize,
    confidence: f64,
    entropy: f64,
}

impl Answer {
    fn of(logits: &[f32]) -> Answer {
        let p = crate::model::softmax(logits);
        let class = crate::model::argmax(&p);
        Answer {
            class,
            confidence: p.get(class).copied().map_or(0.0, f64::from),
            entropy: -p
                .iter()
                .filter(|&&x| x > 0.0)
                .map(|&x| f64::from(x) * f64::from(x).ln())
                .sum::<f64>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shadow(fraction: f64) -> Shadow {
        Shadow {
            profile: "fog".into(),
            fraction,
            since_ms: 0,
            seen: AtomicU64::new(0),
            tally: Mutex::default(),
        }
    }

    #[test]
    fn exactly_the_fraction_is_sampled_evenly() {
        for (fraction, of, want) in [(0.1, 100, 10), (0.25, 8, 2), (1.0, 5, 5), (0.3, 10, 3)] {
            let s = shadow(fraction);
            let picked: Vec<bool> = (0..of).map(|_| s.pick()).collect();
            assert_eq!(picked.iter().filter(|&&p| p).count(), want, "{fraction}");
        }
        // Spread: at a tenth, never two picks within ten requests.
        let s = shadow(0.1);
        let at: Vec<usize> = (0..100).filter(|_| s.pick()).collect();
        assert!(at.windows(2).all(|w| w[1] - w[0] == 10), "{at:?}");
    }

    #[test]
    fn nothing_is_queued_while_requests_wait() {
        let dir = tempfile::tempdir().unwrap();
        let arch = crate::lab::synth::arch_by_name("resnet-small").unwrap();
        let model = crate::lab::synth::write_repo_model(
            dir.path(),
            arch,
            1,
            &[],
            crate::patch::quant::Quant::Int8,
            5,
        )
        .unwrap();
        let input = vec![0.0; model.config.channels * 28 * 28];
        let registry = Arc::new(Registry::new(Arc::new(model), 4).unwrap());
        let load = Arc::new(Load::new(1));
        load.waiting.store(1, Ordering::Relaxed);
        let shadows = Shadows::start(registry, load.clone()).unwrap();
        #[cfg(target_os = "linux")]
        assert_shadow_threads_idle();
        shadows.set("clean", 1.0, true).unwrap();
        for _ in 0..100 {
            shadows.offer(&input, &[0.0; 10], "other");
        }
        let t = &shadows.list()[0].tally;
        assert_eq!((t.sampled, t.dropped, shadows.queued()), (100, 100, 0));
        // Idle again: sampled, computed and compared. Shadow threads run under
        // SCHED_IDLE: on a machine busy with other work (the tests beside this
        // one, a build) a sample may wait past MAX_WAIT for a core and be
        // dropped as stale, which is the design; offer another until one is
        // compared.
        load.waiting.store(0, Ordering::Relaxed);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < until {
            shadows.offer(&input, &[0.0; 10], "other");
            let settled = |t: &Tally| t.sampled == t.dropped + t.compared + t.failed;
            while !settled(&shadows.list()[0].tally) && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let t = &shadows.list()[0].tally;
            assert_eq!(t.failed, 0, "a sample failed: {t:?}");
            if t.compared == 1 {
                return;
            }
        }
        panic!("no sample taken when idle was compared in 60 s");
    }

    /// Every `rws-shadow` thread of this process runs under SCHED_IDLE (policy
    /// 5, the 41st field of its /proc stat line), once its pool has started it.
    #[cfg(target_os = "linux")]
    fn assert_shadow_threads_idle() {
        let policies = || -> Vec<String> {
            let tasks = std::fs::read_dir("/proc/self/task").unwrap();
            let shadow = |t: &std::path::Path| {
                std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "rws-shadow")
            };
            (tasks.filter_map(|t| Some(t.ok()?.path())))
                .filter(|t| shadow(t))
                .filter_map(|t| {
                    let stat = std::fs::read_to_string(t.join("stat")).ok()?;
                    let after = &stat[stat.rfind(')')? + 1..];
                    after.split_whitespace().nth(41 - 3).map(String::from)
                })
                .collect()
        };
        for _ in 0..500 {
            let p = policies();
            if !p.is_empty() {
                assert!(p.iter().all(|p| p == "5"), "shadow thread policies {p:?}");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("no rws-shadow thread started");
    }

    #[test]
    fn answers_give_class_confidence_and_entropy() {
        let a = Answer::of(&[0.0, 0.0]);
        assert_eq!(a.class, 0);
        assert!((a.confidence - 0.5).abs() < 1e-9);
        assert!((a.entropy - 2f64.ln()).abs() < 1e-9);
        let b = Answer::of(&[-50.0, 50.0, 0.0]);
        assert_eq!(b.class, 1);
        assert!(b.confidence > 0.999 && b.entropy < 1e-6);
    }
}
