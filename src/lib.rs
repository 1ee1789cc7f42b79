//! kyberhook: a webhook delivery engine in one process with an embedded store.
//!
//! The pipeline, in the order an event travels (ARCHITECTURE.md has the picture, the module
//! map and the recovery story):
//!
//! - [`edge`] accepts HTTP(S) connections; its router hands `/ui…` to [`ui`] (the dashboard)
//!   and everything else to [`api`] (JSON), which routes, authenticates and validates them.
//! - [`domain`] holds every business rule of accounts, webhooks, deliveries, events and
//!   stats, its one error type ([`domain::Refusal`]) and the one place a token becomes a
//!   [`domain::caller::Caller`]; both [`api`] and [`ui`] call it.
//! - [`ingest`] builds each event's body once and hands it to the group committer, which
//!   makes a whole batch durable in the [`store`] with one flush before answering 202, then
//!   fans it out through the [`registry`]'s subscription index into delivery records.
//! - [`scheduler`] owns the [`wheel`] (a hierarchical timing wheel) holding every future
//!   attempt; due attempts go to [`dispatch`], which applies [`ratelimit`] and in-flight
//!   limits and the order of fifo webhooks ([`fifo`]), signs ([`signing`]) and sends the
//!   request; [`delivery`] owns every delivery state transition and the one thread that
//!   writes them (records, attempts, schedule).
//! - [`metrics`] serves Prometheus; [`config`] is read once at start; [`ids`], [`model`] and
//!   [`codec`] define what flows between the stages.
//!
//! The HTTP side has no cycle: the two front ends, [`api`] and [`ui`], are siblings over
//! [`domain`] and [`edge`]. No module under `src/api/` names `ui`, none under `src/ui/` names
//! `api`, the domain names neither, and the edge names neither of them nor the domain (the
//! engine hands it the two front ends as handlers). `tests/it/layers.rs` enforces it; the same
//! check by hand prints nothing:
//!
//! ```text
//! grep -rnE '(crate|super)(::super)*::(api|ui)\b' src/domain src/edge src/metrics.rs
//! grep -rnE '(crate|super)(::super)*::domain\b' src/edge
//! grep -rnE '(crate|super)(::super)*::ui\b' src/api
//! grep -rnE '(crate|super)(::super)*::api\b' src/ui
//! ```

#![forbid(unsafe_code)]

pub mod admin_token;
pub mod api;
pub mod backlog;
pub mod canonical;
pub mod catalog;
pub mod clock;
pub mod codec;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod domain;
pub mod edge;
pub mod fifo;
pub mod handover;
pub mod history;
pub mod ids;
pub mod ingest;
pub mod maintenance;
pub mod manual_retry;
pub mod metrics;
pub mod model;
pub mod once_file;
pub mod partition;
pub mod placement;
pub mod pushback;
pub mod ratelimit;
pub mod registry;
pub mod retention;
pub mod scheduler;
pub mod secrets;
pub mod signing;
pub mod standby;
pub mod stats;
pub mod store;
pub mod ui;
pub mod wheel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::delivery::{Deliveries, Writer};
use crate::dispatch::{Deliverer, Dispatcher, Outbound};
use crate::domain::Services;
use crate::ingest::{Committer, Ingest};
use crate::registry::Registry;
use crate::scheduler::{Scheduler, SchedulerHandle};
use crate::store::embedded::SledStore;
use crate::store::{Storage, StoreError, StoreErrorKind};

/// Why the engine could not start. `Config` errors are the operator's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Other(String),
    /// The store failed while serving (disk full, I/O error, failed fsync): the process must
    /// end so that a supervisor starts it again (see [`run`]).
    #[error("{0}")]
    StorageFailed(StoreError),
}

/// The exit code after a storage failure: EX_TEMPFAIL, "try again later" — a restart once the
/// disk is writable again recovers everything acknowledged.
pub const EXIT_STORAGE_FAILED: i32 = 75;

impl From<delivery::DeliveryError> for StartError {
    fn from(e: delivery::DeliveryError) -> Self {
        StartError::Other(e.to_string())
    }
}

impl StartError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => 2,
            StartError::StorageFailed(_) => EXIT_STORAGE_FAILED,
            _ => 1,
        }
    }
}

/// How often the engine checks whether its store still writes.
const STORE_HEALTH_EVERY: Duration = Duration::from_millis(100);

/// Due attempts waiting for the dispatcher; small, since the wheel is the real buffer.
const DUE_QUEUE: usize = 4096;

