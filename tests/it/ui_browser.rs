//! The dashboard in a real browser: Debian's headless `chromium`, driven over WebDriver by
//! `chromedriver` (a small W3C WebDriver client below, over hyper), against the real server and
//! a real local HTTPS receiver. Elements are found by their accessible names (the browser's
//! computed label), so the test reads the screens the way the guide's reader does, and
//! axe-core (npm `axe-core`) is injected into every screen and must report no violation. Each
//! screen is saved as a PNG under `target/ui-screens/`.
//!
//! The browser, the driver and axe-core are installed on first use (tests/it/tools.rs). The test
//! fails when they cannot be had, unless `KYBERHOOK_SKIP_BROWSER=1` is set (then nothing is
//! installed, and the test skips when one is missing).

use crate::common;
use crate::tools;

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn screens_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screens")
}

/// `chromedriver` on a free local port; killed on drop.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    /// Ends chromedriver and the browser it started (its own process group), also when the
    /// test failed before closing the session.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
struct Browser {
    http: Client<HttpConnector, Full<Bytes>>,
    session: String,
    axe: String,
}

impl Browser {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let uri = format!("{}{path}", self.session);
        call(&self.http, method, &uri, body).await
    }

    async fn goto(&self, url: &str) {
        self.call(Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn url(&self) -> String {
        self.call(Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn find_all(&self, css: &str) -> Vec<String> {
        self.call(
            Method::POST,
            "/elements",
            Some(json!({ "using": "css selector", "value": css })),
        )
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[ELEMENT].as_str().unwrap().to_string())
        .collect()
    }

    async fn find(&self, css: &str) -> String {
        let found = self.find_all(css).await;
        assert!(
            !found.is_empty(),
            "no element {css:?} on {}",
            self.url().await
        );
        found[0].clone()
    }

    /// The element's accessible name ("" for an element of a page already left).
    async fn label(&self, el: &str) -> String {
        let uri = format!("{}/element/{el}/computedlabel", self.session);
        try_call(&self.http, Method::GET, &uri, None)
            .await
            .and_then(|v| v.as_str().map(|s| s.trim().to_string()))
            .unwrap_or_default()
    }

    /// The first element matching `css` whose accessible name is `name` (waits up to 5 s).
    async fn named(&self, css: &str, name: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for el in self.find_all(css).await {
                if self.label(&el).await == name {
                    return el;
                }
            }
            if Instant::now() > deadline {
                let mut names = Vec::new();
                for el in self.find_all(css).await {
                    names.push(self.label(&el).await);
                }
                panic!(
                    "no {css} named {name:?} on {} (names: {names:?})",
                    self.url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn button(&self, name: &str) -> String {
        self.named("button, a, input[type=submit]", name).await
    }

    async fn field(&self, name: &str) -> String {
        self.named("input, select, textarea", name).await
    }

    async fn click(&self, el: &str) {
        self.call(
            Method::POST,
            &format!("/element/{el}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn click_named(&self, name: &str) {
        let el = self.button(name).await;
        self.click(&el).await;
    }

    async fn type_into(&self, name: &str, text: &str) {
        let el = self.field(name).await;
        self.call(
            Method::POST,
            &format!("/element/{el}/clear"),
            Some(json!({})),
        )
        .await;
        self.call(
            Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn text(&self, el: &str) -> String {
        self.call(Method::GET, &format!("/element/{el}/text"), None)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn prop(&self, el: &str, name: &str) -> Value {
        self.call(Method::GET, &format!("/element/{el}/property/{name}"), None)
            .await
    }

    async fn attr(&self, el: &str, name: &str) -> String {
        self.call(
            Method::GET,
            &format!("/element/{el}/attribute/{name}"),
            None,
        )
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    async fn heading(&self) -> String {
        let h1 = self.find("h1").await;
        self.text(&h1).await
    }

    /// Waits until the page's `h1` contains `text` (read by script: no stale references
    /// while the previous page is replaced).
    async fn wait_heading(&self, text: &str) {
        self.wait_heading_not(text, None).await;
    }

    /// Like `wait_heading`, for a page whose predecessor's `h1` also contains `text`
    /// (a confirmation page names the account): waits for a heading without `gone`.
    async fn wait_heading_not(&self, text: &str, gone: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h1 = self
                .call(
                    Method::POST,
                    "/execute/sync",
                    Some(json!({
                        "script": "const h = document.querySelector('h1'); return h ? h.textContent : '';",
                        "args": []
                    })),
                )
                .await;
            if h1
                .as_str()
                .is_some_and(|h| h.contains(text) && gone.map_or(true, |g| !h.contains(g)))
            {
                return;
            }
            if Instant::now() > deadline {
                let page = self.call(Method::GET, "/source", None).await;
                panic!("no h1 with {text:?} on {}: {page}", self.url().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// axe-core on the current page: no violation of any rule; then a screenshot.
    async fn check(&self, screen: &str) {
        self.call(
            Method::POST,
            "/execute/sync",
            Some(json!({ "script": format!("{};return true;", self.axe), "args": [] })),
        )
        .await;
        let result = self
            .call(
                Method::POST,
                "/execute/async",
                Some(json!({
                    "script": "const done = arguments[arguments.length - 1];
                        axe.run(document, { resultTypes: ['violations'] })
                          .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact,
                              help: v.help, nodes: v.nodes.map(n => n.target.join(' ')) }))))
                          .catch(e => done([{ id: 'axe-error', help: String(e) }]));",
                    "args": []
                })),
            )
            .await;
        self.call(
            Method::POST,
            "/execute/sync",
            Some(json!({ "script": "window.scrollTo(0, 0); return true;", "args": [] })),
        )
        .await;
        let png = self.call(Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(screens_dir()).unwrap();
        std::fs::write(screens_dir().join(format!("{screen}.png")), bytes).unwrap();
        assert_eq!(
            result,
            json!([]),
            "axe-core violations on the {screen} screen ({})",
            self.url().await
        );
    }
}

/// A WebDriver command; `None` when the driver refuses it (e.g. a stale element).
async fn try_call(
    http: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> Option<Value> {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = http.request(req).await.ok()?;
    let ok = resp.status().is_success();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    ok.then(|| v["value"].clone())
}

async fn call(
    http: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> Value {
    let req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = http.request(req).await.expect("chromedriver answered");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert!(
        status.is_success(),
        "WebDriver {method} {uri}: {status} {v}"
    );
    v["value"].clone()
}

/// Starts chromedriver and a headless chromium session; `None` when skipping is allowed.
async fn start_browser() -> Option<(Driver, Browser)> {
    let (Some(chromedriver), Some(chromium), Some(axe)) =
        (tools::chromedriver(), tools::chromium(), tools::axe())
    else {
        return None;
    };
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = Request::get(format!("{}/status", driver.base))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(resp) = http.request(req).await {
            if resp.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1"]
        }
    }}});
    let created = call(
        &http,
        Method::POST,
        &format!("{}/session", driver.base),
        Some(caps),
    )
    .await;
    let session = format!(
        "{}/session/{}",
        driver.base,
        created["sessionId"].as_str().unwrap()
    );
    let browser = Browser {
        http,
        session,
        axe: std::fs::read_to_string(&axe).unwrap_or_else(|e| panic!("{}: {e}", axe.display())),
    };
    browser
        .call(
            Method::POST,
            "/timeouts",
            Some(json!({ "script": 30000, "pageLoad": 20000, "implicit": 0 })),
        )
        .await;
    Some((driver, browser))
}

/// The guide's Python verifier on one captured request.
fn python_verifies(secret: &str, got: &Received) -> bool {
    let path = format!("{}/tests/verifiers/verify.py", env!("CARGO_MANIFEST_DIR"));
    let items = json!([{
        "secret": secret,
        "timestamp": got.header("x-kyberaccess-timestamp"),
        "signature": got.header("x-kyberaccess-signature"),
        "body": String::from_utf8(got.body.to_vec()).unwrap(),
    }]);
    let mut child = Command::new("python3")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the guide's verifier");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(items.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap().status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_walk_in_a_real_browser() {
    let Some((_driver, b)) = start_browser().await else {
        return;
    };
    let started = Instant::now();
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let (s, acct) = eng
        .api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({ "name": "Acme Security", "plan": "starter", "id": "acme" })),
        )
        .await;
    assert!(s.is_success(), "{acct}");
    let key = acct["api_key"].as_str().unwrap().to_string();
    let base = eng.api.base.clone();

    // Sign in with the account's API key.
    b.goto(&format!("{base}/")).await;
    b.wait_heading("Sign in").await;
    b.check("login").await;
    b.type_into("API key or admin token", &key).await;
    b.click_named("Sign in").await;
    b.wait_heading("Acme Security").await;
    b.check("webhooks-empty").await;

    // Add Webhook, three steps.
    b.click_named("Add Webhook").await;
    b.wait_heading("Add Webhook").await;
    b.type_into("Name", "CRM Visitor Sync").await;
    b.type_into("Endpoint URL", "http://crm.example.com/hook")
        .await;
    b.type_into("Description", "Check-ins to the CRM").await;
    b.click_named("Next").await;
    // The HTTPS rule: the error is next to the field and the values are kept.
    let url_field = b.field("Endpoint URL").await;
    assert_eq!(b.attr(&url_field, "aria-invalid").await, "true");
    assert_eq!(
        b.prop(&url_field, "value").await,
        "http://crm.example.com/hook"
    );
    let name_field = b.field("Name").await;
    assert_eq!(b.prop(&name_field, "value").await, "CRM Visitor Sync");
    b.check("add-webhook-step1-error").await;
    b.type_into("Endpoint URL", &rx.url).await;
    b.check("add-webhook-step1").await;
    b.click_named("Next").await;
    b.wait_heading("Add Webhook").await;
    for legend in [
        "Visitor Events",
        "Security Events",
        "Emergency Events",
        "Document Events",
        "Delivery Events",
        "System Events",
    ] {
        b.named("fieldset", legend).await;
    }
    let checked_in = b.field("visitor.checked_in").await;
    b.click(&checked_in).await;
    let all_emergency = b.field("All emergency events").await;
    b.click(&all_emergency).await;
    b.check("add-webhook-step2").await;
    b.click_named("Next").await;
    let secret_field = b.field("Signing Secret").await;
    let shown_secret = b.prop(&secret_field, "value").await;
    let shown_secret = shown_secret.as_str().unwrap().to_string();
    b.field("IP Allowlist (optional)").await;
    b.button("Copy").await;
    b.check("add-webhook-step3").await;
    b.click_named("Create Webhook").await;
    b.wait_heading("CRM Visitor Sync").await;

    // The secret shown is the API's.
    let (_, list) = eng
        .api
        .admin(Method::GET, "/v1/accounts/acme/webhooks", None)
        .await;
    let hook_id = list["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        list["data"][0]["events"],
        json!(["visitor.checked_in", "emergency.*"])
    );
    let (_, secret) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{hook_id}/secret"),
            None,
        )
        .await;
    assert_eq!(secret["secret"], shown_secret.as_str());

    // Test: the receiver gets it, the guide's verifier accepts it, the page shows 200.
    let select = b.field("Event type").await;
    let option = b
        .call(
            Method::POST,
            &format!("/element/{select}/element"),
            Some(json!({ "using": "css selector", "value": "option[value='visitor.checked_in']" })),
        )
        .await[ELEMENT]
        .as_str()
        .unwrap()
        .to_string();
    b.click(&option).await;
    b.click_named("Send Test Event").await;
    let test_request = rx.next(Duration::from_secs(10)).await;
    assert_eq!(
        test_request.header("x-kyberaccess-event"),
        "visitor.checked_in"
    );
    assert!(python_verifies(&shown_secret, &test_request));
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(el) = b.find_all("#test-code").await.first() {
            break b.text(el).await;
        }
        assert!(Instant::now() < deadline, "no test result shown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, "200");
    b.check("webhook").await;

    // An ingested event appears in Deliveries; its page shows the exact request.
    eng.event(
        "acme",
        "visitor.checked_in",
        json!({ "visitor": { "first_name": "Jane", "last_name": "Smith" } }),
    )
    .await;
    let delivered = rx.next(Duration::from_secs(10)).await;
    eng.newest_delivery("acme", &hook_id, Duration::from_secs(10), |d| {
        d["status"] == "delivered" && d["note"].is_null() && d["attempt_count"] == 1
    })
    .await;
    b.click_named("Deliveries").await;
    b.named("th", "Event Type").await;
    for col in ["Timestamp", "Response Code", "Response Time", "Status"] {
        b.named("th", col).await;
    }
    b.check("deliveries").await;
    let first_row = b.find("table.deliveries tbody tr td a").await;
    b.click(&first_row).await;
    b.wait_heading("visitor.checked_in").await;
    let payload = b.find("#payload").await;
    assert_eq!(
        b.text(&payload).await,
        String::from_utf8(delivered.body.to_vec()).unwrap(),
        "the page shows the payload exactly as sent"
    );
    let page_source = b.call(Method::GET, "/source", None).await;
    let source = page_source.as_str().unwrap();
    for name in [
        "x-kyberaccess-delivery",
        "x-kyberaccess-signature",
        "x-kyberaccess-timestamp",
    ] {
        let sent = delivered.header(name);
        assert!(
            source.contains(&sent),
            "the request's {name} ({sent}) is shown"
        );
    }
    b.button("Retry").await;
    b.check("delivery").await;

    // Pause, edit, delete.
    b.click_named("Acme Security · Webhooks").await;
    b.wait_heading("Acme Security").await;
    let pause = b.button("Pause").await;
    assert_eq!(b.attr(&pause, "aria-pressed").await, "false");
    b.click(&pause).await;
    let resume = b.button("Resume").await;
    assert_eq!(b.attr(&resume, "aria-pressed").await, "true");
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{hook_id}"),
            None,
        )
        .await;
    assert_eq!(v["status"], "paused");
    b.check("webhooks").await;
    b.click_named("Edit").await;
    b.wait_heading("Edit").await;
    b.type_into("Name", "CRM Sync (EU)").await;
    b.check("edit-webhook").await;
    b.click_named("Save Changes").await;
    b.wait_heading("CRM Sync (EU)").await;
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{hook_id}"),
            None,
        )
        .await;
    assert_eq!(v["name"], "CRM Sync (EU)");
    assert_eq!(v["url"], rx.url.as_str());
    b.click_named("Delete").await;
    b.wait_heading("Delete the webhook").await;
    b.check("delete-webhook").await;
    b.click_named("Delete Webhook").await;
    b.wait_heading("Acme Security").await;
    let (s, _) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{hook_id}"),
            None,
        )
        .await;
    assert_eq!(s, http::StatusCode::NOT_FOUND);
    b.click_named("Sign out").await;
    b.wait_heading("Sign in").await;

    // The operator: admin sign-in, create an account, open it.
    b.type_into("API key or admin token", ADMIN).await;
    b.click_named("Sign in").await;
    b.wait_heading("Accounts").await;
    b.type_into("Name", "Globex Corporation").await;
    b.type_into("Account ID (optional)", "globex").await;
    let plan = b.field("Plan").await;
    let professional = b
        .call(
            Method::POST,
            &format!("/element/{plan}/element"),
            Some(json!({ "using": "css selector", "value": "option[value='professional']" })),
        )
        .await[ELEMENT]
        .as_str()
        .unwrap()
        .to_string();
    b.click(&professional).await;
    b.click_named("Create Account").await;
    b.wait_heading("Account created").await;
    let key_field = b.field("API Key").await;
    let new_key = b.prop(&key_field, "value").await;
    let (s, _) = eng
        .api
        .call(Method::GET, "/v1/accounts/globex", new_key.as_str(), None)
        .await;
    assert!(s.is_success(), "the API key shown works");
    b.check("account-created").await;
    b.click_named("Back to accounts").await;
    b.wait_heading("Accounts").await;
    b.check("accounts").await;
    b.click_named("Globex Corporation").await;
    b.wait_heading("Globex Corporation").await;
    assert!(b.heading().await.contains("Globex Corporation"));
    b.button("Add Webhook").await;
    b.call(Method::DELETE, "", None).await;
    eprintln!("browser walk took {:?}", started.elapsed());
}

/// Runs a script in the page and returns its value.
async fn script(b: &Browser, js: &str) -> Value {
    b.call(
        Method::POST,
        "/execute/sync",
        Some(json!({ "script": js, "args": [] })),
    )
    .await
}

/// The numbers drawn by a stacked chart's bars: [delivered, retrying, failed] per bar.
async fn bar_numbers(b: &Browser, chart: &str) -> Vec<[u64; 3]> {
    let v = script(
        b,
        &format!(
            "return Array.from(document.querySelectorAll('#{chart} g.bar')).map(g =>
               [g.dataset.delivered, g.dataset.retrying, g.dataset.failed].map(Number));"
        ),
    )
    .await;
    serde_json::from_value(v).unwrap()
}

/// Checks that the page's outcome chart (and, with `table`, the health table) shows what the
/// API's `path` answers, both read over the same buckets: the API is read before and after the
/// page is read, and an hour (or day) that turned in between has the page loaded again.
/// Returns the API's answer.
async fn chart_is_api(b: &Browser, eng: &TestEngine, path: &str, table: bool) -> Value {
    for _ in 0..3 {
        let (_, before) = eng.api.admin(Method::GET, path, None).await;
        let url = b.url().await;
        b.goto(&url).await;
        b.find("#chart-outcomes").await;
        let bars = bar_numbers(b, "chart-outcomes").await;
        let rows = if table {
            Some(table_numbers(b).await)
        } else {
            None
        };
        let (_, after) = eng.api.admin(Method::GET, path, None).await;
        if before["buckets"][0]["start"] != after["buckets"][0]["start"] {
            continue;
        }
        assert_eq!(bars, json_numbers(&after));
        if let Some(rows) = rows {
            assert_eq!(rows, json_numbers(&after));
        }
        return after;
    }
    panic!("the buckets of {path} moved on three times in a row");
}

/// The numbers of the health table's rows: [delivered, retrying, failed].
async fn table_numbers(b: &Browser) -> Vec<[u64; 3]> {
    let v = script(
        b,
        "return Array.from(document.querySelectorAll('#health-table tbody tr')).map(r =>
           Array.from(r.querySelectorAll('td')).slice(0, 3).map(td => Number(td.textContent)));",
    )
    .await;
    serde_json::from_value(v).unwrap()
}

fn json_numbers(v: &Value) -> Vec<[u64; 3]> {
    v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            [
                b["delivered"].as_u64().unwrap(),
                b["retrying"].as_u64().unwrap(),
                b["failed"].as_u64().unwrap(),
            ]
        })
        .collect()
}

