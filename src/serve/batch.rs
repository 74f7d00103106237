//! Dynamic batching with mixed profiles.
//!
//! Requests wait in one bounded queue. A compute worker (a plain OS thread, off
//! tokio's reactor) takes the first waiting request, then keeps taking until the
//! batch is full or `max_delay` has passed since that first one. It loads the
//! profile table **once** for the batch, runs the stem once per profile group,
//! concatenates the activations and runs the shared trunk once: mixed traffic
//! keeps the efficiency of batching because only the stem is per profile.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::serve::activation::now_ms;
use crate::serve::auto::{self, AutoChoice};
use crate::serve::compute::{Served, compute};
use crate::serve::load::Load;
use crate::serve::metrics as m;
use crate::serve::profile::{Choice, Profile, SignatureRef};
use crate::serve::registry::Registry;
use crate::serve::shadow::Shadows;
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
    load: Arc<Load>,
    /// Candidate profiles run on samples of the traffic, off the response path.
    shadows: Arc<Shadows>,
    /// Compute threads running; one that panics is replaced, and health says
    /// NOT_SERVING if none could be.
    alive: Arc<AtomicUsize>,
}

/// What a compute worker does with each batch it forms.
type RunBatch = Arc<dyn Fn(Vec<Job>) + Send + Sync>;

/// What every compute worker shares.
#[derive(Clone)]
struct Crew {
    rx: Receiver<Job>,
    cfg: BatchConfig,
    load: Arc<Load>,
    alive: Arc<AtomicUsize>,
    run: RunBatch,
}

impl Batcher {
    pub fn start(registry: Arc<Registry>, cfg: BatchConfig) -> Result<Batcher> {
        if cfg.max_batch == 0 || cfg.queue_capacity == 0 || cfg.workers == 0 {
            return Err(Error::InvalidArgument(
                "max batch, queue capacity and workers must be at least 1".into(),
            ));
        }
        let load = Arc::new(Load::new(cfg.workers));
        let shadows = Arc::new(Shadows::start(registry.clone(), load.clone())?);
        let run: RunBatch = {
            let shadows = shadows.clone();
            Arc::new(move |jobs| run_batch(&registry, jobs, Some(&shadows)))
        };
        let (tx, alive) = start_workers(cfg, load.clone(), run)?;
        Ok(Batcher {
            tx,
            load,
            shadows,
            alive,
        })
    }

    /// Compute threads running now.
    pub fn workers_alive(&self) -> usize {
        self.alive.load(Ordering::Acquire)
    }

    pub fn shadows(&self) -> &Shadows {
        &self.shadows
    }

    /// Queues a job; refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<()> {
        // Counted before it is sent, so a worker never takes it off the count first.
        let depth = self.load.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = self.tx.try_send(job);
        if sent.is_err() {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
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
        self.load.waiting.load(Ordering::Relaxed)
    }
}

fn start_workers(
    cfg: BatchConfig,
    load: Arc<Load>,
    run: RunBatch,
) -> Result<(Sender<Job>, Arc<AtomicUsize>)> {
    let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity);
    let crew = Crew {
        rx,
        cfg,
        load,
        alive: Arc::new(AtomicUsize::new(0)),
        run,
    };
    for i in 0..cfg.workers {
        spawn_worker(i, crew.clone())
            .map_err(|e| Error::Internal(format!("cannot start compute thread: {e}")))?;
    }
    Ok((tx, crew.alive))
}

fn spawn_worker(i: usize, crew: Crew) -> std::io::Result<()> {
    crew.alive.fetch_add(1, Ordering::AcqRel);
    let alive = crew.alive.clone();
    std::thread::Builder::new()
        .name(format!("rws-compute-{i}"))
        .spawn(move || worker(i, crew))
        .map(drop)
        .inspect_err(|_| {
            alive.fetch_sub(1, Ordering::AcqRel);
        })
}

