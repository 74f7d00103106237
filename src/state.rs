//! The durable part of the profile state: which signatures are loaded and
//! where their bytes live, the profiles and the default. The server writes it
//! atomically on every change, before the change is published, so a restart,
//! even after SIGKILL, finds the last acknowledged state (or the one change
//! in flight), never a torn one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::profile::{CLEAN, SignatureRef, Table};
use crate::{Error, Result, bail};

pub const FORMAT_VERSION: u32 = 1;

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
