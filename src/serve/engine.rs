//! The library's serving API: one model, its signatures and profiles, and
//! classification. The gRPC layer is a thin translation of this.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::oneshot;

use crate::model::Model;
use crate::model::detector::Detector;
use crate::model::repo::{self, ModelDir};
use crate::patch::signature::Signature;
use crate::serve::activation::{now_ms, validate_source};
use crate::serve::admission::{Admission, AdmissionConfig};
use crate::serve::auto::Auto;
use crate::serve::batch::{BatchConfig, Batcher, Classification, Job};
use crate::serve::change::{Applied, Change};
use crate::serve::durability::Retention;
use crate::serve::events::{Decision, Event, Events, KINDS, Rules};
use crate::serve::fleet::{EtcdUrl, Fleet};
use crate::serve::journal::{Cause, Entry, Journal};
use crate::serve::metrics as m;
use crate::serve::preprocess::{self, Input};
use crate::serve::profile::{
    AUTO, Choice, LoadedSignature, Origin, SignatureRef, Source, validate_name,
};
use crate::serve::registry::Registry;
use crate::serve::shadow::{self, Shadows};
use crate::serve::state::{self, Saved, State, StateDir};
use crate::serve::traffic::Traffic;
use crate::{Error, Result, bail};

pub struct EngineOptions {
    pub max_resident_profiles: usize,
    pub batch: BatchConfig,
    /// Load every file in `signatures/` and define a profile of the same name
    /// (`name = [name@default_alpha]`) for each. Skipped when a saved state is restored.
    pub auto_profiles: bool,
    /// Persist signatures, profiles and the default here, and restore them at start.
    pub state: Option<StateDir>,
    /// Rules that turn event reports into activations; without them reports are refused.
    pub events: Option<Rules>,
    /// Which decodes may start, and when.
    pub admission: AdmissionConfig,
    /// How long the state directory keeps audit files and unused uploads.
    pub retention: Retention,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_resident_profiles: 16,
            batch: BatchConfig::default(),
            auto_profiles: true,
            state: None,
            events: None,
            admission: AdmissionConfig::default(),
            retention: Retention::default(),
        }
    }
}

pub struct Engine {
    dir: ModelDir,
    state: Option<StateDir>,
    registry: Arc<Registry>,
    batcher: Batcher,
    /// Set by [`Engine::warm_up`]: the default profile has served one request.
    ready: AtomicBool,
    /// Set by [`Engine::drain`]: new requests are refused.
    draining: AtomicBool,
    /// Set by [`Engine::join_fleet`]: admin changes go through etcd.
    fleet: OnceLock<Arc<Fleet>>,
    events: Option<Events>,
    /// The last minutes of requests per profile, for the console.
    traffic: Traffic,
    /// Which decodes may start: without a bound a burst of requests spawns a
    /// blocking-pool thread each (the soak saw 25 threads become 77 within one
    /// second, with a 40 ms stall), and one client's large images take every core.
    admission: Admission,
}

/// Where a signature to load comes from.
pub enum SignatureSource {
    /// Relative to the model directory.
    Path(String),
    Bytes(Vec<u8>),
}