/// Forms batches and runs them until every sender (the Batcher) is dropped.
/// A batch that panics loses its requests (their callers get INTERNAL, as
/// their reply channels are dropped unanswered); the thread then hands over
/// to a fresh one, so nothing a panic left half-done on it is used again.
fn worker(i: usize, crew: Crew) {
    while let Ok(first) = crew.rx.recv() {
        let until = Instant::now() + crew.cfg.max_delay;
        let mut jobs = vec![first];
        while jobs.len() < crew.cfg.max_batch {
            match crew.rx.recv_deadline(until) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let left = crew.load.waiting.fetch_sub(jobs.len(), Ordering::Relaxed) - jobs.len();
        metrics::gauge!(m::QUEUE_DEPTH).set(left as f64);
        let run = AssertUnwindSafe(|| crew.load.run(|| (crew.run)(jobs)));
        if std::panic::catch_unwind(run).is_err() {
            metrics::counter!(m::WORKER_PANICS).increment(1);
            crew.alive.fetch_sub(1, Ordering::AcqRel);
            match spawn_worker(i, crew.clone()) {
                Ok(()) => tracing::error!(
                    worker = i,
                    "a compute batch panicked; its requests got INTERNAL and the worker was replaced"
                ),
                Err(e) => {
                    tracing::error!(worker = i, error = %e, "a compute batch panicked and the worker cannot be replaced")
                }
            }
            return;
        }
    }
    crew.alive.fetch_sub(1, Ordering::AcqRel);
}

/// Computes one batch and answers every job in it, offering each answered one
/// to the running `shadows`.
pub fn run_batch(registry: &Registry, jobs: Vec<Job>, shadows: Option<&Shadows>) {
    let now = Instant::now();
    // A caller that has gone (cancelled, or timed out by its transport) wants nothing.
    let (jobs, gone): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| !j.reply.is_closed());
    if !gone.is_empty() {
        metrics::counter!(m::CANCELLED, "stage" => "compute").increment(gone.len() as u64);
    }
    let (live, expired): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| j.deadline.is_none_or(|d| d > now));
    if !expired.is_empty() {
        metrics::counter!(m::CANCELLED, "stage" => "compute").increment(expired.len() as u64);
    }
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
    let mut resolved = Vec::with_capacity(live.len());
    for job in live {
        match table.resolve(&job.profile, &job.source, at) {
            Ok((p, chosen)) => resolved.push((job, p.clone(), chosen)),
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
    let served = {
        let inputs: Vec<(&[f32], &Arc<Profile>)> = resolved
            .iter()
            .map(|(j, p, _)| (j.input.as_slice(), p))
            .collect();
        compute(registry, &table, &inputs)
    };
    let labels = &registry.model().config.labels;
    for ((job, profile, chosen), served) in resolved.into_iter().zip(served) {
        let Served { logits, auto } = match served {
            Ok(s) => s,
            Err(e) => {
                let _ = job.reply.send(Err(e));
                continue;
            }
        };
        if let Some(pick) = &auto {
            metrics::counter!(m::AUTO_CHOICES, "choice" => auto::describe(&pick.signatures))
                .increment(1);
        }
        if let Some(shadows) = shadows {
            shadows.offer(&job.input, &logits, &profile.name);
        }
        let top_k = top_k_of(&logits, labels, job.top_k);
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

/// Default number of classes returned.
pub const DEFAULT_TOP_K: usize = 5;

/// Softmax scores of the `k` largest logits (0 means [`DEFAULT_TOP_K`]).
pub fn top_k_of(logits: &[f32], labels: &[String], k: usize) -> Vec<Prediction> {
    let k = if k == 0 { DEFAULT_TOP_K } else { k }.min(logits.len());
    let probs = crate::model::softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| Prediction {
            index: i,
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            score: probs[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn job() -> (Job, oneshot::Receiver<Result<Classification>>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            input: Vec::new(),
            profile: String::new(),
            source: String::new(),
            top_k: 1,
            with_logits: false,
            deadline: None,
            queued: Instant::now(),
            span: tracing::Span::none(),
            reply,
        };
        (job, answer)
    }

    fn answered(name: &str) -> Classification {
        Classification {
            top_k: Vec::new(),
            profile: name.into(),
            generation: 0,
            chosen: Choice::Default,
            signatures: Vec::new(),
            auto: None,
            logits: Vec::new(),
        }
    }

    /// The real worker loop, with a batch that panics once: that batch's caller
    /// gets no answer (INTERNAL upstream), the worker is replaced, and the next
    /// request is answered.
    #[tokio::test]
    async fn a_worker_whose_batch_panics_is_replaced() {
        let cfg = BatchConfig {
            max_delay: Duration::ZERO,
            ..BatchConfig::default()
        };
        let panicked = Arc::new(AtomicBool::new(false));
        let run: RunBatch = {
            let panicked = panicked.clone();
            Arc::new(move |jobs: Vec<Job>| {
                if !panicked.swap(true, Ordering::SeqCst) {
                    panic!("injected: a batch that panics");
                }
                for j in jobs {
                    let _ = j.reply.send(Ok(answered("after")));
                }
            })
        };
        let load = Arc::new(Load::new(1));
        let (tx, alive) = start_workers(cfg, load.clone(), run).unwrap();
        let send = |j: Job| {
            load.waiting.fetch_add(1, Ordering::Relaxed);
            tx.send(j).unwrap();
        };
        let (first, lost) = job();
        send(first);
        assert!(lost.await.is_err(), "the panicked batch's reply is dropped");
        let (second, answer) = job();
        send(second);
        let c = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the replaced worker answers")
            .unwrap()
            .unwrap();
        assert_eq!(c.profile, "after");
        assert_eq!(alive.load(Ordering::Acquire), 1);
        drop(tx);
        let until = Instant::now() + Duration::from_secs(10);
        while alive.load(Ordering::Acquire) != 0 {
            assert!(Instant::now() < until, "the worker did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
