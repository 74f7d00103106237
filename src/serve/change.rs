//! Admin changes to the profile state: load and unload a signature, put and
//! delete a profile, set the default.
//!
//! Every change is checked once, by [`Change::next`], against a snapshot of the
//! state, with rules that need no weights. A store then carries the next state:
//! locally the registry builds, persists and publishes it; in fleet mode etcd
//! takes it and every replica's watcher reconciles to it. Either way the
//! registry is changed only by reconciling to a [`State`].

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::serve::activation::{
    Activation, MAX_ACTIVATIONS, MAX_REASON_LEN, MAX_TTL_MS, now_ms, validate_scope,
};
use crate::serve::journal::{Cause, Entry};
use crate::serve::profile::{
    LoadedSignature, Profile, SignatureRef, Table, check_definition, is_builtin, validate_name,
};
use crate::serve::state::{ProfileEntry, SignatureEntry, State};
use crate::{Error, Result, bail};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Registers a signature; its bytes travel separately, by `origin`.
    Load(SignatureEntry),
    Unload(String),
    /// Defines a profile; `replace` allows redefining an existing one.
    Put {
        name: String,
        signatures: Vec<SignatureRef>,
        replace: bool,
    },
    Delete(String),
    SetDefault(String),
    /// Switches a profile on for a scope of sources, until its end.
    Activate(Activation),
    /// Moves an activation's end (an event's refresh).
    Extend {
        id: String,
        until_ms: u64,
    },
    /// Ends an activation, by id, before its time.
    Deactivate(String),
    /// Drops the activations that ended by this instant (Unix milliseconds).
    Expire(u64),
}

impl Change {
    pub fn put(name: &str, signatures: Vec<SignatureRef>, replace: bool) -> Self {
        Change::Put {
            name: name.into(),
            signatures,
            replace,
        }
    }

    /// The scope of sources the change concerns, if it concerns one.
    pub fn scope(&self, state: &State) -> Option<String> {
        match self {
            Change::Activate(a) => Some(a.scope.clone()),
            Change::Deactivate(id) | Change::Extend { id, .. } => state
                .activations
                .iter()
                .find(|a| &a.id == id)
                .map(|a| a.scope.clone()),
            _ => None,
        }
    }

    /// Its line in the audit trail, caused by `cause`; generation and
    /// revision are filled in where they become known.
    pub fn entry(&self, state: &State, cause: &Cause) -> Entry {
        Entry {
            at_ms: now_ms(),
            generation: 0,
            revision: 0,
            op: self.op().into(),
            scope: self.scope(state),
            change: serde_json::to_value(self).unwrap_or_default(),
            cause: cause.clone(),
        }
    }