/// Gives a webhook a day of history before now (for the screenshots): attempts per hour with
/// a failure streak a few hours ago. Written into the stopped engine's store.
fn seed_history(data: &std::path::Path, hook: u64) {
    use kyberhook::stats::{AttemptStat, Outcome, HOUR_MS};
    let store = kyberhook::store::embedded::SledStore::open(data, false).unwrap();
    let now = kyberhook::model::now_ms();
    let mut stats = Vec::new();
    for h in 1..24u64 {
        let at = now - h * HOUR_MS;
        let n = 30 + (h * 37 % 50);
        for i in 0..n {
            let outcome = match (h, i % 10) {
                (5..=7, 0..=5) => Outcome::Retrying,
                (6, 6) => Outcome::Failed,
                _ => Outcome::Delivered,
            };
            stats.push(AttemptStat {
                webhook: kyberhook::ids::WebhookId(hook),
                at_ms: at,
                outcome,
                response_time_ms: 40 + (i * 13 % 90) + if (5..=7).contains(&h) { 400 } else { 0 },
            });
        }
    }
    store.add_stats(&stats).unwrap();
    store.make_durable().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charts_overview_and_log_search_in_a_real_browser() {
    let Some((_driver, b)) = start_browser().await else {
        return;
    };
    let pki = pki();
    let mut eng = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (_, key) = eng.account("acme", "professional").await;
    let good = Receiver::start(pki.server.clone()).await;
    let bad = Receiver::start(pki.server.clone()).await;
    bad.set_default(Reply::Status(503));
    let (_, v) = eng
        .api
        .admin(
            Method::POST,
            "/v1/accounts/acme/webhooks",
            Some(json!({"name": "CRM Visitor Sync", "url": good.url, "events": ["*"]})),
        )
        .await;
    let hook = v["id"].as_str().unwrap().to_string();
    let (_, v) = eng
        .api
        .admin(
            Method::POST,
            "/v1/accounts/acme/webhooks",
            Some(json!({"name": "Slack Notifications", "url": bad.url, "events": ["visitor.*"]})),
        )
        .await;
    let bad_hook = v["id"].as_str().unwrap().to_string();
    // A day of history for the good webhook, written while the engine is stopped.
    eng.engine.take().unwrap().shutdown().await;
    let raw = u64::from_str_radix(hook.trim_start_matches("wh_"), 16).unwrap();
    seed_history(&eng.config.storage.path, raw);
    eng.engine = Some(kyberhook::Engine::start(eng.config.clone()).await.unwrap());
    eng.api = Api::new(eng.engine.as_ref().unwrap().api_addr());
    let base = eng.api.base.clone();

    let mut event_ids = Vec::new();
    for i in 0..4 {
        event_ids.push(
            eng.event(
                "acme",
                "visitor.checked_in",
                json!({ "visitor": { "n": i } }),
            )
            .await,
        );
    }
    good.wait_for(4, Duration::from_secs(10)).await;
    bad.wait_for(4, Duration::from_secs(10)).await;
    let stats_path = format!("/v1/accounts/acme/webhooks/{hook}/stats");
    eng.poll(&stats_path, Duration::from_secs(10), |v| {
        v["buckets"][23]["delivered"] == 4
    })
    .await;
    eng.poll(
        &format!("/v1/accounts/acme/webhooks/{bad_hook}/stats"),
        Duration::from_secs(10),
        |v| v["buckets"][23]["retrying"] == 4,
    )
    .await;

    b.goto(&format!("{base}/ui/login")).await;
    b.wait_heading("Sign in").await;
    b.type_into("API key or admin token", &key).await;
    b.click_named("Sign in").await;
    b.wait_heading("acme").await;
    // The list: rates, sparklines, the failing webhook marked.
    b.named("th", "Success (24 h)").await;
    let marks = script(
        &b,
        "return Array.from(document.querySelectorAll('.flag')).map(e => e.textContent);",
    )
    .await;
    assert_eq!(marks, json!(["Failing: the last 4 attempts failed"]));
    b.check("webhooks-health").await;

    // The webhook's charts: the bars, the table and the API say the same; this hour's
    // deliveries are the delivery log's.
    b.click_named("CRM Visitor Sync").await;
    b.wait_heading("CRM Visitor Sync").await;
    let chart = b.named("svg", "Attempts by outcome, last 24 hours").await;
    assert_eq!(b.attr(&chart, "role").await, "img");
    let day = chart_is_api(&b, &eng, &stats_path, true).await;
    let (_, log) = eng
        .api
        .admin(
            Method::GET,
            &format!(
                "/v1/accounts/acme/webhooks/{hook}/deliveries?status=delivered&since={}",
                day["buckets"][23]["start"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(count(&log) as u64, json_numbers(&day)[23][0]);
    b.named("svg", "Endpoint response time, last 24 hours")
        .await;
    b.check("webhook-health").await;
    b.click_named("Last 7 days").await;
    b.named("svg", "Attempts by outcome, last 7 days").await;
    chart_is_api(&b, &eng, &format!("{stats_path}?window=7d"), true).await;
    b.check("webhook-health-7d").await;

    // Search the log by event id from the Deliveries tab.
    b.click_named("Deliveries").await;
    b.named("th", "Event Type").await;
    b.type_into("Event ID", &event_ids[2]).await;
    b.click_named("Apply filters").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = b.find_all("table.deliveries tbody tr").await.len();
        if n == 1 && b.url().await.contains("event_id=") {
            break;
        }
        assert!(Instant::now() < deadline, "the filtered log shows {n} rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.check("deliveries-search").await;

    // The failing webhook says since when; the edit form offers the signature scheme.
    b.goto(&format!("{base}/ui/a/acme/webhooks/{bad_hook}"))
        .await;
    b.wait_heading("Slack Notifications").await;
    chart_is_api(
        &b,
        &eng,
        &format!("/v1/accounts/acme/webhooks/{bad_hook}/stats"),
        false,
    )
    .await;
    let verdict = b.find("#health-verdict").await;
    assert!(b.text(&verdict).await.starts_with("Failing since"));
    b.check("webhook-health-failing").await;
    b.click_named("Edit").await;
    b.wait_heading("Edit").await;
    b.field("Signature Scheme").await;
    b.check("edit-webhook-scheme").await;
    b.goto(&format!("{base}/ui/a/acme/webhooks")).await;
    b.wait_heading("acme").await;
    b.click_named("Sign out").await;
    b.wait_heading("Sign in").await;

    // The operator: the overview, then a plan change and a key rotation.
    b.type_into("API key or admin token", ADMIN).await;
    b.click_named("Sign in").await;
    b.wait_heading("Accounts").await;
    b.click_named("Overview").await;
    b.wait_heading("Overview").await;
    let (_, stats) = eng.api.admin(Method::GET, "/v1/admin/stats", None).await;
    let active = b.find("#fig-active").await;
    assert_eq!(
        b.text(&active).await,
        stats["webhooks"]["active"].to_string()
    );
    let waiting = b.find("#fig-backlog").await;
    assert_eq!(
        b.text(&waiting).await,
        stats["backlog"]["total"].to_string()
    );
    b.named("svg", "Events and deliveries per second, last hour")
        .await;
    b.check("overview").await;
    b.click_named("Accounts").await;
    b.wait_heading("Accounts").await;
    b.click_named("Manage acme").await;
    b.wait_heading("acme").await;
    let plan = b.field("New plan").await;
    let enterprise = b
        .call(
            Method::POST,
            &format!("/element/{plan}/element"),
            Some(json!({ "using": "css selector", "value": "option[value='enterprise']" })),
        )
        .await[ELEMENT]
        .as_str()
        .unwrap()
        .to_string();
    b.click(&enterprise).await;
    b.check("account").await;
    b.click_named("Review Plan Change").await;
    b.wait_heading("Change the plan").await;
    b.check("confirm-plan").await;
    b.click_named("Change Plan").await;
    b.wait_heading_not("acme", Some("Change the plan")).await;
    let (_, acct) = eng.api.admin(Method::GET, "/v1/accounts/acme", None).await;
    assert_eq!(acct["plan"], "enterprise");
    b.click_named("Rotate API Key").await;
    b.wait_heading("Rotate the API key").await;
    b.click_named("Rotate API Key").await;
    b.wait_heading("New API key").await;
    let field = b.field("API Key").await;
    let new_key = b.prop(&field, "value").await;
    let (s, _) = eng
        .api
        .call(Method::GET, "/v1/accounts/acme", new_key.as_str(), None)
        .await;
    assert!(s.is_success());
    let (s, _) = eng
        .api
        .call(Method::GET, "/v1/accounts/acme", Some(key.as_str()), None)
        .await;
    assert_eq!(s, http::StatusCode::UNAUTHORIZED);
    b.check("api-key").await;
    b.call(Method::DELETE, "", None).await;
    eng.stop().await;
}
