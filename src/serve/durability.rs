//! What the state directory keeps and for how long, and what a write it
//! refused tells the operator: shared by the state file and the audit trail.

use std::path::Path;
use std::time::Duration;

use crate::Error;

/// How much of a state directory's history is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// `audit.jsonl` is rotated to `audit.jsonl.1` once it passes this size.
    pub audit_max_bytes: u64,
    /// Rotated audit files kept; older ones are deleted.
    pub audit_keep_files: usize,
    /// How long an upload no signature uses any more stays, so that a state
    /// naming it can still be restored; zero deletes it at once.
    pub uploads_keep: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            audit_max_bytes: 64 << 20,
            audit_keep_files: 4,
            uploads_keep: Duration::from_secs(24 * 3600),
        }
    }
}

/// The error for a write the state directory `dir` refused: UNAVAILABLE, with
/// what to check, since the operator can fix it and the client can retry.
pub(crate) fn unwritable(dir: &Path, e: Error) -> Error {
    match e {
        Error::Io { source, .. } => Error::Unavailable(format!(
            "cannot write the state directory {} ({source}); the change was not applied: \
             check its permissions and free space",
            dir.display()
        )),
        other => other,
    }
}