/// Opens the embedded store of `config` (finishing a compaction a crash interrupted first) and
/// checks that it still writes.
async fn open_embedded(config: &Config) -> Result<SledStore, StartError> {
    let path = config.storage.path.clone();
    let options = store::embedded::StoreOptions {
        fsync: config.storage.fsync,
        cache_bytes: config.storage.cache_size,
        secrets: secrets::KeySource::from_env_or_file(config.storage.secrets_key_file.as_deref())
            .map_err(|e| StartError::Config(e.to_string()))?,
    };
    let store = tokio::task::spawn_blocking(move || {
        // A compaction a crash interrupted is finished (or undone) before the store opens
        // (and before an empty data dir could be made where the new store belongs).
        store::embedded::compact::recover_at_start(&path).map_err(|e| {
            StartError::Config(format!(
                "storage.path: an interrupted compaction could not be finished ({e}): run \
                 `kyberhook compact --config …` as the data dir's owner or root"
            ))
        })?;
        let store = SledStore::open_with(&path, &options)
            .map_err(StoreError::from)
            .map_err(|e| match e.kind() {
                // A full or failing disk is the supervisor's to retry, not the operator's.
                StoreErrorKind::Unavailable | StoreErrorKind::Moved => StartError::StorageFailed(e),
                StoreErrorKind::Io => {
                    StartError::Config(format!("storage.path = {:?}: {e}", path.display()))
                }
                // A wrong key, permissions, a store from a newer kyberhook, a damaged
                // version record: the operator's to sort out.
                StoreErrorKind::Operator => StartError::Config(e.to_string()),
                StoreErrorKind::Internal => StartError::Store(e),
            })?;
        // A restart on a disk that is still full must fail here, before it serves, not at
        // the first write it would have to acknowledge.
        Storage::probe_write(&store).map_err(StartError::StorageFailed)?;
        Ok::<SledStore, StartError>(store)
    })
    .await
    .map_err(|e| StartError::Other(e.to_string()))??;
    Ok(store)
}

