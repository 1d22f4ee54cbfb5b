//! Prometheus metrics with the reference's names (§4.13).
//!
//! State gauges are computed at scrape time from the live state rather than kept up to
//! date on every update, so the hot path pays nothing for them.

use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::snapshot::Stats;
use crate::state::State;

/// gRPC service name used in the `grpc_service` label.
pub const GRPC_SERVICE: &str = "sidero.discovery.server.Cluster";
/// Every method with its `grpc_type`, for pre-initialized series.
pub const GRPC_METHODS: [(&str, &str); 5] = [
    ("Hello", "unary"),
    ("AffiliateUpdate", "unary"),
    ("AffiliateDelete", "unary"),
    ("List", "unary"),
    ("Watch", "server_stream"),
];

/// gRPC code names as grpc-go prints them (the `grpc_code` label).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Every code, in numeric order (index = code).
const ALL_CODES: [tonic::Code; 17] = [
    tonic::Code::Ok,
    tonic::Code::Cancelled,
    tonic::Code::Unknown,
    tonic::Code::InvalidArgument,
    tonic::Code::DeadlineExceeded,
    tonic::Code::NotFound,
    tonic::Code::AlreadyExists,
    tonic::Code::PermissionDenied,
    tonic::Code::ResourceExhausted,
    tonic::Code::FailedPrecondition,
    tonic::Code::Aborted,
    tonic::Code::OutOfRange,
    tonic::Code::Unimplemented,
    tonic::Code::Internal,
    tonic::Code::Unavailable,
    tonic::Code::DataLoss,
    tonic::Code::Unauthenticated,
];

/// Cluster, affiliate, endpoint and subscription counts, walked at scrape time.
#[derive(Debug)]
struct StateCollector {
    state: State,
    clusters: IntGauge,
    affiliates: IntGauge,
    endpoints: IntGauge,
    subscriptions: IntGauge,
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        [
            &self.clusters,
            &self.affiliates,
            &self.endpoints,
            &self.subscriptions,
        ]
        .into_iter()
        .flat_map(|g| g.desc())
        .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let n = self.state.counts();
        self.clusters.set(self.state.cluster_count() as i64);
        self.affiliates.set(n.affiliates as i64);
        self.endpoints.set(n.endpoints as i64);
        self.subscriptions.set(n.subscriptions as i64);
        [
            &self.clusters,
            &self.affiliates,
            &self.endpoints,
            &self.subscriptions,
        ]
        .into_iter()
        .flat_map(|g| g.collect())
        .collect()
    }
}

/// How the etcd backend's mirror follows etcd, read at scrape time.
struct EtcdCollector {
    etcd: std::sync::Arc<crate::etcd::EtcdState>,
    applied: IntGauge,
    resyncs: IntCounter,
    resumes: IntCounter,
    read_restarts: IntCounter,
    data_misses: IntCounter,
    /// Scrapes may run at once: one at a time brings the counters up to date.
    collecting: std::sync::Mutex<()>,
}

impl EtcdCollector {
    fn counters(&self) -> [&IntCounter; 4] {
        [
            &self.resyncs,
            &self.resumes,
            &self.read_restarts,
            &self.data_misses,
        ]
    }
}

impl Collector for EtcdCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.applied.desc();
        for c in self.counters() {
            d.extend(c.desc());
        }
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.collecting.lock().unwrap_or_else(|e| e.into_inner());
        let p = self.etcd.progress();
        self.applied.set(p.applied);
        // They only grow; each counter is brought up to the mirror's count.
        let [resyncs, resumes, read_restarts, data_misses] = self.counters();
        for (c, n) in [
            (resyncs, p.resyncs),
            (resumes, p.resumes),
            (read_restarts, p.read_restarts),
            (data_misses, p.data_misses),
        ] {
            c.inc_by(n.saturating_sub(c.get()));
        }
        let mut m = self.applied.collect();
        for c in self.counters() {
            m.extend(c.collect());
        }
        m
    }
}

#[derive(Debug)]
struct StorageMetrics {
    operations: IntCounterVec,
    size: IntGaugeVec,
    clusters: IntGaugeVec,
    affiliates: IntGaugeVec,
    endpoints: IntGaugeVec,
    duration: GaugeVec,
}

/// One method's `grpc_server_*` series, resolved once at start so the request path
/// increments atomics instead of hashing label values under the vectors' locks.
#[derive(Debug)]
pub struct MethodMetrics {
    pub started: IntCounter,
    pub msg_received: IntCounter,
    pub msg_sent: IntCounter,
    pub handling_seconds: prometheus::Histogram,
    handled: Vec<IntCounter>,
}