impl Engine {
    pub fn open(dir: ModelDir, device: &Device, opts: &EngineOptions) -> Result<Self> {
        let model = Model::load(dir.config.clone(), &dir.base_path(), device)?;
        let registry = Arc::new(Registry::new(Arc::new(model), opts.max_resident_profiles)?);
        let detector = dir.detector_path();
        if detector.exists() {
            let auto = Auto::new(Detector::load(&detector)?, registry.model())?;
            registry.enable_auto(auto)?;
            tracing::info!(detector = %detector.display(), "the auto profile is enabled");
        }
        tracing::info!(
            isa = crate::model::blocked::kernel::isa().name(),
            "the CPU kernels chosen for this CPU"
        );
        let batcher = Batcher::start(registry.clone(), opts.batch)?;
        let engine = Engine {
            dir,
            state: opts.state.clone(),
            registry,
            batcher,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            fleet: OnceLock::new(),
            events: opts.events.clone().map(Events::new),
            traffic: Traffic::default(),
            admission: Admission::new(opts.admission)?,
        };
        let saved = match &opts.state {
            Some(dir) => {
                let saved = dir.read()?;
                let journal = Journal::open(&dir.dir, &opts.retention)?;
                engine.registry.resume(journal, saved.as_ref())?;
                let state = dir.clone();
                engine
                    .registry
                    .persist_with(move |table, pending| state.write(&Saved::of(table, pending)))?;
                let (uploads, keep) = (dir.clone(), opts.retention.uploads_keep);
                engine
                    .registry
                    .on_publish(move |before, after| uploads.released(before, after, keep))?;
                saved.map(|s| s.state)
            }
            None => None,
        };
        match saved {
            Some(state) => engine.restore(&state)?,
            None if opts.auto_profiles => engine.auto_profiles()?,
            None => {}
        }
        if let Some(dir) = &opts.state {
            dir.collect_uploads(&engine.registry.snapshot(), opts.retention.uploads_keep);
        }
        Ok(engine)
    }

    /// One signature and one profile of the same name per file in `signatures/`.
    fn auto_profiles(&self) -> Result<()> {
        for path in self.dir.signature_files()? {
            let name = repo::signature_name(&path);
            let rel = path
                .strip_prefix(&self.dir.dir)
                .map_err(|_| Error::Internal(format!("{} is outside the model", path.display())))?
                .to_string_lossy()
                .into_owned();
            let cause = Cause::new("server", "start-up: the model's signatures");
            let loaded = self.load_signature_path(&name, &rel, false, &cause)?;
            let alpha = loaded.signature.meta.default_alpha;
            let refs = vec![SignatureRef {
                name: name.clone(),
                alpha,
            }];
            self.registry
                .apply(&Change::put(&name, refs, false), &cause)?;
            tracing::info!(signature = %name, alpha, "loaded signature and defined its profile");
        }
        Ok(())
    }

    /// Loads a saved state: every signature re-read and checked against its
    /// recorded hash, then the profiles and the default. Any failure stops start-up.
    fn restore(&self, saved: &State) -> Result<()> {
        let errors = self.registry.restore(saved, &|e| {
            state::read_entry(&self.dir, self.state.as_ref(), e)
        });
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        // Activations that ended while the server was down do not come back.
        let cause = Cause::new("server", "ended while the server was down");
        self.registry.apply(&Change::Expire(now_ms()), &cause)?;
        tracing::info!(
            signatures = saved.signatures.len(),
            profiles = saved.profiles.len(),
            default = %saved.default_profile,
            "restored the saved state"
        );
        Ok(())
    }

    /// Keeps the profile state in etcd from now on, shared with the other
    /// replicas under the same prefix; `addr` is what this replica publishes.
    pub async fn join_fleet(&self, url: EtcdUrl, id: String, addr: String) -> Result<Arc<Fleet>> {
        let fleet = Fleet::join(url, id, addr, self.registry.clone(), self.dir.clone()).await?;
        self.fleet
            .set(fleet.clone())
            .map_err(|_| Error::Internal("already in a fleet".into()))?;
        Ok(fleet)
    }

    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    /// Applies an admin change: through etcd in fleet mode, else straight to the
    /// registry on the blocking pool (it may fold weights). A load goes through
    /// [`Engine::load_signature`], which reads the bytes first.
    pub async fn change(
        self: &Arc<Self>,
        change: Change,
        cause: Cause,
        wait_fleet: bool,
    ) -> Result<Applied> {
        let (op, who) = (change.op(), cause.who.clone());
        traced_change(op, &who, async move {
            let names_auto = match &change {
                Change::SetDefault(name) => name == AUTO,
                Change::Activate(a) => a.profile == AUTO,
                _ => false,
            };
            if names_auto && self.registry.auto().is_none() {
                bail!(
                    FailedPrecondition,
                    "{AUTO:?} needs a corruption detector, and this model has none; train one \
                     with `rws train-detector`"
                );
            }
            if let Some(f) = self.fleet() {
                return f.submit(change, &cause, wait_fleet).await;
            }
            let this = self.clone();
            blocking(move || this.registry.apply(&change, &cause)).await
        })
        .await
    }

