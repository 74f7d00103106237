//! Who may change the server: the one rule behind Admin, Events, the events
//! endpoint and the console.
//!
//! A caller is admitted by what it proves, never by where it seems to come
//! from unless the operator said so:
//! - a bearer token equal to the token file's (compared in constant time);
//! - with `--admin-client-ca`, a client certificate the TLS layer verified
//!   against that CA (gRPC only; required then, beside any token);
//! - with `--trust-loopback` and no token, any loopback peer. Behind a sidecar
//!   (Envoy, Istio), a reverse proxy on the host or `kubectl port-forward`,
//!   loopback is everyone, so that is an explicit choice the server states at
//!   start-up.
//!
//! Without any of them nobody may change the server. The audit trail records
//! only what was verified here ([`Who`]). The token file is read again by
//! [`Auth::reload`] (on SIGHUP); a changed token ends the console's sessions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use tonic::{Request, Status};

use crate::serve::state::sha256;
use crate::{Error, Result};

/// How the server admits changes, as `rws serve`'s flags say.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Admit loopback peers without a token (only when there is no token file).
    pub trust_loopback: bool,
    /// Require a client certificate verified by the TLS layer (gRPC only).
    pub require_client_cert: bool,
}

pub struct Auth {
    cfg: AuthConfig,
    token: ArcSwapOption<String>,
    /// Bumped whenever the token changes; sessions from an older epoch are over.
    epoch: AtomicU64,
}

/// A verified identity, as the audit trail records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who(String);

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a caller presents.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The value after `Bearer ` in its `authorization` header.
    pub bearer: Option<&'a str>,
    pub peer: Option<SocketAddr>,
    /// The DER of the client certificate the TLS layer verified, if any.
    pub client_cert: Option<&'a [u8]>,
}

/// Why a caller was refused: it presented nothing valid (unauthenticated), or
/// this server admits nobody of its kind (denied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Unauthenticated(&'static str),
    Denied(&'static str),
}

impl Refused {
    pub fn message(&self) -> &'static str {
        match self {
            Refused::Unauthenticated(m) | Refused::Denied(m) => m,
        }
    }
}

impl From<Refused> for Status {
    fn from(r: Refused) -> Status {
        match r {
            Refused::Unauthenticated(m) => Status::unauthenticated(m),
            Refused::Denied(m) => Status::permission_denied(m),
        }
    }
}

/// The fingerprint the audit trail shows for a secret or a certificate.
fn fingerprint(bytes: &[u8]) -> String {
    sha256(bytes)[7..19].to_string()
}

pub fn read_token(path: &Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, e))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the admin token file {} is empty; write a long random token into it",
            path.display()
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidArgument(format!(
            "the admin token in {} must be printable ASCII without spaces",
            path.display()
        )));
    }
    Ok(token)
}

impl Auth {
    pub fn new(cfg: AuthConfig) -> Result<Arc<Self>> {
        if cfg.trust_loopback && cfg.token_file.is_some() {
            return Err(Error::InvalidArgument(
                "--trust-loopback and --admin-token-file cannot be combined: with a token, every caller presents it".into(),
            ));
        }
        let token = cfg.token_file.as_deref().map(read_token).transpose()?;
        Ok(Arc::new(Auth {
            cfg,
            token: ArcSwapOption::from_pointee(token),
            epoch: AtomicU64::new(0),
        }))
    }

    /// Loopback callers may change the server without a token: what tests and
    /// a developer's laptop use.
    pub fn trust_loopback() -> Arc<Self> {
        Arc::new(Auth {
            cfg: AuthConfig {
                trust_loopback: true,
                ..AuthConfig::default()
            },
            token: ArcSwapOption::empty(),
            epoch: AtomicU64::new(0),
        })
    }