impl MethodMetrics {
    pub fn handled(&self, code: tonic::Code) -> &IntCounter {
        // `ALL_CODES` lists the codes in numeric order, so the code is the index.
        &self.handled[(code as usize).min(self.handled.len() - 1)]
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub hello_requests: IntCounterVec,
    hello_versions: crate::grpc::version::VersionLabels,
    pub gc_runs: IntCounter,
    pub gc_clusters: IntCounter,
    pub gc_affiliates: IntCounter,
    pub grpc_started: IntCounterVec,
    pub grpc_handled: IntCounterVec,
    storage: Option<StorageMetrics>,
    methods: Vec<MethodMetrics>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let g =
        IntGaugeVec::new(Opts::new(name, help), &["operation"]).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("unique metric name");
    // Exposed from the start, like the other series, so dashboards see zeros.
    for op in ["save", "load"] {
        g.with_label_values(&[op]);
    }
    g
}

impl Metrics {
    /// Counts one Hello under its client's version label (capped, see
    /// [`crate::grpc::version::VersionLabels`]).
    pub fn count_hello(&self, client_version: &str) {
        self.hello_requests
            .with_label_values(&[self.hello_versions.label(client_version).as_str()])
            .inc();
    }

    /// Registers every metric. Storage metrics exist only with snapshots enabled.
    ///
    /// The `expect`s run once at start on constant definitions; they cannot depend on
    /// input.
    pub fn new(state: State, snapshots: bool) -> Self {
        let registry = Registry::new();
        let gauge =
            |name: &str, help: &str| IntGauge::new(name, help).expect("static metric definition");
        registry
            .register(Box::new(StateCollector {
                state,
                clusters: gauge(
                    "discovery_state_clusters",
                    "The current number of clusters.",
                ),
                affiliates: gauge(
                    "discovery_state_affiliates",
                    "The current number of affiliates.",
                ),
                endpoints: gauge(
                    "discovery_state_endpoints",
                    "The current number of endpoints.",
                ),
                subscriptions: gauge(
                    "discovery_state_subscriptions",
                    "The current number of subscriptions.",
                ),
            }))
            .expect("unique metric name");
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }

        let hello_requests = counter_vec(
            &registry,
            "discovery_server_hello_requests_total",
            "Number of hello requests by client version.",
            &["client_version"],
        );
        hello_requests.with_label_values(&["unknown"]);

        let grpc_labels = ["grpc_type", "grpc_service", "grpc_method"];
        let grpc_started = counter_vec(
            &registry,
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            &grpc_labels,
        );
        let grpc_handled = counter_vec(
            &registry,
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        );
        let grpc_msg_received = counter_vec(
            &registry,
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            &grpc_labels,
        );
        let grpc_msg_sent = counter_vec(
            &registry,
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            &grpc_labels,
        );
        let grpc_handling_seconds = HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            )
            .buckets(vec![0.01, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &grpc_labels,
        )
        .expect("static metric definition");
        registry
            .register(Box::new(grpc_handling_seconds.clone()))
            .expect("unique metric name");
        // Pre-initialized for every method (and code), as upstream's interceptors do.
        let methods = GRPC_METHODS
            .iter()
            .map(|&(method, kind)| {
                let l = [kind, GRPC_SERVICE, method];
                MethodMetrics {
                    started: grpc_started.with_label_values(&l),
                    msg_received: grpc_msg_received.with_label_values(&l),
                    msg_sent: grpc_msg_sent.with_label_values(&l),
                    handling_seconds: grpc_handling_seconds.with_label_values(&l),
                    handled: ALL_CODES
                        .iter()
                        .map(|&code| {
                            grpc_handled.with_label_values(&[
                                kind,
                                GRPC_SERVICE,
                                method,
                                code_name(code),
                            ])
                        })
                        .collect(),
                }
            })
            .collect();

        let storage = snapshots.then(|| {
            let operations = counter_vec(
                &registry,
                "discovery_storage_operations_total",
                "The total number of storage operations.",
                &["operation", "status"],
            );
            for op in ["save", "load"] {
                for status in ["success", "error"] {
                    operations.with_label_values(&[op, status]);
                }
            }
            let duration = GaugeVec::new(
                Opts::new(
                    "discovery_storage_last_operation_duration_seconds",
                    "The duration of the last storage operation.",
                ),
                &["operation"],
            )
            .expect("static metric definition");
            registry
                .register(Box::new(duration.clone()))
                .expect("unique metric name");
            for op in ["save", "load"] {
                duration.with_label_values(&[op]);
            }
            StorageMetrics {
                operations,
                size: gauge_vec(
                    &registry,
                    "discovery_storage_last_snapshot_size_bytes",
                    "The size of the last processed snapshot in bytes.",
                ),
                clusters: gauge_vec(
                    &registry,
                    "discovery_storage_last_operation_clusters",
                    "The number of clusters in the last processed snapshot.",
                ),
                affiliates: gauge_vec(
                    &registry,
                    "discovery_storage_last_operation_affiliates",
                    "The number of affiliates in the last processed snapshot.",
                ),
                endpoints: gauge_vec(
                    &registry,
                    "discovery_storage_last_operation_endpoints",
                    "The number of endpoints in the last processed snapshot.",
                ),
                duration,
            }
        });

        let gc_runs = counter(
            &registry,
            "discovery_state_gc_runs_total",
            "The number of GC runs.",
        );
        let gc_clusters = counter(
            &registry,
            "discovery_state_gc_clusters_total",
            "The total number of clusters removed by GC.",
        );
        let gc_affiliates = counter(
            &registry,
            "discovery_state_gc_affiliates_total",
            "The total number of affiliates removed by GC.",
        );
        Self {
            registry,
            hello_requests,
            hello_versions: crate::grpc::version::VersionLabels::new(
                crate::limits::HELLO_VERSION_LABELS_MAX,
            ),
            gc_runs,
            gc_clusters,
            gc_affiliates,
            grpc_started,
            grpc_handled,
            storage,
            methods,
        }
    }

