//! The operator console in real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which scripts/test.sh installs), against a real server:
//! log in, activate fog on one site, check over gRPC that only that site is
//! served with fog, watch the countdown, end it early, find it in the history.
//! Then the refusals, over plain HTTP: no session, a wrong CSRF token, bad input.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{RwsProcess, http, tensor_request, tiny_repo};
use fantoccini::{Client, ClientBuilder, Locator};
use rws::server::pb;

/// chromedriver on a free loopback port, killed on drop; None when Chromium is
/// not installed (and RWS_REQUIRE_CHROMIUM is not set).
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Option<Driver> {
        let installed = Command::new("chromedriver")
            .arg("--version")
            .output()
            .is_ok()
            && std::path::Path::new("/usr/bin/chromium").exists();
        if !installed {
            assert!(
                std::env::var("RWS_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
                "Chromium is not installed: apt-get install chromium chromium-driver"
            );
            eprintln!("skipped: apt-get install chromium chromium-driver");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Driver {
            child,
            port,
            _profile: tempfile::tempdir().unwrap(),
        })
    }

    async fn browser(&self) -> Client {
        let profile = self._profile.path().display().to_string();
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1280,900",
                    format!("--user-data-dir={profile}"),
                ],
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where screenshots go: docs/console/ with RWS_SCREENSHOTS=1, else a temp dir.
fn shot_dir() -> std::path::PathBuf {
    match std::env::var("RWS_SCREENSHOTS").as_deref() {
        Ok("1") => std::path::PathBuf::from("docs/console"),
        _ => std::env::temp_dir().join("rws-console-shots"),
    }
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = shot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Waits until `f` holds for the page's text (the page updates itself).
async fn wait_text(c: &Client, selector: &str, f: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let t = c
            .find(Locator::Css(selector))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if f(&t) {
            return t;
        }
        assert!(Instant::now() < until, "{selector}: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(c: &Client, at: Locator<'_>) {
    c.find(at).await.unwrap().click().await.unwrap();
}

async fn type_into(c: &Client, id: &str, text: &str) {
    c.find(Locator::Id(id))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

async fn served(ch: &tonic::transport::Channel, source: &str) -> pb::ClassifyResponse {
    common::InferenceClient::new(ch.clone())
        .classify(pb::ClassifyRequest {
            source: source.into(),
            ..tensor_request(1, "")
        })
        .await
        .unwrap()
        .into_inner()
}

/// A server on the tiny model whose admin token is `s3cret-console`, and the
/// files it reads, to keep until it stops.
fn with_token() -> (RwsProcess, (tempfile::TempDir, tempfile::TempDir)) {
    let repo = tiny_repo();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-console\n").unwrap();
    let server = RwsProcess::start(&[
        "--repo",
        repo.path().to_str().unwrap(),
        "--model",
        common::MODEL,
        "--admin-token-file",
        token.to_str().unwrap(),
    ]);
    (server, (repo, dir))
}

#[tokio::test]
async fn an_operator_activates_fog_for_one_site_and_ends_it_in_chromium() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let (server, _files) = with_token();
    let ch = server.channel().await;
    common::wait_ready(&ch).await;
    let c = driver.browser().await;

    // 1. Log in with the admin token.
    c.goto(&server.console).await.unwrap();
    wait_text(&c, "#login h2", |t| t == "Log in").await;
    shot(&c, "login").await;
    type_into(&c, "token", "s3cret-console").await;
    click(&c, Locator::Css("#login-form button")).await;
    wait_text(&c, "#who", |t| t.starts_with("console:token:")).await;

    // 2. Activate fog on site-a/ for 10 minutes, with a reason.
    wait_text(&c, "#profile", |t| t.contains("fog")).await;
    let form = |id: &'static str| c.find(Locator::Id(id));
    type_into(&c, "scope", "site-a/").await;
    form("profile")
        .await
        .unwrap()
        .select_by_value("fog")
        .await
        .unwrap();
    form("minutes").await.unwrap().clear().await.unwrap();
    type_into(&c, "minutes", "10").await;
    type_into(&c, "reason", "fog warning").await;
    click(&c, Locator::Css("#activate-form button")).await;
    wait_text(&c, "#message", |t| {
        t.starts_with("Activated fog on site-a/")
    })
    .await;

    // 3. Over gRPC: site-a is served with fog, site-b with the default.
    let a = served(&ch, "site-a/cam-1").await;
    assert_eq!(
        (a.profile.as_str(), a.selection()),
        ("fog", pb::Selection::Activation)
    );
    let b = served(&ch, "site-b/cam-1").await;
    assert_eq!(
        (b.profile.as_str(), b.selection()),
        ("clean", pb::Selection::Default)
    );

    // 4. The activation is on the page, and its countdown runs.
    let row = wait_text(&c, "#activation-table tbody", |t| t.contains("site-a/")).await;
    assert!(row.contains("fog") && row.contains("fog warning"), "{row}");
    let first = wait_text(&c, ".countdown", |t| {
        t.starts_with("9m") || t.starts_with("10m")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = c
        .find(Locator::Css(".countdown"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_ne!(first, later, "the countdown does not move");
    shot(&c, "activations").await;
    // A few seconds of traffic from both sites, for the traffic page to show.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        for source in ["site-a/cam-1", "site-b/cam-1", "site-b/cam-2"] {
            served(&ch, source).await;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for page in ["traffic", "profiles", "signatures"] {
        click(&c, Locator::Css(&format!("#tabs button[data-page={page}]"))).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shot(&c, page).await;
    }
    click(&c, Locator::Css("#tabs button[data-page=activations]")).await;

    // Extend it by 30 minutes: the countdown jumps past 39 minutes.
    click(&c, Locator::XPath("//button[text()='+30 min']")).await;
    wait_text(&c, "#message", |t| t.starts_with("Extended ")).await;
    wait_text(&c, ".countdown", |t| {
        t.starts_with("39m") || t.starts_with("40m")
    })
    .await;

    // 5. End it early.
    let end = c
        .find(Locator::XPath("//button[text()='End now']"))
        .await
        .unwrap();
    end.click().await.unwrap();
    wait_text(&c, "#message", |t| t.starts_with("Ended ")).await;

    // 6. It is gone, and the history has it.
    wait_text(&c, "#no-activations", |t| {
        t.starts_with("Nothing is active")
    })
    .await;
    assert_eq!(served(&ch, "site-a/cam-1").await.profile, "clean");
    click(&c, Locator::Css("#tabs button[data-page=history]")).await;
    let history = wait_text(&c, "#history-table tbody", |t| t.contains("deactivate")).await;
    assert!(
        history.contains("activate")
            && history.contains("extend")
            && history.contains("fog warning"),
        "{history}"
    );
    assert!(history.contains("console:token:"), "{history}");
    shot(&c, "history").await;
    c.close().await.unwrap();
}

#[tokio::test]
async fn refused_without_a_session_a_csrf_token_or_good_input_and_nothing_changes() {
    let (server, _files) = with_token();
    let ch = server.channel().await;
    let base = server.console.trim_end_matches('/').to_string();
    let url = |p: &str| format!("{base}{p}");
    // What a refused request must leave as it was: the trail and the activations.
    let state = || async {
        let mut admin = rws::server::admin_client(ch.clone(), Some("s3cret-console")).unwrap();
        let history = admin
            .history(pb::HistoryRequest {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        let activations = admin
            .list_activations(pb::ListActivationsRequest {})
            .await
            .unwrap()
            .into_inner()
            .activations;
        (history, activations)
    };
    let before = state().await;
    let good = r#"{"scope": "site-a/", "profile": "fog", "minutes": 10, "reason": "x"}"#;

    // No session: reads and changes are refused.
    assert_eq!(http("GET", &url("/api/overview"), &[], "").await.0, 401);
    assert_eq!(http("POST", &url("/api/activate"), &[], good).await.0, 401);
    // A wrong token does not log in; the right one does, with a strict cookie.
    let (code, _, _) = http("POST", &url("/login"), &[], r#"{"token": "guess"}"#).await;
    assert_eq!(code, 401);
    let (code, head, body) = http(
        "POST",
        &url("/login"),
        &[],
        r#"{"token": "s3cret-console"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let csrf: serde_json::Value = serde_json::from_str(&body).unwrap();
    let csrf = csrf["csrf"].as_str().unwrap().to_string();
    // No change through GET.
    let (code, _, _) = http("GET", &url("/api/activate"), &[("Cookie", &session)], "").await;
    assert_eq!(code, 405);
    // A session without the CSRF token, or with a wrong one, changes nothing.
    let with = |csrf: &str| {
        vec![
            ("Cookie", session.clone()),
            ("X-CSRF-Token", csrf.to_string()),
        ]
    };
    let no_csrf = [("Cookie", session.as_str())];
    assert_eq!(
        http("POST", &url("/api/activate"), &no_csrf, good).await.0,
        403
    );
    let wrong = with("0000");
    let wrong: Vec<(&str, &str)> = wrong.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        http("POST", &url("/api/activate"), &wrong, good).await.0,
        403
    );
    // Bad input gets a message, checked by the API's own rules.
    let right = with(&csrf);
    let right: Vec<(&str, &str)> = right.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let long = format!(r#"{{"scope": "site-a/", "{}": 1}}"#, "y".repeat(10_000));
    for (what, body, want) in [
        (
            "empty scope",
            r#"{"scope": "", "profile": "fog", "minutes": 10}"#,
            400,
        ),
        (
            "unknown profile",
            r#"{"scope": "site-a/", "profile": "hail", "minutes": 10}"#,
            404,
        ),
        (
            "negative duration",
            r#"{"scope": "site-a/", "profile": "fog", "minutes": -5}"#,
            400,
        ),
        (
            "unknown field",
            r#"{"scope": "site-a/", "profile": "fog", "minutes": 5, "x": 1}"#,
            400,
        ),
        ("a long unknown field, not echoed whole", long.as_str(), 400),
        ("not JSON", "scope=site-a/", 400),
    ] {
        let (code, _, text) = http("POST", &url("/api/activate"), &right, body).await;
        assert_eq!(code, want, "{what}: {text}");
        assert!(!text.is_empty() && text.len() < 600, "{what}: {text}");
    }
    let (code, _, text) = http("POST", &url("/api/deactivate"), &right, r#"{"id": "nope"}"#).await;
    assert_eq!(code, 404, "{text}");
    assert_eq!(before, state().await);
    // And the right request, for contrast, goes through.
    let (code, _, text) = http("POST", &url("/api/activate"), &right, good).await;
    assert_eq!(code, 200, "{text}");
    // A history scope is checked by the engine's own rules.
    let (code, _, text) = http("GET", &url("/api/history?scope=no%20spaces"), &no_csrf, "").await;
    assert_eq!(code, 400, "{text}");
    // Logins do not pile up: past 256 sessions, the least recently used one ends.
    for _ in 0..256 {
        let (code, _, _) = http(
            "POST",
            &url("/login"),
            &[],
            r#"{"token": "s3cret-console"}"#,
        )
        .await;
        assert_eq!(code, 200);
    }
    let (code, _, _) = http("GET", &url("/api/overview"), &no_csrf, "").await;
    assert_eq!(code, 401);
}
