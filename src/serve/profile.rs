//! Profiles and the table that publishes them.
//!
//! A profile is a named list of `signature@alpha`. The [`Registry`] holds one
//! immutable [`Table`] behind an `ArcSwap`: a request loads it once and uses only
//! that snapshot, so it never sees half of a change. Writers build the new
//! patched stem first, off the request path, and then publish a new table with
//! one atomic store. Patched stems are kept per profile in a slot that may be
//! emptied by LRU eviction and refilled on demand; refilling is deterministic,
//! so an evicted profile comes back bit-identical.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::{Deserialize, Serialize};

use crate::model::{Model, Stem};
use crate::patch::signature::Signature;
use crate::serve::metrics as m;
use crate::{Error, Result, bail};

/// The built-in profile with no signatures. It always exists and is never evicted.
pub const CLEAN: &str = "clean";

/// At most this many signatures in one profile.
pub const MAX_SIGNATURES_PER_PROFILE: usize = 16;

/// Where a loaded signature's bytes came from, so it can be loaded again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A file in the model directory, by its path relative to it.
    Repo { path: String },
    /// Uploaded bytes, kept in the state directory under this file name.
    Upload { file: String },
    /// Handed over in-process (tools, tests); not persisted.
    Memory,
}

/// How a signature was loaded: enough to load and verify it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    pub source: Source,
    /// `sha256:<hex>` of the file's bytes.
    pub sha256: String,
    pub allow_transfer: bool,
}

impl Origin {
    pub fn memory(allow_transfer: bool) -> Self {
        Origin {
            source: Source::Memory,
            sha256: String::new(),
            allow_transfer,
        }
    }
}

/// A signature registered under a name.
#[derive(Debug)]
pub struct LoadedSignature {
    pub name: String,
    pub signature: Signature,
    /// Made against other base weights and accepted with `allow_transfer`.
    pub transferred: bool,
    pub origin: Origin,
}

/// One entry of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct SignatureRef {
    pub name: String,
    pub alpha: f32,
}

impl std::str::FromStr for SignatureRef {
    type Err = Error;

    /// Parses `name@alpha` or `name=alpha`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, alpha) = s
            .split_once('@')
            .or_else(|| s.split_once('='))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: expected SIGNATURE@ALPHA, e.g. fog@0.8",
                    crate::error::clip(s)
                ))
            })?;
        let alpha = alpha.trim().parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "{}: alpha {} is not a number",
                crate::error::clip(s),
                crate::error::clip(alpha)
            ))
        })?;
        Ok(SignatureRef {
            name: name.trim().to_string(),
            alpha,
        })
    }
}

/// A profile definition and, when resident, its patched stem.
#[derive(Debug)]
pub struct Profile {
    pub name: String,
    pub signatures: Vec<SignatureRef>,
    /// The table generation that published this definition.
    pub generation: u64,
    /// The signatures, resolved when the profile was defined.
    resolved: Vec<Arc<LoadedSignature>>,
    stem: ArcSwapOption<Stem>,
    last_used: AtomicU64,
    fill: Mutex<()>,
}

impl Profile {
    pub fn is_resident(&self) -> bool {
        self.stem.load().is_some()
    }

    fn materialize(&self, model: &Model) -> Result<Stem> {
        let _s = tracing::debug_span!("patch_apply", profile = %self.name, signatures = self.signatures.len()).entered();
        let start = Instant::now();
        let patches: Vec<(&Signature, f32)> = self
            .resolved
            .iter()
            .zip(&self.signatures)
            .map(|(s, r)| (&s.signature, r.alpha))
            .collect();
        let stem = model.materialize(&patches)?;
        metrics::histogram!(m::PATCH_APPLY_SECONDS).record(start.elapsed().as_secs_f64());
        Ok(stem)
    }
}

/// One consistent view of signatures, profiles and the default.
#[derive(Debug, Clone)]
pub struct Table {
    pub generation: u64,
    pub signatures: BTreeMap<String, Arc<LoadedSignature>>,
    pub profiles: BTreeMap<String, Arc<Profile>>,
    pub default_profile: String,
}

