//! Dynamic batching with mixed profiles.
//!
//! Requests wait in one bounded queue. A compute worker (a plain OS thread, off
//! tokio's reactor) takes the first waiting request, then keeps taking until the
//! batch is full or `max_delay` has passed since that first one. It loads the
//! profile table **once** for the batch, runs the stem once per profile group,
//! concatenates the activations and runs the shared trunk once: mixed traffic
//! keeps the efficiency of batching because only the stem is per profile.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::serve::activation::now_ms;
use crate::serve::auto::{self, AutoChoice};
use crate::serve::metrics as m;
use crate::serve::preprocess;
use crate::serve::profile::{AUTO, CLEAN, Choice, Profile, SignatureRef};
use crate::serve::registry::Registry;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub top_k: Vec<Prediction>,
    pub profile: String,
    pub generation: u64,
    /// Why that profile served it.
    pub chosen: Choice,
    /// The signatures and alphas that served it: the profile's, or `auto`'s choice.
    pub signatures: Vec<SignatureRef>,
    /// For `auto`: what the detector saw, and what it chose.
    pub auto: Option<AutoChoice>,
    /// Empty unless asked for.
    pub logits: Vec<f32>,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    /// How long the first request of a batch may wait for company.
    pub max_delay: Duration,
    /// Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Compute threads. Each already parallelizes its tensor ops, so one is
    /// usually right for a CPU; more overlap batches.
    pub workers: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 8,
            max_delay: Duration::from_millis(2),
            queue_capacity: 256,
            workers: 1,
        }
    }
}

/// One request, preprocessed.
pub struct Job {
    /// `[C, H, W]` model input.
    pub input: Vec<f32>,
    /// Empty: the activation covering `source`, else the default profile.
    pub profile: String,
    /// Where the input came from (`site-a/cam-12`); may be empty.
    pub source: String,
    pub top_k: usize,
    pub with_logits: bool,
    /// Dropped without computing once passed.
    pub deadline: Option<Instant>,
    /// When the job entered the queue.
    pub queued: Instant,
    /// The request's span, which the batch that computes it links to.
    pub span: tracing::Span,
    pub reply: oneshot::Sender<Result<Classification>>,
}

pub struct Batcher {
    tx: Sender<Job>,
    depth: Arc<AtomicUsize>,
}

impl Batcher {
    pub fn start(registry: Arc<Registry>, cfg: BatchConfig) -> Result<Batcher> {
        if cfg.max_batch == 0 || cfg.queue_capacity == 0 || cfg.workers == 0 {
            return Err(Error::InvalidArgument(
                "max batch, queue capacity and workers must be at least 1".into(),
            ));
        }
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        for i in 0..cfg.workers {
            let (rx, registry, depth) = (rx.clone(), registry.clone(), depth.clone());
            std::thread::Builder::new()
                .name(format!("rws-compute-{i}"))
                .spawn(move || worker(&registry, &rx, cfg, &depth))
                .map_err(|e| Error::Internal(format!("cannot start compute thread: {e}")))?;
        }
        Ok(Batcher { tx, depth })
    }

    /// Queues a job; refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<()> {
        // Counted before it is sent, so a worker never takes it off the count first.
        let depth = self.depth.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = self.tx.try_send(job);
        if sent.is_err() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => {
                metrics::gauge!(m::QUEUE_DEPTH).set(depth as f64);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Error::ResourceExhausted(
                "the request queue is full; retry with backoff or add replicas".into(),
            )),
            Err(TrySendError::Disconnected(_)) => {
                Err(Error::Internal("compute workers have stopped".into()))
            }
        }
    }

    /// Requests waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

