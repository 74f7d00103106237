//! The durable part of the profile state: which signatures are loaded and
//! where their bytes live, the profiles and the default. The server writes it
//! atomically on every change, before the change is published, so a restart,
//! even after SIGKILL, finds the last acknowledged state (or the one change
//! in flight), never a torn one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::repo::ModelDir;
use crate::patch::signature::Signature;
use crate::serve::activation::Activation;
use crate::serve::profile::{Origin, SignatureRef, Source, Table, is_builtin};
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
    /// Profiles switched on for scopes of sources, until their end.
    #[serde(default)]
    pub activations: Vec<Activation>,
}

impl ProfileEntry {
    pub fn new(name: &str, signatures: &[SignatureRef]) -> Self {
        ProfileEntry {
            name: name.into(),
            signatures: signatures
                .iter()
                .map(|r| RefEntry {
                    name: r.name.clone(),
                    alpha: r.alpha,
                })
                .collect(),
        }
    }

    pub fn refs(&self) -> Vec<SignatureRef> {
        self.signatures
            .iter()
            .map(|r| SignatureRef {
                name: r.name.clone(),
                alpha: r.alpha,
            })
            .collect()
    }
}

impl State {
    /// Parses the text of a state file of this rws's format.
    pub fn parse(text: &str) -> Result<State> {
        let state: State = serde_json::from_str(text).map_err(|e| {
            Error::InvalidArgument(format!(
                "not a valid rws state file ({e}); move it away to start from the model's signatures"
            ))
        })?;
        if state.version != FORMAT_VERSION {
            bail!(
                InvalidArgument,
                "state format {}; this rws reads {FORMAT_VERSION}",
                state.version
            );
        }
        Ok(state)
    }

    /// The state a table holds, sorted by name.
    pub fn of(table: &Table) -> State {
        State {
            version: FORMAT_VERSION,
            signatures: table
                .signatures
                .values()
                .map(|s| SignatureEntry {
                    name: s.name.clone(),
                    origin: s.origin.clone(),
                })
                .collect(),
            profiles: table
                .profiles
                .values()
                .filter(|p| !is_builtin(&p.name))
                .map(|p| ProfileEntry::new(&p.name, &p.signatures))
                .collect(),
            default_profile: table.default_profile.clone(),
            activations: table
                .activations
                .all()
                .iter()
                .map(|a| (**a).clone())
                .collect(),
        }
    }

    pub fn signature(&self, name: &str) -> Option<&SignatureEntry> {
        self.signatures.iter().find(|s| s.name == name)
    }

    pub fn profile(&self, name: &str) -> Option<&ProfileEntry> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// Refuses a state that names signatures handed over in memory, which
    /// could not be loaded again from it.
    pub fn check_durable(&self) -> Result<()> {
        if let Some(s) = self
            .signatures
            .iter()
            .find(|s| s.origin.source == Source::Memory)
        {
            bail!(
                FailedPrecondition,
                "signature {:?} was handed over in memory and cannot be persisted",
                s.name
            );
        }
        Ok(())
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
        State::parse(&text)
            .map(Some)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
    }

    pub fn write(&self, state: &State) -> Result<()> {
        state.check_durable()?;
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
pub fn read_repo(
    model: &ModelDir,
    rel: &str,
    allow_transfer: bool,
) -> Result<(Arc<Signature>, Origin)> {
    let path = model.confine(rel)?;
    let bytes = read_limited(&path)?;
    let sig = Signature::from_bytes(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let origin = Origin {
        source: Source::Repo { path: rel.into() },
        sha256: sha256(&bytes),
        allow_transfer,
    };
    Ok((Arc::new(sig), origin))
}

/// Reads a recorded signature again and checks it is the same file.
pub fn read_entry(
    model: &ModelDir,
    state: Option<&StateDir>,
    e: &SignatureEntry,
) -> Result<Arc<Signature>> {
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
        .map(Arc::new)
        .map_err(|err| Error::InvalidArgument(format!("{}: {err}", path.display())))
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
