//! Prometheus metrics of the controller (prometheus-client), served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabels {
    namespace: String,
    schedule: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    freeze_window: Histogram,
    cut_duration: Histogram,
    snapshots: Family<OutcomeLabels, Counter>,
    reconcile_errors: Family<ControllerLabels, Counter>,
    reconciles: Family<ControllerLabels, Counter>,
    schedule_runs: Family<OutcomeLabels, Counter>,
    retention_deleted: Counter,
    last_ready_timestamp: Family<ScheduleLabels, FloatGauge>,
    last_ready_age: Family<ScheduleLabels, FloatGauge>,
    /// Per schedule: when its newest Ready snapshot became Ready (the age is computed at scrape).
    last_ready: std::sync::Mutex<std::collections::HashMap<ScheduleLabels, f64>>,
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
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles run, by controller (what one watch event costs)",
            reconciles.clone(),
        );
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
        let schedule_runs = Family::<OutcomeLabels, Counter>::default();
        let retention_deleted = Counter::default();
        let last_ready_timestamp = Family::<ScheduleLabels, FloatGauge>::default();
        let last_ready_age = Family::<ScheduleLabels, FloatGauge>::default();
        registry.register(
            "schedule_runs",
            "Due runs of GroupSnapshotSchedules by outcome: started, skipped (one was unfinished), missed (too late or during downtime), ready, failed",
            schedule_runs.clone(),
        );
        registry.register(
            "schedule_retention_deleted",
            "GroupSnapshots deleted by schedule retention",
            retention_deleted.clone(),
        );
        registry.register(
            "schedule_last_ready_timestamp_seconds",
            "When the newest Ready GroupSnapshot of a schedule became Ready (Unix seconds)",
            last_ready_timestamp.clone(),
        );
        registry.register(
            "schedule_last_ready_age_seconds",
            "Age of the newest Ready GroupSnapshot of a schedule, at scrape time",
            last_ready_age.clone(),
        );
        Metrics {
            registry,
            freeze_window,
            cut_duration,
            snapshots,
            reconcile_errors,
            reconciles,
            schedule_runs,
            retention_deleted,
            last_ready_timestamp,
            last_ready_age,
            last_ready: Default::default(),
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

    pub fn reconciled(&self, controller: &str) {
        self.reconciles
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
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

    /// Counts `n` due runs of a schedule with `outcome`.
    pub fn schedule_runs(&self, outcome: &str, n: u64) {
        if n > 0 {
            self.schedule_runs
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.into(),
                })
                .inc_by(n);
        }
    }

    pub fn retention_deleted(&self) {
        self.retention_deleted.inc();
    }

    /// Records when the newest Ready snapshot of a schedule became Ready (None: it has none, or
    /// the schedule is gone).
    pub fn schedule_last_ready(&self, namespace: &str, schedule: &str, unix_seconds: Option<f64>) {
        let labels = ScheduleLabels {
            namespace: namespace.into(),
            schedule: schedule.into(),
        };
        let mut last = self.last_ready.lock().unwrap_or_else(|p| p.into_inner());
        match unix_seconds {
            Some(t) => {
                self.last_ready_timestamp.get_or_create(&labels).set(t);
                last.insert(labels, t);
            }
            None => {
                self.last_ready_timestamp.remove(&labels);
                self.last_ready_age.remove(&labels);
                last.remove(&labels);
            }
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        for (labels, t) in self
            .last_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            self.last_ready_age
                .get_or_create(labels)
                .set((now - t).max(0.0));
        }
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
