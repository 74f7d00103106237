//! The registry: the one place that changes the published profile table.
//!
//! It holds one immutable [`Table`] behind an `ArcSwap`: a request loads it once
//! and uses only that snapshot, so it never sees half of a change. Every change
//! reaches it as a desired [`State`] (the next state of a checked [`Change`], a
//! restored state file, or the fleet's state in etcd), and [`Registry::reconcile`]
//! builds the next table from it off the request path: what is unchanged is
//! reused, new stems are folded, and the table is persisted and then published
//! with one atomic store.

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
use crate::serve::state::{SignatureEntry, State};
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
    prepared: Mutex<Vec<Prepared>>,
    /// Where every change is recorded (in memory unless set).
    journal: OnceLock<Journal>,
    /// The detector behind the built-in `auto` profile, when the model has one.
    auto: OnceLock<Arc<Auto>>,
}

type Persist = Box<dyn Fn(&Table) -> Result<()> + Send + Sync>;

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

    /// Records changes in `journal` from now on. Set once, at start-up.
    pub fn keep_journal(&self, journal: Journal) -> Result<()> {
        self.journal
            .set(journal)
            .map_err(|_| Error::Internal("the audit journal is already set up".into()))
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
    /// through [`Registry::load`].
    pub fn apply(&self, change: &Change, cause: &Cause) -> Result<Applied> {
        self.update(change, cause, &no_bytes)
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
        self.update(&change, cause, &|_| Ok(signature.clone()))
    }

    fn update(&self, change: &Change, cause: &Cause, load: Load) -> Result<Applied> {
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
        let (next, built, errors) = self.build(&before, &desired, load, fresh);
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        let after = self.publish(&before, next, &built, change.op(), Some(entry))?;
        Ok(Applied::new(change, &before, &after, start.elapsed(), 0))
    }

    /// Brings the table to `desired` in one publication. What cannot be
    /// applied (a signature that does not load or fit, and the profiles that
    /// need it) is left out and returned; the rest is applied.
    pub fn reconcile(&self, desired: &State, load: Load) -> Vec<Error> {
        let _w = self.lock_writer();
        let before = self.snapshot();
        let (next, built, mut errors) = self.build(&before, desired, load, None);
        errors.extend(self.publish(&before, next, &built, "reconcile", None).err());
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
    /// are reused; `fresh` names a profile to build anew regardless.
    fn build(
        &self,
        before: &Table,
        desired: &State,
        load: Load,
        fresh: Option<&str>,
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
        let generation = before.generation + 1;
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
            generation: before.generation,
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

    /// Publishes `next` with a bumped generation, once it is recorded in the
    /// journal (with `entry`) and persisted, unless it holds nothing new;
    /// returns the table now current.
    fn publish(
        &self,
        before: &Arc<Table>,
        mut next: Table,
        built: &[Arc<Profile>],
        op: &'static str,
        entry: Option<Entry>,
    ) -> Result<Arc<Table>> {
        let unchanged = next.default_profile == before.default_profile
            && Arc::ptr_eq(&next.activations, &before.activations)
            && same_entries(&next.signatures, &before.signatures)
            && same_entries(&next.profiles, &before.profiles);
        if unchanged {
            return Ok(before.clone());
        }
        next.generation += 1;
        if let Some(mut entry) = entry {
            entry.generation = next.generation;
            self.journal().append(&entry)?;
            if let Some(Err(e)) = self.persist.get().map(|p| p(&next)) {
                // The line is in the trail, the change is not: say so there.
                let mut undone = entry;
                undone.op = format!("{} refused", undone.op);
                undone.cause.why = e.to_string();
                if let Err(j) = self.journal().append(&undone) {
                    tracing::error!(error = %j, "cannot record a refused change in the audit trail");
                }
                return Err(e);
            }
        } else if let Some(persist) = self.persist.get() {
            persist(&next)?;
        }
        record(&next);
        if !Arc::ptr_eq(&next.activations, &before.activations) {
            record_activations(before, &next);
        }
        let next = Arc::new(next);
        self.table.store(next.clone());
        metrics::counter!(m::PROFILE_CHANGES, "op" => op).increment(1);
        self.evict(&next, built);
        Ok(next)
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
}
