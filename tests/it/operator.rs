//! The operator's view: the gauges an operator pages on (store size, write errors, the oldest
//! owed attempt's lateness, webhooks by status) follow the real engine, the page passes
//! `promtool check metrics`, and the alert rules in `docs/alerts.yml` pass `promtool check
//! rules` and their own `promtool test rules` cases. One engine per binary: the metrics
//! recorder is process-wide.
//!
//! promtool comes from Debian's `prometheus` package, installed on first use
//! (tests/it/tools.rs). When it cannot be had these tests fail, unless
//! `KYBERHOOK_SKIP_PROMTOOL=1` says to skip the promtool steps.

use crate::common;
use crate::tools;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// The value of one series on a metrics page, if it is there.
fn value(page: &str, series: &str) -> f64 {
    metric_sample(page, series).unwrap_or_else(|| panic!("{series} not on the page:\n{page}"))
}

/// The promtool binary, or None when `KYBERHOOK_SKIP_PROMTOOL=1` and it is not installed
/// (then the caller skips).
#[track_caller]
fn promtool() -> Option<PathBuf> {
    tools::promtool()
}

fn run_promtool(promtool: &Path, args: &[&str], stdin: Option<&str>, dir: &Path) {
    let mut child = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn page_until(e: &TestEngine, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = e.api.text(&e.metrics_url()).await;
        if pred(&page) {
            return page;
        }
        assert!(Instant::now() < deadline, "{what} never held:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn operator_gauges_follow_the_engine_and_pass_promtool() {
    if !own_process("operator::operator_gauges_follow_the_engine_and_pass_promtool") {
        return;
    }
    let pki = pki();
    let slow = Receiver::start(pki.server.clone()).await;
    slow.set_default(Reply::Slow(Duration::from_millis(700), 200));
    let broken = Receiver::start(pki.server.clone()).await;
    broken.set_default(Reply::Status(500));
    let e = TestEngine::start(
        &pki,
        "retry_schedule = [\"1h\"]\nauto_disable_after = 1\nmax_in_flight_per_webhook = 1",
        "",
    )
    .await;

    let page = e.api.text(&e.metrics_url()).await;
    let size_before = value(&page, "kyberhook_store_size_bytes");
    assert!(size_before > 0.0, "an open store has a size:\n{page}");
    assert_eq!(value(&page, "kyberhook_store_write_errors_total"), 0.0);
    assert_eq!(
        value(&page, "kyberhook_oldest_due_delivery_lateness_seconds"),
        0.0
    );
    assert_eq!(value(&page, "kyberhook_webhooks{status=\"active\"}"), 0.0);

    let (acc, _) = e.account("acc_operator", "enterprise").await;
    // One webhook per status: the slow one stays active, the broken one is disabled by its
    // first failure, the third is paused by hand.
    e.webhook(&acc, &slow.url, &["user.login"]).await;
    e.webhook(&acc, &broken.url, &["user.login_failed"]).await;
    let paused = e.webhook(&acc, &slow.url, &["visitor.checked_out"]).await;
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!(
                "/v1/accounts/{acc}/webhooks/{}",
                paused["id"].as_str().unwrap()
            ),
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    e.event(&acc, "user.login_failed", json!({})).await;

    // Six deliveries to one slot answering in 0.7 s: the last waits ~3.5 s past its due time.
    let filler = "x".repeat(8 << 10);
    for i in 0..6 {
        e.event(&acc, "user.login", json!({"i": i, "filler": filler}))
            .await;
    }
    let page = page_until(&e, "lateness >= 1 s while deliveries queue", |p| {
        metric_sample(p, "kyberhook_oldest_due_delivery_lateness_seconds").is_some_and(|v| v >= 1.0)
    })
    .await;
    assert_eq!(value(&page, "kyberhook_webhooks{status=\"active\"}"), 1.0);
    assert_eq!(value(&page, "kyberhook_webhooks{status=\"paused\"}"), 1.0);
    assert_eq!(value(&page, "kyberhook_webhooks{status=\"disabled\"}"), 1.0);

    slow.wait_for(6, Duration::from_secs(20)).await;
    // Every delivery is done but the broken webhook's, whose retry is an hour away: no
    // owed attempt is overdue any more.
    let page = page_until(&e, "lateness back to 0 once delivered", |p| {
        metric_sample(p, "kyberhook_oldest_due_delivery_lateness_seconds") == Some(0.0)
    })
    .await;
    let size_after = value(&page, "kyberhook_store_size_bytes");
    assert!(
        size_after > size_before,
        "48 KiB of events and their deliveries grew the store: {size_before} -> {size_after}"
    );
    assert_eq!(value(&page, "kyberhook_store_write_errors_total"), 0.0);
    for family in [
        "# TYPE kyberhook_store_size_bytes gauge",
        "# TYPE kyberhook_store_write_errors_total counter",
        "# TYPE kyberhook_oldest_due_delivery_lateness_seconds gauge",
        "# TYPE kyberhook_webhooks gauge",
    ] {
        assert!(page.contains(family), "{family} missing:\n{page}");
    }

    if let Some(promtool) = promtool() {
        run_promtool(
            &promtool,
            &["check", "metrics"],
            Some(&page),
            Path::new("."),
        );
    }
    e.stop().await;
}

#[test]
fn alert_rules_pass_promtool_and_the_readme_shows_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join("docs/alerts.yml")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let shown = rules
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        readme.contains(&shown),
        "the README's alert rules differ from docs/alerts.yml"
    );
    for name in [
        "kyberhook_store_write_errors_total",
        "kyberhook_store_size_bytes",
        "kyberhook_oldest_due_delivery_lateness_seconds",
        "kyberhook_webhooks{",
        "kyberhook_accounts_over_backlog_quota",
        "kyberhook_webhook_backlog_oldest_seconds",
    ] {
        assert!(rules.contains(name), "no alert rule uses {name}");
    }
    if let Some(promtool) = promtool() {
        let docs = root.join("docs");
        run_promtool(&promtool, &["check", "rules", "alerts.yml"], None, &docs);
        run_promtool(
            &promtool,
            &["test", "rules", "alerts.test.yml"],
            None,
            &docs,
        );
    }
}