    /// Applies the rules to an event report: starts, extends or holds the
    /// activation for its (rule, scope), or changes nothing. A refused report
    /// changes nothing either.
    pub async fn report(self: &Arc<Self>, event: Event) -> Result<Decision> {
        let kind = match KINDS.contains(&event.kind.as_str()) {
            true => event.kind.clone(),
            false => "unknown".into(),
        };
        let result = self.report_inner(event).await;
        let outcome = match &result {
            Ok(d) => d.outcome.as_str(),
            Err(_) => "refused",
        };
        metrics::counter!(m::EVENTS, "kind" => kind, "outcome" => outcome).increment(1);
        result
    }

    async fn report_inner(self: &Arc<Self>, event: Event) -> Result<Decision> {
        let Some(events) = &self.events else {
            bail!(
                FailedPrecondition,
                "this server has no event rules; start it with --event-rules FILE"
            );
        };
        let event = event.check(now_ms())?;
        let who = match &event.event.id {
            Some(id) => format!("event:{id}"),
            None => format!("event:{}@{}", event.event.kind, event.event.scope),
        };
        // A report racing another for the same (rule, scope) decides again once.
        for retry in [false, true] {
            let decision = events.decide(&event, &self.registry.snapshot(), now_ms());
            let Some(change) = decision.change.clone() else {
                return Ok(decision);
            };
            let why = decision
                .activation
                .as_ref()
                .map_or_else(String::new, |a| a.reason.clone());
            match self
                .change(change, Cause::new(who.clone(), why), false)
                .await
            {
                Ok(_) => {
                    events.applied(&decision);
                    return Ok(decision);
                }
                Err(Error::AlreadyExists(_) | Error::Aborted(_)) if !retry => continue,
                Err(e) => return Err(e),
            }
        }
        bail!(
            Aborted,
            "the report raced other changes twice; send it again"
        )
    }

    /// Up to `limit` audit entries for `scope` (a prefix; empty: all), newest
    /// first: this server's trail, or in fleet mode the fleet's, from etcd.
    pub async fn history(&self, scope: &str, limit: usize) -> Result<Vec<Entry>> {
        if !scope.is_empty() {
            crate::serve::activation::validate_scope(scope)?;
        }
        match self.fleet() {
            Some(f) => f.history(scope, limit).await,
            None => Ok(self.registry.journal().history(scope, limit)),
        }
    }

    pub async fn load_signature(
        self: &Arc<Self>,
        name: String,
        source: SignatureSource,
        allow_transfer: bool,
        cause: Cause,
        wait_fleet: bool,
    ) -> Result<Arc<LoadedSignature>> {
        let who = cause.who.clone();
        traced_change("load_signature", &who, async move {
            // A file loaded without a name is named after the file.
            let name = match &source {
                SignatureSource::Path(rel) if name.is_empty() => {
                    repo::signature_name(std::path::Path::new(rel))
                }
                _ => name,
            };
            validate_name("signature", &name)?;
            if let Some(f) = self.fleet() {
                let SignatureSource::Path(rel) = source else {
                    bail!(
                        FailedPrecondition,
                        "in fleet mode signatures are loaded by repository path, which every replica reads; uploads would reach one replica only"
                    );
                };
                let this = self.clone();
                let origin = blocking(move || {
                    let (sig, origin) = state::read_repo(&this.dir, &rel, allow_transfer)?;
                    // Checked here as it will be on every replica: it fits the model.
                    this.model().check_signature(&sig, allow_transfer)?;
                    Ok(origin)
                })
                .await?;
                let change = Change::Load(state::SignatureEntry { name, origin });
                return f
                    .submit(change, &cause, wait_fleet)
                    .await?
                    .signature()
                    .cloned();
            }
            let this = self.clone();
            blocking(move || match source {
                SignatureSource::Path(rel) => {
                    this.load_signature_path(&name, &rel, allow_transfer, &cause)
                }
                SignatureSource::Bytes(bytes) => {
                    this.load_signature_bytes(&name, &bytes, allow_transfer, &cause)
                }
            })
            .await
        })
        .await
    }

