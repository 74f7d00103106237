//! The operator console in real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which scripts/test.sh installs), against a real server:
//! log in, activate fog on one site, check over gRPC that only that site is
//! served with fog, watch the countdown, end it early, find it in the history.
//! Then the refusals, over plain HTTP: no session, a wrong CSRF token, bad input.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{RwsProcess, tensor_request, tiny_repo};
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
        let _ = rustls::crypto::ring::default_provider().install_default();
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
        ClientBuilder::rustls()
            .unwrap()
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

#[tokio::test]
async fn an_operator_activates_fog_for_one_site_and_ends_it_in_chromium() {
    let Some(driver) = Driver::start() else {
        return;
    };
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
    let ch = server.channel().await;
    common::wait_ready(&ch).await;
    let c = driver.browser().await;

    // 1. Log in with the admin token.
    c.goto(&server.console).await.unwrap();
    wait_text(&c, "#login h2", |t| t == "Log in").await;
    shot(&c, "login").await;
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys("s3cret-console")
        .await
        .unwrap();
    c.find(Locator::Css("#login-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "#who", |t| t.starts_with("console:token:")).await;

    // 2. Activate fog on site-a/ for 10 minutes, with a reason.
    wait_text(&c, "#profile", |t| t.contains("fog")).await;
    let form = |id: &'static str| c.find(Locator::Id(id));
    form("scope")
        .await
        .unwrap()
        .send_keys("site-a/")
        .await
        .unwrap();
    form("profile")
        .await
        .unwrap()
        .select_by_value("fog")
        .await
        .unwrap();
    form("minutes").await.unwrap().clear().await.unwrap();
    form("minutes")
        .await
        .unwrap()
        .send_keys("10")
        .await
        .unwrap();
    form("reason")
        .await
        .unwrap()
        .send_keys("fog warning")
        .await
        .unwrap();
    c.find(Locator::Css("#activate-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
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
    for page in ["traffic", "profiles", "signatures"] {
        c.find(Locator::Css(&format!("#tabs button[data-page={page}]")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shot(&c, page).await;
    }
    c.find(Locator::Css("#tabs button[data-page=activations]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

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
    c.find(Locator::Css("#tabs button[data-page=history]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let history = wait_text(&c, "#history-table tbody", |t| t.contains("deactivate")).await;
    assert!(
        history.contains("activate") && history.contains("fog warning"),
        "{history}"
    );
    assert!(history.contains("console:token:"), "{history}");
    shot(&c, "history").await;
    c.close().await.unwrap();
}
