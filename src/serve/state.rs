//! The durable part of the profile state: which signatures are loaded and
//! where their bytes live, the profiles and the default. The server writes it
//! atomically on every change, before the change is recorded in the audit
//! trail and published, so a restart, even after SIGKILL, finds the last
//! acknowledged state (or the one change in flight), never a torn one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::repo::ModelDir;
use crate::patch::signature::Signature;
use crate::serve::activation::Activation;
use crate::serve::durability::unwritable;
use crate::serve::journal::Entry;
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

/// What `state.json` holds: the state, the generation of the table it is, and
/// the audit entry of the change that produced it. The entry is the intent: a
/// crash before its line reached the trail leaves it here, and the restart
/// appends it (see [`crate::serve::journal::Journal::recover`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    #[serde(flatten)]
    pub state: State,
    /// 0 in files written before generations were kept.
    #[serde(default)]
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Entry>,
}

impl Saved {
    /// Parses the text of a state file of this rws's format.
    pub fn parse(text: &str) -> Result<Saved> {
        let saved: Saved = serde_json::from_str(text).map_err(|e| {
            Error::InvalidArgument(format!(
                "not a valid rws state file ({e}); move it away to start from the model's signatures"
            ))
        })?;
        if saved.state.version != FORMAT_VERSION {
            bail!(
                InvalidArgument,
                "state format {}; this rws reads {FORMAT_VERSION}",
                saved.state.version
            );
        }
        Ok(saved)
    }

    pub fn of(table: &Table, pending: Option<&Entry>) -> Saved {
        Saved {
            state: State::of(table),
            generation: table.generation,
            pending: pending.cloned(),
        }
    }
}

/// The upload files the signatures of `table` use.
fn uploads_of(table: &Table) -> BTreeSet<&str> {
    table
        .signatures
        .values()
        .filter_map(|s| match &s.origin.source {
            Source::Upload { file } => Some(file.as_str()),
            _ => None,
        })
        .collect()
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
    pub fn read(&self) -> Result<Option<Saved>> {
        let path = self.state_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        Saved::parse(&text)
            .map(Some)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
    }

    pub fn write(&self, saved: &Saved) -> Result<()> {
        saved.state.check_durable()?;
        let json = serde_json::to_vec_pretty(saved)
            .map_err(|e| Error::Internal(format!("cannot encode the state: {e}")))?;
        crate::fsutil::write_atomic(&self.state_path(), &json).map_err(|e| unwritable(&self.dir, e))
    }

    /// The file uploaded bytes with hash `sha` are kept in.
    pub fn upload_file(sha: &str) -> String {
        format!("{}.rws.safetensors", sha.trim_start_matches("sha256:"))
    }

    /// Keeps uploaded bytes in `file` (see [`StateDir::upload_file`]); true if
    /// they were written now, false if the file was there already.
    pub fn store_upload(&self, bytes: &[u8], file: &str) -> Result<bool> {
        let path = self.upload_path(file)?;
        if path.exists() {
            return Ok(false);
        }
        crate::fsutil::write_atomic(&path, bytes).map_err(|e| unwritable(&self.dir, e))?;
        Ok(true)
    }

    /// Deletes an upload no signature of `table` uses.
    pub fn remove_upload(&self, file: &str, table: &Table) {
        if uploads_of(table).contains(file) {
            return;
        }
        if let Err(e) = self.upload_path(file).and_then(|p| remove(&p)) {
            tracing::warn!(error = %e, "cannot delete an unused upload");
        }
    }

    /// After `after` replaced `before`: the uploads `before` used and `after`
    /// does not start their retention now, and those past it go.
    pub fn released(&self, before: &Table, after: &Table, keep: Duration) {
        let used = uploads_of(after);
        let dropped: Vec<&str> = uploads_of(before).difference(&used).copied().collect();
        if dropped.is_empty() {
            return;
        }
        for file in dropped {
            // The file's time is when it was last stored or used.
            let touched = self.upload_path(file).and_then(|p| {
                std::fs::File::options()
                    .append(true)
                    .open(&p)
                    .and_then(|f| f.set_modified(SystemTime::now()))
                    .map_err(|e| Error::io(p, e))
            });
            if let Err(e) = touched {
                tracing::warn!(error = %e, "cannot mark an upload unused");
            }
        }
        self.collect_uploads(after, keep);
    }

    /// Deletes the files in `uploads/` no signature of `table` uses that were
    /// last stored or used more than `keep` ago (crashed writes' temp files too).
    pub fn collect_uploads(&self, table: &Table, keep: Duration) {
        let dir = self.dir.join("uploads");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => return tracing::warn!(error = %Error::io(&dir, e), "cannot list uploads"),
        };
        let used = uploads_of(table);
        let now = SystemTime::now();
        let (mut deleted, mut failed) = (0, None);
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_str().is_some_and(|n| used.contains(n)) {
                continue;
            }
            let age = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default());
            match age {
                Ok(age) if age < keep => {}
                Ok(_) => match remove(&e.path()) {
                    Ok(()) => deleted += 1,
                    Err(err) => failed = Some(err),
                },
                Err(err) => failed = Some(Error::io(e.path(), err)),
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "deleted uploads no signature uses");
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "cannot delete an unused upload");
        }
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

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
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
