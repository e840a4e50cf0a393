//! Prometheus metrics: run transitions and results, job durations, failure rate, queue depth
//! and executor submissions.
//!
//! Counters come from this process's driver events (each replica reports what it drove);
//! the gauges of non-terminal runs and the queue depth are read from the store at scrape time.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use shipinator_core::domain::RunStatus;
use shipinator_core::driver::DriverHandle;
use shipinator_core::store::{PageRequest, RunEventKind, RunFilter, Store};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Job duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The process's metrics registry.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    handle: Option<PrometheusHandle>,
}

impl Metrics {
    /// Installs the Prometheus recorder once per process.
    pub(crate) fn global() -> Self {
        let handle = HANDLE
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        Matcher::Full("shipinator_job_duration_seconds".to_owned()),
                        &DURATION_BUCKETS,
                    )
                    .ok()?;
                let recorder = builder.build_recorder();
                let handle = recorder.handle();
                metrics::set_global_recorder(recorder).ok()?;
                describe();
                Some(handle)
            })
            .clone();
        Self { handle }
    }

    /// The text exposition.
    pub(crate) fn render(&self) -> String {
        self.handle
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default()
    }

    /// Sets the store-derived gauges.
    pub(crate) async fn refresh(&self, store: &dyn Store) {
        for status in [RunStatus::Pending, RunStatus::Running] {
            let filter = RunFilter {
                status: Some(status),
                ..RunFilter::default()
            };
            // Counted up to one page: the gauge saturates at 1000.
            match store
                .list_runs(&filter, &PageRequest::first(PageRequest::MAX_LIMIT))
                .await
            {
                Ok(page) => {
                    let n = page.items.len() as f64;
                    metrics::gauge!("shipinator_runs", "status" => status.as_str()).set(n);
                    if status == RunStatus::Pending {
                        metrics::gauge!("shipinator_queue_depth").set(n);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "metrics: listing runs failed"),
            }
        }
    }
}

fn describe() {
    metrics::describe_counter!(
        "shipinator_run_transitions_total",
        "Run status changes committed by this process, by new status"
    );
    metrics::describe_counter!(
        "shipinator_runs_finished_total",
        "Runs that ended, by status (success, failed, canceled)"
    );
    metrics::describe_gauge!(
        "shipinator_run_failure_ratio",
        "Failed runs over finished runs since this process started"
    );
    metrics::describe_histogram!(
        "shipinator_job_duration_seconds",
        "Duration of jobs (stages) from running to their end, by stage status"
    );
    metrics::describe_counter!(
        "shipinator_executor_submissions_total",
        "Executions submitted to the executor"
    );
    metrics::describe_gauge!(
        "shipinator_runs",
        "Non-terminal runs in the store, by status"
    );
    metrics::describe_gauge!("shipinator_queue_depth", "Runs waiting to start");
}

/// Turns the driver's events into metrics until the driver stops.
pub(crate) fn spawn_event_metrics(driver: &DriverHandle) -> JoinHandle<()> {
    let mut events = driver.subscribe();
    tokio::spawn(async move {
        let finished = AtomicU64::new(0);
        let failed = AtomicU64::new(0);
        let mut jobs_started: HashMap<shipinator_core::domain::JobId, Instant> = HashMap::new();
        let mut executions_seen = std::collections::HashSet::new();
        loop {
            let event = match events.recv().await {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "metrics: event receiver lagged");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            match event.kind {
                RunEventKind::RunChanged { status, .. } => {
                    metrics::counter!("shipinator_run_transitions_total", "status" => status.as_str())
                        .increment(1);
                    if status.is_terminal() {
                        metrics::counter!("shipinator_runs_finished_total", "status" => status.as_str())
                            .increment(1);
                        let total = finished.fetch_add(1, Ordering::Relaxed) + 1;
                        let bad = if status == RunStatus::Failed {
                            failed.fetch_add(1, Ordering::Relaxed) + 1
                        } else {
                            failed.load(Ordering::Relaxed)
                        };
                        metrics::gauge!("shipinator_run_failure_ratio")
                            .set(bad as f64 / total as f64);
                    }
                }
                RunEventKind::JobChanged { job_id, status } => {
                    if status.is_terminal() {
                        if let Some(started) = jobs_started.remove(&job_id) {
                            metrics::histogram!("shipinator_job_duration_seconds", "status" => status.as_str())
                                .record(started.elapsed().as_secs_f64());
                        }
                    } else if status == shipinator_core::domain::Status::Running {
                        jobs_started.entry(job_id).or_insert_with(Instant::now);
                    }
                }
                RunEventKind::ExecutionChanged {
                    execution_id,
                    status,
                } => {
                    if status.is_terminal() {
                        executions_seen.remove(&execution_id);
                    } else if executions_seen.insert(execution_id) {
                        metrics::counter!("shipinator_executor_submissions_total").increment(1);
                    }
                }
                RunEventKind::StepChanged { .. } | RunEventKind::ArtifactRegistered { .. } => {}
            }
        }
    })
}
