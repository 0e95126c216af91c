//! Every metric the gateway exports: names, help texts, and small record functions.
//!
//! Counters that the pipeline already keeps exactly (the sample [`Ledger`], device counters)
//! are copied into the Prometheus recorder when `/metrics` is scraped ([`sync`]), so the hot
//! path pays nothing for them and Prometheus can never disagree with `/status`. Events with no
//! other home (state changes, batch durations, HTTP requests) are recorded where they happen.
//! The recorder is global: [`install`] installs it once per process and hands out its handle
//! afterwards, so tests that build several apps share it and assert on deltas.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use axum::http::{Method, StatusCode};
use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::device::codec::InvalidReason;
use crate::device::state::DeviceState;
use crate::device::{CountersSnapshot, LinkFailure};
use crate::ledger::{DropReason, Ledger, RejectReason};

/// Samples read from device links.
pub const SAMPLES_READ: &str = "telemetryhub_samples_read_total";
/// Samples accepted over HTTP.
pub const SAMPLES_INGESTED: &str = "telemetryhub_samples_ingested_total";
/// Samples the workers processed.
pub const SAMPLES_PROCESSED: &str = "telemetryhub_samples_processed_total";
/// Samples the workers rejected, by reason.
pub const SAMPLES_REJECTED: &str = "telemetryhub_samples_rejected_total";
/// Samples dropped before processing, by reason.
pub const BUFFER_DROPPED: &str = "telemetryhub_buffer_dropped_total";
/// Samples that entered the buffer.
pub const BUFFER_PUSHED: &str = "telemetryhub_buffer_pushed_total";
/// Samples taken from the buffer by the dispatcher.
pub const BUFFER_POPPED: &str = "telemetryhub_buffer_popped_total";
/// Samples waiting in the buffer.
pub const BUFFER_DEPTH: &str = "telemetryhub_buffer_depth";
/// Buffer capacity.
pub const BUFFER_CAPACITY: &str = "telemetryhub_buffer_capacity";
/// Samples in worker batches.
pub const WORKER_IN_FLIGHT: &str = "telemetryhub_worker_in_flight_samples";
/// Worker batches finished.
pub const WORKER_BATCHES: &str = "telemetryhub_worker_batches_total";
/// Time to process one batch.
pub const PROCESSING_DURATION: &str = "telemetryhub_processing_duration_seconds";
/// Valid samples read, per device.
pub const DEVICE_SAMPLES_READ: &str = "telemetryhub_device_samples_read_total";
/// Invalid frames, per device and reason.
pub const FRAMES_INVALID: &str = "telemetryhub_frames_invalid_total";
/// Samples missing by sequence number, per device.
pub const DEVICE_SEQ_GAPS: &str = "telemetryhub_device_seq_gap_samples_total";
/// Link failures, per device and kind.
pub const DEVICE_LINK_FAILURES: &str = "telemetryhub_device_link_failures_total";
/// Device state, 1 for the current state.
pub const DEVICE_STATE: &str = "telemetryhub_device_state";
/// Last processed (calibrated) value, per device, channel and unit.
pub const CHANNEL_VALUE: &str = "telemetryhub_channel_value";
/// HTTP requests, by method, matched route and status.
pub const HTTP_REQUESTS: &str = "telemetryhub_http_requests_total";
/// HTTP request duration, by method and matched route.
pub const HTTP_DURATION: &str = "telemetryhub_http_request_duration_seconds";
/// Processed samples written to the spool in this run.
pub const SAMPLES_SPOOLED: &str = "telemetryhub_samples_spooled_total";
/// Whether the uplink is connected to its broker.
pub const UPLINK_CONNECTED: &str = "telemetryhub_uplink_connected";
/// Uplink messages published (resends included).
pub const UPLINK_PUBLISHED: &str = "telemetryhub_uplink_published_total";
/// Uplink messages the broker acknowledged.
pub const UPLINK_ACKED: &str = "telemetryhub_uplink_acked_total";
/// Uplink connections lost or refused.
pub const UPLINK_RECONNECTS: &str = "telemetryhub_uplink_reconnects_total";
/// Bytes of spool files.
pub const SPOOL_BYTES: &str = "telemetryhub_spool_bytes";
/// Messages in the spool not yet acknowledged.
pub const SPOOL_RECORDS: &str = "telemetryhub_spool_records";
/// Samples in the spool not yet acknowledged.
pub const SPOOL_SAMPLES: &str = "telemetryhub_spool_samples";
/// Age of the oldest unacknowledged message in the spool.
pub const SPOOL_OLDEST_AGE: &str = "telemetryhub_spool_oldest_age_seconds";
/// Samples acknowledged by the broker, over the spool's life.
pub const SPOOL_FORWARDED: &str = "telemetryhub_spool_forwarded_samples_total";
/// Samples deleted from the spool unsent, by reason, over the spool's life.
pub const SPOOL_DROPPED: &str = "telemetryhub_spool_dropped_samples_total";
/// Time of one `fdatasync` of the spool.
pub const SPOOL_FSYNC_DURATION: &str = "telemetryhub_spool_fsync_duration_seconds";
/// Build information.
pub const BUILD_INFO: &str = "telemetryhub_build_info";
/// Whether the last configuration reload succeeded (1) or was refused (0); Prometheus's name.
pub const CONFIG_RELOAD_SUCCESSFUL: &str = "telemetryhub_config_last_reload_successful";
/// When the configuration was last loaded successfully (start-up or reload), Unix seconds.
pub const CONFIG_RELOAD_SUCCESS_TIMESTAMP: &str =
    "telemetryhub_config_last_reload_success_timestamp_seconds";
