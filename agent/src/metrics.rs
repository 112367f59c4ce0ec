//! The node's counters, rendered as Prometheus text by `GET /metrics`.
//!
//! Why its own module: the session and blob protocols, the HTTP gateway and the job watcher all
//! count things, and `/metrics` must render them in one place with the store's own statistics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters (Prometheus `counter`s).
#[derive(Debug, Default)]
pub struct Metrics {
    sessions_submitted: AtomicU64,
    sessions_attached: AtomicU64,
    sessions_refused: AtomicU64,
    jobs_succeeded: AtomicU64,
    jobs_failed: AtomicU64,
    cache_hits: AtomicU64,
    uploaded_bytes: AtomicU64,
    served_bytes: AtomicU64,
    peer_fetched_blobs: AtomicU64,
    peer_action_results: AtomicU64,
    protocol_errors: AtomicU64,
    ws_clients: AtomicU64,
}

macro_rules! counter {
    ($inc:ident, $field:ident) => {
        /// Adds one.
        pub fn $inc(&self) {
            self.$field.fetch_add(1, Ordering::Relaxed);
        }
    };
}

impl Metrics {
    counter!(inc_submitted, sessions_submitted);
    counter!(inc_attached, sessions_attached);
    counter!(inc_refused, sessions_refused);
    counter!(inc_succeeded, jobs_succeeded);
    counter!(inc_failed, jobs_failed);
    counter!(inc_cache_hits, cache_hits);
    counter!(inc_peer_fetched_blobs, peer_fetched_blobs);
    counter!(inc_peer_action_results, peer_action_results);
    counter!(inc_protocol_errors, protocol_errors);
    counter!(inc_ws_clients, ws_clients);

    /// Counts bytes clients uploaded.
    pub fn add_uploaded_bytes(&self, bytes: u64) {
        self.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts bytes served to peers and clients.
    pub fn add_served_bytes(&self, bytes: u64) {
        self.served_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Jobs answered from the action cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    /// Jobs that ended so far (succeeded or not, cache hits included).
    pub fn jobs_finished(&self) -> u64 {
        self.jobs_succeeded.load(Ordering::Relaxed) + self.jobs_failed.load(Ordering::Relaxed)
    }

    /// Bytes clients uploaded so far.
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded_bytes.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition of the counters plus the given gauges.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 12] = [
            (
                "rba_sessions_submitted_total",
                "Jobs submitted",
                &self.sessions_submitted,
            ),
            (
                "rba_sessions_attached_total",
                "Attachments to existing sessions",
                &self.sessions_attached,
            ),
            (
                "rba_sessions_refused_total",
                "Submissions answered with an Error frame",
                &self.sessions_refused,
            ),
            (
                "rba_jobs_succeeded_total",
                "Jobs that ended with success",
                &self.jobs_succeeded,
            ),
            (
                "rba_jobs_failed_total",
                "Jobs that ended with an error",
                &self.jobs_failed,
            ),
            (
                "rba_cache_hits_total",
                "Jobs answered from the action cache",
                &self.cache_hits,
            ),
            (
                "rba_uploaded_bytes_total",
                "Blob bytes uploaded by clients",
                &self.uploaded_bytes,
            ),
            (
                "rba_served_bytes_total",
                "Blob bytes served over /rba/cas/1.0.0",
                &self.served_bytes,
            ),
            (
                "rba_peer_fetched_blobs_total",
                "Blobs fetched from trusted peers",
                &self.peer_fetched_blobs,
            ),
            (
                "rba_peer_action_results_total",
                "Signed action results accepted from trusted peers",
                &self.peer_action_results,
            ),
            (
                "rba_protocol_errors_total",
                "Malformed or oversized frames and protocol violations",
                &self.protocol_errors,
            ),
            (
                "rba_websocket_clients_total",
                "WebSocket event subscriptions",
                &self.ws_clients,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}
