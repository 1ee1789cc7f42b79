//! The dashboard without a browser: security headers, the session cookie, CSRF refusal, session
//! expiry and logout, the sign-in limit, escaping of tenant- and endpoint-written text, scoping,
//! and the Add Webhook steps as plain form posts against the real server and a real HTTPS
//! receiver.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kyberhook::config::Config;
use serde_json::json;

/// A cookie-keeping form client that does not follow redirects.
pub(crate) struct Browser {
    base: String,
    host: String,
    cookie: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    headers: HeaderMap,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    /// The session's CSRF token, from the first form that carries it.
    pub(crate) fn csrf(&self) -> String {
        let marker = "name=\"_csrf\" value=\"";
        let start = self.body.find(marker).expect("a form with a CSRF token") + marker.len();
        self.body[start..].split('"').next().unwrap().to_string()
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Browser {
    pub(crate) fn new(api: &Api) -> Browser {
        Browser {
            host: api.base.trim_start_matches("http://").to_string(),
            base: api.base.clone(),
            cookie: None,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn send(&mut self, req: http::request::Builder, body: Vec<u8>) -> Answer {
        let mut req = req;
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("kh_session={c}"));
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .expect("the server answered");
        let status = resp.status();
        let headers = resp.headers().clone();
        if let Some(set) = headers.get("set-cookie").and_then(|v| v.to_str().ok()) {
            let value = set
                .split(';')
                .next()
                .and_then(|kv| kv.split_once('='))
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            self.cookie = (!value.is_empty()).then_some(value);
        }
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Answer {
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path}", self.base));
        self.send(req, Vec::new()).await
    }

    /// A same-origin form POST, as a browser sends it.
    pub(crate) async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let origin = format!("http://{}", self.host);
        self.post_with(
            path,
            fields,
            &[("origin", &origin), ("sec-fetch-site", "same-origin")],
        )
        .await
    }

    async fn post_with(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Answer {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req, body.into_bytes()).await
    }

    /// Takes the session of `other` (the same browser, talking to another node).
    pub(crate) fn cookie_from(&mut self, other: &Browser) {
        self.cookie = other.cookie.clone();
    }

    pub(crate) async fn sign_in(&mut self, key: &str) -> Answer {
        let a = self.post("/ui/login", &[("key", key)]).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "sign-in: {}", a.body);
        a
    }
}

async fn engine_with(pki: &Pki, tweak: impl FnOnce(&mut Config)) -> TestEngine {
    let data = tempfile::tempdir().unwrap();
    let toml = config_toml(
        data.path(),
        &pki.ca_file,
        "retry_schedule = [\"500ms\", \"1s\"]",
        "",
    );
    let mut config = Config::from_toml(&toml, "test").unwrap();
    tweak(&mut config);
    TestEngine::start_with(config, data).await
}

fn assert_secure_headers(a: &Answer) {
    let csp = a.header("content-security-policy");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("style-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(a.header("x-content-type-options"), "nosniff");
    assert_eq!(a.header("referrer-policy"), "same-origin");
}

#[tokio::test]
async fn headers_cookie_flags_and_bearer_only_v1() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let mut b = Browser::new(&eng.api);

    let root = b.get("/").await;
    assert!(root.status.is_redirection());
    assert_eq!(root.location(), "/ui/");
    let home = b.get("/ui/").await;
    assert_eq!(home.status, StatusCode::SEE_OTHER);
    assert_eq!(home.location(), "/ui/login");
    assert_secure_headers(&home);

    let login = b.get("/ui/login").await;
    assert_eq!(login.status, StatusCode::OK);
    assert_secure_headers(&login);
    assert!(login.header("content-type").starts_with("text/html"));
    assert!(login.body.contains("type=\"password\""));
    assert!(!login.body.contains("<script>"), "no inline script");
    assert!(!login.body.contains("style="), "no inline style");

    // The stylesheet: versioned path, cached for good; a wrong version is not served.
    let css_path = login
        .body
        .split("href=\"")
        .find_map(|s| s.split('"').next().filter(|p| p.ends_with("app.css")))
        .unwrap()
        .to_string();
    let css = b.get(&css_path).await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.header("cache-control").contains("immutable"));
    assert!(css.header("content-type").starts_with("text/css"));
    assert_eq!(
        b.get("/ui/static/000000000000/app.css").await.status,
        StatusCode::NOT_FOUND
    );

    let signed = b.sign_in(&key).await;
    let set_cookie = signed.header("set-cookie").to_string();
    assert!(set_cookie.starts_with("kh_session="), "{set_cookie}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(set_cookie.contains(flag), "{set_cookie} lacks {flag}");
    }
    assert!(!set_cookie.contains("Secure"), "no TLS: no Secure flag");
    let home = b.get("/ui/").await;
    assert_eq!(home.location(), "/ui/a/acme/webhooks");
    let page = b.get("/ui/a/acme/webhooks").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_secure_headers(&page);
    assert_eq!(page.header("cache-control"), "no-store");
    assert!(page.body.contains("Add Webhook"));
    assert!(page.body.contains("starter"));

