//! The process: file descriptors, resident memory and start time (from `/proc`, Linux), and the
//! build's version.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::labels::VersionLabels;
use super::Metrics;

pub(super) struct ProcessMetrics {
    open_fds: Gauge,
    max_fds: Gauge,
    resident_memory: Gauge,
    start_time: Gauge,
    build_info: Family<VersionLabels, Gauge>,
}

impl ProcessMetrics {
    pub(super) fn new() -> ProcessMetrics {
        let m = ProcessMetrics {
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            resident_memory: Gauge::default(),
            start_time: Gauge::default(),
            build_info: Family::default(),
        };
        m.build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        m.start_time
            .set(i64::try_from(crate::clock::unix_secs(process_start())).unwrap_or(0));
        m
    }
}

impl Metrics {
    /// The `process_` gauges, named without the `pullthrough_` prefix as every exporter names
    /// them.
    pub(super) fn register_process(&self, root: &mut Registry) {
        root.register(
            "process_open_fds",
            "Open file descriptors",
            self.process.open_fds.clone(),
        );
        root.register(
            "process_max_fds",
            "The soft limit on open file descriptors",
            self.process.max_fds.clone(),
        );
        root.register(
            "process_resident_memory_bytes",
            "Resident memory",
            self.process.resident_memory.clone(),
        );
        root.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            self.process.start_time.clone(),
        );
    }

    pub(super) fn register_build_info(&self, r: &mut Registry) {
        r.register(
            "build_info",
            "Always 1, labelled with the version",
            self.process.build_info.clone(),
        );
    }

    /// Reads the process gauges from /proc (Linux; elsewhere they stay 0).
    pub(super) fn update_process(&self) {
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.process.open_fds.set(fds.count() as i64);
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(kb) = proc_field(&status, "VmRSS:") {
                self.process.resident_memory.set(kb.saturating_mul(1024));
            }
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            if let Some(soft) = proc_field(&limits, "Max open files") {
                self.process.max_fds.set(soft);
            }
        }
    }
}

/// The first number after `key` on the line that starts with it.
fn proc_field(text: &str, key: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// When this process started, near enough: when its metrics were first made.
fn process_start() -> std::time::SystemTime {
    static START: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::SystemTime::now)
}