    /// Starts, restarts (with a fresh tally) or with `fraction` 0 stops the
    /// shadow of `profile`. Not an admin change: responses stay as they are.
    pub fn shadow(&self, profile: &str, fraction: f64, who: &str) -> Result<shadow::Report> {
        let exists = self.registry.snapshot().profiles.contains_key(profile);
        let report = self.batcher.shadows().set(profile, fraction, exists)?;
        tracing::info!(profile, fraction, who, "shadow set");
        Ok(report)
    }

    pub fn shadows(&self) -> &Shadows {
        self.batcher.shadows()
    }

    /// Requests per profile over the last minutes.
    pub fn traffic(&self) -> &Traffic {
        // Deleted profiles leave the chart once their window has gone quiet.
        let table = self.registry.snapshot();
        self.traffic
            .retain(|name| table.profiles.contains_key(name));
        &self.traffic
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn model(&self) -> &Arc<Model> {
        self.registry.model()
    }

    pub fn model_dir(&self) -> &ModelDir {
        &self.dir
    }

    /// Loads a signature from a path relative to the model directory.
    pub fn load_signature_path(
        &self,
        name: &str,
        rel: &str,
        allow_transfer: bool,
        cause: &Cause,
    ) -> Result<Arc<LoadedSignature>> {
        let (sig, origin) = state::read_repo(&self.dir, rel, allow_transfer)?;
        self.registry
            .load(name, sig, origin, cause)?
            .signature()
            .cloned()
    }

    /// Loads an uploaded signature; with a state directory, its bytes are kept
    /// there so that it survives a restart.
    pub fn load_signature_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        allow_transfer: bool,
        cause: &Cause,
    ) -> Result<Arc<LoadedSignature>> {
        if name.is_empty() {
            bail!(InvalidArgument, "an uploaded signature needs a name");
        }
        state::check_size(bytes.len() as u64, "the uploaded signature")?;
        let sig = Arc::new(Signature::from_bytes(bytes)?);
        // Checked before the bytes are kept, so a refused upload leaves no file
        // behind (the registry checks again under its lock).
        validate_name("signature", name)?;
        self.model().check_signature(&sig, allow_transfer)?;
        let sha256 = state::sha256(bytes);
        let Some(dir) = &self.state else {
            let origin = Origin {
                source: Source::Memory,
                sha256,
                allow_transfer,
            };
            return self
                .registry
                .load(name, sig, origin, cause)?
                .signature()
                .cloned();
        };
        let file = StateDir::upload_file(&sha256);
        let change = Change::Load(state::SignatureEntry {
            name: name.into(),
            origin: Origin {
                source: Source::Upload { file: file.clone() },
                sha256,
                allow_transfer,
            },
        });
        // Stored under the registry's lock, so that no clean-up of unused
        // uploads runs between storing the file and publishing its use.
        let stored = std::cell::Cell::new(false);
        let applied = self.registry.apply_with(&change, cause, &|_| {
            stored.set(dir.store_upload(bytes, &file)?);
            Ok(sig.clone())
        });
        if applied.is_err() && stored.get() {
            // A refused upload leaves no file behind (unless another load of
            // the same bytes took it meanwhile).
            self.registry
                .locked(|table| dir.remove_upload(&file, table));
        }
        applied?.signature().cloned()
    }