    // /v1 never accepts the cookie.
    let cookie = b.cookie.clone().unwrap();
    let req = Request::get(format!("{}/v1/accounts/acme", eng.api.base))
        .header("cookie", format!("kh_session={cookie}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn cookie_is_secure_when_the_api_serves_tls() {
    let pki = pki();
    let eng = engine_with(&pki, |c| {
        c.server.tls_cert = Some(pki.cert_file.clone());
        c.server.tls_key = Some(pki.key_file.clone());
    })
    .await;
    // The dashboard over HTTPS, with a client trusting the test CA.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&pki.ca_file) {
        roots.add(cert).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let port = eng.api.base.rsplit(':').next().unwrap().to_string();
    let req = Request::post(format!("https://localhost:{port}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(format!("key={ADMIN}"))))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
}

fn rustls_pemfile_certs(path: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn forged_cross_site_posts_are_refused_and_change_nothing() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let hook = eng.webhook("acme", &rx.url, &["visitor.checked_in"]).await;
    let id = hook["id"].as_str().unwrap().to_string();
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let csrf = b.get("/ui/a/acme/webhooks").await.csrf();
    let pause = format!("/ui/a/acme/webhooks/{id}/status");
    let delete = format!("/ui/a/acme/webhooks/{id}/delete");

    // No token, a wrong token, a cross-site Origin, a cross-site Sec-Fetch-Site: all 403.
    let refused = [
        b.post(&pause, &[("status", "paused")]).await,
        b.post(&pause, &[("status", "paused"), ("_csrf", "0000")])
            .await,
        b.post_with(
            &pause,
            &[("status", "paused"), ("_csrf", &csrf)],
            &[("origin", "https://evil.example")],
        )
        .await,
        b.post_with(
            &delete,
            &[("_csrf", &csrf)],
            &[("sec-fetch-site", "cross-site")],
        )
        .await,
        b.post_with(&delete, &[("_csrf", &csrf)], &[("origin", "null")])
            .await,
        b.post_with(
            &delete,
            &[("_csrf", &csrf)],
            &[("sec-fetch-site", "same-site"), ("origin", "null")],
        )
        .await,
    ];
    for a in &refused {
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
        assert_secure_headers(a);
    }
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(v["status"], "active", "nothing changed");

    // A GET never changes state: the delete "link" only asks for confirmation.
    let confirm = b.get(&delete).await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm
        .body
        .contains("All delivery history for this webhook is also deleted"));
    let (s, _) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // The same forms, same-origin with the token, work.
    let ok = b
        .post(&pause, &[("status", "paused"), ("_csrf", &csrf)])
        .await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(v["status"], "paused");
    let home = b.get("/ui/a/acme/webhooks").await;
    assert!(home.body.contains("aria-pressed=\"true\""), "{}", home.body);
    assert!(home.body.contains("Resume"));
    assert!(home.body.contains("Paused"));
    let ok = b.post(&delete, &[("_csrf", &csrf)]).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    let (s, _) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sessions_expire_when_idle_and_end_at_logout() {
    let pki = pki();
    let eng = engine_with(&pki, |c| {
        c.ui.session_idle = Duration::from_millis(400);
    })
    .await;
    let (_, key) = eng.account("acme", "starter").await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    assert_eq!(b.get("/ui/a/acme/webhooks").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired = b.get("/ui/a/acme/webhooks").await;
    assert_eq!(expired.status, StatusCode::SEE_OTHER);
    assert_eq!(expired.location(), "/ui/login");

    // Logout is a POST that ends the session server-side and clears the cookie.
    b.sign_in(&key).await;
    let page = b.get("/ui/a/acme/webhooks").await;
    let old = b.cookie.clone().unwrap();
    let out = b.post("/ui/logout", &[("_csrf", &page.csrf())]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(out.header("set-cookie").contains("Max-Age=0"));
    b.cookie = Some(old);
    assert_eq!(
        b.get("/ui/a/acme/webhooks").await.location(),
        "/ui/login",
        "the old cookie no longer works"
    );
    assert_eq!(
        b.get("/ui/logout").await.status,
        StatusCode::SEE_OTHER,
        "GET logout changes nothing: it needs a session, which is gone"
    );

    // A rotated API key ends the account's sessions.
    b.cookie = None;
    b.sign_in(&key).await;
    assert_eq!(b.get("/ui/a/acme/webhooks").await.status, StatusCode::OK);
    let (s, _) = eng
        .api
        .admin(Method::POST, "/v1/accounts/acme/api-key", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b.get("/ui/a/acme/webhooks").await.location(), "/ui/login");
}

#[tokio::test]
async fn failed_sign_ins_are_rate_limited() {
    let pki = pki();
    let eng = engine_with(&pki, |c| {
        c.ui.login_attempts_per_minute = 3;
    })
    .await;
    let (_, key) = eng.account("acme", "starter").await;
    let mut b = Browser::new(&eng.api);
    for _ in 0..3 {
        let a = b.post("/ui/login", &[("key", "khk_wrong")]).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert!(a.body.contains("not accepted"));
        assert!(b.cookie.is_none());
    }
    let limited = b.post("/ui/login", &[("key", "khk_wrong")]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert_secure_headers(&limited);
    // While limited, even the right key is not tried.
    let right = b.post("/ui/login", &[("key", &key)]).await;
    assert_eq!(right.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(b.cookie.is_none());
}

#[tokio::test]
async fn tenant_and_endpoint_text_is_escaped() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    rx.set_default(Reply::Html(200, "<img src=x onerror=alert(2)><b>hello</b>"));
    let (s, hook) = eng
        .api
        .admin(
            Method::POST,
            "/v1/accounts/acme/webhooks",
            Some(json!({
                "name": "<script>alert(1)</script>",
                "url": rx.url,
                "description": "\"><svg onload=alert(3)>",
                "events": ["visitor.checked_in"],
            })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let id = hook["id"].as_str().unwrap().to_string();
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let home = b.get("/ui/a/acme/webhooks").await;
    assert!(!home.body.contains("<script>alert(1)"), "{}", home.body);
    assert!(home.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));

    // A test send: the endpoint's HTML answer is shown as text.
    let page = b.get(&format!("/ui/a/acme/webhooks/{id}")).await;
    assert!(!page.body.contains("<svg onload"), "description escaped");
    let sent = b
        .post(
            &format!("/ui/a/acme/webhooks/{id}/test"),
            &[("_csrf", &page.csrf()), ("event", "visitor.checked_in")],
        )
        .await;
    assert_eq!(sent.status, StatusCode::SEE_OTHER, "{}", sent.body);
    let result = b.get(sent.location()).await;
    assert_eq!(result.status, StatusCode::OK);
    assert!(
        result.body.contains("id=\"test-code\">200<"),
        "{}",
        result.body
    );
    assert!(!result.body.contains("<img src=x"), "{}", result.body);
    assert!(result
        .body
        .contains("&lt;img src=x onerror=alert(2)&gt;&lt;b&gt;hello&lt;/b&gt;"));
    let delivery = result
        .body
        .split("href=\"")
        .find_map(|s| {
            s.split('"')
                .next()
                .filter(|p| p.contains("/deliveries/dlv_"))
        })
        .unwrap()
        .to_string();
    let detail = b.get(&delivery).await;
    assert_eq!(detail.status, StatusCode::OK);
    assert!(!detail.body.contains("<img src=x"));
    assert!(detail.body.contains("&lt;b&gt;hello&lt;/b&gt;"));
}

#[tokio::test]
async fn add_webhook_steps_keep_values_and_create_with_the_shown_secret() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let step1 = b.get("/ui/a/acme/webhooks/new").await;
    assert_eq!(step1.status, StatusCode::OK);
    for label in ["Name", "Endpoint URL", "Description", "Next", "HTTPS"] {
        assert!(step1.body.contains(label), "step 1 lacks {label}");
    }
    let csrf = step1.csrf();

    // An http:// URL is refused next to its field, and the values stay.
    let bad = b
        .post(
            "/ui/a/acme/webhooks/new",
            &[
                ("_csrf", &csrf),
                ("name", "CRM Visitor Sync"),
                ("url", "http://example.com/hook"),
                ("description", "visits"),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad.body.contains("id=\"url-error\""), "{}", bad.body);
    assert!(bad.body.contains("must use https://"));
    assert!(bad.body.contains("value=\"CRM Visitor Sync\""));
    assert!(bad.body.contains("value=\"http://example.com/hook\""));

    let fields = [
        ("_csrf", csrf.as_str()),
        ("name", "CRM Visitor Sync"),
        ("url", rx.url.as_str()),
        ("description", "visits"),
    ];
    let step2 = b.post("/ui/a/acme/webhooks/new", &fields).await;
    assert_eq!(step2.status, StatusCode::OK, "{}", step2.body);
    for legend in [
        "Visitor Events",
        "Security Events",
        "Emergency Events",
        "Document Events",
        "Delivery Events",
        "System Events",
    ] {
        assert!(
            step2.body.contains(&format!("<legend>{legend}</legend>")),
            "{legend}"
        );
    }
    assert!(step2.body.contains("value=\"emergency.*\""));
    let none = b.post("/ui/a/acme/webhooks/new/events", &fields).await;
    assert_eq!(none.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(none.body.contains("Choose at least one event"));

    let mut with_events = fields.to_vec();
    with_events.push(("events", "visitor.checked_in"));
    with_events.push(("events", "emergency.*"));
    let step3 = b.post("/ui/a/acme/webhooks/new/events", &with_events).await;
    assert_eq!(step3.status, StatusCode::OK, "{}", step3.body);
    assert_eq!(step3.header("cache-control"), "no-store");
    assert!(step3.body.contains("Signing Secret"));
    assert!(step3.body.contains("IP Allowlist (optional)"));
    let marker = "id=\"signing-secret\" value=\"";
    let start = step3.body.find(marker).unwrap() + marker.len();
    let secret = step3.body[start..].split('"').next().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));

    // A secret the engine did not mint is refused.
    let mut forged = with_events.clone();
    forged.push(("secret", "whsec_chosen-by-someone"));
    forged.push(("ip_allowlist", ""));
    let refused = b.post("/ui/a/acme/webhooks/new/security", &forged).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);

    let mut create = with_events.clone();
    create.push(("secret", &secret));
    create.push(("ip_allowlist", "127.0.0.0/8"));
    let created = b.post("/ui/a/acme/webhooks/new/security", &create).await;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", created.body);
    let id = created.location().rsplit('/').next().unwrap().to_string();
    let (_, api_secret) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}/secret"),
            None,
        )
        .await;
    assert_eq!(
        api_secret["secret"],
        secret.as_str(),
        "the secret shown is the one used"
    );
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(v["events"], json!(["visitor.checked_in", "emergency.*"]));
    assert_eq!(v["ip_allowlist"], json!(["127.0.0.0/8"]));
    let page = b.get(created.location()).await;
    assert!(page.body.contains("was created"), "a one-shot notice");
    assert!(!b.get(created.location()).await.body.contains("was created"));
}

#[tokio::test]
async fn accounts_see_only_themselves_and_the_operator_sees_all() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    eng.account("globex", "starter").await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    assert_eq!(
        b.get("/ui/a/globex/webhooks").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(b.get("/ui/accounts").await.status, StatusCode::NOT_FOUND);

    let mut op = Browser::new(&eng.api);
    op.sign_in(ADMIN).await;
    assert_eq!(op.get("/ui/").await.location(), "/ui/accounts");
    let list = op.get("/ui/accounts").await;
    assert!(list.body.contains("globex") && list.body.contains("acme"));
    let created = op
        .post(
            "/ui/accounts",
            &[
                ("_csrf", &list.csrf()),
                ("name", "Initech"),
                ("id", "initech"),
                ("plan", "professional"),
            ],
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.header("cache-control"), "no-store");
    let marker = "id=\"api-key\" value=\"";
    let start = created.body.find(marker).unwrap() + marker.len();
    let new_key = created.body[start..].split('"').next().unwrap().to_string();
    let (s, _) = eng
        .api
        .call(Method::GET, "/v1/accounts/initech", Some(&new_key), None)
        .await;
    assert_eq!(s, StatusCode::OK, "the key shown works");
    assert_eq!(
        op.get("/ui/a/initech/webhooks").await.status,
        StatusCode::OK
    );
    let confirm = op.get("/ui/accounts/initech/delete").await;
    assert!(confirm.body.contains("delivery history"));
    let deleted = op
        .post("/ui/accounts/initech/delete", &[("_csrf", &list.csrf())])
        .await;
    assert_eq!(deleted.status, StatusCode::SEE_OTHER);
    let (s, _) = eng
        .api
        .admin(Method::GET, "/v1/accounts/initech", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn regenerate_secret_is_a_confirmed_post_that_shows_the_new_secret_once() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let hook = eng.webhook("acme", &rx.url, &["visitor.checked_in"]).await;
    let id = hook["id"].as_str().unwrap().to_string();
    let old = hook["secret"].as_str().unwrap().to_string();
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let path = format!("/ui/a/acme/webhooks/{id}/secret/regenerate");
    let confirm = b.get(&path).await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm.body.contains("Regenerate Secret"));
    let secret_now = |v: serde_json::Value| v["secret"].as_str().unwrap().to_string();
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}/secret"),
            None,
        )
        .await;
    assert_eq!(secret_now(v), old, "the confirmation page changed nothing");

    // The grace period goes through the API's rule (0 to 7 days).
    let refused = b
        .post(&path, &[("_csrf", &confirm.csrf()), ("grace_period", "8d")])
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let shown = b
        .post(&path, &[("_csrf", &confirm.csrf()), ("grace_period", "0s")])
        .await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.body);
    assert_eq!(shown.header("cache-control"), "no-store");
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}/secret"),
            None,
        )
        .await;
    let new = secret_now(v);
    assert_ne!(new, old);
    assert!(shown.body.contains(&format!("value=\"{new}\"")));
}

