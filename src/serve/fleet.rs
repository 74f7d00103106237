//! Fleet mode: many replicas, one profile state, kept in etcd (v3 API).
//!
//! Under the prefix:
//! - `state/signatures/<name>`, `state/profiles/<name>`, `state/default`: the
//!   same records as the local state file ([`crate::serve::state`]); signatures by
//!   repository path and content hash, since every replica reads its own copy;
//! - `state/last`: rewritten by every change, so the newest mod revision in
//!   `state/` is the state's revision, deletions included;
//! - `audit/<time>-<replica>-<n>`: the audit trail, one key per change, written
//!   in the change's own transaction;
//! - `replicas/<id>`: each replica's applied revision and last error, bound
//!   to a lease so that the key disappears when the replica dies.
//!
//! A replica loads one consistent snapshot at one revision, then watches
//! `state/` from the next revision, so no event is missed or applied twice;
//! each change reaches the registry through [`Registry::reconcile`], as a local
//! admin change does. An admin change is checked by the same [`Change::next`]
//! as a local one, against the fleet's state, and written as one etcd
//! transaction that compares mod revisions against what this replica has
//! seen: two admins never silently overwrite each other, the loser gets
//! ABORTED. When etcd is unreachable the replica keeps serving its last state,
//! reports it, and resyncs from a fresh snapshot when etcd returns.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::repo::ModelDir;
use crate::serve::change::{Applied, Change};
use crate::serve::journal::{self, Cause};
use crate::serve::profile::{CLEAN, is_builtin};
use crate::serve::registry::Registry;
use crate::serve::state::{self, State};
use crate::{Error, Result, bail};

/// Seconds a replica's key outlives its last keep-alive.
const LEASE_TTL: i64 = 5;
/// Newest audit entries read for one `History` call.
const AUDIT_READ: i64 = 10_000;
/// How long a write waits for this replica (or the fleet) to apply it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// `etcd://HOST:PORT/PREFIX`
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdUrl {
    pub endpoint: String,
    /// Always ends with `/`.
    pub prefix: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let rest = s.strip_prefix("etcd://").ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{s:?} is not an etcd URL like etcd://127.0.0.1:2379/rws"
            ))
        })?;
        let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if host.is_empty() || prefix.is_empty() {
            bail!(
                InvalidArgument,
                "{s:?} needs a host and a key prefix, e.g. etcd://127.0.0.1:2379/rws"
            );
        }
        Ok(EtcdUrl {
            endpoint: format!("http://{host}"),
            prefix: format!("/{prefix}/"),
        })
    }
}

/// What a replica publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub id: String,
    pub addr: String,
    pub applied_revision: i64,
    /// What it could not apply at that revision, if anything.
    pub error: Option<String>,
}

/// One key of `state/`, as this replica last saw it.
#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
}

#[derive(Debug, Default)]
struct Mirror {
    /// Keys relative to `<prefix>state/`.
    keys: BTreeMap<String, Entry>,
    revision: i64,
}

impl Mirror {
    fn mod_revision(&self, key: &str) -> i64 {
        self.keys.get(key).map_or(0, |e| e.mod_revision)
    }

    /// The state these keys describe. Unreadable records are reported, not applied.
    fn state(&self) -> (State, Vec<Error>) {
        let mut errors = Vec::new();
        let (mut signatures, mut profiles, mut activations) = (Vec::new(), Vec::new(), Vec::new());
        for (k, e) in &self.keys {
            let bad =
                |err: serde_json::Error| Error::InvalidArgument(format!("etcd key {k}: {err}"));
            if k.starts_with("signatures/") {
                match serde_json::from_slice(&e.value) {
                    Ok(v) => signatures.push(v),
                    Err(err) => errors.push(bad(err)),
                }
            } else if k.starts_with("profiles/") {
                match serde_json::from_slice(&e.value) {
                    Ok(v) => profiles.push(v),
                    Err(err) => errors.push(bad(err)),
                }
            } else if k.starts_with("activations/") {
                match serde_json::from_slice(&e.value) {
                    Ok(v) => activations.push(v),
                    Err(err) => errors.push(bad(err)),
                }
            }
        }
        let default_profile = self
            .keys
            .get("default")
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
            .unwrap_or_else(|| CLEAN.into());
        let state = State {
            version: state::FORMAT_VERSION,
            signatures,
            profiles,
            default_profile,
            activations,
        };
        (state, errors)
    }
}

