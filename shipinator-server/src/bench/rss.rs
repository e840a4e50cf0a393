//! Resident memory of this process, from `/proc/self/status` (Linux; 0 elsewhere).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// `VmRSS` in bytes.
pub(crate) fn current_rss_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l[field.len()..]
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// Samples `VmRSS` in the background and keeps the maximum, so a phase's peak can be told from
/// the process's lifetime peak.
#[derive(Debug)]
pub(crate) struct PeakSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakSampler {
    pub(crate) fn start(every: Duration) -> Self {
        let peak = Arc::new(AtomicU64::new(current_rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(current_rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(every).await;
            }
        });
        Self { peak, stop, task }
    }

    pub(crate) async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed).max(current_rss_bytes())
    }
}
