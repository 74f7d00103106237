//! Profiles and the table that publishes them.
//!
//! A profile is a named list of `signature@alpha`. A [`Table`] is one immutable,
//! consistent view of the loaded signatures, the profiles and the default; the
//! registry publishes a new one for every change.
//! Each profile keeps its patched stem in a slot that LRU eviction may empty and
//! a request refills; refilling is deterministic, so an evicted profile comes back
//! bit-identical.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

use crate::model::{Model, Stem};
use crate::patch::signature::Signature;
use crate::serve::activation::Activations;
use crate::serve::metrics as m;
use crate::{Error, Result, bail};

/// The built-in profile with no signatures. It always exists and is never evicted.
pub const CLEAN: &str = "clean";

/// The built-in profile that lets the corruption detector choose signatures per
/// image. It exists when the model ships a detector; it has no stem of its own.
pub const AUTO: &str = "auto";

/// Whether `name` is a profile the server defines itself, which no change may
/// define or delete.
pub fn is_builtin(name: &str) -> bool {
    name == CLEAN || name == AUTO
}

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
    /// Shared, so that a GPU keeps its deltas exactly as long as it is loaded.
    pub signature: Arc<Signature>,
    /// Made against other base weights and accepted with `allow_transfer`.
    pub transferred: bool,
    pub origin: Origin,
}

/// One entry of a profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    pub(crate) resolved: Vec<Arc<LoadedSignature>>,
    pub(crate) stem: ArcSwapOption<Stem>,
    /// A logical clock reading, for LRU eviction.
    pub(crate) last_used: AtomicU64,
    /// Serializes refills, so that concurrent requests fold the stem once.
    pub(crate) fill: Mutex<()>,
}

impl Profile {
    pub(crate) fn new(
        name: &str,
        signatures: Vec<SignatureRef>,
        resolved: Vec<Arc<LoadedSignature>>,
        generation: u64,
        stem: Option<Arc<Stem>>,
        last_used: u64,
    ) -> Self {
        Profile {
            name: name.into(),
            signatures,
            generation,
            resolved,
            stem: ArcSwapOption::new(stem),
            last_used: AtomicU64::new(last_used),
            fill: Mutex::new(()),
        }
    }

    pub fn is_resident(&self) -> bool {
        self.stem.load().is_some()
    }

    pub(crate) fn materialize(&self, model: &Model) -> Result<Stem> {
        materialize(model, &self.name, &self.resolved, &self.signatures)
    }
}

/// Folds the stem of profile `name`: each resolved signature at its alpha.
pub(crate) fn materialize(
    model: &Model,
    name: &str,
    resolved: &[Arc<LoadedSignature>],
    refs: &[SignatureRef],
) -> Result<Stem> {
    let _s =
        tracing::debug_span!("patch_apply", profile = %name, signatures = refs.len()).entered();
    let start = Instant::now();
    let patches: Vec<(&Arc<Signature>, f32)> = resolved
        .iter()
        .zip(refs)
        .map(|(s, r)| (&s.signature, r.alpha))
        .collect();
    let stem = model.materialize(&patches)?;
    metrics::histogram!(m::PATCH_APPLY_SECONDS).record(start.elapsed().as_secs_f64());
    Ok(stem)
}

/// One consistent view of signatures, profiles, activations and the default.
#[derive(Debug, Clone)]
pub struct Table {
    pub generation: u64,
    pub signatures: BTreeMap<String, Arc<LoadedSignature>>,
    pub profiles: BTreeMap<String, Arc<Profile>>,
    pub default_profile: String,
    pub activations: Arc<Activations>,
}

/// Why a request was served with its profile.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The request named it.
    Explicit,
    /// The activation with this id covers the request's source.
    Activation(String),
    /// The server default.
    Default,
}

impl Table {
    /// The profile that serves a request naming `profile` (empty: none) from
    /// `source` (empty: none) at `now_ms`, and why.
    pub fn resolve(
        &self,
        profile: &str,
        source: &str,
        now_ms: u64,
    ) -> Result<(&Arc<Profile>, Choice)> {
        if !profile.is_empty() {
            return Ok((self.profile(Some(profile))?, Choice::Explicit));
        }
        if let Some(a) = self.activations.lookup(source, now_ms)
            && let Some(p) = self.profiles.get(&a.profile)
        {
            return Ok((p, Choice::Activation(a.id.clone())));
        }
        Ok((self.profile(None)?, Choice::Default))
    }

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

/// The checks on a profile definition that need no state: names, the built-in
/// profile, the size limit, finite alphas, each signature once.
pub fn check_definition(name: &str, signatures: &[SignatureRef]) -> Result<()> {
    validate_name("profile", name)?;
    if is_builtin(name) {
        bail!(
            InvalidArgument,
            "{name:?} is built in and cannot be redefined"
        );
    }
    if signatures.len() > MAX_SIGNATURES_PER_PROFILE {
        bail!(
            InvalidArgument,
            "a profile holds at most {MAX_SIGNATURES_PER_PROFILE} signatures"
        );
    }
    for (i, r) in signatures.iter().enumerate() {
        validate_name("signature", &r.name)?;
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