    /// The metrics label of the change.
    pub fn op(&self) -> &'static str {
        match self {
            Change::Load(_) => "load_signature",
            Change::Unload(_) => "unload_signature",
            Change::Put { .. } => "put_profile",
            Change::Delete(_) => "delete_profile",
            Change::SetDefault(_) => "set_default",
            Change::Activate(_) => "activate",
            Change::Extend { .. } => "extend",
            Change::Deactivate(_) => "deactivate",
            Change::Expire(_) => "expire",
        }
    }

    /// The state after this change, or why it is refused. Nothing but `state`
    /// is consulted, so the same rules hold for every store.
    pub fn next(&self, state: State) -> Result<State> {
        let mut next = state;
        let state = &next;
        match self {
            Change::Load(e) => {
                validate_name("signature", &e.name)?;
                if state.signature(&e.name).is_some() {
                    bail!(
                        AlreadyExists,
                        "a signature named {:?} is already loaded; unload it first or pick another name",
                        e.name
                    );
                }
                next.signatures.push(e.clone());
                next.signatures.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Change::Unload(name) => {
                validate_name("signature", name)?;
                if state.signature(name).is_none() {
                    bail!(NotFound, "no signature named {name:?} is loaded");
                }
                let users: Vec<&str> = state
                    .profiles
                    .iter()
                    .filter(|p| p.signatures.iter().any(|r| &r.name == name))
                    .map(|p| p.name.as_str())
                    .collect();
                if !users.is_empty() {
                    bail!(
                        FailedPrecondition,
                        "signature {name:?} is used by profile(s) {}; change or delete them first",
                        users.join(", ")
                    );
                }
                next.signatures.retain(|s| &s.name != name);
            }
            Change::Put {
                name,
                signatures,
                replace,
            } => {
                check_definition(name, signatures)?;
                if state.profile(name).is_some() && !replace {
                    bail!(
                        AlreadyExists,
                        "profile {name:?} already exists; set replace to change it"
                    );
                }
                if let Some(r) = signatures
                    .iter()
                    .find(|r| state.signature(&r.name).is_none())
                {
                    bail!(
                        NotFound,
                        "no signature named {:?} is loaded (load it first)",
                        r.name
                    );
                }
                next.profiles.retain(|p| &p.name != name);
                next.profiles.push(ProfileEntry::new(name, signatures));
                next.profiles.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Change::Delete(name) => {
                validate_name("profile", name)?;
                if is_builtin(name) {
                    bail!(
                        FailedPrecondition,
                        "{name:?} is built in and cannot be deleted"
                    );
                }
                if name == &state.default_profile {
                    bail!(
                        FailedPrecondition,
                        "{name:?} is the default profile; set another default first"
                    );
                }
                if state.profile(name).is_none() {
                    bail!(NotFound, "no profile named {name:?}");
                }
                let scopes: Vec<&str> = state
                    .activations
                    .iter()
                    .filter(|a| &a.profile == name)
                    .map(|a| a.scope.as_str())
                    .collect();
                if !scopes.is_empty() {
                    bail!(
                        FailedPrecondition,
                        "{name:?} is activated for scope(s) {}; deactivate them first",
                        scopes.join(", ")
                    );
                }
                next.profiles.retain(|p| &p.name != name);
            }
            Change::SetDefault(name) => {
                if name.is_empty() {
                    bail!(InvalidArgument, "name the profile to make the default");
                }
                validate_name("profile", name)?;
                if !is_builtin(name) && state.profile(name).is_none() {
                    bail!(NotFound, "no profile named {name:?}");
                }
                next.default_profile = name.clone();
            }
            Change::Activate(a) => {
                validate_name("activation id", &a.id)?;
                validate_scope(&a.scope)?;
                validate_name("profile", &a.profile)?;
                if !is_builtin(&a.profile) && state.profile(&a.profile).is_none() {
                    bail!(NotFound, "no profile named {:?}", a.profile);
                }
                let ttl = a.until_ms.saturating_sub(a.since_ms);
                if ttl == 0 || ttl > MAX_TTL_MS {
                    bail!(
                        InvalidArgument,
                        "an activation lasts from 1 ms to {} days; this one {}",
                        MAX_TTL_MS / 86_400_000,
                        if ttl == 0 {
                            "ends before it begins"
                        } else {
                            "is longer"
                        }
                    );
                }
                if a.reason.len() > MAX_REASON_LEN || a.reason.chars().any(char::is_control) {
                    bail!(
                        InvalidArgument,
                        "a reason is at most {MAX_REASON_LEN} bytes of printable text"
                    );
                }
                // An id may be reused once its activation has ended.
                if state
                    .activations
                    .iter()
                    .any(|b| b.id == a.id && b.until_ms > a.since_ms)
                {
                    bail!(AlreadyExists, "activation {:?} exists already", a.id);
                }
                if state.activations.len() >= MAX_ACTIVATIONS {
                    bail!(
                        ResourceExhausted,
                        "{MAX_ACTIVATIONS} activations exist already; deactivate some first"
                    );
                }
                next.activations.retain(|b| b.id != a.id);
                next.activations.push(a.clone());
            }
            Change::Extend { id, until_ms } => {
                validate_name("activation id", id)?;
                let Some(a) = next.activations.iter_mut().find(|a| &a.id == id) else {
                    bail!(NotFound, "no activation {id:?} (it may have ended)");
                };
                if *until_ms <= a.since_ms || until_ms - a.since_ms > MAX_TTL_MS {
                    bail!(
                        InvalidArgument,
                        "an activation lasts from 1 ms to {} days",
                        MAX_TTL_MS / 86_400_000
                    );
                }
                a.until_ms = *until_ms;
            }
            Change::Deactivate(id) => {
                validate_name("activation id", id)?;
                if !state.activations.iter().any(|a| &a.id == id) {
                    bail!(NotFound, "no activation {id:?} (it may have ended)");
                }
                next.activations.retain(|a| &a.id != id);
            }
            Change::Expire(now_ms) => next.activations.retain(|a| a.until_ms > *now_ms),
        }
        Ok(next)
    }

    /// Whether `table` shows this change applied: how a fleet writer knows its
    /// own replica took the change it put in etcd.
    pub fn is_reflected(&self, table: &Table) -> bool {
        match self {
            Change::Load(e) => table
                .signatures
                .get(&e.name)
                .is_some_and(|s| s.origin == e.origin),
            Change::Unload(name) => !table.signatures.contains_key(name),
            Change::Put {
                name, signatures, ..
            } => table
                .profiles
                .get(name)
                .is_some_and(|p| &p.signatures == signatures),
            Change::Delete(name) => !table.profiles.contains_key(name),
            Change::SetDefault(name) => &table.default_profile == name,
            Change::Activate(a) => table.activations.all().iter().any(|b| b.id == a.id),
            Change::Extend { id, until_ms } => table
                .activations
                .all()
                .iter()
                .any(|a| &a.id == id && a.until_ms == *until_ms),
            Change::Deactivate(id) => !table.activations.all().iter().any(|a| &a.id == id),
            Change::Expire(now_ms) => table.activations.all().iter().all(|a| a.until_ms > *now_ms),
        }
    }
}

/// What an applied change did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The generation of the table that shows the change.
    pub generation: u64,
    /// From the request to the change being served by this replica.
    pub elapsed: Duration,
    /// The etcd revision of the change in fleet mode; 0 for a local change.
    pub revision: i64,
    /// The profile the change was about: as defined after it, or as it was
    /// before it was deleted.
    pub profile: Option<Arc<Profile>>,
    /// Likewise the signature loaded or unloaded.
    pub signature: Option<Arc<LoadedSignature>>,
}

