//! Held deliveries (`delivery::HELD_WINDOW`): a delivery fan-out creates is written once, in
//! the state its first attempt left it, if that attempt settles within the window; otherwise
//! it is written as created when the window ends, and is listed as pending meanwhile and after.
//! One test per binary, since the metrics recorder is process-wide.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn first_writes(page: &str, state: &str) -> f64 {
    let series = format!("kyberhook_held_deliveries_written_total{{state=\"{state}\"}}");
    metric_sample(page, &series).unwrap_or(0.0)
}

#[tokio::test]
async fn a_delivery_is_first_written_settled_or_as_pending_once_the_window_ends() {
    if !own_process("held::a_delivery_is_first_written_settled_or_as_pending_once_the_window_ends")
    {
        return;
    }
    let pki = pki();
    let fast = Receiver::start(pki.server.clone()).await;
    let slow = Receiver::start(pki.server.clone()).await;
    // Answers after the held window (1 s) has ended, within the engine's timeout (5 s here).
    slow.set_default(Reply::Slow(Duration::from_millis(2500), 200));
    let e = TestEngine::start(&pki, "timeout = \"5s\"", "").await;
    let (acc, _) = e.account("acc_held", "enterprise").await;
    e.webhook(&acc, &fast.url, &["*"]).await;
    let slow_hook = e.webhook(&acc, &slow.url, &["*"]).await;
    let slow_id = slow_hook["id"].as_str().unwrap().to_string();
    for i in 0..5 {
        e.event(&acc, "visitor.checked_in", json!({"i": i})).await;
    }
    fast.wait_for(5, WAIT).await;
    slow.wait_for(5, WAIT).await;

    // The slow endpoint's deliveries: written as created when the window ended, while their
    // attempts still ran; listed as pending throughout.
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let page = e.api.text(&e.metrics_url()).await;
        if first_writes(&page, "pending") >= 5.0 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first_writes(&page, "pending"), 5.0, "{page}");
    let (_, listed) = e
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/{acc}/webhooks/{slow_id}/deliveries?limit=100"),
            None,
        )
        .await;
    let data = listed["data"].as_array().unwrap();
    assert_eq!(data.len(), 5, "{listed}");
    assert!(
        data.iter()
            .all(|d| d["status"] == "pending" || d["status"] == "delivered"),
        "{listed}"
    );

    // Once everything is delivered: the fast endpoint's five were each written once, settled;
    // the slow one's five were written as pending first (and again when they settled).
    let all = e
        .poll(
            &format!("/v1/accounts/{acc}/deliveries?limit=100&status=delivered"),
            WAIT,
            |v| count(v) == 10,
        )
        .await;
    assert_eq!(count(&all), 10);
    let page = e.api.text(&e.metrics_url()).await;
    assert_eq!(
        (
            first_writes(&page, "settled"),
            first_writes(&page, "pending")
        ),
        (5.0, 5.0),
        "{page}"
    );
    e.stop().await;
}