impl Table {
    pub fn profile(&self, name: Option<&str>) -> Result<&Arc<Profile>> {
        let name = name
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.default_profile);
        // Names from clients are validated where they enter (the engine); the
        // message is clipped anyway, for every other caller.
        self.profiles.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "no profile named {} (known: {})",
                crate::error::clip(name),
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

/// The outcome of a profile change.
#[derive(Debug, Clone)]
pub struct Change {
    pub profile: Arc<Profile>,
    pub generation: u64,
    /// Materializing the stem plus publishing the table.
    pub apply: Duration,
    /// The etcd revision of the change in fleet mode; 0 for a local change.
    pub revision: i64,
}

/// Updates the gauges that describe a table about to be published.
fn record(table: &Table) {
    metrics::gauge!(m::PROFILES).set(table.profiles.len() as f64);
    metrics::gauge!(m::SIGNATURES).set(table.signatures.len() as f64);
    let bytes: usize = table
        .signatures
        .values()
        .map(|s| s.signature.stored_bytes())
        .sum();
    metrics::gauge!(m::SIGNATURE_BYTES).set(bytes as f64);
    metrics::gauge!(m::GENERATION).set(table.generation as f64);
    record_resident(table);
}

fn record_resident(table: &Table) {
    let resident = table.profiles.values().filter(|p| p.is_resident()).count();
    metrics::gauge!(m::RESIDENT_PROFILES).set(resident as f64);
}

pub struct Registry {
    model: Arc<Model>,
    table: ArcSwap<Table>,
    /// Serializes writers; readers never take it.
    writer: Mutex<()>,
    /// Serializes eviction decisions.
    residency: Mutex<()>,
    max_resident: usize,
    clock: AtomicU64,
    /// Called with each new table before it is published; an error refuses the change.
    persist: OnceLock<Persist>,
}

type Persist = Box<dyn Fn(&Table) -> Result<()> + Send + Sync>;

/// The checks on a profile definition that need no state.
fn check_definition(name: &str, signatures: &[SignatureRef]) -> Result<()> {
    validate_name("profile", name)?;
    if name == CLEAN {
        bail!(
            InvalidArgument,
            "{CLEAN:?} is built in and cannot be redefined"
        );
    }
    if signatures.len() > MAX_SIGNATURES_PER_PROFILE {
        bail!(
            InvalidArgument,
            "a profile holds at most {MAX_SIGNATURES_PER_PROFILE} signatures"
        );
    }
    for r in signatures {
        validate_name("signature", &r.name)?;
    }
    Ok(())
}

/// Refuses to drop signature `name` while a profile, given as (name, its
/// signatures' names), uses it.
pub(crate) fn ensure_unused<'a>(
    name: &str,
    profiles: impl Iterator<Item = (&'a str, Vec<&'a str>)>,
) -> Result<()> {
    let users: Vec<&str> = profiles
        .filter(|(_, sigs)| sigs.contains(&name))
        .map(|(p, _)| p)
        .collect();
    if !users.is_empty() {
        bail!(
            FailedPrecondition,
            "signature {name:?} is used by profile(s) {}; change or delete them first",
            users.join(", ")
        );
    }
    Ok(())
}

/// Names of profiles and signatures: short, printable, safe in paths and metrics.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!(
            InvalidArgument,
            "{kind} name {} must be 1-64 characters of letters, digits, '-', '_' or '.'",
            crate::error::clip(name)
        );
    }
    Ok(())
}

