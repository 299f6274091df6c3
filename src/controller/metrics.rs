//! Prometheus metrics of the controller (prometheus-client), served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    freeze_window: Histogram,
    cut_duration: Histogram,
    snapshots: Family<OutcomeLabels, Counter>,
    reconcile_errors: Family<ControllerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tandem");
        // 1 ms to ~65 s: freeze windows are tens of milliseconds, cuts up to the freeze timeout.
        let buckets = || prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17);
        let freeze_window = Histogram::new(buckets());
        let cut_duration = Histogram::new(buckets());
        let snapshots = Family::<OutcomeLabels, Counter>::default();
        let reconcile_errors = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "freeze_window_seconds",
            "First freeze to last thaw of a group snapshot, across its nodes",
            freeze_window.clone(),
        );
        registry.register(
            "cut_duration_seconds",
            "From the start of a group snapshot until every node has cut",
            cut_duration.clone(),
        );
        registry.register(
            "group_snapshots",
            "Group snapshots finished, by outcome",
            snapshots.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and will be retried",
            reconcile_errors.clone(),
        );
        Metrics {
            registry,
            freeze_window,
            cut_duration,
            snapshots,
            reconcile_errors,
        }
    }
}

impl Metrics {
    pub fn freeze_window(&self, seconds: f64) {
        self.freeze_window.observe(seconds);
    }

    pub fn cut_duration(&self, seconds: f64) {
        self.cut_duration.observe(seconds);
    }

    pub fn snapshot_finished(&self, outcome: &str) {
        self.snapshots
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn reconcile_error(&self, controller: &str) {
        self.reconcile_errors
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
