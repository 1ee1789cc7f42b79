//! The Prometheus page: the contract's families, with values that match what happened. One test
//! per binary, since the metrics recorder is process-wide.

use crate::common;

use std::time::Duration;

use common::*;
use http::Method;
use serde_json::json;

fn value(page: &str, series: &str) -> f64 {
    metric_sample(page, series).unwrap_or_else(|| panic!("{series} not on the page:\n{page}"))
}

#[tokio::test]
async fn metrics_page_counts_what_the_engine_did() {
    if !own_process("metrics::metrics_page_counts_what_the_engine_did") {
        return;
    }
    let pki = pki();
    let ok = Receiver::start(pki.server.clone()).await;
    let bad = Receiver::start(pki.server.clone()).await;
    bad.set_default(Reply::Status(500));
    let e = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (acc, _) = e.account("acc_metrics", "enterprise").await;
    e.webhook(&acc, &ok.url, &["*"]).await;
    e.webhook(&acc, &bad.url, &["*"]).await;
    for i in 0..7 {
        e.event(&acc, "user.login", json!({"i": i})).await;
    }
    ok.wait_for(7, Duration::from_secs(10)).await;
    bad.wait_for(7, Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = e.api.text(&e.metrics_url()).await;
        let done = page
            .lines()
            .any(|l| l == "kyberhook_delivery_attempts_total{outcome=\"failure\"} 7")
            && page.contains("kyberhook_deliveries_scheduled 7");
        if done {
            break page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never matched:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(value(&page, "kyberhook_events_ingested_total"), 7.0);
    assert_eq!(
        value(
            &page,
            "kyberhook_delivery_attempts_total{outcome=\"success\"}"
        ),
        7.0
    );
    assert_eq!(
        value(
            &page,
            "kyberhook_delivery_attempts_total{outcome=\"failure\"}"
        ),
        7.0
    );
    assert_eq!(
        value(&page, "kyberhook_delivery_attempt_duration_seconds_count"),
        14.0
    );
    assert!(page.contains("# TYPE kyberhook_delivery_attempt_duration_seconds histogram"));
    assert!(page.contains("kyberhook_delivery_attempt_duration_seconds_bucket{le=\"0.005\"}"));
    assert!(page.contains("# TYPE kyberhook_deliveries_scheduled gauge"));
    // 7 failed deliveries wait for their 1 h retry.
    assert_eq!(value(&page, "kyberhook_deliveries_scheduled"), 7.0);
    assert_eq!(
        value(
            &page,
            "kyberhook_api_requests_total{route=\"/v1/events\",status=\"202\"}"
        ),
        7.0
    );
    assert!(value(&page, "kyberhook_wal_flush_seconds_count") >= 7.0);
    assert!(
        !page.contains("acc_metrics"),
        "an account id leaked into a label"
    );
    let (s, _) = e.api.admin(Method::GET, "/readyz", None).await;
    assert_eq!(s, 200);
    e.stop().await;
}
