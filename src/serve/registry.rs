//! The registry: the one place that changes the published profile table.
//!
//! It holds one immutable [`Table`] behind an `ArcSwap`: a request loads it once
//! and uses only that snapshot, so it never sees half of a change. Every change
//! reaches it as a desired [`State`] (the next state of a checked [`Change`], a
//! restored state file, or the fleet's state in etcd), and [`Registry::reconcile`]
//! builds the next table from it off the request path: what is unchanged is
//! reused, new stems are folded, and the table is persisted, recorded in the
//! audit trail and then published with one atomic store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::model::{Model, Stem};
use crate::patch::signature::Signature;
use crate::serve::activation::{Activation, Activations};
use crate::serve::auto::Auto;
use crate::serve::change::{Applied, Change};
use crate::serve::journal::{Cause, Entry, Journal};
use crate::serve::metrics as m;
use crate::serve::profile::{
    AUTO, CLEAN, LoadedSignature, Origin, Profile, SignatureRef, Table, check_definition,
    is_builtin, materialize, validate_name,
};
use crate::serve::state::{Saved, SignatureEntry, State};
use crate::{Error, Result, bail};

/// Gives the bytes of a signature the registry does not hold yet.
pub type Load<'a> = &'a dyn Fn(&SignatureEntry) -> Result<Arc<Signature>>;

/// Stems folded ahead of a change that another store publishes (etcd), kept
/// until the reconcile that applies it takes them: at most this many.
const MAX_PREPARED: usize = 4;

/// A stem folded ahead, by the signatures and alphas it was folded from.
struct Prepared {
    patches: Vec<(Arc<LoadedSignature>, u32)>,
    stem: Arc<Stem>,
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
    /// Called with the tables before and after each publication.
    published: OnceLock<Published>,
    prepared: Mutex<Vec<Prepared>>,
    /// Where every change is recorded (in memory unless set).
    journal: OnceLock<Journal>,
    /// The detector behind the built-in `auto` profile, when the model has one.
    auto: OnceLock<Arc<Auto>>,
}

/// Writes a table's state, with the audit entry of the change that produced it.
type Persist = Box<dyn Fn(&Table, Option<&Entry>) -> Result<()> + Send + Sync>;
type Published = Box<dyn Fn(&Table, &Table) + Send + Sync>;

/// What a publication writes before the table is stored.
enum Record {
    /// A change: the state with its entry, then the entry's line.
    Change(Entry),
    /// The state alone.
    State,
    /// Nothing: the table is the state just read back.
    Nothing,
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

/// Publishes the activation counts of `next`. What only `before` had needs no
/// zeroing: the exposition shows the counts as they are, so its pairs vanish.
fn record_activations(_before: &Table, next: &Table) {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for a in next.activations.all() {
        *counts
            .entry((a.scope.clone(), a.profile.clone()))
            .or_default() += 1;
    }
    m::set_activations(counts);
}

fn record_resident(table: &Table) {
    let resident = table.profiles.values().filter(|p| p.is_resident()).count();
    metrics::gauge!(m::RESIDENT_PROFILES).set(resident as f64);
}

/// Whether two maps hold the very same entries.
fn same_entries<T>(a: &BTreeMap<String, Arc<T>>, b: &BTreeMap<String, Arc<T>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}

/// Why `what` cannot name profile `name`: it is not defined, or it is `auto`
/// on a model without a detector.
fn undefined(what: &str, name: &str) -> Error {
    if name == AUTO {
        return Error::FailedPrecondition(format!(
            "{what} is {AUTO:?}, which needs a corruption detector: this model has no \
             detector.safetensors (train one with `rws train-detector`)"
        ));
    }
    Error::NotFound(format!(
        "{what} {} is not defined",
        crate::error::clip(name)
    ))
}

fn no_bytes(e: &SignatureEntry) -> Result<Arc<Signature>> {
    Err(Error::FailedPrecondition(format!(
        "signature {:?} has no bytes here; load it with its file",
        e.name
    )))
}

impl Registry {
    /// A registry with only the clean profile, materialized, as the default.
    pub fn new(model: Arc<Model>, max_resident: usize) -> Result<Self> {
        if max_resident == 0 {
            bail!(InvalidArgument, "max resident profiles must be at least 1");
        }
        let stem = materialize(&model, CLEAN, &[], &[])?;
        let clean = Profile::new(CLEAN, vec![], vec![], 0, Some(Arc::new(stem)), 0);
        let table = Table {
            generation: 0,
            signatures: BTreeMap::new(),
            profiles: BTreeMap::from([(CLEAN.to_string(), Arc::new(clean))]),
            default_profile: CLEAN.into(),
            activations: Default::default(),
        };
        Ok(Registry {
            model,
            table: ArcSwap::from_pointee(table),
            writer: Mutex::new(()),
            residency: Mutex::new(()),
            max_resident,
            clock: AtomicU64::new(1),
            persist: OnceLock::new(),
            published: OnceLock::new(),
            prepared: Mutex::default(),
            journal: OnceLock::new(),
            auto: OnceLock::new(),
        })
    }

