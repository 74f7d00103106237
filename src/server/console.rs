//! The operator console: one page, served by `rws serve` on `--console-addr`, that
//! shows what is active, where and until when, how traffic is served, and acts.
//!
//! It is built on the same engine calls as the Admin service, so it can do
//! nothing the API cannot, and its inputs meet the same checks. Security:
//! - **Login**: [`super::auth`] decides, as for Admin. With an admin token, the
//!   login form exchanges it for a session (a random id in an `HttpOnly;
//!   SameSite=Strict` cookie, `Secure` when the console speaks TLS; the token
//!   itself never goes back to the browser). A session ends when the token it
//!   was opened with is rotated.
//! - **CSRF**: every change carries the session's random token in `X-CSRF-Token`.
//! - **No change through GET**; changes are POSTs of JSON.
//!
//! The assets are in the repository and embedded in the binary: nothing is
//! fetched from the internet at run time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use super::auth::Credentials;
use super::http::{Refusal, Side};
use crate::serve::activation::{Activation, End, now_ms};
use crate::serve::change::Change;
use crate::serve::engine::Engine;
use crate::serve::journal::Cause;
use crate::{Error, Result};

const INDEX: &str = include_str!("console/index.html");
const APP: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

/// How long a session lasts without use.
const SESSION_IDLE: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at once; a login beyond it ends the least recently used one,
/// so repeated logins cannot grow the server's memory.
const MAX_SESSIONS: usize = 256;
const COOKIE: &str = "rws_session";

struct Session {
    csrf: String,
    who: String,
    used: Instant,
    /// The token epoch it was opened in ([`super::auth::Auth::epoch`]).
    epoch: u64,
}

struct Console {
    engine: Arc<Engine>,
    side: Side,
    sessions: Mutex<HashMap<String, Session>>,
}

/// 128 random bits, hex.
fn random_id() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A handler's answer: the response, or the refusal that ends it early.
type Answer<T = Response> = std::result::Result<T, Refusal>;

/// A request body read as `T`, refused with a message that quotes at most the
/// start of what serde saw (field names are the client's).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Answer<T> {
    serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "not a valid request ({}); the page sends JSON",
                crate::error::clip(&e.to_string())
            ),
        )
    })
}

fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

impl Console {
    /// `Secure` whenever the console speaks TLS, so the browser never sends the
    /// session over plain HTTP.
    fn cookie_attributes(&self) -> &'static str {
        match self.side.tls.is_some() {
            true => "HttpOnly; SameSite=Strict; Path=/; Secure",
            false => "HttpOnly; SameSite=Strict; Path=/",
        }
    }

    /// The session a request carries, refreshed; `None` when absent or idle too long.
    fn session(&self, headers: &HeaderMap) -> Option<(String, String)> {
        let id = cookie_of(headers)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.side.auth.epoch();
        sessions.retain(|_, s| s.used.elapsed() < SESSION_IDLE && s.epoch == epoch);
        let s = sessions.get_mut(&id)?;
        s.used = Instant::now();
        Some((s.csrf.clone(), s.who.clone()))
    }

    /// Refuses a read without a session.
    fn reader(&self, headers: &HeaderMap) -> Answer<()> {
        match self.session(headers) {
            Some(_) => Ok(()),
            None => Err(Refusal::new(StatusCode::UNAUTHORIZED, "log in first")),
        }
    }

    /// The session's audit identity, after checking its CSRF token.
    fn authorize_change(&self, headers: &HeaderMap) -> Answer<String> {
        let Some((csrf, who)) = self.session(headers) else {
            return Err(Refusal::new(StatusCode::UNAUTHORIZED, "log in first"));
        };
        let given = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        match given {
            Some(g) if constant_time_eq::constant_time_eq(g.as_bytes(), csrf.as_bytes()) => Ok(who),
            _ => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token; reload the page",
            )),
        }
    }

    /// A change's author and its form: the session and CSRF token are checked
    /// before the body is read, so a stranger learns nothing from parse errors.
    fn change_request<T: DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Answer<(String, T)> {
        let who = self.authorize_change(headers)?;
        Ok((who, parse(body)?))
    }
}

#[derive(Deserialize)]
struct Login {
    #[serde(default)]
    token: String,
}

async fn login(
    State(c): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Answer {
    let form: Login = parse(&body)?;
    let epoch = c.side.auth.epoch();
    let creds = Credentials {
        bearer: c.side.auth.needs_token().then_some(form.token.as_str()),
        peer: Some(peer),
        client_cert: None,
    };
    let who = format!("console:{}", c.side.auth.check(&creds)?);
    let id = random_id()?;
    let csrf = random_id()?;
    let mut sessions = c.sessions.lock().unwrap_or_else(|e| e.into_inner());
    if sessions.len() >= MAX_SESSIONS
        && let Some(oldest) = sessions
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(k, _)| k.clone())
    {
        sessions.remove(&oldest);
    }
    sessions.insert(
        id.clone(),
        Session {
            csrf: csrf.clone(),
            who,
            used: Instant::now(),
            epoch,
        },
    );
    drop(sessions);
    let cookie = format!("{COOKIE}={id}; {}", c.cookie_attributes());
    Ok((
        [(header::SET_COOKIE, cookie)],
        axum::Json(serde_json::json!({ "csrf": csrf })),
    )
        .into_response())
}