/// Connection state, for health and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub connected: bool,
    pub applied_revision: i64,
    pub error: Option<String>,
}

pub struct Fleet {
    client: Client,
    url: EtcdUrl,
    id: String,
    addr: String,
    registry: Arc<Registry>,
    model: ModelDir,
    mirror: Mutex<Mirror>,
    link: watch::Sender<Link>,
    /// Numbers this replica's audit keys.
    audit_seq: std::sync::atomic::AtomicU64,
    /// The lease `replicas/<id>` is kept under now, for [`Fleet::leave`].
    lease: std::sync::Mutex<Option<i64>>,
    /// Set by [`Fleet::leave`]: the replica key is not registered again.
    left: std::sync::atomic::AtomicBool,
}

fn etcd_error(e: etcd_client::Error) -> Error {
    Error::Unavailable(format!(
        "etcd is unreachable ({e}); the replica serves its last state"
    ))
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl Fleet {
    /// Connects, seeds an empty fleet state with this replica's profiles (one
    /// transaction; another replica may win), loads the snapshot, and keeps
    /// following etcd in the background.
    pub async fn join(
        url: EtcdUrl,
        id: String,
        addr: String,
        registry: Arc<Registry>,
        model: ModelDir,
    ) -> Result<Arc<Fleet>> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = Client::connect([url.endpoint.as_str()], Some(opts))
            .await
            .map_err(etcd_error)?;
        let fleet = Arc::new(Fleet {
            client,
            url,
            id,
            addr,
            registry,
            model,
            mirror: Mutex::new(Mirror::default()),
            audit_seq: Default::default(),
            lease: Default::default(),
            left: Default::default(),
            link: watch::channel(Link {
                connected: false,
                applied_revision: 0,
                error: None,
            })
            .0,
        });
        fleet.seed().await?;
        let revision = fleet.sync().await?;
        tokio::spawn(fleet.clone().follow(revision));
        tokio::spawn(fleet.clone().heartbeat());
        Ok(fleet)
    }

    fn key(&self, rel: &str) -> String {
        format!("{}state/{rel}", self.url.prefix)
    }

    /// Connection state as it changes.
    pub fn link(&self) -> watch::Receiver<Link> {
        self.link.subscribe()
    }

    async fn seed(&self) -> Result<()> {
        let state = State::of(&self.registry.snapshot());
        state.check_durable()?;
        let mut ops = Vec::new();
        for s in &state.signatures {
            ops.push(TxnOp::put(
                self.key(&format!("signatures/{}", s.name)),
                json(s)?,
                None,
            ));
        }
        for p in &state.profiles {
            ops.push(TxnOp::put(
                self.key(&format!("profiles/{}", p.name)),
                json(p)?,
                None,
            ));
        }
        ops.push(TxnOp::put(self.key("default"), state.default_profile, None));
        ops.push(TxnOp::put(
            self.key("last"),
            format!("seed by {}", self.id),
            None,
        ));
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key("last"),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        let r = self.client.clone().txn(txn).await.map_err(etcd_error)?;
        if r.succeeded() {
            tracing::info!(prefix = %self.url.prefix, "seeded the empty fleet state with this replica's profiles");
        }
        Ok(())
    }

    /// Loads the whole state at one revision and applies it; returns the revision.
    async fn sync(self: &Arc<Self>) -> Result<i64> {
        let r = self
            .client
            .clone()
            .get(self.key(""), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_error)?;
        let revision = r.header().map_or(0, |h| h.revision());
        let base = self.key("");
        let mut mirror = Mirror {
            keys: BTreeMap::new(),
            revision,
        };
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if let Some(rel) = key.strip_prefix(&base) {
                mirror.keys.insert(
                    rel.to_string(),
                    Entry {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
        }
        *self.mirror.lock().unwrap_or_else(|e| e.into_inner()) = mirror;
        self.apply().await;
        Ok(revision)
    }

    /// Reconciles the registry with the mirror, off the async threads, and
    /// publishes the revision now applied.
    async fn apply(self: &Arc<Self>) {
        let this = self.clone();
        let (revision, errors) = tokio::task::spawn_blocking(move || {
            let (desired, mut errors, revision) = {
                let m = this.mirror.lock().unwrap_or_else(|e| e.into_inner());
                let (state, errors) = m.state();
                (state, errors, m.revision)
            };
            let model = this.model.clone();
            errors.extend(
                this.registry
                    .reconcile(&desired, &|e| state::read_entry(&model, None, e)),
            );
            (revision, errors)
        })
        .await
        .unwrap_or_else(|e| (0, vec![Error::Internal(format!("reconcile failed: {e}"))]));
        let error = (!errors.is_empty()).then(|| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        });
        if let Some(e) = &error {
            tracing::error!(revision, error = %e, "could not apply all of the fleet state");
        }
        metrics::gauge!(crate::serve::metrics::FLEET_APPLIED_REVISION).set(revision as f64);
        self.link.send_modify(|l| {
            l.connected = true;
            l.applied_revision = revision.max(l.applied_revision);
            l.error = error;
        });
    }

    fn disconnected(&self, e: &Error) {
        tracing::warn!(error = %e, "lost etcd; serving the last state and retrying");
        metrics::gauge!(crate::serve::metrics::FLEET_CONNECTED).set(0.0);
        self.link.send_modify(|l| {
            l.connected = false;
            l.error = Some(e.to_string());
        });
    }

    /// Watches `state/` from `revision + 1`; on any failure, resyncs from a
    /// fresh snapshot (events missed meanwhile are in it) and watches again.
    async fn follow(self: Arc<Self>, mut revision: i64) {
        let mut backoff = Duration::from_millis(100);
        loop {
            metrics::gauge!(crate::serve::metrics::FLEET_CONNECTED).set(1.0);
            let e = self.watch_from(revision).await;
            self.disconnected(&e);
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                match self.sync().await {
                    Ok(r) => {
                        revision = r;
                        backoff = Duration::from_millis(100);
                        tracing::info!(revision, "resynced with etcd");
                        break;
                    }
                    Err(e) => self.disconnected(&e),
                }
            }
        }
    }

    async fn watch_from(self: &Arc<Self>, revision: i64) -> Error {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = match self.client.clone().watch(self.key(""), Some(opts)).await {
            Ok(s) => s,
            Err(e) => return etcd_error(e),
        };
        let base = self.key("");
        loop {
            let r = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Error::Unavailable("the etcd watch ended".into()),
                Err(e) => return etcd_error(e),
            };
            if r.canceled() {
                return Error::Unavailable(format!(
                    "etcd cancelled the watch (compacted at {}); resyncing",
                    r.compact_revision()
                ));
            }
            if r.events().is_empty() {
                continue;
            }
            {
                let mut m = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
                for ev in r.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let Some(rel) = key.strip_prefix(&base) else {
                        continue;
                    };
                    match ev.event_type() {
                        etcd_client::EventType::Put => {
                            m.keys.insert(
                                rel.to_string(),
                                Entry {
                                    value: kv.value().to_vec(),
                                    mod_revision: kv.mod_revision(),
                                },
                            );
                        }
                        etcd_client::EventType::Delete => {
                            m.keys.remove(rel);
                        }
                    }
                    m.revision = m.revision.max(kv.mod_revision());
                }
            }
            self.apply().await;
        }
    }

    /// Keeps `replicas/<id>` alive under a lease and rewrites it whenever the
    /// applied revision or error changes.
    async fn heartbeat(self: Arc<Self>) {
        let mut link = self.link.subscribe();
        while !self.left.load(std::sync::atomic::Ordering::Acquire) {
            if let Err(e) = self.heartbeat_once(&mut link).await {
                tracing::debug!(error = %e, "replica key lost; re-registering");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Leaves the fleet at shutdown: revokes the lease, so `replicas/<id>` goes
    /// at once rather than when the lease would expire, and registers no more.
    /// The other replicas stop waiting for this one's acknowledgements then.
    pub async fn leave(&self) -> Result<()> {
        self.left.store(true, std::sync::atomic::Ordering::Release);
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(lease) = lease {
            self.client
                .clone()
                .lease_revoke(lease)
                .await
                .map_err(etcd_error)?;
        }
        Ok(())
    }

    async fn heartbeat_once(&self, link: &mut watch::Receiver<Link>) -> Result<()> {
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(LEASE_TTL, None)
            .await
            .map_err(etcd_error)?
            .id();
        {
            let mut current = self.lease.lock().unwrap_or_else(|e| e.into_inner());
            if self.left.load(std::sync::atomic::Ordering::Acquire) {
                drop(current);
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
            *current = Some(lease);
        }
        let (mut keeper, mut acks) = client.lease_keep_alive(lease).await.map_err(etcd_error)?;
        let key = format!("{}replicas/{}", self.url.prefix, self.id);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let l = link.borrow_and_update().clone();
            let status = ReplicaStatus {
                id: self.id.clone(),
                addr: self.addr.clone(),
                applied_revision: l.applied_revision,
                error: l.error.clone(),
            };
            client
                .put(
                    key.clone(),
                    json(&status)?,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .map_err(etcd_error)?;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        keeper.keep_alive().await.map_err(etcd_error)?;
                        match acks.message().await.map_err(etcd_error)? {
                            Some(a) if a.ttl() > 0 => {}
                            _ => bail!(Unavailable, "lease {lease} expired"),
                        }
                    }
                    changed = link.changed() => {
                        changed.map_err(|_| Error::Internal("fleet stopped".into()))?;
                        break;
                    }
                }
            }
        }
    }

    /// Runs a write transaction guarded by `guards`, then waits until this
    /// replica (and with `wait_fleet`, every live replica) has applied it.
    async fn write(
        self: &Arc<Self>,
        what: &str,
        guards: Vec<Compare>,
        ops: Vec<TxnOp>,
        wait_fleet: bool,
    ) -> Result<i64> {
        if !self.link.borrow().connected {
            bail!(
                Unavailable,
                "etcd is unreachable, so the fleet state cannot change now; retry when it is back"
            );
        }
        let mut ops = ops;
        ops.push(TxnOp::put(
            self.key("last"),
            format!("{what} by {} at {}", self.id, now_ms()),
            None,
        ));
        let r = self
            .client
            .clone()
            .txn(Txn::new().when(guards).and_then(ops))
            .await
            .map_err(etcd_error)?;
        if !r.succeeded() {
            bail!(
                Aborted,
                "{what}: another admin changed the same state first; re-read it and retry"
            );
        }
        let revision = r.header().map_or(0, |h| h.revision());
        self.wait_applied(revision).await?;
        if wait_fleet {
            self.wait_fleet(revision).await?;
        }
        Ok(revision)
    }

    async fn wait_applied(&self, revision: i64) -> Result<()> {
        let mut link = self.link.subscribe();
        let reached = tokio::time::timeout(
            APPLY_TIMEOUT,
            link.wait_for(|l| l.applied_revision >= revision),
        )
        .await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => bail!(
                Unavailable,
                "the change is in etcd at revision {revision} but this replica has not applied it yet"
            ),
        }
    }

    /// Waits until every replica registered now has applied `revision`.
    pub async fn wait_fleet(&self, revision: i64) -> Result<()> {
        let until = Instant::now() + APPLY_TIMEOUT;
        loop {
            let lagging: Vec<String> = replicas(&mut self.client.clone(), &self.url)
                .await?
                .into_iter()
                .filter(|r| r.applied_revision < revision)
                .map(|r| r.id)
                .collect();
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    Unavailable,
                    "replicas {} have not applied revision {revision} yet",
                    lagging.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn guard_unchanged(&self, m: &Mirror, rel: &str) -> Compare {
        Compare::mod_revision(self.key(rel), CompareOp::Equal, m.mod_revision(rel))
    }

    /// Up to `limit` entries of the fleet's audit trail for `scope` (a
    /// prefix; empty: all), newest first, each with its etcd revision.
    pub async fn history(&self, scope: &str, limit: usize) -> Result<Vec<journal::Entry>> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(AUDIT_READ);
        let r = self
            .client
            .clone()
            .get(format!("{}audit/", self.url.prefix), Some(opts))
            .await
            .map_err(etcd_error)?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| {
                let mut e: journal::Entry = serde_json::from_slice(kv.value()).ok()?;
                e.revision = kv.mod_revision();
                Some(e)
            })
            .filter(|e| e.in_scope(scope))
            .take(limit)
            .collect())
    }

    /// No key under `prefix` has changed since this replica's view.
    fn unchanged_since(&self, m: &Mirror, prefix: &str) -> Compare {
        Compare::mod_revision(self.key(prefix), CompareOp::Less, m.revision + 1).with_prefix()
    }

    /// The etcd transaction that makes `change`, taking `next` from the fleet's
    /// state: its guards (what must not have changed since this replica's view)
    /// and its writes.
    fn transaction(
        &self,
        m: &Mirror,
        change: &Change,
        next: &State,
    ) -> Result<(Vec<Compare>, Vec<TxnOp>)> {
        let absent = |rel: &str| Compare::create_revision(self.key(rel), CompareOp::Equal, 0);
        Ok(match change {
            Change::Load(e) => {
                let rel = format!("signatures/{}", e.name);
                let put = TxnOp::put(self.key(&rel), json(e)?, None);
                (vec![absent(&rel)], vec![put])
            }
            Change::Unload(name) => {
                let rel = format!("signatures/{name}");
                // No profile may have started using it since.
                let guards = vec![
                    self.guard_unchanged(m, &rel),
                    self.unchanged_since(m, "profiles/"),
                ];
                (guards, vec![TxnOp::delete(self.key(&rel), None)])
            }
            Change::Put {
                name,
                signatures,
                replace,
            } => {
                let rel = format!("profiles/{name}");
                let mut guards = vec![match replace {
                    true => self.guard_unchanged(m, &rel),
                    false => absent(&rel),
                }];
                for s in signatures {
                    guards.push(self.guard_unchanged(m, &format!("signatures/{}", s.name)));
                }
                let entry = next.profile(name).ok_or_else(|| {
                    Error::Internal(format!("profile {name:?} is missing after its put"))
                })?;
                (guards, vec![TxnOp::put(self.key(&rel), json(entry)?, None)])
            }
            Change::Delete(name) => {
                let rel = format!("profiles/{name}");
                // Nor may an activation have started using it since.
                let guards = vec![
                    self.guard_unchanged(m, &rel),
                    self.guard_unchanged(m, "default"),
                    self.unchanged_since(m, "activations/"),
                ];
                (guards, vec![TxnOp::delete(self.key(&rel), None)])
            }
            Change::SetDefault(name) => {
                let mut guards = vec![self.guard_unchanged(m, "default")];
                if !is_builtin(name) {
                    guards.push(self.guard_unchanged(m, &format!("profiles/{name}")));
                }
                let put = TxnOp::put(self.key("default"), name.as_str(), None);
                (guards, vec![put])
            }
            Change::Activate(a) => {
                let rel = format!("activations/{}", a.id);
                // Absent, or the ended one this replica saw (an id is reused once ended).
                let mut guards = vec![match m.keys.contains_key(&rel) {
                    true => self.guard_unchanged(m, &rel),
                    false => absent(&rel),
                }];
                if !is_builtin(&a.profile) {
                    guards.push(self.guard_unchanged(m, &format!("profiles/{}", a.profile)));
                }
                (guards, vec![TxnOp::put(self.key(&rel), json(a)?, None)])
            }
            Change::Extend { id, .. } => {
                let rel = format!("activations/{id}");
                let guards = vec![self.guard_unchanged(m, &rel)];
                let a = next
                    .activations
                    .iter()
                    .find(|a| &a.id == id)
                    .ok_or_else(|| {
                        Error::Internal(format!("activation {id:?} is missing after its extension"))
                    })?;
                (guards, vec![TxnOp::put(self.key(&rel), json(a)?, None)])
            }
            Change::Deactivate(id) => {
                let rel = format!("activations/{id}");
                let guards = vec![self.guard_unchanged(m, &rel)];
                (guards, vec![TxnOp::delete(self.key(&rel), None)])
            }
            Change::Expire(now_ms) => {
                let (state, _) = m.state();
                let ended = state.activations.iter().filter(|a| a.until_ms <= *now_ms);
                let rels: Vec<String> = ended.map(|a| format!("activations/{}", a.id)).collect();
                let guards = rels.iter().map(|r| self.guard_unchanged(m, r)).collect();
                let ops = rels
                    .iter()
                    .map(|r| TxnOp::delete(self.key(r), None))
                    .collect();
                (guards, ops)
            }
        })
    }

    /// Checks `change` against the fleet's state, writes it to etcd in one
    /// guarded transaction, and returns once this replica (and with
    /// `wait_fleet`, every live one) serves it. A profile's stem is folded
    /// here first, which both checks it and spares the reconcile folding it again.
    pub async fn submit(
        self: &Arc<Self>,
        change: Change,
        cause: &Cause,
        wait_fleet: bool,
    ) -> Result<Applied> {
        let start = Instant::now();
        let before = self.registry.snapshot();
        // The rules and the guards read one view of the fleet's state, so a
        // change made meanwhile (while the stem is folded) aborts the write.
        let (guards, mut ops, prepare, entry) = {
            let m = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
            let (state, _) = m.state();
            let entry = change.entry(&state, cause);
            let prepare = match &change {
                Change::Put {
                    name, signatures, ..
                } if state.profile(name).map(|p| p.refs()).as_ref() != Some(signatures) => {
                    Some((name.clone(), signatures.clone()))
                }
                _ => None,
            };
            let next = change.next(state)?;
            let (guards, ops) = self.transaction(&m, &change, &next)?;
            (guards, ops, prepare, entry)
        };
        if let Some((name, refs)) = prepare {
            let registry = self.registry.clone();
            tokio::task::spawn_blocking(move || registry.prepare(&name, &refs))
                .await
                .map_err(|e| Error::Internal(format!("worker failed: {e}")))??;
        }
        if ops.is_empty() {
            // Nothing to write (another replica cleaned up first): no record either.
            return Ok(Applied::new(&change, &before, &before, start.elapsed(), 0));
        }
        // The audit line commits with the change, or not at all.
        let n = self
            .audit_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!(
            "{}audit/{:020}-{}-{n}",
            self.url.prefix, entry.at_ms, self.id
        );
        ops.push(TxnOp::put(key, json(&entry)?, None));
        let revision = self
            .write(change.op(), guards, ops, wait_fleet)
            .await
            .map_err(|e| match (e, &change) {
                (Error::Aborted(_), Change::Load(entry)) => Error::AlreadyExists(format!(
                    "a signature named {:?} is already loaded in the fleet; unload it first or pick another name",
                    entry.name
                )),
                (e, _) => e,
            })?;
        let after = self.registry.snapshot();
        if !change.is_reflected(&after) {
            bail!(
                FailedPrecondition,
                "the change is in etcd at revision {revision} but this replica could not apply it: {}",
                self.link.borrow().error.clone().unwrap_or_default()
            );
        }
        Ok(Applied::new(
            &change,
            &before,
            &after,
            start.elapsed(),
            revision,
        ))
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("cannot encode for etcd: {e}")))
}