#[tokio::test]
async fn deliveries_tab_filters_and_pages_with_cursors() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "enterprise").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let hook = eng
        .webhook(
            "acme",
            &rx.url,
            &["visitor.checked_in", "visitor.checked_out"],
        )
        .await;
    let id = hook["id"].as_str().unwrap().to_string();
    for i in 0..26 {
        eng.event("acme", "visitor.checked_in", json!({ "n": i }))
            .await;
    }
    eng.event("acme", "visitor.checked_out", json!({})).await;
    rx.wait_for(27, Duration::from_secs(20)).await;
    eng.poll(
        &format!("/v1/accounts/acme/webhooks/{id}/deliveries?status=delivered&limit=100"),
        Duration::from_secs(10),
        |v| count(v) == 27,
    )
    .await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let tab = format!("/ui/a/acme/webhooks/{id}/deliveries");
    let rows = |a: &Answer| a.body.matches("/ui/a/acme/deliveries/dlv_").count();
    let first = b.get(&tab).await;
    assert_eq!(first.status, StatusCode::OK);
    for col in [
        "Event Type",
        "Timestamp",
        "Response Code",
        "Response Time",
        "Status",
    ] {
        assert!(first.body.contains(&format!(">{col}</th>")), "{col}");
    }
    assert_eq!(rows(&first), 25);
    assert!(first.body.contains("visitor.checked_out"), "newest first");
    let next = first
        .body
        .split("href=\"")
        .find_map(|s| s.split('"').next().filter(|p| p.contains("cursor=")))
        .expect("a Next page link")
        .replace("&amp;", "&");
    let second = b.get(&next).await;
    assert_eq!(rows(&second), 2);
    assert!(second.body.contains("First page"));
    assert!(
        !second.body.contains("cursor=dlv"),
        "no next page after the last"
    );

    // Filters: the form's empty fields are ignored, datetime-local times are UTC.
    let by_event = b
        .get(&format!(
            "{tab}?status=&event=visitor.checked_out&since=&until="
        ))
        .await;
    assert_eq!(rows(&by_event), 1);
    let failed = b.get(&format!("{tab}?status=failed")).await;
    assert_eq!(rows(&failed), 0);
    assert!(failed.body.contains("No deliveries match"));
    let future = b.get(&format!("{tab}?since=2999-01-01T00:00")).await;
    assert_eq!(rows(&future), 0);
    let past = b.get(&format!("{tab}?until=2000-01-01T00:00:00")).await;
    assert_eq!(rows(&past), 0);
    let all = b.get(&format!("{tab}?since=2000-01-01T00:00")).await;
    assert_eq!(rows(&all), 25);
    let bad = b.get(&format!("{tab}?since=yesterday")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("RFC 3339"));
}

