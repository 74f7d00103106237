//! The durable part of the profile state: which signatures are loaded and
//! where their bytes live, the profiles and the default. The server writes it
//! atomically on every change, before the change is published, so a restart,
//! even after SIGKILL, finds the last acknowledged state (or the one change
//! in flight), never a torn one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::repo::ModelDir;
use crate::patch::signature::Signature;
use crate::serve::profile::{CLEAN, Origin, Registry, SignatureRef, Source, Table};
use crate::{Error, Result, bail};

pub const FORMAT_VERSION: u32 = 1;

/// Largest signature accepted, from disk or uploaded.
pub const MAX_SIGNATURE_BYTES: usize = 256 << 20;

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub name: String,
    #[serde(flatten)]
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    pub name: String,
    pub signatures: Vec<RefEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefEntry {
    pub name: String,
    pub alpha: f32,
}

/// Everything a restart needs, in the order it must be applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub signatures: Vec<SignatureEntry>,
    /// All but the built-in clean profile.
    pub profiles: Vec<ProfileEntry>,
    pub default_profile: String,
}

impl State {
    pub fn of(table: &Table) -> Result<State> {
        let mut signatures = Vec::new();
        for s in table.signatures.values() {
            if s.origin.source == Source::Memory {
                bail!(
                    FailedPrecondition,
                    "signature {:?} was handed over in memory and cannot be persisted",
                    s.name
                );
            }
            signatures.push(SignatureEntry {
                name: s.name.clone(),
                origin: s.origin.clone(),
            });
        }
        Ok(State {
            version: FORMAT_VERSION,
            signatures,
            profiles: table
                .profiles
                .values()
                .filter(|p| p.name != CLEAN)
                .map(|p| ProfileEntry {
                    name: p.name.clone(),
                    signatures: p
                        .signatures
                        .iter()
                        .map(|r| RefEntry {
                            name: r.name.clone(),
                            alpha: r.alpha,
                        })
                        .collect(),
                })
                .collect(),
            default_profile: table.default_profile.clone(),
        })
    }

    pub fn refs(p: &ProfileEntry) -> Vec<SignatureRef> {
        p.signatures
            .iter()
            .map(|r| SignatureRef {
                name: r.name.clone(),
                alpha: r.alpha,
            })
            .collect()
    }
}

/// A directory holding `state.json` and `uploads/`.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The state last written, if any.
    pub fn read(&self) -> Result<Option<State>> {
        let path = self.state_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} is not a valid rws state file ({e}); move it away to start from the model's signatures",
                path.display()
            ))
        })?;
        if state.version != FORMAT_VERSION {
            bail!(
                InvalidArgument,
                "{} has state format {}; this rws reads {FORMAT_VERSION}",
                path.display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    pub fn write(&self, state: &State) -> Result<()> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::Internal(format!("cannot encode the state: {e}")))?;
        crate::fsutil::write_atomic(&self.state_path(), &json)
    }

    /// Keeps uploaded bytes under their hash; returns the file name.
    pub fn store_upload(&self, bytes: &[u8], sha: &str) -> Result<String> {
        let file = format!("{}.rws.safetensors", sha.trim_start_matches("sha256:"));
        let path = self.dir.join("uploads").join(&file);
        if !path.exists() {
            crate::fsutil::write_atomic(&path, bytes)?;
        }
        Ok(file)
    }

    pub fn upload_path(&self, file: &str) -> Result<PathBuf> {
        let name = Path::new(file);
        if name.components().count() != 1 || name.file_name().is_none() {
            bail!(
                InvalidArgument,
                "upload file name {file:?} is not a plain name"
            );
        }
        Ok(self.dir.join("uploads").join(name))
    }
}

/// Reads a signature file of the model directory: the parsed signature and the
/// origin that lets it be loaded (and verified) again.
pub fn read_repo(model: &ModelDir, rel: &str, allow_transfer: bool) -> Result<(Signature, Origin)> {
    let path = model.confine(rel)?;
    let bytes = read_limited(&path)?;
    let sig = Signature::from_bytes(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let origin = Origin {
        source: Source::Repo { path: rel.into() },
        sha256: sha256(&bytes),
        allow_transfer,
    };
    Ok((sig, origin))
}

/// Reads a recorded signature again and checks it is the same file.
pub fn read_entry(
    model: &ModelDir,
    state: Option<&StateDir>,
    e: &SignatureEntry,
) -> Result<Signature> {
    let path = match &e.origin.source {
        Source::Repo { path } => model.confine(path)?,
        Source::Upload { file } => state
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "signature {:?} was uploaded to another server's state directory",
                    e.name
                ))
            })?
            .upload_path(file)?,
        Source::Memory => bail!(
            InvalidArgument,
            "signature {:?} was handed over in memory and cannot be loaded again",
            e.name
        ),
    };
    let bytes = read_limited(&path)?;
    let sha = sha256(&bytes);
    if sha != e.origin.sha256 {
        bail!(
            FailedPrecondition,
            "signature {:?}: {} is not the file that was loaded ({sha}, recorded {}); put the original back",
            e.name,
            path.display(),
            e.origin.sha256
        );
    }
    Signature::from_bytes(&bytes)
        .map_err(|err| Error::InvalidArgument(format!("{}: {err}", path.display())))
}

/// Brings `registry` to `desired` through its ordinary validated changes: new
/// signatures first, then profiles and the default, removals last, so every
/// table published on the way is consistent. What cannot be applied (a
/// signature that does not load or verify, and the profiles that need it) is
/// skipped and returned; the rest is applied.
pub fn reconcile(
    registry: &Registry,
    desired: &State,
    load: impl Fn(&SignatureEntry) -> Result<Signature>,
) -> Vec<Error> {
    let mut errors = Vec::new();
    let table = registry.snapshot();
    for e in &desired.signatures {
        match table.signatures.get(&e.name) {
            Some(s) if s.origin.sha256 == e.origin.sha256 => continue,
            Some(_) => {
                errors.push(Error::FailedPrecondition(format!(
                    "signature {:?} is loaded with other content; unload it before loading the new one",
                    e.name
                )));
                continue;
            }
            None => {}
        }
        let loaded =
            load(e).and_then(|sig| registry.load_signature_from(&e.name, sig, e.origin.clone()));
        errors.extend(loaded.err());
    }
    let table = registry.snapshot();
    for p in &desired.profiles {
        let refs = State::refs(p);
        let same = table
            .profiles
            .get(&p.name)
            .is_some_and(|cur| cur.signatures == refs);
        if !same {
            errors.extend(registry.put_profile(&p.name, refs, true).err());
        }
    }
    if registry.snapshot().default_profile != desired.default_profile {
        errors.extend(registry.set_default(&desired.default_profile).err());
    }
    let table = registry.snapshot();
    for name in table.profiles.keys() {
        if name != CLEAN && !desired.profiles.iter().any(|p| &p.name == name) {
            errors.extend(registry.delete_profile(name).err());
        }
    }
    for name in registry.snapshot().signatures.keys() {
        if !desired.signatures.iter().any(|s| &s.name == name) {
            errors.extend(registry.unload_signature(name).err());
        }
    }
    errors
}

pub(crate) fn check_size(len: u64, what: &str) -> Result<()> {
    if len > MAX_SIGNATURE_BYTES as u64 {
        bail!(
            ResourceExhausted,
            "{what} is {len} bytes; signatures are limited to {MAX_SIGNATURE_BYTES}"
        );
    }
    Ok(())
}

/// Reads a signature file, refusing oversized ones before reading them.
pub(crate) fn read_limited(path: &std::path::Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    check_size(len, &path.display().to_string())?;
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