fn worker(registry: &Registry, rx: &Receiver<Job>, cfg: BatchConfig, depth: &AtomicUsize) {
    // Ends when every sender (the Batcher) is dropped.
    while let Ok(first) = rx.recv() {
        let until = Instant::now() + cfg.max_delay;
        let mut jobs = vec![first];
        while jobs.len() < cfg.max_batch {
            match rx.recv_deadline(until) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let left = depth.fetch_sub(jobs.len(), Ordering::Relaxed) - jobs.len();
        metrics::gauge!(m::QUEUE_DEPTH).set(left as f64);
        run_batch(registry, jobs);
    }
}

/// Computes one batch and answers every job in it.
pub fn run_batch(registry: &Registry, jobs: Vec<Job>) {
    let now = Instant::now();
    let (live, expired): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| j.deadline.is_none_or(|d| d > now));
    for j in expired {
        let _ = j.reply.send(Err(Error::DeadlineExceeded(
            "the request's deadline passed while it was queued".into(),
        )));
    }
    if live.is_empty() {
        return;
    }
    let mut queue_us = 0;
    for j in &live {
        let waited = now.duration_since(j.queued);
        metrics::histogram!(m::QUEUE_SECONDS).record(waited.as_secs_f64());
        queue_us = queue_us.max(waited.as_micros() as u64);
    }
    metrics::histogram!(m::BATCH_SIZE).record(live.len() as f64);
    let span = tracing::debug_span!("batch", size = live.len(), queue_us);
    for j in &live {
        span.follows_from(&j.span);
    }
    let _span = span.entered();
    // One snapshot and one instant for the whole batch: every job in it sees
    // the same table, and the same activations in force.
    let table = registry.snapshot();
    let at = now_ms();
    let model = registry.model();
    let mut groups: Vec<(Route, Vec<Routed>)> = Vec::new();
    for job in live {
        let (profile, chosen) = match table.resolve(&job.profile, &job.source, at) {
            Ok((p, chosen)) => (p.clone(), chosen),
            Err(e) => {
                let _ = job.reply.send(Err(e));
                continue;
            }
        };
        let (route, auto) = match registry.auto().filter(|_| profile.name == AUTO) {
            Some(auto) => {
                let pick = {
                    let _s = tracing::debug_span!("detect").entered();
                    auto.choose(&job.input, model, &table.signatures)
                };
                metrics::counter!(m::AUTO_CHOICES, "choice" => auto::describe(&pick.signatures))
                    .increment(1);
                // Served clean: with the clean profile's requests.
                let clean = table
                    .profiles
                    .get(CLEAN)
                    .filter(|_| pick.signatures.is_empty());
                let route = match clean {
                    Some(clean) => Route::Profile(clean.clone()),
                    None => Route::Auto(pick.signatures.clone()),
                };
                (route, Some(pick))
            }
            None => (Route::Profile(profile.clone()), None),
        };
        let routed = Routed {
            job,
            profile,
            chosen,
            auto,
        };
        match groups.iter_mut().find(|(r, _)| r.same(&route)) {
            Some((_, jobs)) => jobs.push(routed),
            None => groups.push((route, vec![routed])),
        }
    }
    let mut activations = Vec::with_capacity(groups.len());
    let mut answered = Vec::with_capacity(groups.len());
    for (route, jobs) in groups {
        let stem = {
            let _s = tracing::debug_span!("stem", route = %route, n = jobs.len()).entered();
            let stem = match &route {
                Route::Profile(p) => registry.stem(&table, p),
                Route::Auto(refs) => registry
                    .auto()
                    .ok_or_else(|| Error::Internal("auto is not enabled".into()))
                    .and_then(|a| a.stem(model, refs, &table.signatures)),
            };
            stem.and_then(|stem| {
                let inputs: Vec<&[f32]> = jobs.iter().map(|r| r.job.input.as_slice()).collect();
                let x = preprocess::batch(&inputs, &model.config, model.device())?;
                model.forward_stem(&stem, &x)
            })
        };
        match stem {
            Ok(h) => {
                activations.push(h);
                answered.extend(jobs);
            }
            Err(e) => fail(jobs.into_iter().map(|r| r.job), &e),
        }
    }
    if activations.is_empty() {
        return;
    }
    let logits = {
        let _s = tracing::debug_span!("trunk", n = activations.len()).entered();
        Tensor::cat(&activations, 0)
            .map_err(Error::from)
            .and_then(|h| model.forward_trunk(&h))
            .and_then(|l| Ok(l.to_vec2::<f32>()?))
    };
    let rows = match logits {
        Ok(rows) => rows,
        Err(e) => {
            fail(answered.into_iter().map(|r| r.job), &e);
            return;
        }
    };
    for (routed, logits) in answered.into_iter().zip(rows) {
        let Routed {
            job,
            profile,
            chosen,
            auto,
        } = routed;
        // A finite input can still overflow inside the network; its "prediction"
        // would be noise, so it is refused rather than answered.
        if logits.iter().any(|v| !v.is_finite()) {
            let _ = job.reply.send(Err(Error::InvalidArgument(
                "the input drives the model to non-finite logits (inf or NaN); send an \
                 image, or a tensor normalized like the model's input (values near [-10, 10])"
                    .into(),
            )));
            continue;
        }
        let top_k = top_k_of(&logits, &model.config.labels, job.top_k);
        if let Some(top) = top_k.first() {
            metrics::histogram!(m::TOP1_PROBABILITY, "profile" => profile.name.clone())
                .record(f64::from(top.score));
        }
        let _ = job.reply.send(Ok(Classification {
            top_k,
            profile: profile.name.clone(),
            generation: profile.generation,
            chosen,
            signatures: match &auto {
                Some(pick) => pick.signatures.clone(),
                None => profile.signatures.clone(),
            },
            auto,
            logits: if job.with_logits { logits } else { Vec::new() },
        }));
    }
}

/// What folds the stem a group of jobs is served with.
enum Route {
    /// A profile's own stem.
    Profile(Arc<Profile>),
    /// `auto`'s choice of signatures and alphas.
    Auto(Vec<SignatureRef>),
}

impl Route {
    fn same(&self, other: &Route) -> bool {
        match (self, other) {
            (Route::Profile(a), Route::Profile(b)) => Arc::ptr_eq(a, b),
            (Route::Auto(a), Route::Auto(b)) => a == b,
            _ => false,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Profile(p) => f.write_str(&p.name),
            Route::Auto(refs) => write!(f, "auto:{}", auto::describe(refs)),
        }
    }
}

/// A job, the profile that serves it and why, and what `auto` chose for it.
struct Routed {
    job: Job,
    profile: Arc<Profile>,
    chosen: Choice,
    auto: Option<AutoChoice>,
}

fn fail(jobs: impl IntoIterator<Item = Job>, e: &Error) {
    for j in jobs {
        let _ = j.reply.send(Err(Error::Internal(e.to_string())));
    }
}

/// Default number of classes returned.
pub const DEFAULT_TOP_K: usize = 5;

/// Softmax scores of the `k` largest logits (0 means [`DEFAULT_TOP_K`]).
pub fn top_k_of(logits: &[f32], labels: &[String], k: usize) -> Vec<Prediction> {
    let k = if k == 0 { DEFAULT_TOP_K } else { k }.min(logits.len());
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| Prediction {
            index: i,
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            score: exp[i] / sum,
        })
        .collect()
}
