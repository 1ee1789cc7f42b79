//! Prometheus metrics: the recorder every module reports to through the `metrics` macros, and
//! the `GET /metrics` page on `metrics.listen`.
//!
//! Names, types and labels are documented in the README. Labels are bounded sets (route
//! patterns, status codes, outcome): never an account, webhook or URL, so the number of series
//! does not grow with customers.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::server::Handler;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Seconds; from a fast local endpoint (ms) to the 30 s default timeout.
const ATTEMPT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("kyberhook_delivery_attempt_duration_seconds".into()),
                    ATTEMPT_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("kyberhook_wal_batch_events".into()),
                        BATCH_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "kyberhook_events_ingested_total",
        "Events acknowledged (durable) by ingest, duplicates excluded."
    );
    describe_counter!(
        "kyberhook_delivery_attempts_total",
        "Delivery attempts by outcome (success = 2xx in time)."
    );
    describe_histogram!(
        "kyberhook_delivery_attempt_duration_seconds",
        Unit::Seconds,
        "Time from sending an attempt to its full response (or failure)."
    );
    describe_gauge!(
        "kyberhook_deliveries_scheduled",
        "Deliveries waiting for their next attempt (in the timing wheel)."
    );
    describe_histogram!(
        "kyberhook_ingest_duration_seconds",
        Unit::Seconds,
        "Ingest request to durable acknowledgement."
    );
    describe_histogram!(
        "kyberhook_wal_flush_seconds",
        Unit::Seconds,
        "Time of one group commit (write + flush + fdatasync)."
    );
    describe_histogram!("kyberhook_wal_batch_events", "Events per group commit.");
    describe_counter!(
        "kyberhook_rate_limit_deferrals_total",
        "Attempts deferred by an account's plan rate."
    );
    describe_counter!(
        "kyberhook_webhooks_auto_disabled_total",
        "Webhooks disabled after too many consecutive failures."
    );
    describe_counter!(
        "kyberhook_api_requests_total",
        "API requests by matched route and status."
    );
    describe_histogram!(
        "kyberhook_api_request_duration_seconds",
        Unit::Seconds,
        "API request latency by matched route."
    );
}

/// Runs the exporter's housekeeping (histogram windows) in the background.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

#[derive(Clone)]
pub struct MetricsHandler {
    pub prometheus: PrometheusHandle,
    /// Read at scrape time, so the gauge is exact whenever it is looked at.
    pub scheduler: crate::scheduler::SchedulerHandle,
}

impl Handler for MetricsHandler {
    async fn call(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET || req.uri().path() != "/metrics" {
            return crate::server::not_found();
        }
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from({
                metrics::gauge!("kyberhook_deliveries_scheduled")
                    .set(self.scheduler.scheduled() as f64);
                self.prometheus.render()
            })))
            .expect("static response parts are valid")
    }
}
