//! Prometheus metrics, served as OpenMetrics text on `GET /metrics` of a separate HTTP port.
//!
//! - `rba_cache_requests_total{method,code}`: every RPC by its final gRPC code;
//! - `rba_cache_action_cache_hits_total`, `rba_cache_action_cache_misses_total`;
//! - `rba_cache_blob_lookups_total{result="hit"|"miss"}`: digests asked in FindMissingBlobs;
//! - `rba_cache_bytes_received_total`, `rba_cache_bytes_sent_total`: blob payload on the wire;
//! - store gauges read at scrape time from the seams' counters (never a scan):
//!   `rba_cache_store_bytes`, `rba_cache_store_blobs`, `rba_cache_store_capacity_bytes` (the
//!   configured `store.max_bytes`), `rba_cache_evictions_total`,
//!   `rba_cache_evicted_bytes_total`, `rba_cache_action_cache_entries`,
//!   `rba_cache_read_grants`, `rba_cache_upload_sessions`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rba_cas::{ActionCache, Stores};
use tonic::{Response, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    result: &'static str,
}

/// The server's counters. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    ac_hits: Counter,
    ac_misses: Counter,
    lookups: Family<LookupLabels, Counter>,
    bytes_received: Counter,
    bytes_sent: Counter,
}

/// Reads the store's own counters at scrape time.
#[derive(Debug)]
struct StoreCollector {
    stores: Stores,
    capacity: u64,
    upload_sessions: Arc<AtomicU64>,
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.stores.blobs().stats();
        let gauges = [
            (
                "rba_cache_store_bytes",
                "Bytes held by the blob store",
                stats.total_bytes,
            ),
            (
                "rba_cache_store_blobs",
                "Blobs held by the blob store",
                stats.blob_count,
            ),
            (
                "rba_cache_store_capacity_bytes",
                "Eviction threshold of the blob store",
                self.capacity,
            ),
            (
                "rba_cache_action_cache_entries",
                "Entries in the action cache (all instances)",
                self.stores.actions().len(),
            ),
            (
                "rba_cache_read_grants",
                "Read grants recorded (all tenants)",
                self.stores.grants().len(),
            ),
            (
                "rba_cache_upload_sessions",
                "Resumable uploads in progress",
                self.upload_sessions.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counters = [
            (
                "rba_cache_evictions",
                "Blobs evicted since start",
                stats.evictions,
            ),
            (
                "rba_cache_evicted_bytes",
                "Bytes evicted since start",
                stats.evicted_bytes,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Registers every metric; store gauges are read from `stores` at scrape time, and
    /// `capacity` is the store's configured eviction threshold.
    pub fn new(stores: Stores, capacity: u64, upload_sessions: Arc<AtomicU64>) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "rba_cache_requests",
            "gRPC requests by method and final status code",
            requests.clone(),
        );
        let ac_hits = Counter::default();
        registry.register(
            "rba_cache_action_cache_hits",
            "GetActionResult calls answered with a complete result",
            ac_hits.clone(),
        );
        let ac_misses = Counter::default();
        registry.register(
            "rba_cache_action_cache_misses",
            "GetActionResult calls answered NOT_FOUND",
            ac_misses.clone(),
        );
        let lookups = Family::<LookupLabels, Counter>::default();
        registry.register(
            "rba_cache_blob_lookups",
            "Digests asked about in FindMissingBlobs",
            lookups.clone(),
        );
        let bytes_received = Counter::default();
        registry.register(
            "rba_cache_bytes_received",
            "Blob bytes received from clients",
            bytes_received.clone(),
        );
        let bytes_sent = Counter::default();
        registry.register(
            "rba_cache_bytes_sent",
            "Blob bytes sent to clients",
            bytes_sent.clone(),
        );
        registry.register_collector(Box::new(StoreCollector {
            stores,
            capacity,
            upload_sessions,
        }));
        Metrics {
            registry,
            requests,
            ac_hits,
            ac_misses,
            lookups,
            bytes_received,
            bytes_sent,
        }
    }

    /// Counts a finished RPC and hands its result back: the one place a call is counted.
    pub fn counted<T>(&self, method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
        let code = match &result {
            Ok(_) => "ok",
            Err(status) => code_name(status.code()),
        };
        self.requests
            .get_or_create(&RequestLabels { method, code })
            .inc();
        result
    }

    /// Counts a finished RPC and wraps its answer for tonic: how a service method ends.
    pub fn answer<T>(
        &self,
        method: &'static str,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        self.counted(method, result).map(Response::new)
    }

    /// Counts an action-cache lookup.
    pub fn action_cache(&self, hit: bool) {
        if hit {
            self.ac_hits.inc()
        } else {
            self.ac_misses.inc()
        };
    }

    /// Counts FindMissingBlobs answers.
    pub fn lookups(&self, hits: u64, misses: u64) {
        self.lookups
            .get_or_create(&LookupLabels { result: "hit" })
            .inc_by(hits);
        self.lookups
            .get_or_create(&LookupLabels { result: "miss" })
            .inc_by(misses);
    }

    /// Counts blob bytes received.
    pub fn received(&self, bytes: u64) {
        self.bytes_received.inc_by(bytes);
    }

    /// Counts blob bytes sent.
    pub fn sent(&self, bytes: u64) {
        self.bytes_sent.inc_by(bytes);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        text
    }
}

/// Lowercase snake names of gRPC codes, for labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// The HTTP app serving `/metrics` (and `/healthz`).
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::header;
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}
