//! Prometheus metrics: the recorder every module reports to through the `metrics` macros, and
//! the `GET /metrics` page on `metrics.listen` (its own listener, rendered by
//! `metrics-exporter-prometheus`).
//!
//! Names, types and labels are documented in the README. Labels are bounded sets (route
//! patterns, status codes, outcome, webhook status): never an account, webhook or URL, so the
//! number of series does not grow with customers.
//!
//! Most families are pushed by the module that sees the event. The operator's gauges — store
//! size, the oldest owed attempt's lateness, webhooks by status, deliveries scheduled — are
//! state rather than events, so [`MetricsHandler`] reads them from the store, registry and
//! scheduler when Prometheus scrapes (the store's part on the blocking pool), and they are
//! exact whenever they are looked at. The oldest owed attempt's lateness is the first key of
//! the `schedule` tree, which keeps an entry until an attempt's outcome is written.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::edge::Handler;
use crate::model::now_ms;
use crate::registry::Registry;
use crate::store::Storage;

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
            // Present from the start, so an alert on its rate has a series before the first error.
            metrics::counter!("kyberhook_store_write_errors_total").increment(0);
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
    describe_histogram!(
        "kyberhook_retention_writer_seconds",
        Unit::Seconds,
        "Time the delivery writer spends deleting one retention batch (it writes nothing else meanwhile)."
    );
    describe_counter!(
        "kyberhook_rate_limit_deferrals_total",
        "Attempts deferred by an account's plan rate."
    );
    describe_counter!(
        "kyberhook_webhooks_auto_disabled_total",
        "Webhooks disabled after too many consecutive failures."
    );
    describe_gauge!(
        "kyberhook_store_size_bytes",
        Unit::Bytes,
        "Bytes the embedded store uses on disk (sled's data file and blobs)."
    );
    describe_counter!(
        "kyberhook_store_write_errors_total",
        "Store flushes that failed: the disk refused writes (full, read-only, failing)."
    );
    describe_gauge!(
        "kyberhook_oldest_due_delivery_lateness_seconds",
        Unit::Seconds,
        "How far behind schedule the earliest owed attempt is (0 when none is overdue)."
    );
    describe_gauge!(
        "kyberhook_delivery_lag_seconds",
        Unit::Seconds,
        "The engine's own delivery lag by stage (fanout, scheduler, dispatcher, slots): age of the oldest work it owes there; over delivery.max_lag, ingest is held (slots: only the waiting account's)."
    );
    describe_counter!(
        "kyberhook_held_deliveries_written_total",
        "Deliveries fan-out created, by the state they were first written in: settled (the first attempt settled while held, one write) or pending (the held window ended first)."
    );
    describe_counter!(
        "kyberhook_ingest_held_total",
        "Ingest requests held because deliveries lagged more than delivery.max_lag."
    );
    describe_counter!(
        "kyberhook_ingest_lag_refusals_total",
        "Ingest requests refused (503 deliveries_lagging) after delivery.max_lag_hold."
    );
    describe_gauge!(
        "kyberhook_webhook_backlog_oldest_seconds",
        Unit::Seconds,
        "How long the oldest delivery waiting behind a webhook's concurrency limit (or for an engine slot) has waited, of all webhooks; 0 when none waits."
    );
    describe_gauge!(
        "kyberhook_attempts_in_flight",
        "Attempts in flight, engine-wide (at most delivery.max_in_flight)."
    );
    describe_gauge!(
        "kyberhook_accounts_over_backlog_quota",
        "Accounts with delivery.max_scheduled_per_account deliveries or more waiting (their ingest gets 429)."
    );
    describe_gauge!(
        "kyberhook_webhooks",
        "Webhooks by status (active, paused, disabled)."
    );
    describe_gauge!(
        "kyberhook_fifo_deliveries_waiting",
        "Due deliveries of fifo webhooks held until the earlier ones are delivered or failed."
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
    describe_gauge!(
        "kyberhook_serving",
        "1 while this node runs the engine; 0 while it stands by (PostgreSQL: another node holds the lease) and forwards."
    );
    describe_counter!(
        "kyberhook_standby_requests_total",
        "Requests a standby answered, by outcome: forwarded to the serving node, or refused (503 standby)."
    );
    describe_counter!(
        "kyberhook_auth_failures_total",
        "Wrong bearer tokens on /v1 (outcome=unauthorized) and requests refused with 429 because their address sent too many (outcome=limited)."
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
    pub scheduler: crate::scheduler::SchedulerHandle,
    pub store: Arc<dyn Storage>,
    pub registry: Arc<Registry>,
}

impl MetricsHandler {
    /// Sets the state gauges from their owners, just before rendering.
    async fn refresh(&self) {
        metrics::gauge!("kyberhook_deliveries_scheduled").set(self.scheduler.scheduled() as f64);
        for (stage, ms) in self.scheduler.lag().stages(crate::clock::now_ms()) {
            metrics::gauge!("kyberhook_delivery_lag_seconds", "stage" => stage)
                .set(ms as f64 / 1000.0);
        }
        let (backlog_ms, in_flight) = self.scheduler.lag().slots(crate::clock::now_ms());
        metrics::gauge!("kyberhook_webhook_backlog_oldest_seconds").set(backlog_ms as f64 / 1000.0);
        metrics::gauge!("kyberhook_attempts_in_flight").set(in_flight as f64);
        metrics::gauge!("kyberhook_fifo_deliveries_waiting")
            .set(self.registry.fifo().parked() as f64);
        let counts = self.registry.hook_status_counts();
        for (status, n) in ["active", "paused", "disabled"].into_iter().zip(counts) {
            metrics::gauge!("kyberhook_webhooks", "status" => status).set(n as f64);
        }
        // Directory metadata and a tree lookup: file-system work, off the async workers.
        let store = self.store.clone();
        let read =
            tokio::task::spawn_blocking(move || (store.size_on_disk(), store.earliest_due_ms()))
                .await;
        match read {
            Ok((size, earliest)) => {
                metrics::gauge!("kyberhook_store_size_bytes").set(size as f64);
                match earliest {
                    Ok(earliest) => {
                        metrics::gauge!("kyberhook_oldest_due_delivery_lateness_seconds")
                            .set(lateness_seconds(earliest, now_ms()))
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the earliest due attempt failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the store's figures failed"),
        }
    }
}

/// Seconds from `earliest_due_ms` to `now_ms`; 0 when nothing is owed or nothing is overdue.
pub fn lateness_seconds(earliest_due_ms: Option<u64>, now_ms: u64) -> f64 {
    earliest_due_ms.map_or(0.0, |due| now_ms.saturating_sub(due) as f64 / 1000.0)
}

/// A plain-text 404 for the listener's other paths: this listener is for Prometheus, not a
/// client of the API, so its answer owes nothing to the API's JSON error format.
fn not_found() -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(
            b"not found: only GET /metrics is served here\n",
        )))
        .expect("static response parts are valid")
}

fn exposition(prometheus: &PrometheusHandle) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(prometheus.render())))
        .expect("static response parts are valid")
}