    /// Reads the token file again. A changed token takes effect for the next
    /// call and ends every session opened with the old one; a file that cannot
    /// be read keeps the token in force. Returns whether it changed.
    pub fn reload(&self) -> Result<bool> {
        let Some(path) = &self.cfg.token_file else {
            return Ok(false);
        };
        let token = read_token(path)?;
        let changed = self.token.load().as_deref() != Some(&token);
        if changed {
            self.token.store(Some(Arc::new(token)));
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        Ok(changed)
    }

    /// Which token is in force; sessions remember it to know when they are over.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether callers need a token (the console asks for one then).
    pub fn needs_token(&self) -> bool {
        self.cfg.token_file.is_some()
    }

    /// What the server says at start-up about who may change it.
    pub fn describe(&self) -> &'static str {
        match (
            self.needs_token(),
            self.cfg.require_client_cert,
            self.cfg.trust_loopback,
        ) {
            (true, true, _) => {
                "changes need the admin token and a client certificate signed by --admin-client-ca"
            }
            (true, false, _) => "changes need the admin token (--admin-token-file)",
            (false, true, _) => {
                "changes need a client certificate signed by --admin-client-ca (gRPC only: \
                 the console and the events endpoint admit nobody)"
            }
            (false, false, true) => {
                "--trust-loopback: ANY loopback peer may change this server without a token; \
                 behind a sidecar, a proxy on this host or a port-forward, that is everyone"
            }
            (false, false, false) => {
                "nobody may change this server: Admin, events and the console refuse every \
                 caller; start it with --admin-token-file (or --trust-loopback on a laptop)"
            }
        }
    }

    /// Admits or refuses a caller.
    pub fn check(&self, c: &Credentials) -> std::result::Result<Who, Refused> {
        let mut parts = Vec::new();
        if self.cfg.require_client_cert {
            let Some(cert) = c.client_cert else {
                return Err(Refused::Unauthenticated(
                    "changes need a client certificate signed by the server's --admin-client-ca",
                ));
            };
            parts.push(format!("cert:{}", fingerprint(cert)));
        }
        if let Some(token) = self.token.load_full() {
            match c.bearer {
                Some(g) if constant_time_eq::constant_time_eq(g.as_bytes(), token.as_bytes()) => {
                    parts.push(format!("token:{}", fingerprint(token.as_bytes())));
                }
                Some(_) => return Err(Refused::Unauthenticated("wrong admin token")),
                None => {
                    return Err(Refused::Unauthenticated(
                        "changes need an `authorization: Bearer <admin token>` header",
                    ));
                }
            }
        }
        if !parts.is_empty() {
            return Ok(Who(parts.join("+")));
        }
        match c.peer {
            Some(peer) if self.cfg.trust_loopback && peer.ip().is_loopback() => {
                Ok(Who(format!("peer:{peer}")))
            }
            _ if self.cfg.trust_loopback => Err(Refused::Denied(
                "only loopback clients may change this server (--trust-loopback); start it \
                 with --admin-token-file to admit remote callers",
            )),
            _ => Err(Refused::Denied(
                "this server admits no changes: start it with --admin-token-file, or with \
                 --trust-loopback to let loopback clients change it without a token",
            )),
        }
    }

    /// The gRPC interceptor for Admin and Events: admits or refuses each call
    /// and leaves the verified [`Who`] in its extensions for the audit trail.
    pub fn interceptor(self: &Arc<Self>) -> impl tonic::service::Interceptor + Clone + use<> {
        let auth = self.clone();
        move |mut req: Request<()>| {
            let certs = req.peer_certs();
            let who = auth.check(&Credentials {
                bearer: bearer(
                    req.metadata()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok()),
                ),
                peer: req.remote_addr(),
                client_cert: certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref()),
            })?;
            req.extensions_mut().insert(who);
            Ok(req)
        }
    }
}

/// The token in an `authorization` header's value, if it is a bearer one.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    header?.strip_prefix("Bearer ")
}