#[tokio::test]
async fn at_the_plans_maximum_add_webhook_is_replaced_by_a_note() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    for _ in 0..2 {
        eng.webhook("acme", &rx.url, &["visitor.checked_in"]).await;
    }
    let home = b.get("/ui/a/acme/webhooks").await;
    assert!(home.body.contains("href=\"/ui/a/acme/webhooks/new\""));
    assert!(home
        .body
        .contains("<strong>2</strong> of <strong>3</strong>"));
    assert!(home.body.contains("Events per second: <strong>10</strong>"));
    // The last step of a flow started below the limit meets the limit: the domain rule refuses.
    let csrf = home.csrf();
    eng.webhook("acme", &rx.url, &["visitor.checked_in"]).await;
    let refused = b
        .post(
            "/ui/a/acme/webhooks/new/security",
            &[
                ("_csrf", csrf.as_str()),
                ("name", "Fourth"),
                ("url", rx.url.as_str()),
                ("description", ""),
                ("events", "visitor.checked_in"),
                (
                    "secret",
                    "whsec_9a6cc444815170422c29c90f0b285d129f3ac3a3885ae6e9d46e241f49c8ddb1",
                ),
                ("ip_allowlist", ""),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused
        .body
        .contains("the starter plan allows at most 3 webhooks"));
    let full = b.get("/ui/a/acme/webhooks").await;
    assert!(
        !full.body.contains("href=\"/ui/a/acme/webhooks/new\""),
        "no Add Webhook"
    );
    assert!(full
        .body
        .contains("The starter plan allows 3 webhooks, and all are in use."));
}