    /// Defines the built-in `auto` profile, served by `auto`'s choices. Set once,
    /// at start-up.
    pub fn enable_auto(&self, auto: Auto) -> Result<()> {
        let _w = self.lock_writer();
        self.auto
            .set(Arc::new(auto))
            .map_err(|_| Error::Internal("auto is already enabled".into()))?;
        let before = self.snapshot();
        let mut next = (*before).clone();
        let profile = Profile::new(AUTO, vec![], vec![], before.generation, None, 0);
        next.profiles.insert(AUTO.into(), Arc::new(profile));
        record(&next);
        self.table.store(Arc::new(next));
        Ok(())
    }

    /// The detector and policy behind `auto`, if the model has a detector.
    pub fn auto(&self) -> Option<&Arc<Auto>> {
        self.auto.get()
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The current table. Hold on to it for the whole request.
    pub fn snapshot(&self) -> Arc<Table> {
        self.table.load_full()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The patched stem of a profile from `table`, materializing it if it was evicted.
    pub fn stem(&self, table: &Table, profile: &Arc<Profile>) -> Result<Arc<Stem>> {
        profile.last_used.store(self.tick(), Ordering::Relaxed);
        if let Some(stem) = profile.stem.load_full() {
            return Ok(stem);
        }
        let (stem, filled) = self.fill(profile)?;
        if filled {
            self.evict(table, std::slice::from_ref(profile));
            record_resident(table);
        }
        Ok(stem)
    }

    /// The profile's stem, folded now if its slot is empty (then `true`).
    fn fill(&self, profile: &Profile) -> Result<(Arc<Stem>, bool)> {
        let _fill = profile.fill.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stem) = profile.stem.load_full() {
            return Ok((stem, false));
        }
        let stem = Arc::new(profile.materialize(&self.model)?);
        profile.stem.store(Some(stem.clone()));
        Ok((stem, true))
    }

    /// Empties the least recently used slots until at most `max_resident` are filled.
    /// The default, clean and activated profiles and `keep` stay.
    fn evict(&self, table: &Table, keep: &[Arc<Profile>]) {
        let _guard = self.residency.lock().unwrap_or_else(|e| e.into_inner());
        let mut resident: Vec<&Arc<Profile>> = table
            .profiles
            .values()
            .filter(|p| p.is_resident())
            .collect();
        let Some(excess) = resident.len().checked_sub(self.max_resident) else {
            return;
        };
        resident.retain(|p| {
            !keep.iter().any(|k| Arc::ptr_eq(p, k))
                && p.name != table.default_profile
                && p.name != CLEAN
                && !table.activations.all().iter().any(|a| a.profile == p.name)
        });
        resident.sort_by_key(|p| p.last_used.load(Ordering::Relaxed));
        for p in resident.into_iter().take(excess) {
            p.stem.store(None);
            tracing::debug!(profile = %p.name, "evicted patched stem");
        }
    }

    /// From now on, every change is handed to `persist` (with its audit
    /// entry) before it is recorded and published, and refused if that fails.
    /// Set once, at start-up, before the first change.
    pub fn persist_with(
        &self,
        persist: impl Fn(&Table, Option<&Entry>) -> Result<()> + Send + Sync + 'static,
    ) -> Result<()> {
        self.persist
            .set(Box::new(persist))
            .map_err(|_| Error::Internal("persistence is already set up".into()))
    }

    /// Calls `f` with the tables before and after each publication, under the
    /// writer lock: for clean-up that must wait until a change is final. Set
    /// once, at start-up.
    pub fn on_publish(&self, f: impl Fn(&Table, &Table) + Send + Sync + 'static) -> Result<()> {
        self.published
            .set(Box::new(f))
            .map_err(|_| Error::Internal("a publication hook is already set up".into()))
    }

    /// Takes up the audit trail and the saved state of a state directory at
    /// start-up, before any change: a change whose state was written but whose
    /// line a crash cut off is recorded now, and generations go on after the
    /// last one recorded or persisted, so that none is used twice.
    pub fn resume(&self, journal: Journal, saved: Option<&Saved>) -> Result<()> {
        let _w = self.lock_writer();
        if let Some(pending) = saved.and_then(|s| s.pending.as_ref()) {
            journal.recover(pending)?;
        }
        let saved_generation = saved.map_or(0, |s| s.generation);
        let mut table = (*self.snapshot()).clone();
        table.generation = saved_generation.max(journal.last_generation());
        self.journal
            .set(journal)
            .map_err(|_| Error::Internal("the audit journal is already set up".into()))?;
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// The audit trail of this registry's changes.
    pub fn journal(&self) -> &Journal {
        self.journal.get_or_init(Journal::memory)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `change` against the current state and applies it, all or
    /// nothing, recording it with `cause`. A [`Change::Load`] takes its bytes
    /// through [`Registry::load`] or [`Registry::apply_with`].
    pub fn apply(&self, change: &Change, cause: &Cause) -> Result<Applied> {
        self.apply_with(change, cause, &no_bytes)
    }

    /// Runs `f` on the current table while no change can be published.
    pub fn locked<T>(&self, f: impl FnOnce(&Table) -> T) -> T {
        let _w = self.lock_writer();
        f(&self.snapshot())
    }

    /// Registers `signature` under `name`, after checking it against the served model.
    pub fn load(
        &self,
        name: &str,
        signature: Arc<Signature>,
        origin: Origin,
        cause: &Cause,
    ) -> Result<Applied> {
        let change = Change::Load(SignatureEntry {
            name: name.into(),
            origin,
        });
        self.apply_with(&change, cause, &|_| Ok(signature.clone()))
    }

    /// [`Registry::apply`], with `load` giving the bytes of a signature it
    /// loads; `load` runs under the writer lock.
    pub fn apply_with(&self, change: &Change, cause: &Cause, load: Load) -> Result<Applied> {
        let start = Instant::now();
        let _w = self.lock_writer();
        let before = self.snapshot();
        let state = State::of(&before);
        let entry = change.entry(&state, cause);
        let desired = change.next(state)?;
        // An explicit put always folds anew, so that it is timed like one and
        // publishes a new generation even when the definition is unchanged.
        let fresh = match change {
            Change::Put { name, .. } => Some(name.as_str()),
            _ => None,
        };
        let generation = before.generation + 1;
        let (next, built, errors) = self.build(&before, &desired, load, fresh, generation);
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        let after = self.publish(&before, next, &built, change.op(), Record::Change(entry))?;
        Ok(Applied::new(change, &before, &after, start.elapsed(), 0))
    }

    /// Brings the table to `desired` in one publication. What cannot be
    /// applied (a signature that does not load or fit, and the profiles that
    /// need it) is left out and returned; the rest is applied.
    pub fn reconcile(&self, desired: &State, load: Load) -> Vec<Error> {
        let _w = self.lock_writer();
        let before = self.snapshot();
        let generation = before.generation + 1;
        let (next, built, mut errors) = self.build(&before, desired, load, None, generation);
        errors.extend(
            self.publish(&before, next, &built, "reconcile", Record::State)
                .err(),
        );
        errors
    }

    /// Publishes the state a restart read back, as [`Registry::reconcile`]
    /// would, but at the generation [`Registry::resume`] set and without
    /// writing it again: it is the table persisted then, not a change.
    pub fn restore(&self, saved: &State, load: Load) -> Vec<Error> {
        let _w = self.lock_writer();
        let before = self.snapshot();
        let generation = before.generation;
        let (next, built, mut errors) = self.build(&before, saved, load, None, generation);
        errors.extend(
            self.publish(&before, next, &built, "restore", Record::Nothing)
                .err(),
        );
        errors
    }

    /// Folds the stem of a profile definition now, for a change another store
    /// will publish: the reconcile that applies it takes the stem instead of
    /// folding it again. Errors are those the reconcile would meet.
    pub fn prepare(&self, name: &str, refs: &[SignatureRef]) -> Result<()> {
        check_definition(name, refs)?;
        let table = self.snapshot();
        let resolved = refs
            .iter()
            .map(|r| {
                table.signatures.get(&r.name).cloned().ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "signature {:?} is not loaded on this replica; see the fleet status",
                        r.name
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let stem = Arc::new(materialize(&self.model, name, &resolved, refs)?);
        let patches = resolved
            .into_iter()
            .zip(refs)
            .map(|(s, r)| (s, r.alpha.to_bits()))
            .collect();
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if prepared.len() == MAX_PREPARED {
            prepared.remove(0);
        }
        prepared.push(Prepared { patches, stem });
        Ok(())
    }

    /// A stem prepared for exactly these signatures at these alphas, if any.
    fn take_prepared(
        &self,
        resolved: &[Arc<LoadedSignature>],
        refs: &[SignatureRef],
    ) -> Option<Arc<Stem>> {
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        let i = prepared.iter().position(|p| {
            p.patches.len() == resolved.len()
                && p.patches
                    .iter()
                    .zip(resolved.iter().zip(refs))
                    .all(|((s, a), (t, r))| Arc::ptr_eq(s, t) && *a == r.alpha.to_bits())
        })?;
        Some(prepared.remove(i).stem)
    }

    /// The next table for `desired`, the profiles built for it, and what could
    /// not be applied. Entries of `before` that `desired` leaves as they are
    /// are reused; `fresh` names a profile to build anew regardless. The
    /// table and the profiles built have `generation`.
    fn build(
        &self,
        before: &Table,
        desired: &State,
        load: Load,
        fresh: Option<&str>,
        generation: u64,
    ) -> (Table, Vec<Arc<Profile>>, Vec<Error>) {
        let mut errors = Vec::new();
        let mut signatures = BTreeMap::new();
        for e in &desired.signatures {
            let current = before.signatures.get(&e.name);
            let taken = match current.filter(|s| s.origin == e.origin) {
                Some(s) => Ok(s.clone()),
                None => self.take_in(e, load),
            };
            match taken {
                Ok(s) => {
                    signatures.insert(e.name.clone(), s);
                }
                Err(err) => {
                    // Other bytes under a loaded name that do not load here: the
                    // replica keeps serving what it has, and says so.
                    if let Some(s) = current {
                        signatures.insert(e.name.clone(), s.clone());
                    }
                    errors.push(err);
                }
            }
        }
        // The built-in profiles carry over unchanged.
        let mut profiles: BTreeMap<String, Arc<Profile>> = before
            .profiles
            .iter()
            .filter(|(name, _)| is_builtin(name))
            .map(|(name, p)| (name.clone(), p.clone()))
            .collect();
        let mut built = Vec::new();
        for p in &desired.profiles {
            let refs = p.refs();
            let kept = before.profiles.get(&p.name).filter(|cur| {
                fresh != Some(p.name.as_str())
                    && cur.signatures == refs
                    && cur.resolved.iter().all(|s| {
                        signatures
                            .get(&s.name)
                            .is_some_and(|now| Arc::ptr_eq(now, s))
                    })
            });
            if let Some(cur) = kept {
                profiles.insert(p.name.clone(), cur.clone());
                continue;
            }
            match self.build_profile(&p.name, refs, &signatures, generation) {
                Ok(profile) => {
                    built.push(profile.clone());
                    profiles.insert(p.name.clone(), profile);
                }
                Err(err) => errors.push(err),
            }
        }
        let default_profile = if profiles.contains_key(&desired.default_profile) {
            desired.default_profile.clone()
        } else {
            errors.push(undefined("the default profile", &desired.default_profile));
            match profiles.contains_key(&before.default_profile) {
                true => before.default_profile.clone(),
                false => CLEAN.into(),
            }
        };
        let activations = desired.activations.iter().filter(|a| {
            let defined = profiles.contains_key(&a.profile);
            if !defined {
                errors.push(undefined(
                    &format!("activation {:?}'s profile", a.id),
                    &a.profile,
                ));
            }
            defined
        });
        let activations: Vec<Activation> = activations.cloned().collect();
        let activations = match before
            .activations
            .all()
            .iter()
            .map(|a| &**a)
            .eq(&activations)
        {
            true => before.activations.clone(),
            false => Arc::new(Activations::new(activations)),
        };
        // The default and activated profiles are resident before they are
        // published, so that the first request after a switch pays nothing.
        // `auto` has no stem of its own; its choices are folded as they come.
        let serving = std::iter::once(&default_profile)
            .chain(activations.all().iter().map(|a| &a.profile))
            .filter(|name| name.as_str() != AUTO);
        for name in serving {
            if let Err(e) = self.fill(&profiles[name]) {
                errors.push(e);
            }
        }
        let next = Table {
            generation,
            signatures,
            profiles,
            default_profile,
            activations,
        };
        (next, built, errors)
    }

    /// A signature to register: its bytes, checked against the served model.
    fn take_in(&self, e: &SignatureEntry, load: Load) -> Result<Arc<LoadedSignature>> {
        validate_name("signature", &e.name)?;
        let signature = load(e)?;
        let transferred = self
            .model
            .check_signature(&signature, e.origin.allow_transfer)?;
        Ok(Arc::new(LoadedSignature {
            name: e.name.clone(),
            signature,
            transferred,
            origin: e.origin.clone(),
        }))
    }

    /// A profile with its stem folded (or taken from [`Registry::prepare`]).
    fn build_profile(
        &self,
        name: &str,
        refs: Vec<SignatureRef>,
        signatures: &BTreeMap<String, Arc<LoadedSignature>>,
        generation: u64,
    ) -> Result<Arc<Profile>> {
        // A state from disk or etcd is held to the rules of a request.
        check_definition(name, &refs)?;
        let resolved = refs
            .iter()
            .map(|r| {
                signatures.get(&r.name).cloned().ok_or_else(|| {
                    Error::NotFound(format!(
                        "profile {name:?} needs signature {:?}, which is not loaded",
                        r.name
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let stem = match self.take_prepared(&resolved, &refs) {
            Some(stem) => stem,
            None => Arc::new(materialize(&self.model, name, &resolved, &refs)?),
        };
        Ok(Arc::new(Profile::new(
            name,
            refs,
            resolved,
            generation,
            Some(stem),
            self.tick(),
        )))
    }

    /// Publishes `next` once `write` is written, unless it holds nothing
    /// new; returns the table now current.
    fn publish(
        &self,
        before: &Arc<Table>,
        next: Table,
        built: &[Arc<Profile>],
        op: &'static str,
        write: Record,
    ) -> Result<Arc<Table>> {
        let unchanged = next.default_profile == before.default_profile
            && Arc::ptr_eq(&next.activations, &before.activations)
            && same_entries(&next.signatures, &before.signatures)
            && same_entries(&next.profiles, &before.profiles);
        if unchanged {
            return Ok(before.clone());
        }
        match write {
            Record::Change(mut entry) => {
                entry.generation = next.generation;
                self.commit(before, &next, &entry)?;
            }
            Record::State => {
                if let Some(persist) = self.persist.get() {
                    persist(&next, None)?;
                }
            }
            Record::Nothing => {}
        }
        record(&next);
        if !Arc::ptr_eq(&next.activations, &before.activations) {
            record_activations(before, &next);
        }
        let next = Arc::new(next);
        self.table.store(next.clone());
        metrics::counter!(m::PROFILE_CHANGES, "op" => op).increment(1);
        self.evict(&next, built);
        if let Some(f) = self.published.get() {
            f(before, &next);
        }
        Ok(next)
    }

    /// Makes a change durable in the order that keeps the trail true at any
    /// instant: the state with `entry` first (a crash now leaves the entry
    /// there, for [`Registry::resume`]), then its line. Without the line the
    /// change is refused and the state goes back.
    fn commit(&self, before: &Table, next: &Table, entry: &Entry) -> Result<()> {
        let Some(persist) = self.persist.get() else {
            return self.journal().append(entry);
        };
        persist(next, Some(entry))?;
        if let Err(e) = self.journal().append(entry) {
            if let Err(undo) = persist(before, None) {
                tracing::error!(
                    error = %undo,
                    generation = entry.generation,
                    "cannot put the state back after the audit trail refused a change; \
                     a restart now applies and records it"
                );
            }
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::quant::Quant;
    use crate::serve::profile::Source;

    /// A small synthetic model and two signatures for it.
    fn fixture() -> (Registry, Arc<Signature>, Arc<Signature>) {
        let dir = tempfile::tempdir().unwrap();
        let arch = crate::lab::synth::arch_by_name("resnet-small").unwrap();
        let model =
            crate::lab::synth::write_repo_model(dir.path(), arch, 1, &[], Quant::Int8, 5).unwrap();
        let sig = |seed| {
            Arc::new(crate::lab::synth::signature(&model, "s", seed, 0.3, Quant::Int8).unwrap())
        };
        let (a, b) = (sig(1), sig(2));
        (Registry::new(Arc::new(model), 4).unwrap(), a, b)
    }

    fn entry(name: &str) -> SignatureEntry {
        SignatureEntry {
            name: name.into(),
            origin: Origin {
                source: Source::Repo {
                    path: format!("{name}.rws.safetensors"),
                },
                sha256: format!("sha256:{name}"),
                allow_transfer: false,
            },
        }
    }

    fn desired(signatures: &[&str], profiles: &[(&str, &str)], default: &str) -> State {
        State {
            version: crate::serve::state::FORMAT_VERSION,
            signatures: signatures.iter().map(|s| entry(s)).collect(),
            profiles: profiles
                .iter()
                .map(|(p, s)| {
                    let refs = [SignatureRef {
                        name: s.to_string(),
                        alpha: 0.5,
                    }];
                    crate::serve::state::ProfileEntry::new(p, &refs)
                })
                .collect(),
            default_profile: default.into(),
            activations: vec![],
        }
    }

    #[test]
    fn reconcile_applies_what_it_can_in_one_publication_and_is_idempotent() {
        let (registry, a, _) = fixture();
        let load = |e: &SignatureEntry| match e.name.as_str() {
            "a" => Ok(a.clone()),
            _ => Err(Error::NotFound(format!("{} is missing here", e.name))),
        };
        let want = desired(&["a", "b"], &[("pa", "a"), ("pb", "b")], "pb");
        let errors = registry.reconcile(&want, &load);
        let names: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{names:?}");
        assert!(names[0].contains("b is missing"), "{names:?}");
        assert!(
            names[1].contains("\"pb\" needs signature \"b\""),
            "{names:?}"
        );
        assert!(names[2].contains("default profile \"pb\""), "{names:?}");
        let t = registry.snapshot();
        assert_eq!(t.generation, 1, "one publication");
        assert_eq!(t.signatures.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(t.profiles.keys().collect::<Vec<_>>(), ["clean", "pa"]);
        assert_eq!(t.default_profile, CLEAN);
        assert_eq!(t.profiles["pa"].generation, 1);
        // The same state again: nothing is folded or published.
        let again = registry.reconcile(&want, &load);
        assert_eq!(again.len(), 3);
        let t2 = registry.snapshot();
        assert!(Arc::ptr_eq(&t, &t2));
    }

    #[test]
    fn a_refused_change_publishes_nothing() {
        let (registry, a, b) = fixture();
        registry
            .load("a", a, Origin::memory(false), &Default::default())
            .unwrap();
        let before = registry.snapshot();
        let huge = vec![SignatureRef {
            name: "a".into(),
            alpha: 1e38,
        }];
        let err = registry
            .apply(&Change::put("p", huge, false), &Default::default())
            .unwrap_err();
        assert_eq!(err.kind(), "invalid_argument", "{err}");
        let err = registry
            .load("a", b, Origin::memory(false), &Default::default())
            .unwrap_err();
        assert_eq!(err.kind(), "already_exists", "{err}");
        assert!(Arc::ptr_eq(&before, &registry.snapshot()));
    }

    #[test]
    fn an_explicit_put_folds_anew_and_a_replaced_signature_refolds_its_users() {
        let (registry, a, b) = fixture();
        registry
            .load("a", a, Origin::memory(false), &Default::default())
            .unwrap();
        let refs = vec![SignatureRef {
            name: "a".into(),
            alpha: 0.5,
        }];
        let first = registry
            .apply(&Change::put("p", refs.clone(), false), &Default::default())
            .unwrap();
        let again = registry
            .apply(&Change::put("p", refs, true), &Default::default())
            .unwrap();
        assert_eq!(again.generation, first.generation + 1);
        let (p1, p2) = (first.profile().unwrap(), again.profile().unwrap());
        assert!(!Arc::ptr_eq(p1, p2));
        // A state naming other bytes under the same name swaps the signature
        // and refolds the profile that uses it, in one publication.
        let mut want = State::of(&registry.snapshot());
        want.signatures[0] = entry("a");
        let errors = registry.reconcile(&want, &|_| Ok(b.clone()));
        assert!(errors.is_empty(), "{errors:?}");
        let t = registry.snapshot();
        assert_eq!(t.generation, again.generation + 1);
        assert!(Arc::ptr_eq(&t.signatures["a"].signature, &b));
        assert!(Arc::ptr_eq(
            &t.profiles["p"].resolved[0],
            &t.signatures["a"]
        ));
        // Other bytes that do not load: the replica keeps what it serves.
        want.signatures[0].origin.sha256 = "sha256:other".into();
        let errors = registry.reconcile(&want, &|e| Err(Error::NotFound(e.name.clone())));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(Arc::ptr_eq(&t, &registry.snapshot()));
    }

    use crate::serve::durability::Retention;
    use crate::serve::state::StateDir;
    use std::time::{Duration, SystemTime};

    /// A registry on `model` that keeps its state in `dir` as the engine does,
    /// restored from what `dir` holds; `persist` stands in for the state write.
    fn reopen(
        model: &Arc<Model>,
        dir: &StateDir,
        sig: &Arc<Signature>,
        persist: impl Fn(&Table, Option<&Entry>) -> Result<()> + Send + Sync + 'static,
    ) -> Result<Registry> {
        let registry = Registry::new(model.clone(), 4)?;
        let saved = dir.read()?;
        registry.resume(
            Journal::open(&dir.dir, &Retention::default())?,
            saved.as_ref(),
        )?;
        registry.persist_with(persist)?;
        if let Some(saved) = saved {
            let sig = sig.clone();
            let errors = registry.restore(&saved.state, &|_| Ok(sig.clone()));
            assert!(errors.is_empty(), "{errors:?}");
        }
        Ok(registry)
    }

    fn trail(registry: &Registry) -> Vec<(u64, String)> {
        let mut t: Vec<_> = registry
            .journal()
            .history("", usize::MAX)
            .into_iter()
            .map(|e| (e.generation, e.op))
            .collect();
        t.reverse();
        t
    }

    /// A crash just before or just after the state of a change is written:
    /// after the restart the trail says exactly what the state holds, and the
    /// next change gets a generation not used before.
    fn crash_then_restart(state_written: bool) {
        let (registry, a, _) = fixture();
        let model = registry.model().clone();
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let crash = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, c) = (dir.clone(), crash.clone());
        let first = reopen(&model, &dir, &a, move |t, pending| {
            let crashing = pending.is_some() && c.load(Ordering::Relaxed);
            if crashing && !state_written {
                panic!("crash before the state is written");
            }
            d.write(&crate::serve::state::Saved::of(t, pending))?;
            assert!(!crashing, "crash after the state is written");
            Ok(())
        })
        .unwrap();
        let cause = Cause::default();
        first
            .load("a", a.clone(), entry("a").origin, &cause)
            .unwrap();
        let refs = vec![SignatureRef {
            name: "a".into(),
            alpha: 0.5,
        }];
        first.apply(&Change::put("p", refs, false), &cause).unwrap();
        crash.store(true, Ordering::Relaxed);
        let set = Change::SetDefault("p".into());
        let crashed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| first.apply(&set, &cause)));
        assert!(crashed.is_err(), "the crash did not happen");
        drop(first);

        let d = dir.clone();
        let again = reopen(&model, &dir, &a, move |t, pending| {
            d.write(&crate::serve::state::Saved::of(t, pending))
        })
        .unwrap();
        let table = again.snapshot();
        let mut want = vec![(1, "load_signature".to_string()), (2, "put_profile".into())];
        if state_written {
            want.push((3, "set_default".into()));
        }
        assert_eq!(trail(&again), want, "the trail is what was persisted");
        assert_eq!(
            table.default_profile,
            if state_written { "p" } else { CLEAN }
        );
        assert_eq!(table.generation, want.len() as u64);
        let refs = vec![SignatureRef {
            name: "a".into(),
            alpha: 0.25,
        }];
        let next = again.apply(&Change::put("q", refs, false), &cause).unwrap();
        assert_eq!(next.generation, table.generation + 1, "generations go on");
        assert_eq!(trail(&again).last().unwrap().0, next.generation);
    }

    #[test]
    fn a_crash_after_the_state_is_written_is_recorded_on_restart() {
        crash_then_restart(true);
    }

    #[test]
    fn a_crash_before_the_state_is_written_leaves_no_line() {
        crash_then_restart(false);
    }

    #[test]
    fn a_change_the_audit_trail_refuses_leaves_the_state_as_it_was() {
        let (registry, a, _) = fixture();
        let model = registry.model().clone();
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let write = |dir: &StateDir| {
            let d = dir.clone();
            move |t: &Table, p: Option<&Entry>| d.write(&crate::serve::state::Saved::of(t, p))
        };
        let first = reopen(&model, &dir, &a, write(&dir)).unwrap();
        let cause = Cause::default();
        first
            .load("a", a.clone(), entry("a").origin, &cause)
            .unwrap();
        drop(first);
        // The trail's file now refuses every write, as a full disk would.
        let audit = tmp.path().join("audit.jsonl");
        std::fs::remove_file(&audit).unwrap();
        std::os::unix::fs::symlink("/dev/full", &audit).unwrap();
        // (Its line is in the old trail: the state needs no recovery.)
        let mut saved = dir.read().unwrap().unwrap();
        saved.pending = None;
        dir.write(&saved).unwrap();
        let registry = reopen(&model, &dir, &a, write(&dir)).unwrap();
        let before = registry.snapshot();
        let refs = vec![SignatureRef {
            name: "a".into(),
            alpha: 0.5,
        }];
        let err = registry
            .apply(&Change::put("p", refs, false), &cause)
            .unwrap_err();
        assert_eq!(err.kind(), "unavailable", "{err}");
        assert!(err.to_string().contains("check its permissions"), "{err}");
        assert!(Arc::ptr_eq(&before, &registry.snapshot()));
        assert_eq!(dir.read().unwrap().unwrap(), saved, "the state moved");
        assert!(trail(&registry).is_empty());
    }

    #[test]
    fn an_unused_upload_is_kept_for_its_retention_from_when_it_was_unloaded() {
        let (registry, a, _) = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let keep = Duration::from_secs(3600);
        let uploads = dir.clone();
        registry
            .on_publish(move |before, after| uploads.released(before, after, keep))
            .unwrap();
        let long_ago = SystemTime::now() - 2 * keep;
        let file = |name: &str, at: SystemTime| {
            let path = dir.upload_path(name).unwrap();
            crate::fsutil::write_atomic(&path, b"bytes").unwrap();
            std::fs::File::options()
                .append(true)
                .open(&path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        };
        let uploaded = |name: &str| {
            let mut e = entry(name);
            e.origin.source = Source::Upload {
                file: format!("{name}.up"),
            };
            e.origin
        };
        file("a.up", long_ago);
        file("b.up", long_ago);
        file("old.up", long_ago);
        file("new.up", SystemTime::now());
        let cause = Cause::default();
        registry
            .load("a", a.clone(), uploaded("a"), &cause)
            .unwrap();
        registry
            .load("b", a.clone(), uploaded("b"), &cause)
            .unwrap();
        let listed = || {
            let mut names: Vec<String> = std::fs::read_dir(tmp.path().join("uploads"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            listed(),
            ["a.up", "b.up", "new.up", "old.up"],
            "a load collects nothing"
        );
        registry.apply(&Change::Unload("a".into()), &cause).unwrap();
        assert_eq!(
            listed(),
            ["a.up", "b.up", "new.up"],
            "a.up was unloaded just now"
        );
        dir.collect_uploads(&registry.snapshot(), Duration::ZERO);
        assert_eq!(listed(), ["b.up"], "what a signature uses stays");
    }
}