async fn logout(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    c.authorize_change(&headers)?;
    if let Some(id) = cookie_of(&headers) {
        c.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
    let cookie = format!("{COOKIE}=; {}; Max-Age=0", c.cookie_attributes());
    Ok((
        [(header::SET_COOKIE, cookie)],
        axum::Json(serde_json::json!({})),
    )
        .into_response())
}

async fn session(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match c.session(&headers) {
        Some((csrf, who)) => axum::Json(serde_json::json!({ "csrf": csrf, "who": who,
            "token_required": c.side.auth.needs_token() }))
        .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({ "error": "log in first",
                "token_required": c.side.auth.needs_token() })),
        )
            .into_response(),
    }
}

/// The state the pages show, in one read of the table.
async fn overview(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    c.reader(&headers)?;
    let table = c.engine.registry().snapshot();
    let profiles: Vec<_> = table
        .profiles
        .values()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "signatures": p.signatures,
                "resident": p.is_resident(),
                "default": p.name == table.default_profile,
                "generation": p.generation,
            })
        })
        .collect();
    let signatures: Vec<_> = table
        .signatures
        .values()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "corruption": s.signature.meta.corruption,
                "storage": s.signature.quant_summary(),
                "bytes": s.signature.stored_bytes(),
                "fingerprint": s.signature.meta.base_fingerprint,
                "transferred": s.transferred,
            })
        })
        .collect();
    let activations: Vec<&Activation> = table.activations.all().iter().map(|a| &**a).collect();
    Ok(axum::Json(serde_json::json!({
        "generation": table.generation,
        "default_profile": table.default_profile,
        "profiles": profiles,
        "signatures": signatures,
        "activations": activations,
        "now_ms": now_ms(),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    scope: String,
}

async fn history(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Answer {
    c.reader(&headers)?;
    let entries = c.engine.history(&q.scope, 200).await?;
    Ok(axum::Json(entries).into_response())
}

/// Traffic per profile, pushed every second: the last 120 s of requests per
/// second and p50/p99 latency.
async fn traffic(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    c.reader(&headers)?;
    let engine = c.engine.clone();
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    let stream = tokio_stream::StreamExt::map(ticks, move |_| {
        let data = serde_json::to_string(&engine.traffic().recent(120)).unwrap_or_default();
        Ok::<_, std::convert::Infallible>(SseEvent::default().data(data))
    });
    // Ends when the server closes, so an open page does not hold the drain.
    let stream = futures_util::StreamExt::take_until(stream, c.side.shutdown.closing());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateForm {
    scope: String,
    profile: String,
    minutes: f64,
    #[serde(default)]
    reason: String,
}

fn minutes(m: f64) -> Answer<Duration> {
    if !(m.is_finite() && m > 0.0) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the duration must be a positive number of minutes",
        ));
    }
    Duration::try_from_secs_f64(m * 60.0)
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "the duration is too long"))
}

async fn activate(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Answer {
    let (who, f): (_, ActivateForm) = c.change_request(&headers, &body)?;
    let d = minutes(f.minutes)?;
    let cause = Cause::new(who, f.reason.clone());
    let a = Activation::starting_now(f.scope, f.profile, End::After(d), f.reason);
    let change = Change::Activate(a.clone());
    c.engine.change(change, cause, false).await?;
    Ok(axum::Json(a).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendForm {
    id: String,
    minutes: f64,
}

async fn extend(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Answer {
    let (who, f): (_, ExtendForm) = c.change_request(&headers, &body)?;
    let d = minutes(f.minutes)?;
    let table = c.engine.registry().snapshot();
    let Some(a) = table.activations.all().iter().find(|a| a.id == f.id) else {
        return Err(Error::NotFound(format!(
            "no activation {} (it may have ended)",
            crate::error::clip(&f.id)
        ))
        .into());
    };
    let until_ms = a
        .until_ms
        .max(now_ms())
        .saturating_add(d.as_millis() as u64);
    let change = Change::Extend { id: f.id, until_ms };
    let cause = Cause::new(who, "extended in the console");
    c.engine.change(change, cause, false).await?;
    Ok(axum::Json(serde_json::json!({ "until_ms": until_ms })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndForm {
    id: String,
}

async fn deactivate(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Answer {
    let (who, f): (_, EndForm) = c.change_request(&headers, &body)?;
    let cause = Cause::new(who, "ended in the console");
    let change = Change::Deactivate(f.id);
    c.engine.change(change, cause, false).await?;
    Ok(axum::Json(serde_json::json!({})).into_response())
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse + Clone {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Nothing from elsewhere: no inline script, no third-party origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
}

/// Serves the console on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, side: Side) -> Result<()> {
    let console = Arc::new(Console {
        engine,
        side: side.clone(),
        sessions: Mutex::default(),
    });
    let index = asset("text/html; charset=utf-8", INDEX);
    let app = asset("text/javascript; charset=utf-8", APP);
    let style = asset("text/css; charset=utf-8", STYLE);
    let router = axum::Router::new()
        .route("/", get(move || async move { index }))
        .route("/app.js", get(move || async move { app }))
        .route("/style.css", get(move || async move { style }))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/api/session", get(session))
        .route("/api/overview", get(overview))
        .route("/api/history", get(history))
        .route("/api/traffic", get(traffic))
        .route("/api/activate", post(activate))
        .route("/api/extend", post(extend))
        .route("/api/deactivate", post(deactivate))
        .layer(axum::extract::DefaultBodyLimit::max(16 << 10))
        .with_state(console);
    super::http::serve(listener, router, "console", &side).await
}