/// Seconds since the gateway started.
pub const UPTIME: &str = "telemetryhub_uptime_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // HTTP requests take tens of microseconds to seconds; a batch takes microseconds.
            let request_buckets = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let batch_buckets = [
                0.000_001,
                0.000_002_5,
                0.000_005,
                0.000_01,
                0.000_025,
                0.000_05,
                0.000_1,
                0.000_25,
                0.001,
                0.01,
                0.1,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(PROCESSING_DURATION.to_owned()),
                    &batch_buckets,
                )
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &request_buckets)
                .expect("the bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            describe();
            STARTED.get_or_init(SystemTime::now);
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// A configuration was loaded (at start, or by a reload) or refused.
pub fn config_loaded(success: bool) {
    gauge!(CONFIG_RELOAD_SUCCESSFUL).set(if success { 1.0 } else { 0.0 });
    if success {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        gauge!(CONFIG_RELOAD_SUCCESS_TIMESTAMP).set(now.as_secs_f64());
    }
}

fn describe() {
    describe_counter!(
        SAMPLES_READ,
        Unit::Count,
        "Valid samples read from device links and handed to the buffer."
    );
    describe_counter!(SAMPLES_INGESTED, Unit::Count, "Samples accepted over HTTP.");
    describe_counter!(
        SAMPLES_PROCESSED,
        Unit::Count,
        "Samples the workers validated, calibrated and stored."
    );
    describe_counter!(
        SAMPLES_REJECTED,
        Unit::Count,
        "Samples the workers refused, by reason."
    );
    describe_counter!(
        BUFFER_DROPPED,
        Unit::Count,
        "Samples dropped before processing, by reason."
    );
    describe_counter!(
        BUFFER_PUSHED,
        Unit::Count,
        "Samples that entered the ring buffer."
    );
    describe_counter!(
        BUFFER_POPPED,
        Unit::Count,
        "Samples taken from the ring buffer by the dispatcher."
    );
    describe_gauge!(
        BUFFER_DEPTH,
        Unit::Count,
        "Samples waiting in the ring buffer."
    );
    describe_gauge!(BUFFER_CAPACITY, Unit::Count, "Capacity of the ring buffer.");
    describe_gauge!(
        WORKER_IN_FLIGHT,
        Unit::Count,
        "Samples in worker batches being processed."
    );
    describe_counter!(WORKER_BATCHES, Unit::Count, "Worker batches finished.");
    describe_histogram!(
        PROCESSING_DURATION,
        Unit::Seconds,
        "Time a worker spent on one batch."
    );
    describe_counter!(
        DEVICE_SAMPLES_READ,
        Unit::Count,
        "Valid samples read, per device."
    );
    describe_counter!(
        FRAMES_INVALID,
        Unit::Count,
        "Frames skipped, per device and reason."
    );
    describe_counter!(
        DEVICE_SEQ_GAPS,
        Unit::Count,
        "Samples missing according to device sequence numbers."
    );
    describe_counter!(
        DEVICE_LINK_FAILURES,
        Unit::Count,
        "Device link failures, per device and kind (connect, io, timeout, closed; exception and invalid for Modbus)."
    );
    describe_gauge!(
        DEVICE_STATE,
        "Device state: 1 for the current state, 0 for the others."
    );
    describe_gauge!(
        CHANNEL_VALUE,
        "Last processed (calibrated) value, per device, channel and unit; only the series the \
         per-device statistics keep (at most 32 a device)."
    );
    describe_counter!(
        HTTP_REQUESTS,
        Unit::Count,
        "HTTP requests, by method, matched route and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request duration, by method and matched route."
    );
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    describe_gauge!(
        CONFIG_RELOAD_SUCCESSFUL,
        "Whether the last configuration reload attempt was successful (1) or refused (0)."
    );
    describe_gauge!(
        CONFIG_RELOAD_SUCCESS_TIMESTAMP,
        Unit::Seconds,
        "Timestamp of the last successful configuration load (start or reload)."
    );
    describe_counter!(
        SAMPLES_SPOOLED,
        Unit::Count,
        "Processed samples written to the uplink's spool in this run."
    );
    describe_gauge!(
        UPLINK_CONNECTED,
        "1 while the uplink is connected to its MQTT broker, else 0."
    );
    describe_counter!(
        UPLINK_PUBLISHED,
        Unit::Count,
        "Uplink messages published with QoS 1, resends after a reconnect included."
    );
    describe_counter!(
        UPLINK_ACKED,
        Unit::Count,
        "Uplink messages the broker acknowledged (PUBACK)."
    );
    describe_counter!(
        UPLINK_RECONNECTS,
        Unit::Count,
        "Uplink connections lost or refused."
    );
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes of spool files on disk.");
    describe_gauge!(
        SPOOL_RECORDS,
        "Uplink messages in the spool not yet acknowledged by the broker."
    );
    describe_gauge!(
        SPOOL_SAMPLES,
        "Samples in the spool not yet acknowledged by the broker."
    );
    describe_gauge!(
        SPOOL_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest message in the spool not yet acknowledged; 0 when none."
    );
    describe_counter!(
        SPOOL_FORWARDED,
        Unit::Count,
        "Samples the broker acknowledged, over the spool's life (kept across restarts)."
    );
    describe_counter!(
        SPOOL_DROPPED,
        Unit::Count,
        "Samples deleted from the spool unsent, by reason (spool_full, spool_corrupt), over its life."
    );
    describe_histogram!(
        SPOOL_FSYNC_DURATION,
        Unit::Seconds,
        "Time of one fdatasync of a spool segment or its metadata."
    );
    describe_gauge!(UPTIME, Unit::Seconds, "Seconds since the gateway started.");
}

/// Sets the device state gauges: 1 for `state`, 0 for the others.
pub fn device_state(device: &str, state: DeviceState) {
    for s in DeviceState::ALL {
        let value = if s == state { 1.0 } else { 0.0 };
        gauge!(DEVICE_STATE, "device" => device.to_owned(), "state" => s.as_str()).set(value);
    }
}

/// Sets the last processed value of one series; called once per batch and series, for the
/// series the statistics keep, so the label set is bounded like them.
pub fn channel_value(device: &str, channel: &str, unit: &str, value: f64) {
    gauge!(
        CHANNEL_VALUE,
        "device" => device.to_owned(),
        "channel" => channel.to_owned(),
        "unit" => unit.to_owned()
    )
    .set(value);
}

/// Records one worker batch's processing time.
pub fn batch_processed(elapsed: Duration) {
    histogram!(PROCESSING_DURATION).record(elapsed.as_secs_f64());
}

/// Records one `fdatasync` of the spool.
pub fn spool_fsync(elapsed: Duration) {
    histogram!(SPOOL_FSYNC_DURATION).record(elapsed.as_secs_f64());
}

/// Records one HTTP request. Labels are static strings: methods outside the standard set are
/// labelled `other`, so clients cannot grow the label set, and nothing is allocated.
pub fn http_request(method: &Method, route: &'static str, status: StatusCode, elapsed: Duration) {
    let method = match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let status = status.as_str();
    let status: &'static str = HTTP_STATUSES
        .iter()
        .find(|s| **s == status)
        .copied()
        .unwrap_or("other");
    if HANDLE.get().is_none() {
        // No recorder yet: the macros hand out no-op handles, which must not be cached.
        return;
    }
    // `try_with`: a request finishing while its thread shuts down is not worth a panic.
    let _ = HTTP_HANDLES.try_with(|handles| {
        let mut handles = handles.borrow_mut();
        let (requests, duration) = handles.entry((method, route, status)).or_insert_with(|| {
            (
                counter!(HTTP_REQUESTS, "method" => method, "route" => route, "status" => status),
                histogram!(HTTP_DURATION, "method" => method, "route" => route),
            )
        });
        requests.increment(1);
        duration.record(elapsed.as_secs_f64());
    });
}

thread_local! {
    /// The HTTP metrics' handles by (method, route, status) label, per thread: a request then
    /// costs one small map lookup, with no lock shared between threads, instead of building a
    /// labelled key and finding it in the recorder's registry. Bounded like the labels are.
    static HTTP_HANDLES: RefCell<HttpHandles> = RefCell::new(HashMap::default());
}

/// The handles of [`HTTP_HANDLES`].
///
/// Hashed with foldhash (already in the tree, through metrics-util's hashbrown), not the
/// default SipHash, which was half of recording a request (callgrind). SipHash's resistance to
/// chosen keys is not needed: the labels are static strings the gateway picks (a route pattern,
/// a known method or status, else `other`), never text from the client.
type HttpHandles = HashMap<HttpLabels, (Counter, Histogram), foldhash::fast::FixedState>;

/// Method, route and status labels.
type HttpLabels = (&'static str, &'static str, &'static str);

/// Status codes the API answers with, as static labels.
const HTTP_STATUSES: [&str; 17] = [
    "200", "202", "400", "401", "403", "404", "405", "408", "409", "413", "415", "422", "429",
    "500", "502", "503", "504",
];

/// What [`sync`] copies into the recorder before a scrape.
pub struct ScrapeView<'a> {
    /// The sample accounting.
    pub ledger: Ledger,
    /// Buffer capacity.
    pub capacity: usize,
    /// Seconds since start.
    pub uptime: Duration,
    /// Each device's id and counters.
    pub devices: Vec<(&'a str, CountersSnapshot)>,
    /// The uplink, when one is configured.
    pub uplink: Option<crate::uplink::UplinkView>,
}

/// Copies exact counters into the recorder; called on every scrape.
pub fn sync(view: &ScrapeView<'_>) {
    let l = &view.ledger;
    counter!(SAMPLES_READ).absolute(l.read);
    counter!(SAMPLES_INGESTED).absolute(l.ingested);
    counter!(SAMPLES_PROCESSED).absolute(l.processed);
    counter!(BUFFER_PUSHED).absolute(l.pushed);
    counter!(BUFFER_POPPED).absolute(l.popped);
    counter!(WORKER_BATCHES).absolute(l.batches);
    for reason in RejectReason::ALL {
        counter!(SAMPLES_REJECTED, "reason" => reason.as_str()).absolute(l.rejected.get(reason));
    }
    for reason in DropReason::ALL {
        counter!(BUFFER_DROPPED, "reason" => reason.as_str()).absolute(l.dropped.get(reason));
    }
    gauge!(BUFFER_DEPTH).set(l.in_buffer as f64);
    gauge!(BUFFER_CAPACITY).set(view.capacity as f64);
    gauge!(WORKER_IN_FLIGHT).set(l.in_flight as f64);
    gauge!(UPTIME).set(view.uptime.as_secs_f64());
    if let Some(u) = &view.uplink {
        counter!(SAMPLES_SPOOLED).absolute(l.spooled);
        gauge!(UPLINK_CONNECTED).set(if u.connected { 1.0 } else { 0.0 });
        counter!(UPLINK_PUBLISHED).absolute(u.published);
        counter!(UPLINK_ACKED).absolute(u.acked);
        counter!(UPLINK_RECONNECTS).absolute(u.reconnects);
        gauge!(SPOOL_BYTES).set(u.pending_bytes as f64);
        gauge!(SPOOL_RECORDS).set(u.pending_records as f64);
        gauge!(SPOOL_SAMPLES).set(u.pending_samples as f64);
        gauge!(SPOOL_OLDEST_AGE).set(u.oldest_pending_age_seconds.unwrap_or(0.0));
        counter!(SPOOL_FORWARDED).absolute(u.forwarded);
        counter!(SPOOL_DROPPED, "reason" => "spool_full").absolute(u.dropped.spool_full);
        counter!(SPOOL_DROPPED, "reason" => "spool_corrupt").absolute(u.dropped.spool_corrupt);
    }
    for (device, c) in &view.devices {
        let device = device.to_string();
        counter!(DEVICE_SAMPLES_READ, "device" => device.clone()).absolute(c.samples_read);
        counter!(DEVICE_SEQ_GAPS, "device" => device.clone()).absolute(c.seq_gaps);
        for reason in InvalidReason::ALL {
            counter!(FRAMES_INVALID, "device" => device.clone(), "reason" => reason.as_str())
                .absolute(c.frames_invalid.get(reason));
        }
        for failure in LinkFailure::ALL {
            counter!(DEVICE_LINK_FAILURES, "device" => device.clone(), "kind" => failure.as_str())
                .absolute(c.link_failures.get(failure));
        }
    }
}

/// Appends the standard `process_*` metrics, read from `/proc/self` (Linux; elsewhere only the
/// start time). Written directly because the `metrics` crate's counters are integers, and CPU
/// seconds need fractions.
pub fn render_process(out: &mut String) {
    let mut family = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    };
    if let Some((user, system)) = process_cpu_times() {
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            user + system,
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| status_field(&status, key).map(|kb| kb * 1024.0);
    if let Some(rss) = kib("VmRSS:") {
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        );
    }
    if let Some(vsz) = kib("VmSize:") {
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsz,
        );
    }
    if let Some(threads) = status_field(&status, "Threads:") {
        family(
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            threads,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    if let Some(max) = max_open_files() {
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        );
    }
    let started = STARTED.get().copied().unwrap_or_else(SystemTime::now);
    let since_epoch = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        since_epoch.as_secs_f64(),
    );
}

/// This process's user and system CPU time from `/proc/self/stat`, in seconds (the kernel's
/// USER_HZ is 100).
pub fn process_cpu_times() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime / 100.0, stime / 100.0))
}

fn status_field(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn max_open_files() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