/// A running engine.
pub struct Engine {
    api_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server_tasks: Vec<JoinHandle<()>>,
    pipeline_tasks: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    retention: Option<retention::Retention>,
    state: Option<Arc<Services>>,
    committer: Option<Committer>,
    writer: Option<Writer>,
    store: Arc<dyn Storage>,
    scheduler: SchedulerHandle,
    /// Dividing: the ownership loop and what stops it (it hands every partition over).
    ownership: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

/// A PostgreSQL store's start-up failure as the process reports it.
fn pg_start_error(e: store::postgres::PgError) -> StartError {
    match e {
        store::postgres::PgError::Config(line) => StartError::Config(line),
        store::postgres::PgError::Unreachable(line) => {
            StartError::StorageFailed(StoreError::new(StoreErrorKind::Unavailable, line))
        }
        store::postgres::PgError::Failed(line) => StartError::Other(line),
    }
}

impl Engine {
    /// Opens the store, recovers owed work, binds both listeners and starts every stage.
    pub async fn start(mut config: Config) -> Result<Engine, StartError> {
        // Nodes dividing the partitions start holding none; one node alone serves them all.
        let dividing = store::postgres::is_selected(&config) && config.cluster.divide_work;
        let shares = Arc::new(if dividing {
            partition::Shares::none()
        } else {
            partition::Shares::all()
        });
        // PostgreSQL first: a standby node waits here for the serving one to stop.
        let pg_store = if dividing {
            let (c, sh) = (config.clone(), shares.clone());
            let opened = tokio::task::spawn_blocking(move || {
                store::postgres::PgStore::open_dividing(&c, sh)
            })
            .await
            .map_err(|e| StartError::Other(e.to_string()))?;
            Some(opened.map_err(pg_start_error)?)
        } else if store::postgres::is_selected(&config) {
            // While another node holds the lease, this one answers on its API address by
            // forwarding to that node.
            let (waiting_tx, waiting) = tokio::sync::oneshot::channel();
            let c = config.clone();
            let open = tokio::task::spawn_blocking(move || {
                store::postgres::PgStore::open(&c, Some(waiting_tx))
            });
            tokio::pin!(open);
            let mut forwarding = None;
            let opened = tokio::select! {
                r = &mut open => r,
                Ok(()) = waiting => {
                    forwarding = Some(standby::Standby::start(&config).await?);
                    open.await
                }
            }
            .map_err(|e| StartError::Other(e.to_string()));
            if let Some(s) = forwarding {
                s.stop().await;
            }
            let opened = opened?;
            Some(opened.map_err(pg_start_error)?)
        } else {
            None
        };
        let api_listener = edge::bind(config.server.listen, "server.listen").await?;
        let metrics_listener = edge::bind(config.metrics.listen, "metrics.listen").await?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let metrics_addr = metrics_listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let tls = edge::server_tls(&config.server)?;
        let outbound = Outbound::new(
            &config.delivery.extra_ca_files,
            config.delivery.private_network_allowlist.clone(),
            config.delivery.timeout,
            config.delivery.max_response_body_bytes,
            !config.delivery.require_https,
            config.delivery.max_in_flight,
        )
        .map_err(|e| StartError::Config(format!("delivery.extra_ca_files: {e}")))?;
        let prometheus = metrics::install();
        ::metrics::gauge!("kyberhook_serving").set(1.0);

        // The engine owns the process: every file it creates from here on (sled's segments,
        // snapshots and blobs, the secrets key) is private to its user.
        #[cfg(unix)]
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        let pg_store = pg_store.map(Arc::new);
        let store: Arc<dyn Storage> = match &pg_store {
            Some(pg) => {
                let probe = pg.clone();
                tokio::task::spawn_blocking(move || probe.probe_write())
                    .await
                    .map_err(|e| StartError::Other(e.to_string()))?
                    .map_err(StartError::StorageFailed)?;
                pg.clone()
            }
            None => Arc::new(open_embedded(&config).await?),
        };
        // After the store made the data dir (private) and before anything can authenticate.
        match admin_token::resolve(&mut config).map_err(|e| StartError::Config(e.to_string()))? {
            admin_token::Resolved::Generated(path) => tracing::warn!(
                file = %path.display(),
                "no admin token was configured: generated one into {}; read it from there (or set auth.admin_token_file / KYBERHOOK_ADMIN_TOKEN)",
                path.display()
            ),
            admin_token::Resolved::Read(path) => {
                tracing::info!(file = %path.display(), "admin token read from the data dir")
            }
            admin_token::Resolved::Configured => {}
        }
        let config = Arc::new(config);

        let registry = Arc::new(Registry::new(config.events.catalog.clone()));
        registry.load(store.all_accounts()?, store.all_webhooks()?);
        registry
            .backlog()
            .set_quota(config.delivery.max_scheduled_per_account);
        let last_seq = store.last_seq()?;
        let seq = Arc::new(match store.writer_slot() {
            Some(slot) => ids::Sequencer::for_writer(last_seq, slot),
            None => ids::Sequencer::new(last_seq),
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (due_tx, due_rx) = mpsc::channel(DUE_QUEUE);
        let (scheduler_task, scheduler) = Scheduler::new(due_tx);
        let (deliveries, writer) = Deliveries::start(
            store.clone(),
            registry.clone(),
            config.clone(),
            scheduler.clone(),
        );
        let (ingest, committer) = {
            let store = store.clone();
            let registry = registry.clone();
            let deliveries = deliveries.clone();
            let queue = config.server.ingest_queue;
            let rt = tokio::runtime::Handle::current();
            let lag = scheduler.lag().clone();
            tokio::task::spawn_blocking(move || {
                Ingest::start(store, registry, deliveries, seq, queue, rt, lag, !dividing)
            })
            .await
            .map_err(|e| StartError::Other(e.to_string()))??
        };
        // After the owed fan-out above (which wrote its schedule entries), before any request.
        // Nodes dividing the work load each partition's as they take it (`handover`).
        if !dividing {
            let (store, registry) = (store.clone(), registry.clone());
            tokio::task::spawn_blocking(move || {
                registry.backlog().rebuild(store.scheduled(), |hook| {
                    registry.hook(hook).map(|h| h.hook.account_id.clone())
                })?;
                registry.fifo().rebuild(store.scheduled())
            })
            .await
            .map_err(|e| StartError::Other(e.to_string()))??;
        }
        registry.fifo().wire(scheduler.clone(), store.clone());
        let deliveries_for_retention = deliveries.clone();
        let deliverer = Arc::new(Deliverer::new(
            store.clone(),
            registry.clone(),
            config.clone(),
            outbound,
            scheduler.clone(),
            deliveries,
            shares.clone(),
        ));
        let pipeline_tasks = vec![
            tokio::spawn(
                scheduler_task.run((!dividing).then(|| store.clone()), shutdown_rx.clone()),
            ),
            tokio::spawn(Dispatcher::new(deliverer.clone()).run(due_rx, shutdown_rx.clone())),
        ];
        // Dividing: the ownership loop hands this node its partitions from here on, and the
        // registry follows what other nodes change.
        let (ownership_stop, ownership_rx) = watch::channel(false);
        let mut ownership = None;
        let mut handover_worker = None;
        if let (true, Some(pg)) = (dividing, &pg_store) {
            let (handover, worker) = handover::Handover::start(ingest.clone(), deliverer.clone());
            let waiter = handover.clone();
            if let Some((task, mut rounds)) = pg.divide(Arc::new(handover), ownership_rx) {
                // Serve once the first round has run: a node alone holds every partition
                // then, and one joining others knows it holds none yet.
                if tokio::time::timeout(config.cluster.lease, rounds.changed())
                    .await
                    .is_err()
                {
                    tracing::warn!("no partition ownership round succeeded yet; serving meanwhile (requests are relayed or refused until one does)");
                } else if !waiter.settled(Duration::from_secs(60)).await {
                    tracing::warn!("the work of the partitions taken at start is still loading; serving meanwhile (their requests are refused until it is)");
                }
                ownership = Some(task);
            }
            handover_worker = Some(worker);
        }
        let mut placement = None;
        let mut placement_lookup = None;
        if let (true, Some(pg)) = (dividing, &pg_store) {
            let (p, task) = placement::Placement::start(
                &config,
                shares.clone(),
                pg.node_id(),
                shutdown_rx.clone(),
            )?;
            placement = Some(p);
            placement_lookup = Some(task);
        }
        let state = Arc::new(Services {
            config: config.clone(),
            store: store.clone(),
            registry,
            ingest,
            deliverer,
            scheduler: scheduler.clone(),
            manual_retries: manual_retry::ManualRetryLimits::new(),
            placement,
        });
        // The API listener: the two front ends over the same services, split by path.
        let router = edge::router::Router::new(
            api::ApiHandler::new(state.clone()),
            ui::UiHandler::new(state.clone()),
            &config.server,
            // Its standbys name their clients (the key file exists once the store is open).
            store::postgres::is_selected(&config)
                .then(|| edge::forwarded::ForwardKey::load(&config))
                .flatten(),
        );
        let server_tasks = vec![
            tokio::spawn(edge::serve(
                api_listener,
                tls,
                router,
                edge::Timeouts::from_config(&config.server),
                shutdown_rx.clone(),
            )),
            tokio::spawn(edge::serve(
                metrics_listener,
                None,
                metrics::MetricsHandler {
                    prometheus: prometheus.clone(),
                    scheduler: scheduler.clone(),
                    store: store.clone(),
                    registry: state.registry.clone(),
                },
                edge::Timeouts::from_config(&config.server),
                shutdown_rx.clone(),
            )),
        ];
        let mut background = vec![
            metrics::spawn_upkeep(prometheus),
            stats::live::spawn_sampler(store.clone(), scheduler.clone()),
        ];
        if dividing {
            background.push(tokio::spawn(handover::follow_registry(
                store.clone(),
                state.registry.clone(),
                shutdown_rx.clone(),
            )));
        }
        background.extend(handover_worker);
        background.extend(placement_lookup);
        tracing::info!(api = %api_addr, metrics = %metrics_addr, tls = config.server.tls_cert.is_some(), "kyberhook is serving");
        Ok(Engine {
            api_addr,
            metrics_addr,
            shutdown,
            server_tasks,
            pipeline_tasks,
            background,
            retention: Some(retention::Retention::start(
                retention::Purger::new(store.clone(), deliveries_for_retention),
                config.storage.retention,
                // Nodes dividing the work leave retention to the owner of partition 0.
                dividing.then(|| shares.clone()),
            )),
            ownership: ownership.map(|task| (ownership_stop, task)),
            state: Some(state),
            committer: Some(committer),
            writer: Some(writer),
            store,
            scheduler,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Whether start-up recovery has finished and the store still writes (what `/readyz`
    /// reports).
    pub fn is_ready(&self) -> bool {
        self.scheduler.is_ready() && self.store.health().is_ok()
    }

    /// Resolves with the failure once the store can no longer write (never, while it can).
    /// sled's errors are sticky and a failed fsync may have lost pages already acknowledged
    /// to the kernel, so a failed store is not retried: [`run`] ends the process instead.
    pub async fn storage_failure(&self) -> StoreError {
        let mut tick = tokio::time::interval(STORE_HEALTH_EVERY);
        loop {
            tick.tick().await;
            if let Err(failure) = self.store.health() {
                return failure;
            }
        }
    }

    /// Deliveries waiting for an attempt.
    pub fn scheduled(&self) -> usize {
        self.scheduler.scheduled()
    }

    /// A handle that runs retention passes on demand (through the delivery writer, like the
    /// retention thread), with a cutoff of the caller's choosing. Drop it before
    /// [`Engine::shutdown`]: it holds the delivery writer open.
    pub fn purger(&self) -> Option<retention::Purger> {
        self.retention.as_ref().map(|r| r.purger())
    }

    /// Stops accepting, lets open requests finish (10 s deadline), commits what was
    /// acknowledged — fan-out first has the delivery writer write every held delivery, so the
    /// committer's last flush clears their inbox marks — waits for attempts in flight, and
    /// flushes the store.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        // Retention first: its handle keeps the delivery writer, joined below, open.
        if let Some(r) = self.retention.take() {
            let _ = tokio::task::spawn_blocking(move || r.stop()).await;
        }
        for t in self.server_tasks.drain(..) {
            let _ = t.await;
        }
        // Dividing: every partition is handed over (attempts in flight end, held deliveries
        // are written, the partitions released) while the pipeline still runs; the loop's
        // handles on it go with it.
        if let Some((stop, task)) = self.ownership.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        // The last ingest handle goes with the state; the committer then drains and exits.
        drop(self.state.take());
        if let Some(c) = self.committer.take() {
            let _ = tokio::task::spawn_blocking(move || c.join()).await;
        }
        for t in self.pipeline_tasks.drain(..) {
            let _ = t.await;
        }
        // Every attempt has ended and the committer's fan-out is done: the last handles of the
        // delivery writer are gone, and it finishes what they sent.
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        for t in self.background.drain(..) {
            t.abort();
        }
        let store = self.store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.make_durable()).await {
            tracing::error!(error = %e, "final flush failed");
        }
        // Last: a standby on a shared store may write from here on.
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.release()).await;
        tracing::info!("kyberhook stopped");
    }
}

/// Sets up logging as `log.format` and `log.level` (or `RUST_LOG`) say. Call once.
pub fn init_logging(config: &Config) {
    // Trimmed directives and no field-value regexes, as config::log_filter explains.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| config::log_filter(&v).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::builder()
                .with_regex(false)
                .with_default_directive(tracing_subscriber::filter::LevelFilter::ERROR.into())
                .parse_lossy(config::trim_directives(&config.log.level))
        });
    // Colours only on a terminal: escape codes in a log file or journal are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}

/// Runs the engine until SIGINT or SIGTERM, then shuts down gracefully — or until its store
/// fails, which is logged in one line and returned as [`StartError::StorageFailed`] at once,
/// without a graceful shutdown: nothing more can be made durable, nothing unacknowledged is
/// owed, and everything acknowledged is on disk for the restart (call `std::process::exit`
/// with its exit code rather than dropping the runtime, which would wait for blocked work).
///
/// Under systemd (`Type=notify`, `NOTIFY_SOCKET` set) it reports `READY=1` once start-up
/// recovery is done — so `systemctl start` returns when `/readyz` would answer 200 — and
/// `STOPPING=1` when the shutdown begins. Without `NOTIFY_SOCKET` both are no-ops. There is no
/// reload: the config is read once, at start.
pub async fn run(config: Config) -> Result<(), StartError> {
    let engine = match Engine::start(config).await {
        Ok(engine) => engine,
        Err(StartError::StorageFailed(failure)) => {
            log_storage_failure(&failure);
            return Err(StartError::StorageFailed(failure));
        }
        Err(e) => return Err(e),
    };
    // Installed before READY=1 can go out: a SIGTERM that follows readiness at once must find
    // its handler, not the default action (which ends the process without a shutdown).
    let stop = shutdown_signal();
    let recovered = engine.scheduler.clone();
    let readiness = tokio::spawn(async move {
        recovered.wait_ready().await;
        notify_service(sd_notify::NotifyState::Ready);
    });
    tokio::select! {
        () = stop => {}
        failure = engine.storage_failure() => {
            log_storage_failure(&failure);
            return Err(StartError::StorageFailed(failure));
        }
    }
    readiness.abort();
    tracing::info!("shutting down");
    notify_service(sd_notify::NotifyState::Stopping);
    engine.shutdown().await;
    Ok(())
}

/// The one line a storage failure ends the process with, at start-up (the write probe) or
/// while serving.
fn log_storage_failure(failure: &StoreError) {
    tracing::error!(
        error = %failure,
        exit_code = EXIT_STORAGE_FAILED,
        "storage cannot write (disk full, I/O error, or a lost database lease); exiting so that a supervisor restarts kyberhook: every acknowledged event is stored and is delivered after the restart (or by the node that took over)"
    );
}

/// Tells the service manager about a state change, if one is listening.
pub(crate) fn notify_service(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future ends at the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Some(mut term), None) => {
                    term.recv().await;
                }
                (None, Some(mut int)) => {
                    int.recv().await;
                }
                (None, None) => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
