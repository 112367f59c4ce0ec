//! The node's metrics, rendered as Prometheus/OpenMetrics text by `GET /metrics`
//! (prometheus-client).
//!
//! Why its own module: the session and blob protocols, the HTTP gateway and the job watcher all
//! count things, and `/metrics` must render them in one place with the store's own statistics.
//! Counters and histograms live here for the node's lifetime; the gauges (store size, queue)
//! are read from counters the store and executor keep at scrape time — never a scan of the
//! store per scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a finished job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    /// `build`, `test`, `clippy`, …
    kind: String,
    /// `success`, `failed`, `error`, `cancelled`.
    status: &'static str,
    /// `true` when the action cache answered.
    cache_hit: &'static str,
}

/// Job durations from 10 ms to about 45 minutes.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.5, 14))
}

/// The node's counters and histograms. Cheap to clone (every metric is shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    sessions_submitted: Counter,
    sessions_attached: Counter,
    sessions_refused: Counter,
    jobs_succeeded: Counter,
    jobs_failed: Counter,
    cache_hits: Counter,
    uploaded_bytes: Counter,
    served_bytes: Counter,
    peer_fetched_blobs: Counter,
    peer_action_results: Counter,
    protocol_errors: Counter,
    ws_clients: Counter,
    job_duration: Family<JobLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            sessions_submitted: Counter::default(),
            sessions_attached: Counter::default(),
            sessions_refused: Counter::default(),
            jobs_succeeded: Counter::default(),
            jobs_failed: Counter::default(),
            cache_hits: Counter::default(),
            uploaded_bytes: Counter::default(),
            served_bytes: Counter::default(),
            peer_fetched_blobs: Counter::default(),
            peer_action_results: Counter::default(),
            protocol_errors: Counter::default(),
            ws_clients: Counter::default(),
            job_duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

macro_rules! counter {
    ($inc:ident, $field:ident) => {
        /// Adds one.
        pub fn $inc(&self) {
            self.$field.inc();
        }
    };
}

impl Metrics {
    counter!(inc_submitted, sessions_submitted);
    counter!(inc_attached, sessions_attached);
    counter!(inc_refused, sessions_refused);
    counter!(inc_peer_fetched_blobs, peer_fetched_blobs);
    counter!(inc_peer_action_results, peer_action_results);
    counter!(inc_protocol_errors, protocol_errors);
    counter!(inc_ws_clients, ws_clients);

    /// Counts a finished job: its status, whether the cache answered, and its duration.
    pub fn job_finished(
        &self,
        kind: &str,
        status: rba_executor::runner::JobStatus,
        cache_hit: bool,
        duration: std::time::Duration,
    ) {
        use rba_executor::runner::JobStatus;
        if cache_hit {
            self.cache_hits.inc();
        }
        if status == JobStatus::Success {
            self.jobs_succeeded.inc();
        } else {
            self.jobs_failed.inc();
        }
        let status = match status {
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Error => "error",
            JobStatus::Cancelled => "cancelled",
        };
        self.job_duration
            .get_or_create(&JobLabels {
                kind: kind.to_string(),
                status,
                cache_hit: if cache_hit { "true" } else { "false" },
            })
            .observe(duration.as_secs_f64());
    }

    /// Counts bytes clients uploaded.
    pub fn add_uploaded_bytes(&self, bytes: u64) {
        self.uploaded_bytes.inc_by(bytes);
    }

    /// Counts bytes served to peers and clients.
    pub fn add_served_bytes(&self, bytes: u64) {
        self.served_bytes.inc_by(bytes);
    }

    /// Jobs answered from the action cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.get()
    }

    /// Jobs that ended so far (succeeded or not, cache hits included).
    pub fn jobs_finished(&self) -> u64 {
        self.jobs_succeeded.get() + self.jobs_failed.get()
    }

    /// Bytes clients uploaded so far.
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded_bytes.get()
    }

    /// The text exposition of every metric plus the given gauges `(name, help, value)`, read
    /// by the caller from counters it keeps.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut registry = Registry::default();
        let counters: [(&str, &str, &Counter); 12] = [
            (
                "rba_sessions_submitted",
                "Jobs submitted",
                &self.sessions_submitted,
            ),
            (
                "rba_sessions_attached",
                "Attachments to existing sessions",
                &self.sessions_attached,
            ),
            (
                "rba_sessions_refused",
                "Submissions answered with an Error frame",
                &self.sessions_refused,
            ),
            (
                "rba_jobs_succeeded",
                "Jobs that ended with success",
                &self.jobs_succeeded,
            ),
            (
                "rba_jobs_failed",
                "Jobs that ended with an error",
                &self.jobs_failed,
            ),
            (
                "rba_cache_hits",
                "Jobs answered from the action cache",
                &self.cache_hits,
            ),
            (
                "rba_uploaded_bytes",
                "Blob bytes uploaded by clients",
                &self.uploaded_bytes,
            ),
            (
                "rba_served_bytes",
                "Blob bytes served over /rba/cas/1.0.0",
                &self.served_bytes,
            ),
            (
                "rba_peer_fetched_blobs",
                "Blobs fetched from trusted peers",
                &self.peer_fetched_blobs,
            ),
            (
                "rba_peer_action_results",
                "Signed action results accepted from trusted peers",
                &self.peer_action_results,
            ),
            (
                "rba_protocol_errors",
                "Malformed or oversized frames and protocol violations",
                &self.protocol_errors,
            ),
            (
                "rba_websocket_clients",
                "WebSocket event subscriptions",
                &self.ws_clients,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "rba_job_duration_seconds",
            "Wall time of finished jobs by kind, status and cache hit",
            self.job_duration.clone(),
        );
        for (name, help, value) in gauges {
            registry.register(
                *name,
                *help,
                ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)),
            );
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_the_job_histogram_render() {
        let metrics = Metrics::default();
        metrics.inc_submitted();
        metrics.add_uploaded_bytes(42);
        metrics.job_finished(
            "build",
            rba_executor::runner::JobStatus::Success,
            true,
            std::time::Duration::from_millis(120),
        );
        let text = metrics.render(&[("rba_cas_blobs", "Blobs held by the CAS", 7)]);
        for needle in [
            "# TYPE rba_sessions_submitted counter",
            "rba_sessions_submitted_total 1",
            "rba_uploaded_bytes_total 42",
            "rba_cache_hits_total 1",
            "rba_jobs_succeeded_total 1",
            "# TYPE rba_job_duration_seconds histogram",
            "rba_job_duration_seconds_count{kind=\"build\",status=\"success\",cache_hit=\"true\"} 1",
            "rba_cas_blobs 7",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
        assert_eq!(metrics.jobs_finished(), 1);
    }
}
