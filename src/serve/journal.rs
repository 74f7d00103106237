//! The audit trail: one JSON line per published change, saying what changed,
//! who asked, why, when, and the generation it produced.
//!
//! The registry appends under its writer lock, before the change is persisted
//! and published, so the lines are in generation order and every acknowledged
//! change has exactly one. With a state directory the file is `audit.jsonl`
//! there, each line fsync'd; a bounded tail stays in memory for `History`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Entries kept in memory for [`Journal::history`].
const KEPT: usize = 10_000;

/// Who made a change and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cause {
    /// `token:<fingerprint>`, `peer:<address>`, `event:<id>`, `server`, ...
    pub who: String,
    /// The reason given, or the event that triggered it.
    pub why: String,
}

impl Cause {
    pub fn new(who: impl Into<String>, why: impl Into<String>) -> Self {
        Cause {
            who: who.into(),
            why: why.into(),
        }
    }
}

/// One line of the trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The table generation the change produced (0 in fleet mode's etcd trail).
    pub generation: u64,
    /// The etcd revision of the change in fleet mode; 0 otherwise.
    #[serde(default)]
    pub revision: i64,
    /// `put_profile`, `activate`, `expire`, ...
    pub op: String,
    /// The scope the change concerns, for activations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The change itself.
    pub change: serde_json::Value,
    #[serde(flatten)]
    pub cause: Cause,
}

impl Entry {
    /// Whether a `History` filter for `scope` (a prefix; empty: all) selects it.
    pub fn in_scope(&self, scope: &str) -> bool {
        scope.is_empty() || self.scope.as_deref().is_some_and(|s| s.starts_with(scope))
    }
}

pub struct Journal {
    file: Option<(PathBuf, Mutex<File>)>,
    recent: Mutex<VecDeque<Entry>>,
}

impl Journal {
    /// A trail kept in memory only.
    pub fn memory() -> Self {
        Journal {
            file: None,
            recent: Mutex::default(),
        }
    }

    /// The trail in `dir/audit.jsonl`, its tail read back.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("audit.jsonl");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut recent = VecDeque::new();
        let mut torn = false;
        if let Ok(f) = File::open(&path) {
            let mut lines = BufReader::new(f);
            let mut i = 0;
            loop {
                let mut line = String::new();
                let n = lines
                    .read_line(&mut line)
                    .map_err(|e| Error::io(&path, e))?;
                if n == 0 {
                    break;
                }
                i += 1;
                torn = !line.ends_with('\n');
                // A torn last line (a crash mid-append) is left out, not fatal.
                match serde_json::from_str(&line) {
                    Ok(e) => keep(&mut recent, e),
                    Err(err) => {
                        tracing::warn!(line = i, error = %err, path = %path.display(), "skipping an unreadable audit line")
                    }
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if torn {
            // The next entry starts on a line of its own.
            file.write_all(b"\n").map_err(|e| Error::io(&path, e))?;
        }
        Ok(Journal {
            file: Some((path, Mutex::new(file))),
            recent: Mutex::new(recent),
        })
    }

    /// Appends `entry`, durably when there is a file.
    pub fn append(&self, entry: &Entry) -> Result<()> {
        if let Some((path, file)) = &self.file {
            let mut line = serde_json::to_vec(entry)
                .map_err(|e| Error::Internal(format!("cannot encode an audit entry: {e}")))?;
            line.push(b'\n');
            let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
            let end = f.metadata().map_err(|e| Error::io(path, e))?.len();
            if let Err(e) = f.write_all(&line).and_then(|()| f.sync_data()) {
                // A line cut short (a full disk) would swallow the next one.
                let _ = f.set_len(end);
                return Err(Error::io(path, e));
            }
        }
        keep(
            &mut self.recent.lock().unwrap_or_else(|e| e.into_inner()),
            entry.clone(),
        );
        Ok(())
    }

    /// Up to `limit` entries for `scope` (empty: all), newest first.
    pub fn history(&self, scope: &str, limit: usize) -> Vec<Entry> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .rev()
            .filter(|e| e.in_scope(scope))
            .take(limit)
            .cloned()
            .collect()
    }
}

fn keep(recent: &mut VecDeque<Entry>, e: Entry) {
    if recent.len() == KEPT {
        recent.pop_front();
    }
    recent.push_back(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(generation: u64, scope: Option<&str>) -> Entry {
        Entry {
            at_ms: 1,
            generation,
            revision: 0,
            op: "activate".into(),
            scope: scope.map(Into::into),
            change: serde_json::json!({"n": generation}),
            cause: Cause::new("peer:127.0.0.1:1", "test"),
        }
    }

    #[test]
    fn the_trail_survives_a_reopen_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(&entry(1, Some("site-a/"))).unwrap();
        j.append(&entry(2, None)).unwrap();
        j.append(&entry(3, Some("site-b/cam-1"))).unwrap();
        drop(j);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("audit.jsonl"))
            .unwrap();
        f.write_all(b"{\"at_ms\": 4, \"gener").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let all: Vec<u64> = j.history("", 10).iter().map(|e| e.generation).collect();
        assert_eq!(all, [3, 2, 1]);
        j.append(&entry(4, None)).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let all: Vec<u64> = j.history("", 10).iter().map(|e| e.generation).collect();
        assert_eq!(all, [4, 3, 2, 1], "an entry after the torn line is whole");
        let b: Vec<u64> = j
            .history("site-b/", 10)
            .iter()
            .map(|e| e.generation)
            .collect();
        assert_eq!(b, [3]);
        assert_eq!(j.history("", 1).len(), 1);
    }
}