/// The replicas registered under `url` now (dead ones drop out with their lease).
pub async fn replicas(client: &mut Client, url: &EtcdUrl) -> Result<Vec<ReplicaStatus>> {
    let r = client
        .get(
            format!("{}replicas/", url.prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd_error)?;
    Ok(r.kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}

/// Each replica with its lag behind the state's newest revision.
pub async fn status(url: &EtcdUrl) -> Result<(i64, Vec<ReplicaStatus>)> {
    let mut client = Client::connect([url.endpoint.as_str()], None)
        .await
        .map_err(etcd_error)?;
    let r = client
        .get(
            format!("{}state/", url.prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd_error)?;
    let latest = r
        .kvs()
        .iter()
        .map(|kv| kv.mod_revision())
        .max()
        .unwrap_or(0);
    Ok((latest, replicas(&mut client, url).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379/rws/prod".parse().unwrap();
        assert_eq!(u.endpoint, "http://127.0.0.1:2379");
        assert_eq!(u.prefix, "/rws/prod/");
        for bad in [
            "http://x/y",
            "etcd://127.0.0.1:2379",
            "etcd:///p",
            "etcd://h:1/",
        ] {
            assert!(bad.parse::<EtcdUrl>().is_err(), "{bad}");
        }
    }
}
