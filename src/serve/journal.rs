//! The audit trail: one JSON line per published change, saying what changed,
//! who asked, why, when, and the generation it produced.
//!
//! The registry appends under its writer lock, after the change is persisted
//! (with its entry, in the saved state file `state.json`) and before it is
//! published, so the lines are in generation order and every acknowledged
//! change has exactly one; [`Journal::recover`] adds the line a crash cut off.
//! With a state directory the file is `audit.jsonl` there, each line fsync'd,
//! rotated to `audit.jsonl.1`, `.2`, ... as it grows; a bounded tail stays in
//! memory for `History`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::serve::durability::{Retention, unwritable};
use crate::{Error, Result};

/// Entries kept in memory for [`Journal::history`].
const KEPT: usize = 10_000;

const FILE: &str = "audit.jsonl";

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
    file: Option<Trail>,
    recent: Mutex<VecDeque<Entry>>,
}

/// The trail's file and when it is rotated.
struct Trail {
    dir: PathBuf,
    file: Mutex<File>,
    max_bytes: u64,
    keep_files: usize,
}

impl Journal {
    /// A trail kept in memory only.
    pub fn memory() -> Self {
        Journal {
            file: None,
            recent: Mutex::default(),
        }
    }

    /// The trail in `dir/audit.jsonl`, rotated as `retention` says. Only its
    /// last [`KEPT`] lines are read back, from the end, and the rotated files
    /// only while the newer ones hold fewer.
    pub fn open(dir: &Path, retention: &Retention) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut recent = VecDeque::new();
        let mut torn = false;
        for i in 0..=retention.audit_keep_files {
            let want = KEPT - recent.len();
            if want == 0 {
                break;
            }
            let path = rotated(dir, i);
            let bytes = match File::open(&path).and_then(|mut f| tail(&mut f, want)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            torn |= i == 0 && !bytes.is_empty() && !bytes.ends_with(b"\n");
            let entries = parse(&bytes, &path);
            for e in entries.into_iter().rev().take(want) {
                recent.push_front(e);
            }
        }
        let path = rotated(dir, 0);
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
            file: Some(Trail {
                dir: dir.to_path_buf(),
                file: Mutex::new(file),
                max_bytes: retention.audit_max_bytes,
                keep_files: retention.audit_keep_files,
            }),
            recent: Mutex::new(recent),
        })
    }

    /// Appends `entry`, durably when there is a file.
    pub fn append(&self, entry: &Entry) -> Result<()> {
        if let Some(t) = &self.file {
            let mut line = serde_json::to_vec(entry)
                .map_err(|e| Error::Internal(format!("cannot encode an audit entry: {e}")))?;
            line.push(b'\n');
            let path = rotated(&t.dir, 0);
            let failed = |e| unwritable(&t.dir, Error::io(&path, e));
            let mut f = t.file.lock().unwrap_or_else(|e| e.into_inner());
            let end = f.metadata().map_err(failed)?.len();
            if let Err(e) = f.write_all(&line).and_then(|()| f.sync_data()) {
                // A line cut short (a full disk) would swallow the next one.
                let _ = f.set_len(end);
                return Err(failed(e));
            }
            if end + line.len() as u64 > t.max_bytes {
                // The line is in; a file that cannot be rotated just grows.
                if let Err(e) = t.rotate(&mut f) {
                    tracing::warn!(error = %e, "cannot rotate the audit trail");
                }
            }
        }
        keep(
            &mut self.recent.lock().unwrap_or_else(|e| e.into_inner()),
            entry.clone(),
        );
        Ok(())
    }

    /// The generation of the newest entry (0 for none).
    pub fn last_generation(&self) -> u64 {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.back().map_or(0, |e| e.generation)
    }

    /// Completes the trail after a crash between writing the state and
    /// appending its line: `pending`, the change the state was written with,
    /// is appended unless the trail has it already.
    pub fn recover(&self, pending: &Entry) -> Result<()> {
        if pending.generation <= self.last_generation() {
            return Ok(());
        }
        self.append(pending)?;
        tracing::warn!(
            generation = pending.generation,
            op = %pending.op,
            "the audit trail lacked the last change persisted (a crash came between them); recorded it now"
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

impl Trail {
    /// Moves the file to `.1` (each older one up a number, the oldest out) and
    /// starts an empty one. Each rename is atomic: a crash leaves every kept
    /// line in some file.
    fn rotate(&self, f: &mut File) -> Result<()> {
        let rename = |from: usize, to: usize| {
            let (a, b) = (rotated(&self.dir, from), rotated(&self.dir, to));
            match std::fs::rename(&a, &b) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(a, e)),
                _ => Ok(()),
            }
        };
        let oldest = rotated(&self.dir, self.keep_files);
        if let Err(e) = std::fs::remove_file(&oldest)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(Error::io(oldest, e));
        }
        for i in (0..self.keep_files).rev() {
            rename(i, i + 1)?;
        }
        let path = rotated(&self.dir, 0);
        *f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&self.dir, e))
    }
}