    /// Runs one request through the default profile, so its stem is
    /// materialized and the compute path touched before traffic arrives.
    pub async fn warm_up(self: &Arc<Self>) -> Result<()> {
        let cfg = &self.model().config;
        let [h, w] = cfg.input_size;
        let input = Input::Tensor {
            shape: vec![cfg.channels, h, w],
            data: vec![0.0; cfg.channels * h * w],
        };
        let ask = Ask {
            top_k: 1,
            ..Ask::default()
        };
        self.classify(input, ask).await?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Warmed up, not draining, and with a compute worker: what health reports.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && self.batcher.workers_alive() > 0
    }

    /// Refuses new requests from now on (UNAVAILABLE); those already queued still run.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Requests waiting for a compute worker.
    pub fn queue_depth(&self) -> usize {
        self.batcher.queue_depth()
    }

    /// Which decodes may start: the wire layer asks it to refuse large
    /// uploads before they are read.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Classifies one input as `ask` says. The input is decoded on its
    /// admission lane's threads, then batched with other requests on the compute workers;
    /// it is dropped uncomputed if the deadline passes while it waits, and
    /// answered DEADLINE_EXCEEDED at the deadline.
    pub async fn classify(self: &Arc<Self>, input: Input, ask: Ask) -> Result<Classification> {
        let start = Instant::now();
        let requested = ask.profile.clone();
        let deadline = ask.deadline;
        // One span per request: where it came from (once its name is checked), and
        // (once answered) which profile served it and why; its batch links to it.
        let span = tracing::info_span!(
            "classify",
            source = tracing::field::Empty,
            profile = tracing::field::Empty,
            selection = tracing::field::Empty,
            activation = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        let work = tracing::Instrument::instrument(self.classify_inner(input, ask), span.clone());
        let result = match deadline {
            // The queued job stays behind; its worker drops it uncomputed.
            Some(d) => tokio::time::timeout_at(d.into(), work)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::DeadlineExceeded(
                        "the request's deadline passed before it was answered".into(),
                    ))
                }),
            None => work.await,
        };
        if let Ok(c) = &result {
            span.record("profile", c.profile.as_str());
            let (selection, activation) = match &c.chosen {
                Choice::Explicit => ("explicit", ""),
                Choice::Activation(id) => ("activation", id.as_str()),
                Choice::Default => ("default", ""),
            };
            span.record("selection", selection);
            span.record("activation", activation);
        }
        // Label by profile name only when it is a defined one (or the default),
        // so clients cannot grow the label set with made-up names.
        let label = match &result {
            Ok(c) => c.profile.clone(),
            Err(_) => {
                let table = self.registry.snapshot();
                match table.profile(Some(&requested)) {
                    Ok(p) => p.name.clone(),
                    Err(_) => "unknown".into(),
                }
            }
        };
        let status = result.as_ref().map_or_else(|e| e.kind(), |_| "ok");
        span.record("status", status);
        self.traffic.record(&label, start.elapsed(), result.is_ok());
        metrics::counter!(m::REQUESTS, "profile" => label.clone(), "status" => status).increment(1);
        metrics::histogram!(m::REQUEST_SECONDS, "profile" => label)
            .record(start.elapsed().as_secs_f64());
        result
    }

    async fn classify_inner(self: &Arc<Self>, input: Input, ask: Ask) -> Result<Classification> {
        if self.draining.load(Ordering::Acquire) {
            bail!(
                Unavailable,
                "the server is shutting down; send the request to another replica"
            );
        }
        // Before any lookup: names are refused without echoing more than their start.
        check_request_names(&ask.profile, &ask.source)?;
        let request = tracing::Span::current();
        request.record("source", ask.source.as_str());
        let cost = preprocess::inspect(&input, &self.model().config)?;
        let permit = self.admission.admit(cost, ask.peer, ask.deadline).await?;
        let (decoded, waiting) = oneshot::channel();
        let (engine, deadline) = (self.clone(), ask.deadline);
        // The permit goes with the decode: a caller that leaves frees no slot
        // while its decode still runs.
        self.admission.run(permit, move |permit| {
            if decoded.is_closed() || deadline.is_some_and(|d| d <= Instant::now()) {
                metrics::counter!(m::CANCELLED, "stage" => "decode").increment(1);
                return;
            }
            let _s = tracing::debug_span!(parent: &request, "decode").entered();
            let start = Instant::now();
            let chw = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                preprocess::to_chw(&input, &engine.model().config)
            }))
            .unwrap_or_else(|_| Err(Error::Internal("the image decoder panicked".into())));
            if permit.is_large() {
                engine.admission.observe(permit.pixels(), start.elapsed());
            }
            drop(permit);
            let _ = decoded.send(chw);
        });
        // Only a deadline that passed before the decode began ends it unsent.
        let input = waiting.await.map_err(|_| {
            Error::DeadlineExceeded("the request's deadline passed before it was decoded".into())
        })??;
        let (reply, answer) = oneshot::channel();
        self.batcher.submit(Job {
            input,
            profile: ask.profile,
            source: ask.source,
            top_k: ask.top_k,
            with_logits: ask.with_logits,
            deadline: ask.deadline,
            queued: Instant::now(),
            span: tracing::Span::current(),
            reply,
        })?;
        answer
            .await
            .map_err(|_| crate::Error::Internal("compute worker dropped the request".into()))?
    }

    /// The profile a request naming `profile` from `source` gets now, and why:
    /// for protocols that fix one profile for several inputs.
    pub fn resolve(&self, profile: &str, source: &str) -> Result<(String, Choice)> {
        check_request_names(profile, source)?;
        let table = self.registry.snapshot();
        let (p, chosen) = table.resolve(profile, source, now_ms())?;
        Ok((p.name.clone(), chosen))
    }

    /// Ends activations on time in the stored state (requests already stop
    /// using them at their end): sleeps until the next end, then applies
    /// [`Change::Expire`]. Runs until the engine is dropped.
    pub fn expire_activations(self: &Arc<Self>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let wait = {
                    let Some(e) = engine.upgrade() else { return };
                    let now = now_ms();
                    let next = e.registry.snapshot().activations.next_expiry(now);
                    // Re-read at least every second: changes may add earlier ends.
                    next.map_or(1000, |t| (t - now).min(1000))
                };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let Some(e) = engine.upgrade() else { return };
                let now = now_ms();
                let ended = e
                    .registry
                    .snapshot()
                    .activations
                    .all()
                    .iter()
                    .any(|a| a.until_ms <= now);
                if !ended {
                    continue;
                }
                let cause = Cause::new("server", "ended");
                match e.change(Change::Expire(now), cause, false).await {
                    Ok(_) => tracing::info!("ended activations cleaned up"),
                    // Another replica cleaned them up first.
                    Err(Error::Aborted(_)) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "could not clean up ended activations; retrying")
                    }
                }
            }
        });
    }
}