    /// Adds the etcd backend's series: the revision this replica has applied, how
    /// often its watch resumed or had to read everything again, and how often
    /// watchers started again for want of an affiliate's data.
    pub fn register_etcd(&self, etcd: std::sync::Arc<crate::etcd::EtcdState>) {
        let collector = EtcdCollector {
            etcd,
            applied: IntGauge::new(
                "discovery_etcd_applied_revision",
                "The last etcd revision this replica has applied to its copy of the state.",
            )
            .expect("static metric definition"),
            resyncs: IntCounter::new(
                "discovery_etcd_resyncs_total",
                "Full reads of etcd after the watch could not resume (etcd had compacted \
                 what it needed); each restarts this replica's watchers.",
            )
            .expect("static metric definition"),
            resumes: IntCounter::new(
                "discovery_etcd_watch_resumes_total",
                "etcd watches that broke (a member lost, stalled or restarted); each \
                 resumes from the next revision, nothing skipped.",
            )
            .expect("static metric definition"),
            read_restarts: IntCounter::new(
                "discovery_etcd_full_read_restarts_total",
                "Full reads of etcd begun again because etcd compacted the revision \
                 they read at.",
            )
            .expect("static metric definition"),
            data_misses: IntCounter::new(
                "discovery_etcd_data_misses_total",
                "Clusters whose watchers on this replica started again from a snapshot \
                 because an affiliate's data, needed to tell them a change, could not be \
                 read from etcd.",
            )
            .expect("static metric definition"),
            collecting: std::sync::Mutex::new(()),
        };
        if let Err(e) = self.registry.register(Box::new(collector)) {
            tracing::warn!(error = %e, "etcd metrics not registered");
        }
    }

    /// The series of a method in [`GRPC_METHODS`] (by position).
    pub fn method(&self, index: usize) -> &MethodMetrics {
        &self.methods[index.min(self.methods.len() - 1)]
    }

    /// Position of a method in [`GRPC_METHODS`].
    pub fn method_index(name: &str) -> usize {
        GRPC_METHODS
            .iter()
            .position(|(m, _)| *m == name)
            .unwrap_or(0)
    }

    /// Records a snapshot save or load; `stats` is `None` on failure.
    pub fn storage_operation(&self, operation: &str, stats: Option<&Stats>, elapsed: Duration) {
        let Some(m) = &self.storage else { return };
        let status = if stats.is_some() { "success" } else { "error" };
        m.operations.with_label_values(&[operation, status]).inc();
        if let Some(s) = stats {
            m.size
                .with_label_values(&[operation])
                .set(s.size_bytes as i64);
            m.clusters
                .with_label_values(&[operation])
                .set(s.clusters as i64);
            m.affiliates
                .with_label_values(&[operation])
                .set(s.affiliates as i64);
            m.endpoints
                .with_label_values(&[operation])
                .set(s.endpoints as i64);
            m.duration
                .with_label_values(&[operation])
                .set(elapsed.as_secs_f64());
        }
    }

    /// The value of one series as `/metrics` shows it, named with its labels:
    /// `discovery_storage_operations_total{operation="save",status="success"}`.
    pub fn sample(&self, series: &str) -> Option<f64> {
        self.render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The text exposition format served on `/metrics`.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "failed to encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