/// The identity [`Auth::interceptor`] verified for a call.
pub fn who<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Who>()
        .map_or_else(|| "unverified".into(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn from(peer: &str, bearer: Option<&str>) -> Credentials<'static> {
        Credentials {
            bearer: bearer.map(|b| &*b.to_string().leak()),
            peer: Some(peer.parse().unwrap()),
            client_cert: None,
        }
    }

    fn token_file(token: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "{token}").unwrap();
        f
    }

    #[test]
    fn without_a_flag_nobody_may_change_the_server_not_even_loopback() {
        let auth = Auth::new(AuthConfig::default()).unwrap();
        for peer in ["127.0.0.1:5000", "[::1]:5000", "10.1.2.3:5000"] {
            let r = auth.check(&from(peer, Some("anything"))).unwrap_err();
            assert!(matches!(r, Refused::Denied(_)), "{peer}");
            assert!(r.message().contains("--trust-loopback"));
        }
    }

    #[test]
    fn trusting_loopback_admits_loopback_only_and_records_the_peer_not_the_header() {
        let auth = Auth::trust_loopback();
        let who = auth
            .check(&from("127.0.0.6:5000", Some("made-up")))
            .unwrap();
        assert_eq!(who.to_string(), "peer:127.0.0.6:5000");
        assert!(auth.check(&from("[::1]:5000", None)).is_ok());
        let r = auth.check(&from("10.1.2.3:5000", None)).unwrap_err();
        assert!(matches!(r, Refused::Denied(_)));
    }

    #[test]
    fn a_token_is_checked_for_every_peer_and_reloads_end_the_old_epoch() {
        let f = token_file("tok");
        let auth = Auth::new(AuthConfig {
            token_file: Some(f.path().into()),
            ..AuthConfig::default()
        })
        .unwrap();
        let who = auth.check(&from("10.1.2.3:5000", Some("tok"))).unwrap();
        assert!(who.to_string().starts_with("token:"));
        for bad in [None, Some("tok2"), Some("to"), Some("")] {
            let r = auth.check(&from("127.0.0.1:5000", bad)).unwrap_err();
            assert!(matches!(r, Refused::Unauthenticated(_)), "{bad:?}");
        }
        assert!(!auth.reload().unwrap(), "unchanged");
        assert_eq!(auth.epoch(), 0);
        std::fs::write(f.path(), "new-token\n").unwrap();
        assert!(auth.reload().unwrap());
        assert_eq!(auth.epoch(), 1);
        assert!(auth.check(&from("10.1.2.3:5000", Some("tok"))).is_err());
        assert!(
            auth.check(&from("10.1.2.3:5000", Some("new-token")))
                .is_ok()
        );
        // A file that cannot be read keeps the token in force.
        std::fs::write(f.path(), "  \n").unwrap();
        assert!(auth.reload().is_err());
        assert!(
            auth.check(&from("10.1.2.3:5000", Some("new-token")))
                .is_ok()
        );
    }

    #[test]
    fn a_required_client_certificate_is_checked_before_the_token() {
        let f = token_file("tok");
        let auth = Auth::new(AuthConfig {
            token_file: Some(f.path().into()),
            require_client_cert: true,
            ..AuthConfig::default()
        })
        .unwrap();
        let r = auth.check(&from("10.1.2.3:5000", Some("tok"))).unwrap_err();
        assert!(matches!(r, Refused::Unauthenticated(m) if m.contains("certificate")));
        let who = auth
            .check(&Credentials {
                client_cert: Some(b"der"),
                ..from("10.1.2.3:5000", Some("tok"))
            })
            .unwrap();
        assert!(who.to_string().starts_with("cert:") && who.to_string().contains("+token:"));
    }

    #[test]
    fn trusting_loopback_beside_a_token_is_refused() {
        let f = token_file("tok");
        let cfg = AuthConfig {
            token_file: Some(f.path().into()),
            trust_loopback: true,
            ..AuthConfig::default()
        };
        assert!(Auth::new(cfg).is_err());
    }
}