/// A request's profile and source, each optional, checked before any lookup.
/// Runs an admin change in an `admin_change` span that says how it ended, so an
/// operator's change shows in a trace next to the traffic it redirected.
async fn traced_change<T>(
    op: &'static str,
    who: &str,
    change: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let span = tracing::info_span!("admin_change", op, who, status = tracing::field::Empty);
    let result = tracing::Instrument::instrument(change, span.clone()).await;
    span.record(
        "status",
        result.as_ref().map_or_else(|e| e.kind(), |_| "ok"),
    );
    result
}

fn check_request_names(profile: &str, source: &str) -> Result<()> {
    if !profile.is_empty() {
        validate_name("profile", profile)?;
    }
    if !source.is_empty() {
        validate_source(source)?;
    }
    Ok(())
}

/// What a request asks for, beyond its input.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// Empty: the activation covering `source`, else the default.
    pub profile: String,
    /// Where the input comes from, e.g. `site-a/cam-12`; may be empty.
    pub source: String,
    /// Classes to return (0: the default number).
    pub top_k: usize,
    pub with_logits: bool,
    pub deadline: Option<Instant>,
    /// The client's address, for per-client admission limits.
    pub peer: Option<std::net::IpAddr>,
}

/// Runs registry work on tokio's blocking pool, keeping reactor threads free.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("worker failed: {e}")))?
}