#[tokio::test]
async fn the_webhook_page_shows_its_delivery_order_and_the_edit_form_changes_it() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let hook = eng
        .webhook("acme", "https://127.0.0.1:9/hook", &["visitor.checked_in"])
        .await;
    let id = hook["id"].as_str().unwrap().to_string();
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let page = b.get(&format!("/ui/a/acme/webhooks/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("Delivery Order"), "{}", page.body);
    assert!(page.body.contains("As they come due (none)"));

    let edit_path = format!("/ui/a/acme/webhooks/{id}/edit");
    let form = b.get(&edit_path).await;
    assert!(
        form.body.contains(r#"<option value="none" selected>"#),
        "{}",
        form.body
    );
    let csrf = form.csrf();
    let fields = |ordering: &'static str| {
        vec![
            ("_csrf", csrf.clone()),
            ("name", "hook".to_string()),
            ("url", "https://127.0.0.1:9/hook".to_string()),
            ("description", String::new()),
            ("events", "visitor.checked_in".to_string()),
            ("ordering", ordering.to_string()),
        ]
    };
    // A value the select does not offer is refused with the API's rule, and shown again.
    let bad = fields("sometimes");
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let refused = b.post(&edit_path, &bad).await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.body
    );
    assert!(
        refused
            .body
            .contains("is not &quot;none&quot; or &quot;fifo&quot;"),
        "{}",
        refused.body
    );
    let good = fields("fifo");
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let saved = b.post(&edit_path, &good).await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(v["ordering"], "fifo");
    let page = b.get(&format!("/ui/a/acme/webhooks/{id}")).await;
    assert!(page.body.contains("One at a time, in event order (fifo)"));
    let form = b.get(&edit_path).await;
    assert!(form.body.contains(r#"<option value="fifo" selected>"#));

    // The Add Webhook steps offer it too (last step, next to the IP allowlist).
    let step1 = b.get("/ui/a/acme/webhooks/new").await;
    let csrf = step1.csrf();
    let mut fields = vec![
        ("_csrf", csrf.as_str()),
        ("name", "Ordered"),
        ("url", "https://127.0.0.1:9/other"),
        ("description", ""),
        ("events", "visitor.checked_in"),
    ];
    let step3 = b.post("/ui/a/acme/webhooks/new/events", &fields).await;
    assert_eq!(step3.status, StatusCode::OK, "{}", step3.body);
    assert!(step3.body.contains(r#"<option value="none" selected>"#));
    let marker = "id=\"signing-secret\" value=\"";
    let start = step3.body.find(marker).unwrap() + marker.len();
    let secret = step3.body[start..].split('"').next().unwrap().to_string();
    fields.extend([
        ("secret", secret.as_str()),
        ("ip_allowlist", "not-a-cidr"),
        ("ordering", "fifo"),
    ]);
    // Shown again with an error: the choice is kept.
    let again = b.post("/ui/a/acme/webhooks/new/security", &fields).await;
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(again.body.contains(r#"<option value="fifo" selected>"#));
    fields.retain(|(k, _)| *k != "ip_allowlist");
    let created = b.post("/ui/a/acme/webhooks/new/security", &fields).await;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", created.body);
    let new_id = created.location().rsplit('/').next().unwrap().to_string();
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{new_id}"),
            None,
        )
        .await;
    assert_eq!(v["ordering"], "fifo");
}

/// The numbers of the health table's body rows: (delivered, retrying, failed) per row.
fn health_rows(body: &str) -> Vec<(u64, u64, u64)> {
    let table = body
        .split("id=\"health-table\"")
        .nth(1)
        .expect("the health table")
        .split("<tbody>")
        .nth(1)
        .unwrap()
        .split("</tbody>")
        .next()
        .unwrap();
    table
        .split("<tr>")
        .skip(1)
        .map(|row| {
            let cells: Vec<u64> = row
                .split("<td>")
                .skip(1)
                .take(3)
                .map(|c| c.split('<').next().unwrap().parse().unwrap())
                .collect();
            (cells[0], cells[1], cells[2])
        })
        .collect()
}

#[tokio::test]
async fn health_charts_and_the_webhook_list_show_the_api_s_numbers() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (_, key) = eng.account("acme", "enterprise").await;
    let good = Receiver::start(pki.server.clone()).await;
    let bad = Receiver::start(pki.server.clone()).await;
    bad.set_default(Reply::Status(500));
    let ok_hook = eng.webhook("acme", &good.url, &["*"]).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad_hook = eng.webhook("acme", &bad.url, &["*"]).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 0..3 {
        eng.event("acme", "visitor.checked_in", json!({ "n": i }))
            .await;
    }
    let sum = |v: &serde_json::Value, f: &str| {
        v["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[f].as_u64().unwrap())
            .sum::<u64>()
    };
    let ok_json = eng
        .poll(
            &format!("/v1/accounts/acme/webhooks/{ok_hook}/stats"),
            Duration::from_secs(10),
            |v| sum(v, "delivered") == 3,
        )
        .await;
    let bad_json = eng
        .poll(
            &format!("/v1/accounts/acme/webhooks/{bad_hook}/stats"),
            Duration::from_secs(10),
            |v| sum(v, "retrying") == 3,
        )
        .await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;

    let page = b.get(&format!("/ui/a/acme/webhooks/{ok_hook}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_secure_headers(&page);
    assert!(!page.body.contains("style="), "no inline style (CSP)");
    assert!(page.body.contains("role=\"img\" id=\"chart-outcomes\""));
    assert!(page
        .body
        .contains("aria-labelledby=\"chart-outcomes-t\" aria-describedby=\"chart-outcomes-d\""));
    assert!(page.body.contains("role=\"img\" id=\"chart-latency\""));
    assert!(page
        .body
        .contains("3 delivered, 0 retrying and 0 failed in the last 24 hours"));
    assert!(page.body.contains("Healthy now: 100.0 % of 3 attempts"));
    let rows = health_rows(&page.body);
    let from_json: Vec<(u64, u64, u64)> = ok_json["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["delivered"].as_u64().unwrap(),
                b["retrying"].as_u64().unwrap(),
                b["failed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, from_json, "the table is the API's buckets");
    // Each bar carries its numbers too.
    let last = &ok_json["buckets"][23];
    assert!(page.body.contains(&format!(
        "data-delivered=\"{}\" data-retrying=\"0\" data-failed=\"0\"",
        last["delivered"]
    )));
    assert!(page.body.contains(&format!("{} ms</td>", last["p95_ms"])));

    let failing = b
        .get(&format!("/ui/a/acme/webhooks/{bad_hook}?window=7d"))
        .await;
    assert_eq!(failing.status, StatusCode::OK);
    assert!(
        failing.body.contains("Failing since"),
        "the verdict says since when"
    );
    assert!(failing
        .body
        .contains("<a href=\"/ui/a/acme/webhooks/".to_string().as_str()));
    assert!(failing.body.contains("aria-current=\"true\">Last 7 days"));
    let week = health_rows(&failing.body);
    assert_eq!(week.len(), 7);
    assert_eq!(week[6], (0, 3, 0));
    assert_eq!(sum(&bad_json, "retrying"), 3);
    let bad_window = b
        .get(&format!("/ui/a/acme/webhooks/{bad_hook}?window=1y"))
        .await;
    assert_eq!(bad_window.status, StatusCode::BAD_REQUEST);

    // The list: success rate, a sparkline per webhook, the failing one marked.
    let list = b.get("/ui/a/acme/webhooks").await;
    assert!(list.body.contains(">Success (24 h)</th>"));
    assert!(list.body.contains("100.0 %"));
    assert!(list.body.contains("0.0 %"));
    assert_eq!(list.body.matches("class=\"spark\"").count(), 2);
    assert!(list.body.contains(
        "aria-label=\"Attempts per hour, last 24 hours: 3 in all, 3 failed or retrying\""
    ));
    assert_eq!(list.body.matches(">Failing<").count(), 1);
    eng.stop().await;
}

#[tokio::test]
async fn the_operator_overview_is_the_admin_stats_and_only_the_operator_s() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    eng.webhook("acme", &rx.url, &["*"]).await;
    for i in 0..2 {
        eng.event("acme", "visitor.checked_in", json!({ "n": i }))
            .await;
    }
    rx.wait_for(2, Duration::from_secs(10)).await;
    let stats = eng
        .poll("/v1/admin/stats", Duration::from_secs(10), |v| {
            v["last_hour"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["delivered"].as_u64().unwrap())
                .sum::<u64>()
                == 2
        })
        .await;
    let mut admin = Browser::new(&eng.api);
    admin.sign_in(ADMIN).await;
    let page = admin.get("/ui/admin/overview").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_secure_headers(&page);
    assert!(page.body.contains("<h1>Overview</h1>"));
    for chart in ["chart-rates", "chart-lag", "chart-waiting"] {
        assert!(
            page.body.contains(&format!("role=\"img\" id=\"{chart}\"")),
            "{chart}"
        );
    }
    assert!(page.body.contains(&format!(
        "<dd id=\"fig-version\">{}</dd>",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(page.body.contains(&format!(
        "<dd id=\"fig-active\">{}</dd>",
        stats["webhooks"]["active"]
    )));
    assert!(
        page.body.contains("2 delivery attempts in all"),
        "the chart's text alternative"
    );
    assert!(page.body.contains("id=\"fig-disk\""));
    assert!(
        page.body.contains("href=\"/ui/admin/overview\""),
        "in the operator's menu"
    );

    let mut customer = Browser::new(&eng.api);
    customer.sign_in(&key).await;
    let refused = customer.get("/ui/admin/overview").await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert!(!customer
        .get("/ui/a/acme/webhooks")
        .await
        .body
        .contains("/ui/admin/overview"));
    eng.stop().await;
}

#[tokio::test]
async fn the_operator_changes_a_plan_and_rotates_a_key_after_confirming() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, old_key) = eng.account("acme", "starter").await;
    let mut customer = Browser::new(&eng.api);
    customer.sign_in(&old_key).await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(ADMIN).await;
    let accounts = b.get("/ui/accounts").await;
    assert!(accounts.body.contains("href=\"/ui/accounts/acme\""));
    let page = b.get("/ui/accounts/acme").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("<dd id=\"current-plan\">starter</dd>"));

    // The plan: a GET form asks for confirmation and changes nothing.
    let confirm = b.get("/ui/accounts/acme/plan?plan=professional").await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm
        .body
        .contains("Change the plan of acme from starter to professional?"));
    let (_, v) = eng.api.admin(Method::GET, "/v1/accounts/acme", None).await;
    assert_eq!(v["plan"], "starter");
    let unknown = b.get("/ui/accounts/acme/plan?plan=platinum").await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    let csrf = confirm.csrf();
    let done = b
        .post(
            "/ui/accounts/acme/plan",
            &[("_csrf", &csrf), ("plan", "professional")],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.location(), "/ui/accounts/acme");
    let (_, v) = eng.api.admin(Method::GET, "/v1/accounts/acme", None).await;
    assert_eq!(v["plan"], "professional");
    assert!(b
        .get("/ui/accounts/acme")
        .await
        .body
        .contains("acme is on the professional plan now."));

    // The key: confirmed, shown once, the old one dead (API and dashboard session).
    let confirm = b.get("/ui/accounts/acme/api-key").await;
    assert!(confirm.body.contains("Rotate the API key of acme?"));
    let shown = b
        .post("/ui/accounts/acme/api-key", &[("_csrf", &csrf)])
        .await;
    assert_eq!(shown.status, StatusCode::OK);
    assert_eq!(shown.header("cache-control"), "no-store");
    let marker = "id=\"api-key\" value=\"";
    let start = shown.body.find(marker).unwrap() + marker.len();
    let new_key = shown.body[start..].split('"').next().unwrap().to_string();
    let (s, _) = eng
        .api
        .call(
            Method::GET,
            "/v1/accounts/acme",
            Some(new_key.as_str()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = eng
        .api
        .call(
            Method::GET,
            "/v1/accounts/acme",
            Some(old_key.as_str()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        customer.get("/ui/a/acme/webhooks").await.location(),
        "/ui/login"
    );
    assert!(
        !b.get("/ui/accounts/acme").await.body.contains(&new_key),
        "shown once"
    );
    // Only the operator.
    let mut c2 = Browser::new(&eng.api);
    c2.sign_in(&new_key).await;
    assert_eq!(
        c2.get("/ui/accounts/acme").await.status,
        StatusCode::NOT_FOUND
    );
    let csrf2 = c2.get("/ui/a/acme/webhooks").await.csrf();
    let refused = c2
        .post(
            "/ui/accounts/acme/plan",
            &[("_csrf", &csrf2), ("plan", "enterprise")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    eng.stop().await;
}

#[tokio::test]
async fn sessions_survive_a_restart_and_still_end_at_sign_out_and_key_rotation() {
    let pki = pki();
    let mut eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let mut a = Browser::new(&eng.api);
    a.sign_in(&key).await;
    let mut c = Browser::new(&eng.api);
    c.sign_in(&key).await;
    let mut op = Browser::new(&eng.api);
    op.sign_in(ADMIN).await;
    let csrf = a.get("/ui/a/acme/webhooks").await.csrf();
    let (a_cookie, c_cookie, op_cookie) = (a.cookie.clone(), c.cookie.clone(), op.cookie.clone());
    // Nothing readable in the data dir: the cookie's value and the CSRF token are not stored.
    eng.restart().await;
    let dir = eng.config.storage.path.clone();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&csrf), "a CSRF token in the data dir");
        assert!(!text.contains(a_cookie.as_deref().unwrap()));
    }
    let mut a = Browser::new(&eng.api);
    a.cookie = a_cookie;
    let page = a.get("/ui/a/acme/webhooks").await;
    assert_eq!(
        page.status,
        StatusCode::OK,
        "still signed in after the restart"
    );
    assert_eq!(page.csrf(), csrf, "with the same CSRF token");
    let mut op = Browser::new(&eng.api);
    op.cookie = op_cookie;
    assert_eq!(op.get("/ui/accounts").await.status, StatusCode::OK);
    // Sign-out ends it, also across the next restart.
    let out = a.post("/ui/logout", &[("_csrf", &csrf)]).await;
    assert_eq!(out.location(), "/ui/login");
    eng.restart().await;
    let mut a = Browser::new(&eng.api);
    a.cookie = c_cookie.clone();
    assert_eq!(a.get("/ui/a/acme/webhooks").await.status, StatusCode::OK);
    // A rotated key ends the account's stored sessions.
    let (s, _) = eng
        .api
        .admin(Method::POST, "/v1/accounts/acme/api-key", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    eng.restart().await;
    let mut c = Browser::new(&eng.api);
    c.cookie = c_cookie;
    assert_eq!(c.get("/ui/a/acme/webhooks").await.location(), "/ui/login");
    eng.stop().await;
}

#[tokio::test]
async fn a_same_origin_post_without_sec_fetch_site_is_accepted() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let id = eng.webhook("acme", &rx.url, &["*"]).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let page = b.get("/ui/a/acme/webhooks").await;
    assert_eq!(page.header("referrer-policy"), "same-origin");
    let csrf = page.csrf();
    let origin = format!("http://{}", b.host);
    let path = format!("/ui/a/acme/webhooks/{id}/status");
    // What a browser without Sec-Fetch-Site sends under `same-origin`: its real Origin.
    let ok = b
        .post_with(
            &path,
            &[("_csrf", &csrf), ("status", "paused")],
            &[("origin", &origin)],
        )
        .await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(v["status"], "paused");
    for origin in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        let refused = b
            .post_with(
                &path,
                &[("_csrf", &csrf), ("status", "active")],
                &[("origin", origin)],
            )
            .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{origin}");
    }
    eng.stop().await;
}

#[tokio::test]
async fn the_forms_offer_the_signature_scheme_and_the_log_tab_every_filter() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "enterprise").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let csrf = b.get("/ui/a/acme/webhooks").await.csrf();
    let step2 = b
        .post(
            "/ui/a/acme/webhooks/new/events",
            &[
                ("_csrf", &csrf),
                ("name", "Std"),
                ("url", &rx.url),
                ("description", ""),
                ("events", "*"),
            ],
        )
        .await;
    assert!(step2
        .body
        .contains("<label for=\"signature-scheme\">Signature Scheme</label>"));
    let secret_marker = "name=\"secret\" value=\"";
    let start = step2.body.find(secret_marker).unwrap() + secret_marker.len();
    let secret = step2.body[start..].split('"').next().unwrap().to_string();
    let created = b
        .post(
            "/ui/a/acme/webhooks/new/security",
            &[
                ("_csrf", &csrf),
                ("name", "Std"),
                ("url", &rx.url),
                ("description", ""),
                ("events", "*"),
                ("secret", &secret),
                ("ip_allowlist", ""),
                ("ordering", "none"),
                ("signature_scheme", "standard-webhooks"),
            ],
        )
        .await;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", created.body);
    let id = created.location().rsplit('/').next().unwrap().to_string();
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(v["signature_scheme"], "standard-webhooks");
    let edit = b.get(&format!("/ui/a/acme/webhooks/{id}/edit")).await;
    assert!(edit
        .body
        .contains("<option value=\"standard-webhooks\" selected>"));
    let saved = b
        .post(
            &format!("/ui/a/acme/webhooks/{id}/edit"),
            &[
                ("_csrf", &csrf),
                ("name", "Std"),
                ("url", &rx.url),
                ("description", ""),
                ("events", "*"),
                ("ip_allowlist", ""),
                ("ordering", "none"),
                ("signature_scheme", "kyberaccess"),
            ],
        )
        .await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(v["signature_scheme"], "kyberaccess");
    let bad = b
        .post(
            &format!("/ui/a/acme/webhooks/{id}/edit"),
            &[
                ("_csrf", &csrf),
                ("name", "Std"),
                ("url", &rx.url),
                ("events", "*"),
                ("signature_scheme", "md5"),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);

    // The Deliveries tab: event id and delivery id besides status, event and time.
    let e1 = eng
        .event("acme", "visitor.checked_in", json!({"n": 1}))
        .await;
    eng.event("acme", "visitor.checked_in", json!({"n": 2}))
        .await;
    let list = eng
        .poll(
            &format!("/v1/accounts/acme/webhooks/{id}/deliveries"),
            Duration::from_secs(10),
            |v| count(v) == 2,
        )
        .await;
    let tab = format!("/ui/a/acme/webhooks/{id}/deliveries");
    let rows = |a: &Answer| a.body.matches("/ui/a/acme/deliveries/dlv_").count();
    let page = b.get(&tab).await;
    for label in [
        "Status",
        "Event",
        "From (UTC)",
        "To (UTC)",
        "Event ID",
        "Delivery ID",
    ] {
        assert!(
            page.body.contains(&format!("\">{label}</label>")),
            "{label}"
        );
    }
    assert_eq!(rows(&page), 2);
    let by_event = b.get(&format!("{tab}?event_id={e1}&delivery_id=")).await;
    assert_eq!(rows(&by_event), 1);
    assert!(
        by_event.body.contains(&format!("value=\"{e1}\"")),
        "the filter is kept"
    );
    let d = list["data"][0]["id"].as_str().unwrap();
    let by_id = b.get(&format!("{tab}?delivery_id={d}")).await;
    assert_eq!(rows(&by_id), 1);
    assert!(by_id.body.contains(&format!("/ui/a/acme/deliveries/{d}")));
    let nothing = b.get(&format!("{tab}?delivery_id={d}&status=failed")).await;
    assert_eq!(rows(&nothing), 0);
    let bad = b.get(&format!("{tab}?delivery_id=nope")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    eng.stop().await;
}

#[tokio::test]
async fn the_forms_set_and_lift_a_concurrency_cap_and_the_page_shows_the_limit() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    let hook = eng
        .webhook("acme", "https://127.0.0.1:9/hook", &["visitor.checked_in"])
        .await;
    let id = hook["id"].as_str().unwrap().to_string();
    let mut b = Browser::new(&eng.api);
    b.sign_in(&key).await;
    let page = b.get(&format!("/ui/a/acme/webhooks/{id}")).await;
    assert!(
        page.body.contains("up to 64 requests at once now") && page.body.contains("no cap set"),
        "{}",
        page.body
    );
    assert!(page.body.contains("Nothing waits"), "{}", page.body);

    let edit_path = format!("/ui/a/acme/webhooks/{id}/edit");
    let form = b.get(&edit_path).await;
    assert!(
        form.body.contains(r#"name="max_concurrency""#),
        "{}",
        form.body
    );
    let csrf = form.csrf();
    let post = |cap: &'static str| {
        vec![
            ("_csrf", csrf.clone()),
            ("name", "hook".to_string()),
            ("url", "https://127.0.0.1:9/hook".to_string()),
            ("description", String::new()),
            ("events", "visitor.checked_in".to_string()),
            ("ordering", "none".to_string()),
            ("max_concurrency", cap.to_string()),
        ]
    };
    let api_cap = |eng: &TestEngine| {
        let api = eng.api.clone();
        let id = id.clone();
        async move {
            let (_, v) = api
                .admin(
                    Method::GET,
                    &format!("/v1/accounts/acme/webhooks/{id}"),
                    None,
                )
                .await;
            (v["max_concurrency"].clone(), v["concurrency_limit"].clone())
        }
    };
    // Not a number, or out of range: refused with the API's rule, the value shown again.
    for bad in ["many", "0"] {
        let fields = post(bad);
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let refused = b.post(&edit_path, &fields).await;
        assert_eq!(
            refused.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            refused.body
        );
        assert!(
            refused.body.contains("max_concurrency must be from 1"),
            "{}",
            refused.body
        );
    }
    let fields = post("5");
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let saved = b.post(&edit_path, &fields).await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    assert_eq!(api_cap(&eng).await, (json!(5), json!(5)));
    let page = b.get(&format!("/ui/a/acme/webhooks/{id}")).await;
    assert!(
        page.body.contains("up to 5 requests at once now"),
        "{}",
        page.body
    );
    assert!(page.body.contains("your cap: 5"));
    let form = b.get(&edit_path).await;
    assert!(form.body.contains(r#"value="5""#), "{}", form.body);
    // An empty field lifts the cap.
    let fields = post("");
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let saved = b.post(&edit_path, &fields).await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    assert_eq!(api_cap(&eng).await, (serde_json::Value::Null, json!(64)));
}