impl Handler for MetricsHandler {
    type Body = Full<Bytes>;

    async fn call(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET || req.uri().path() != "/metrics" {
            return not_found();
        }
        self.refresh().await;
        exposition(&self.prometheus)
    }
}

/// A standby's `/metrics` (PostgreSQL: another node serves): the same listener and recorder
/// as the engine's, so that a scrape of a healthy standby succeeds (`up` stays 1) and shows
/// `kyberhook_serving 0` and what it forwarded; the engine's own figures appear once it serves.
#[derive(Clone)]
pub struct StandbyMetricsHandler {
    pub prometheus: PrometheusHandle,
}

impl Handler for StandbyMetricsHandler {
    type Body = Full<Bytes>;

    async fn call(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET || req.uri().path() != "/metrics" {
            return not_found();
        }
        exposition(&self.prometheus)
    }
}

#[cfg(test)]
mod tests {
    use super::lateness_seconds;

    #[test]
    fn lateness_is_zero_unless_an_owed_attempt_is_overdue() {
        assert_eq!(lateness_seconds(None, 10_000), 0.0);
        assert_eq!(lateness_seconds(Some(12_000), 10_000), 0.0);
        assert_eq!(lateness_seconds(Some(10_000), 10_000), 0.0);
        assert_eq!(lateness_seconds(Some(7_500), 10_000), 2.5);
    }
}