impl Registry {
    /// A registry with only the clean profile, materialized, as the default.
    pub fn new(model: Arc<Model>, max_resident: usize) -> Result<Self> {
        if max_resident == 0 {
            bail!(InvalidArgument, "max resident profiles must be at least 1");
        }
        let clean = Arc::new(Profile {
            name: CLEAN.into(),
            signatures: vec![],
            generation: 0,
            resolved: vec![],
            stem: ArcSwapOption::empty(),
            last_used: AtomicU64::new(0),
            fill: Mutex::new(()),
        });
        clean.stem.store(Some(Arc::new(clean.materialize(&model)?)));
        let table = Table {
            generation: 0,
            signatures: BTreeMap::new(),
            profiles: BTreeMap::from([(CLEAN.to_string(), clean)]),
            default_profile: CLEAN.into(),
        };
        Ok(Registry {
            model,
            table: ArcSwap::from_pointee(table),
            writer: Mutex::new(()),
            residency: Mutex::new(()),
            max_resident,
            clock: AtomicU64::new(1),
            persist: OnceLock::new(),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The current table. Hold on to it for the whole request.
    pub fn snapshot(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The patched stem of a profile from `table`, materializing it if it was evicted.
    pub fn stem(&self, table: &Table, profile: &Arc<Profile>) -> Result<Arc<Stem>> {
        profile.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if let Some(stem) = profile.stem.load_full() {
            return Ok(stem);
        }
        let _fill = profile.fill.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stem) = profile.stem.load_full() {
            return Ok(stem);
        }
        let stem = Arc::new(profile.materialize(&self.model)?);
        profile.stem.store(Some(stem.clone()));
        self.evict(table, profile);
        record_resident(table);
        Ok(stem)
    }

    /// Empties the least recently used slots until at most `max_resident` are filled.
    /// The default and clean profiles and `keep` stay.
    fn evict(&self, table: &Table, keep: &Arc<Profile>) {
        let _guard = self.residency.lock().unwrap_or_else(|e| e.into_inner());
        let mut resident: Vec<&Arc<Profile>> = table
            .profiles
            .values()
            .filter(|p| p.is_resident())
            .collect();
        if resident.len() <= self.max_resident {
            return;
        }
        resident.retain(|p| {
            !Arc::ptr_eq(p, keep) && p.name != table.default_profile && p.name != CLEAN
        });
        resident.sort_by_key(|p| p.last_used.load(Ordering::Relaxed));
        let excess =
            table.profiles.values().filter(|p| p.is_resident()).count() - self.max_resident;
        for p in resident.into_iter().take(excess) {
            p.stem.store(None);
            tracing::debug!(profile = %p.name, "evicted patched stem");
        }
    }

    /// From now on, every change is handed to `persist` before it is
    /// published, and refused if that fails. Set once, after a restore.
    pub fn persist_with(
        &self,
        persist: impl Fn(&Table) -> Result<()> + Send + Sync + 'static,
    ) -> Result<()> {
        let _w = self.lock_writer();
        persist(&self.snapshot())?;
        self.persist
            .set(Box::new(persist))
            .map_err(|_| Error::Internal("persistence is already set up".into()))
    }

    /// Publishes `next` as the new table, with a bumped generation, once it is persisted.
    fn publish(&self, mut next: Table, op: &'static str) -> Result<u64> {
        next.generation += 1;
        let generation = next.generation;
        if let Some(persist) = self.persist.get() {
            persist(&next)?;
        }
        record(&next);
        self.table.store(Arc::new(next));
        metrics::counter!(m::PROFILE_CHANGES, "op" => op).increment(1);
        Ok(generation)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a signature handed over in memory (not persisted).
    pub fn load_signature(
        &self,
        name: &str,
        signature: Signature,
        allow_transfer: bool,
    ) -> Result<Arc<LoadedSignature>> {
        self.load_signature_from(name, signature, Origin::memory(allow_transfer))
    }

    /// Registers a signature after checking it against the served model.
    pub fn load_signature_from(
        &self,
        name: &str,
        signature: Signature,
        origin: Origin,
    ) -> Result<Arc<LoadedSignature>> {
        validate_name("signature", name)?;
        let transferred = self
            .model
            .check_signature(&signature, origin.allow_transfer)?;
        let _w = self.lock_writer();
        let mut next = (*self.snapshot()).clone();
        if next.signatures.contains_key(name) {
            bail!(
                AlreadyExists,
                "a signature named {name:?} is already loaded; unload it first or pick another name"
            );
        }
        let loaded = Arc::new(LoadedSignature {
            name: name.into(),
            signature,
            transferred,
            origin,
        });
        next.signatures.insert(name.into(), loaded.clone());
        self.publish(next, "load_signature")?;
        Ok(loaded)
    }

    pub fn unload_signature(&self, name: &str) -> Result<()> {
        let _w = self.lock_writer();
        let mut next = (*self.snapshot()).clone();
        if next.signatures.remove(name).is_none() {
            bail!(NotFound, "no signature named {name:?} is loaded");
        }
        ensure_unused(
            name,
            next.profiles.values().map(|p| {
                let refs = p.signatures.iter().map(|s| s.name.as_str());
                (p.name.as_str(), refs.collect())
            }),
        )?;
        self.publish(next, "unload_signature")?;
        Ok(())
    }

    /// Validates a profile definition against `current` and materializes its stem.
    fn build_profile(
        &self,
        current: &Table,
        name: &str,
        signatures: Vec<SignatureRef>,
    ) -> Result<Arc<Profile>> {
        check_definition(name, &signatures)?;
        let mut resolved = Vec::with_capacity(signatures.len());
        for (i, r) in signatures.iter().enumerate() {
            if !r.alpha.is_finite() {
                bail!(
                    InvalidArgument,
                    "alpha of {:?} is {}; it must be a finite number",
                    r.name,
                    r.alpha
                );
            }
            if signatures[..i].iter().any(|p| p.name == r.name) {
                bail!(
                    InvalidArgument,
                    "signature {:?} appears twice in profile {name:?}; give it once with the summed alpha",
                    r.name
                );
            }
            let sig = current.signatures.get(&r.name).ok_or_else(|| {
                Error::NotFound(format!(
                    "no signature named {:?} is loaded (load it first)",
                    r.name
                ))
            })?;
            resolved.push(sig.clone());
        }
        let profile = Arc::new(Profile {
            name: name.into(),
            signatures,
            generation: current.generation + 1,
            resolved,
            stem: ArcSwapOption::empty(),
            last_used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
            fill: Mutex::new(()),
        });
        profile
            .stem
            .store(Some(Arc::new(profile.materialize(&self.model)?)));
        Ok(profile)
    }

    /// Everything [`Registry::put_profile`] checks, without publishing: for
    /// writers that publish elsewhere first (etcd).
    pub fn check_profile(&self, name: &str, signatures: Vec<SignatureRef>) -> Result<()> {
        self.build_profile(&self.snapshot(), name, signatures)
            .map(|_| ())
    }

    /// Defines a profile (or redefines it, with `replace`). Its stem is built
    /// before anything is published; on any error nothing changes.
    pub fn put_profile(
        &self,
        name: &str,
        signatures: Vec<SignatureRef>,
        replace: bool,
    ) -> Result<Change> {
        check_definition(name, &signatures)?;
        let _w = self.lock_writer();
        let current = self.snapshot();
        if current.profiles.contains_key(name) && !replace {
            bail!(
                AlreadyExists,
                "profile {name:?} already exists; set replace to change it"
            );
        }
        let start = Instant::now();
        let profile = self.build_profile(&current, name, signatures)?;
        let mut next = (*current).clone();
        next.profiles.insert(name.into(), profile.clone());
        let generation = self.publish(next, "put_profile")?;
        let apply = start.elapsed();
        self.evict(&self.snapshot(), &profile);
        Ok(Change {
            profile,
            generation,
            apply,
            revision: 0,
        })
    }

    pub fn delete_profile(&self, name: &str) -> Result<Change> {
        let _w = self.lock_writer();
        let start = Instant::now();
        let mut next = (*self.snapshot()).clone();
        if name == CLEAN {
            bail!(
                FailedPrecondition,
                "{CLEAN:?} is built in and cannot be deleted"
            );
        }
        if name == next.default_profile {
            bail!(
                FailedPrecondition,
                "{name:?} is the default profile; set another default first"
            );
        }
        let profile = next
            .profiles
            .remove(name)
            .ok_or_else(|| Error::NotFound(format!("no profile named {name:?}")))?;
        let generation = self.publish(next, "delete_profile")?;
        Ok(Change {
            profile,
            generation,
            apply: start.elapsed(),
            revision: 0,
        })
    }

    /// Makes `name` the profile for requests that name none. Its stem is made
    /// resident before the switch, so the first request after it pays nothing.
    pub fn set_default(&self, name: &str) -> Result<Change> {
        let _w = self.lock_writer();
        let start = Instant::now();
        if name.is_empty() {
            bail!(InvalidArgument, "name the profile to make the default");
        }
        let current = self.snapshot();
        let profile = current.profile(Some(name))?.clone();
        self.stem(&current, &profile)?;
        let mut next = (*current).clone();
        next.default_profile = name.into();
        let generation = self.publish(next, "set_default")?;
        Ok(Change {
            profile,
            generation,
            apply: start.elapsed(),
            revision: 0,
        })
    }
}