impl Applied {
    pub fn new(
        change: &Change,
        before: &Table,
        after: &Table,
        elapsed: Duration,
        revision: i64,
    ) -> Self {
        let (profile, signature) = match change {
            Change::Load(e) => (None, after.signatures.get(&e.name)),
            Change::Unload(name) => (None, before.signatures.get(name)),
            Change::Put { name, .. } | Change::SetDefault(name) => (after.profiles.get(name), None),
            Change::Delete(name) => (before.profiles.get(name), None),
            Change::Activate(a) => (after.profiles.get(&a.profile), None),
            Change::Extend { .. } | Change::Deactivate(_) | Change::Expire(_) => (None, None),
        };
        Applied {
            generation: after.generation,
            elapsed,
            revision,
            profile: profile.cloned(),
            signature: signature.cloned(),
        }
    }

    /// The profile, for changes that are about one.
    pub fn profile(&self) -> Result<&Arc<Profile>> {
        self.profile
            .as_ref()
            .ok_or_else(|| Error::Internal("the change named no profile".into()))
    }

    /// The signature, for changes that are about one.
    pub fn signature(&self) -> Result<&Arc<LoadedSignature>> {
        self.signature
            .as_ref()
            .ok_or_else(|| Error::Internal("the change named no signature".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::profile::{CLEAN, Origin, Source};

    fn entry(name: &str) -> SignatureEntry {
        SignatureEntry {
            name: name.into(),
            origin: Origin {
                source: Source::Repo {
                    path: format!("signatures/{name}.rws.safetensors"),
                },
                sha256: format!("sha256:{name}"),
                allow_transfer: false,
            },
        }
    }

    fn r(name: &str, alpha: f32) -> SignatureRef {
        SignatureRef {
            name: name.into(),
            alpha,
        }
    }

    /// Signatures fog and rain; profile storm = fog@0.5, the default.
    fn state() -> State {
        let s = State::of(&Table {
            generation: 0,
            signatures: Default::default(),
            profiles: Default::default(),
            default_profile: CLEAN.into(),
            activations: Default::default(),
        });
        let s = Change::Load(entry("fog")).next(s).unwrap();
        let s = Change::Load(entry("rain")).next(s).unwrap();
        let s = Change::put("storm", vec![r("fog", 0.5)], false)
            .next(s)
            .unwrap();
        Change::SetDefault("storm".into()).next(s).unwrap()
    }

    fn refused(change: Change, kind: &str) {
        let s = state();
        let err = change.next(s).unwrap_err();
        assert_eq!(err.kind(), kind, "{change:?}: {err}");
    }

    #[test]
    fn changes_build_the_next_state() {
        let s = state();
        assert_eq!(s.signatures.len(), 2);
        assert_eq!(s.profile("storm").unwrap().refs(), vec![r("fog", 0.5)]);
        assert_eq!(s.default_profile, "storm");
        let s = Change::put("storm", vec![r("rain", 1.0)], true)
            .next(s)
            .unwrap();
        assert_eq!(s.profile("storm").unwrap().refs(), vec![r("rain", 1.0)]);
        let s = Change::Unload("fog".into()).next(s).unwrap();
        assert!(s.signature("fog").is_none());
        let s = Change::SetDefault(CLEAN.into()).next(s).unwrap();
        let s = Change::Delete("storm".into()).next(s).unwrap();
        assert!(s.profiles.is_empty());
    }

    #[test]
    fn each_rule_refuses_with_its_kind() {
        refused(Change::Load(entry("fog")), "already_exists");
        refused(Change::Load(entry("../x")), "invalid_argument");
        refused(Change::Unload("fog".into()), "failed_precondition");
        refused(Change::Unload("hail".into()), "not_found");
        refused(
            Change::put("storm", vec![r("fog", 1.0)], false),
            "already_exists",
        );
        refused(Change::put("x", vec![r("hail", 1.0)], false), "not_found");
        refused(
            Change::put("x", vec![r("fog", f32::NAN)], false),
            "invalid_argument",
        );
        refused(
            Change::put("x", vec![r("fog", 0.5), r("fog", 0.5)], false),
            "invalid_argument",
        );
        refused(Change::put(CLEAN, vec![], true), "invalid_argument");
        refused(Change::Delete(CLEAN.into()), "failed_precondition");
        refused(Change::Delete("storm".into()), "failed_precondition");
        refused(Change::Delete("nope".into()), "not_found");
        refused(Change::SetDefault("nope".into()), "not_found");
        refused(Change::SetDefault(String::new()), "invalid_argument");
        refused(Change::SetDefault("x".repeat(100_000)), "invalid_argument");
    }
}
