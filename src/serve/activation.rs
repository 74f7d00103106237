//! Activations: a profile switched on for a scope of sources until a set instant.
//!
//! A request may name its **source** (`site-a/cam-12`). A **scope** is `*`
//! (every source), a prefix ending in `/` (`site-a/`), or one whole source.
//! For a request that names no profile, the most specific active activation
//! whose scope matches its source chooses the profile; on a tie in one scope the
//! newest wins. Expiry is an absolute instant that every lookup compares with
//! the clock, so a change ends for every request, and on every replica, at the
//! same moment, whether or not the entry has been cleaned up yet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Result, bail};

/// The scope that matches every source.
pub const EVERYWHERE: &str = "*";
/// Longest source or scope accepted.
pub const MAX_SOURCE_LEN: usize = 128;
/// Longest reason kept.
pub const MAX_REASON_LEN: usize = 256;
/// Longest an activation may last: a forgotten switch still ends.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// At most this many activations at once.
pub const MAX_ACTIVATIONS: usize = 10_000;

/// One activation, as stored and as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    pub id: String,
    pub scope: String,
    pub profile: String,
    /// Unix milliseconds when it was made, and when it ends (exclusive).
    pub since_ms: u64,
    pub until_ms: u64,
    pub reason: String,
}

/// When an activation ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum End {
    /// This long after it starts.
    After(Duration),
    /// At this instant, Unix milliseconds.
    At(u64),
}

impl Activation {
    /// An activation starting now, with a fresh id; the change that applies it
    /// checks the rest.
    pub fn starting_now(scope: String, profile: String, end: End, reason: String) -> Self {
        let since_ms = now_ms();
        let until_ms = match end {
            End::After(d) => since_ms.saturating_add(d.as_millis().min(u64::MAX as u128) as u64),
            End::At(t) => t,
        };
        Activation {
            id: new_id(since_ms),
            scope,
            profile,
            since_ms,
            until_ms,
            reason,
        }
    }

    pub fn is_active(&self, now_ms: u64) -> bool {
        self.since_ms <= now_ms && now_ms < self.until_ms
    }
}

/// A fresh activation id, unique across replicas: the start time plus a hash
/// of this process, a counter and the clock's nanoseconds.
fn new_id(now_ms: u64) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = format!("{}/{n}/{nanos}/{now_ms}", std::process::id());
    let hash = Sha256::digest(seed.as_bytes());
    format!("a{now_ms:x}-{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2])
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn printable(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
}

/// A request's source: up to 128 of letters, digits and `-_./:@`.
pub fn validate_source(source: &str) -> Result<()> {
    if source.len() > MAX_SOURCE_LEN || !printable(source) || source == EVERYWHERE {
        bail!(
            InvalidArgument,
            "source {} must be at most {MAX_SOURCE_LEN} characters of letters, digits and -_./:@ (e.g. site-a/cam-12)",
            crate::error::clip(source)
        );
    }
    Ok(())
}

/// A scope: `*`, a prefix ending in `/`, or a whole source.
pub fn validate_scope(scope: &str) -> Result<()> {
    if scope == EVERYWHERE {
        return Ok(());
    }
    if scope.is_empty()
        || scope.len() > MAX_SOURCE_LEN
        || !printable(scope)
        || scope.starts_with('/')
        || scope.contains("//")
    {
        bail!(
            InvalidArgument,
            "scope {} must be '*', a source prefix ending in '/' (site-a/) or a whole source (site-a/cam-12)",
            crate::error::clip(scope)
        );
    }
    Ok(())
}

/// The activations of one table, indexed for the per-request lookup.
#[derive(Debug, Default)]
pub struct Activations {
    /// Newest first within each scope.
    by_scope: HashMap<String, Vec<Arc<Activation>>>,
    all: Vec<Arc<Activation>>,
}

impl Activations {
    pub fn new(list: impl IntoIterator<Item = Activation>) -> Self {
        let all: Vec<Arc<Activation>> = list.into_iter().map(Arc::new).collect();
        let mut by_scope: HashMap<String, Vec<Arc<Activation>>> = HashMap::new();
        for a in &all {
            by_scope.entry(a.scope.clone()).or_default().push(a.clone());
        }
        for v in by_scope.values_mut() {
            v.sort_by(|a, b| (b.since_ms, &b.id).cmp(&(a.since_ms, &a.id)));
        }
        Activations { by_scope, all }
    }

    /// Every activation, expired ones included until they are cleaned up.
    pub fn all(&self) -> &[Arc<Activation>] {
        &self.all
    }

    /// The activation that chooses the profile for `source` at `now_ms`: the
    /// most specific matching scope with an active entry, the newest in it.
    pub fn lookup(&self, source: &str, now_ms: u64) -> Option<&Arc<Activation>> {
        if self.by_scope.is_empty() {
            return None;
        }
        let active = |scope: &str| {
            self.by_scope
                .get(scope)
                .and_then(|v| v.iter().find(|a| a.is_active(now_ms)))
        };
        if !source.is_empty() {
            if let Some(a) = active(source) {
                return Some(a);
            }
            // Each prefix ending in '/', longest first.
            for (i, _) in source.rmatch_indices('/') {
                if let Some(a) = active(&source[..=i]) {
                    return Some(a);
                }
            }
        }
        active(EVERYWHERE)
    }

    /// The earliest end still ahead of `now_ms`, for the clean-up timer.
    pub fn next_expiry(&self, now_ms: u64) -> Option<u64> {
        self.all
            .iter()
            .map(|a| a.until_ms)
            .filter(|&u| u > now_ms)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(id: &str, scope: &str, profile: &str, since_ms: u64, until_ms: u64) -> Activation {
        Activation {
            id: id.into(),
            scope: scope.into(),
            profile: profile.into(),
            since_ms,
            until_ms,
            reason: String::new(),
        }
    }

    #[test]
    fn the_most_specific_active_scope_wins_then_the_newest() {
        let idx = Activations::new([
            act("all", "*", "snow", 0, 100),
            act("a", "site-a/", "fog", 10, 100),
            act("a-new", "site-a/", "rain", 20, 50),
            act("cam", "site-a/cam-1", "noise", 0, 100),
        ]);
        let pick = |s: &str, t: u64| idx.lookup(s, t).map(|a| a.id.as_str());
        assert_eq!(pick("site-a/cam-1", 30), Some("cam"));
        assert_eq!(pick("site-a/cam-2", 30), Some("a-new"));
        assert_eq!(pick("site-a/cam-2", 60), Some("a"), "the newest expired");
        assert_eq!(pick("site-a/cam-2", 15), Some("a"), "the newest not begun");
        assert_eq!(pick("site-b/cam-1", 30), Some("all"));
        assert_eq!(pick("", 30), Some("all"));
        assert_eq!(pick("site-a", 30), Some("all"), "a prefix ends in '/'");
        assert_eq!(pick("site-a/cam-1", 100), None, "ends are exclusive");
        assert_eq!(idx.next_expiry(30), Some(50));
    }

    #[test]
    fn sources_and_scopes_are_checked() {
        for ok in ["site-a/cam-12", "cam:1", "x"] {
            validate_source(ok).unwrap();
        }
        for bad in ["*", "a b", "ä", &"x".repeat(129)] {
            assert!(validate_source(bad).is_err(), "{bad}");
        }
        for ok in ["*", "site-a/", "site-a/cam-12", "region-1/site-a/"] {
            validate_scope(ok).unwrap();
        }
        for bad in ["", "/site", "a//b", "a b/", "**"] {
            assert!(validate_scope(bad).is_err(), "{bad}");
        }
    }
}