/// `audit.jsonl`, or its `i`th rotated predecessor.
fn rotated(dir: &Path, i: usize) -> PathBuf {
    match i {
        0 => dir.join(FILE),
        _ => dir.join(format!("{FILE}.{i}")),
    }
}

/// The last `want` lines of `file` (and a torn one after them), read from its
/// end: a long trail is not read whole at start-up.
fn tail(file: &mut File, want: usize) -> std::io::Result<Vec<u8>> {
    const CHUNK: u64 = 1 << 16;
    let mut start = file.metadata()?.len();
    let mut chunks = Vec::new();
    let mut newlines = 0;
    // `want` whole lines need the newline that ends the line before them too.
    while start > 0 && newlines <= want {
        let n = CHUNK.min(start);
        start -= n;
        let mut chunk = vec![0; n as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        chunks.push(chunk);
    }
    let mut bytes: Vec<u8> = chunks.into_iter().rev().flatten().collect();
    if start > 0 {
        let cut = bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        bytes.drain(..cut);
    }
    Ok(bytes)
}

/// The entries in `bytes`, lines of `path`. A line that does not parse (a
/// torn last one, from a crash mid-append) is left out, not fatal.
fn parse(bytes: &[u8], path: &Path) -> Vec<Entry> {
    let mut entries = Vec::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice(line) {
            Ok(e) => entries.push(e),
            Err(err) => {
                tracing::warn!(error = %err, path = %path.display(), "skipping an unreadable audit line")
            }
        }
    }
    entries
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
        let j = Journal::open(dir.path(), &Retention::default()).unwrap();
        j.append(&entry(1, Some("site-a/"))).unwrap();
        j.append(&entry(2, None)).unwrap();
        j.append(&entry(3, Some("site-b/cam-1"))).unwrap();
        drop(j);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("audit.jsonl"))
            .unwrap();
        f.write_all(b"{\"at_ms\": 4, \"gener").unwrap();
        let j = Journal::open(dir.path(), &Retention::default()).unwrap();
        let all: Vec<u64> = j.history("", 10).iter().map(|e| e.generation).collect();
        assert_eq!(all, [3, 2, 1]);
        j.append(&entry(4, None)).unwrap();
        drop(j);
        let j = Journal::open(dir.path(), &Retention::default()).unwrap();
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

    fn generations(j: &Journal) -> Vec<u64> {
        j.history("", usize::MAX)
            .iter()
            .map(|e| e.generation)
            .collect()
    }

    #[test]
    fn the_trail_rotates_keeps_its_last_files_and_history_spans_them() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_vec(&entry(1, None)).unwrap().len() as u64 + 1;
        // Rotated after every second line, two rotated files kept.
        let retention = Retention {
            audit_max_bytes: 2 * line - 1,
            audit_keep_files: 2,
            ..Retention::default()
        };
        let j = Journal::open(dir.path(), &retention).unwrap();
        for g in 1..=5 {
            j.append(&entry(g, None)).unwrap();
        }
        assert_eq!(generations(&j), [5, 4, 3, 2, 1]);
        drop(j);
        let j = Journal::open(dir.path(), &retention).unwrap();
        assert_eq!(
            generations(&j),
            [5, 4, 3, 2, 1],
            "read back across the files"
        );
        j.append(&entry(6, None)).unwrap();
        drop(j);
        let files = |i| std::fs::read(rotated(dir.path(), i)).map(|b| b.len() as u64 / line);
        assert_eq!(files(0).unwrap(), 0, "a fresh file after the rotation");
        assert_eq!((files(1).unwrap(), files(2).unwrap()), (2, 2));
        assert!(files(3).is_err(), "only two rotated files are kept");
        let j = Journal::open(dir.path(), &retention).unwrap();
        assert_eq!(generations(&j), [6, 5, 4, 3]);
        assert_eq!(j.last_generation(), 6);
    }

    #[test]
    fn only_the_tail_of_a_long_trail_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        // Bytes no reader of the whole file gets past, then more than KEPT entries.
        let mut bytes = vec![0xff; 1 << 17];
        bytes.push(b'\n');
        for g in 1..=KEPT as u64 + 5 {
            serde_json::to_writer(&mut bytes, &entry(g, None)).unwrap();
            bytes.push(b'\n');
        }
        std::fs::write(dir.path().join(FILE), bytes).unwrap();
        let j = Journal::open(dir.path(), &Retention::default()).unwrap();
        let all = generations(&j);
        assert_eq!(all.len(), KEPT);
        assert_eq!((all[0], all[KEPT - 1]), (KEPT as u64 + 5, 6));
    }
}
