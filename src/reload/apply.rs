//! [`Reloader`]: loads the configuration again, refuses it whole or applies it, and reports.
//! The one entry point is [`Reloader::reload`]; [`Reloader::run`] serves a
//! [`super::ReloadHandle`]'s requests one at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{ReloadError, ReloadReport, ReloadRequests, Trigger};
use crate::api::{Guard, IngestLimits};
use crate::config::{ConfigSource, Settings};
use crate::notify::Notifier;
use crate::pipeline::DeviceControl;
use crate::swap::Swap;
use crate::telemetry::LogControl;
use crate::uplink::{ForwarderOptions, UplinkControl};
use crate::worker::Worker;

/// The parts of a running gateway that a reload changes.
pub struct LiveParts {
    /// The request guard (token, hosts, limits, request timeout).
    pub guard: Arc<Swap<Guard>>,
    /// `POST /samples` limits.
    pub ingest: Arc<Swap<IngestLimits>>,
    /// The header-read timeout new connections get.
    pub header_read_timeout: watch::Sender<Duration>,
    /// Unit ranges and calibrations.
    pub worker: Arc<Worker>,
    /// The device tasks.
    pub devices: DeviceControl,
    /// The log filter; `None` when this process did not install the subscriber (tests).
    pub log: Option<LogControl>,
    /// The forwarder's connection settings, with an uplink.
    pub uplink: Option<UplinkControl>,
    /// Tells systemd a reload is under way (RELOADING=1) and over (READY=1).
    pub notifier: Notifier,
    /// The gateway's tasks: the file reads run on it (`spawn_blocking`).
    pub tracker: TaskTracker,
}

/// Reloads the configuration of a running gateway.
pub struct Reloader {
    source: ConfigSource,
    /// What runs now: the last configuration applied, with the restart-only settings as they
    /// were at start.
    running: Settings,
    parts: LiveParts,
    shutdown: CancellationToken,
}

impl Reloader {
    /// A reloader for a gateway started with `running`, read from `source`.
    pub fn new(
        source: ConfigSource,
        running: Settings,
        parts: LiveParts,
        shutdown: CancellationToken,
    ) -> Self {
        crate::metrics::config_loaded(true);
        Self {
            source,
            running,
            parts,
            shutdown,
        }
    }

    /// Serves reload requests one at a time until `cancel` (or every handle is gone).
    pub async fn run(mut self, mut requests: ReloadRequests, cancel: CancellationToken) {
        loop {
            let request = tokio::select! {
                _ = cancel.cancelled() => break,
                request = requests.requests.recv() => match request {
                    Some(request) => request,
                    None => break,
                },
            };
            let outcome = self.reload(request.trigger).await;
            let _ = request.reply.send(outcome);
        }
    }

    /// Reloads: loads and checks the configuration, then applies all of it that can change
    /// live, or nothing at all. Logs and counts the outcome.
    pub async fn reload(&mut self, trigger: Trigger) -> Result<ReloadReport, ReloadError> {
        // Checked before telling systemd anything: once shutdown has begun, STOPPING=1 may have
        // gone out, and a RELOADING=1/READY=1 after it would tell systemd the service is up.
        if self.shutdown.is_cancelled() {
            return Err(ReloadError::ShuttingDown);
        }
        // systemd wants READY=1 after RELOADING=1 whatever the outcome: a refused file leaves
        // the gateway running, and ready, on the old configuration.
        self.parts.notifier.reloading();
        let outcome = self.try_reload().await;
        // Unless shutdown began meanwhile: then STOPPING=1 follows (or went out), and a READY=1
        // would contradict it.
        if !self.shutdown.is_cancelled() {
            self.parts.notifier.ready();
        }
        match &outcome {
            Ok(report) => {
                crate::metrics::config_loaded(true);
                if !report.restart_required.is_empty() {
                    warn!(
                        trigger = trigger.as_str(),
                        restart_required = ?report.restart_required,
                        "Configuration changes need a restart; the rest is applied."
                    );
                }
                info!(
                    trigger = trigger.as_str(),
                    applied = ?report.applied,
                    added = ?report.devices.added,
                    removed = ?report.devices.removed,
                    restarted = ?report.devices.restarted,
                    recalibrated = ?report.devices.recalibrated,
                    "Configuration reloaded."
                );
            }
            Err(ReloadError::ShuttingDown) => {}
            Err(err) => {
                crate::metrics::config_loaded(false);
                error!(
                    trigger = trigger.as_str(),
                    error = %err,
                    "Configuration reload refused; the running configuration is unchanged."
                );
            }
        }
        outcome
    }

    async fn try_reload(&mut self) -> Result<ReloadReport, ReloadError> {
        let (next, restart_required, forwarder) = self.prepare().await?;
        let mut report = ReloadReport {
            restart_required,
            ..ReloadReport::default()
        };
        self.apply(&next, forwarder, &mut report).await;
        for warning in next.warnings() {
            warn!(%warning, "Suspicious configuration.");
        }
        self.running = next;
        Ok(report)
    }

    /// Loads and checks the configuration and prepares everything that can fail (the uplink's
    /// CA file), before anything changes: the new settings, the restart-only keys that differ,
    /// and the forwarder's new options if the uplink changed.
    ///
    /// On a blocking thread: it reads files, which may stall (a slow SD card, a network mount)
    /// and must not stall the runtime. Reloads are serialised, so at most one runs.
    async fn prepare(
        &self,
    ) -> Result<(Settings, Vec<String>, Option<ForwarderOptions>), ReloadError> {
        let source = self.source.clone();
        let running = self.running.clone();
        let has_uplink = self.parts.uplink.is_some();
        let prepare = move || -> Result<_, ReloadError> {
            let loaded = source.load()?;
            let (next, restart_required) = keep_restart_only(&running, loaded);
            // Checked again: the restart-only values kept from the running configuration must
            // still make a valid whole with the new ones.
            next.validate()?;
            let forwarder = match &next.uplink {
                Some(uplink) if has_uplink && running.uplink.as_ref() != Some(uplink) => {
                    Some(ForwarderOptions::new(uplink)?)
                }
                _ => None,
            };
            Ok((next, restart_required, forwarder))
        };
        match self.parts.tracker.spawn_blocking(prepare).await {
            Ok(prepared) => prepared,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // Only when the runtime itself is going away.
            Err(_) => Err(ReloadError::ShuttingDown),
        }
    }

    /// Applies `next`, which differs from the running configuration only in what can change
    /// live. Cannot fail.
    async fn apply(
        &mut self,
        next: &Settings,
        forwarder: Option<ForwarderOptions>,
        report: &mut ReloadReport,
    ) {
        let running = &self.running;
        let mut applied = |key: &str| report.applied.push(key.to_owned());
        if next.http != running.http {
            self.parts.guard.store(Arc::new(Guard::new(&next.http)));
            self.parts
                .header_read_timeout
                .send_replace(next.http.header_read_timeout());
            applied("http");
        }
        let limits = IngestLimits::new(next);
        if limits != *self.parts.ingest.load() {
            self.parts.ingest.store(Arc::new(limits));
        }
        if next.buffer.high_watermark != running.buffer.high_watermark {
            applied("buffer.high_watermark");
        }
        let mut notes = Vec::new();
        if next.log.level != running.log.level {
            // Listed as applied only when it is: otherwise a note says why not.
            match self
                .parts
                .log
                .as_ref()
                .map(|log| log.set_level(&next.log.level))
            {
                Some(Ok(true)) => applied("log.level"),
                Some(Ok(false)) => notes.push("RUST_LOG is set and wins over log.level".to_owned()),
                Some(Err(err)) => notes.push(format!("log.level not applied: {err}")),
                None => notes.push("log.level not applied: no log subscriber of ours".to_owned()),
            }
        }
        // Calibrations before the devices: an added device's first samples are calibrated.
        if next.processing != running.processing || next.devices != running.devices {
            self.parts
                .worker
                .reconfigure(&next.processing, &next.devices);
        }
        if next.processing != running.processing {
            applied("processing.units");
        }
        if next.devices != running.devices {
            applied("devices");
            report.devices = self.parts.devices.apply(&next.devices).await;
            // A device that is new here, or whose task was replaced, starts with empty
            // statistics (a replaced task's samples still queued count in the new ones: same
            // device, same series). A removed one's are forgotten, and its samples still
            // queued make none again.
            let fresh = report.devices.added.iter();
            for id in fresh.chain(&report.devices.restarted) {
                self.parts.worker.reset_stats(id);
            }
            for id in &report.devices.removed {
                self.parts.worker.remove_stats(id);
            }
        } else {
            report.devices.unchanged = next.devices.iter().map(|d| d.id.clone()).collect();
        }
        if let (Some(control), Some(options)) = (&self.parts.uplink, forwarder) {
            control.reconfigure(options);
            applied("uplink");
        }
        report.notes = notes;
    }
}

/// `loaded` with every restart-only setting put back to its running value, and the keys that
/// differed.
fn keep_restart_only(running: &Settings, mut loaded: Settings) -> (Settings, Vec<String>) {
    let mut changed = Vec::new();
    let mut keep = |key: &str, differs: bool| {
        if differs {
            changed.push(key.to_owned());
        }
    };
    keep("http.listen", loaded.http.listen != running.http.listen);
    loaded.http.listen = running.http.listen;
    keep("log.format", loaded.log.format != running.log.format);
    loaded.log.format = running.log.format;
    keep(
        "buffer.capacity",
        loaded.buffer.capacity != running.buffer.capacity,
    );
    loaded.buffer.capacity = running.buffer.capacity;
    keep(
        "buffer.overflow",
        loaded.buffer.overflow != running.buffer.overflow,
    );
    loaded.buffer.overflow = running.buffer.overflow;
    keep("pipeline", loaded.pipeline != running.pipeline);
    loaded.pipeline = running.pipeline.clone();
    keep("spool", loaded.spool != running.spool);
    loaded.spool = running.spool.clone();
    match (&running.uplink, &mut loaded.uplink) {
        (Some(old), Some(new)) => {
            keep("uplink.format", new.format != old.format);
            new.format = old.format;
            keep("uplink.topic", new.topic != old.topic);
            new.topic.clone_from(&old.topic);
            keep("uplink.gateway_id", new.gateway_id != old.gateway_id);
            new.gateway_id.clone_from(&old.gateway_id);
            keep("uplink.max_batch", new.max_batch != old.max_batch);
            new.max_batch = old.max_batch;
        }
        (None, None) => {}
        (old, _) => {
            keep("uplink", true);
            loaded.uplink = old.clone();
        }
    }
    (loaded, changed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;
    use crate::config::UplinkSettings;
    use crate::pipeline::Pipeline;

    /// A reloader of a pipeline started from `settings`, re-reading `file`, notifying `socket`.
    fn reloader(
        settings: &Settings,
        file: std::path::PathBuf,
        socket: &std::path::Path,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> (Reloader, Pipeline) {
        let pipeline = Pipeline::start(settings, tracker, &shutdown, None, None);
        let parts = LiveParts {
            guard: Arc::new(Swap::new(Arc::new(Guard::new(&settings.http)))),
            ingest: Arc::new(Swap::new(Arc::new(IngestLimits::new(settings)))),
            header_read_timeout: watch::channel(settings.http.header_read_timeout()).0,
            worker: pipeline.worker.clone(),
            devices: pipeline.device_control(),
            log: None,
            uplink: None,
            notifier: Notifier::to_socket(socket, None),
            tracker: tracker.clone(),
        };
        let source = ConfigSource::new(Some(file), std::iter::empty());
        let reloader = Reloader::new(source, settings.clone(), parts, shutdown);
        (reloader, pipeline)
    }

    /// Every datagram waiting on `socket`.
    fn received(socket: &UnixDatagram) -> Vec<String> {
        let mut messages = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        messages
    }

    #[tokio::test]
    async fn a_reload_after_shutdown_began_tells_systemd_nothing() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("telemetryhub.toml");
        std::fs::write(&file, "").expect("the temp dir is writable");
        let socket_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("a datagram socket");
        socket.set_nonblocking(true).expect("non-blocking");
        let settings = Settings::default();
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (mut reloader, pipeline) =
            reloader(&settings, file, &socket_path, shutdown.clone(), &tracker);

        // While running: RELOADING=1, then READY=1.
        reloader.reload(Trigger::Http).await.expect("applied");
        let messages = received(&socket);
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].contains("RELOADING=1"), "{messages:?}");
        assert!(messages[1].contains("READY=1"), "{messages:?}");

        // Once STOPPING=1 may have gone out, a reload must not say RELOADING=1 or READY=1.
        shutdown.cancel();
        let outcome = reloader.reload(Trigger::Signal).await;
        assert!(
            matches!(outcome, Err(ReloadError::ShuttingDown)),
            "{outcome:?}"
        );
        assert_eq!(received(&socket), Vec::<String>::new());
        pipeline
            .drain(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    }

    /// A sample of `device`, as if it had waited in the buffer.
    fn queued(device: &'static str) -> crate::sample::Sample {
        crate::sample::Sample {
            labels: crate::sample::Labels::new(device, "arb.units", crate::sample::DEFAULT_CHANNEL),
            ..crate::sample::Sample::test(1, 2.0)
        }
    }

    #[tokio::test]
    async fn samples_of_a_removed_device_processed_after_the_reload_leave_no_statistics() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("telemetryhub.toml");
        let devices = |ids: &[&str]| {
            ids.iter()
                .map(|id| format!("[[devices]]\nid = \"{id}\"\nsample_interval_ms = 1000\n"))
                .collect::<String>()
        };
        std::fs::write(&file, devices(&["stays", "gone"])).expect("writable");
        let source = ConfigSource::new(Some(file.clone()), std::iter::empty());
        let settings = source.load().expect("a valid config");
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let socket = dir.path().join("no-listener.sock");
        let (mut reloader, pipeline) =
            reloader(&settings, file.clone(), &socket, shutdown.clone(), &tracker);
        let worker = pipeline.worker.clone();
        worker.process(vec![queued("gone")]);
        assert!(worker.stats("gone").stats.is_some());

        std::fs::write(&file, devices(&["stays"])).expect("writable");
        let report = reloader.reload(Trigger::Http).await.expect("applied");
        assert_eq!(report.devices.removed, ["gone"]);
        // What `gone` read before its task ended is still processed, after the reload.
        let outcome = worker.process(vec![queued("gone")]);
        assert_eq!(outcome.processed, 1, "its samples are processed, not lost");
        assert_eq!(
            worker.stats("gone"),
            crate::worker::DeviceStats::default(),
            "no statistics are kept for a device nobody can see"
        );

        // Added again, it starts afresh and is counted.
        std::fs::write(&file, devices(&["stays", "gone"])).expect("writable");
        let report = reloader.reload(Trigger::Http).await.expect("applied");
        assert_eq!(report.devices.added, ["gone"]);
        worker.process(vec![queued("gone")]);
        assert_eq!(worker.stats("gone").stats.map(|s| s.count), Some(1));
        shutdown.cancel();
        pipeline
            .drain(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    }

    /// The configuration file is read off the runtime's threads: a read that blocks (here a
    /// FIFO no one writes yet; in the field a slow SD card or network mount) leaves the other
    /// tasks running, even on a single-threaded runtime.
    #[tokio::test]
    async fn reading_the_file_does_not_block_the_runtime() {
        use std::sync::atomic::{AtomicBool, Ordering};

        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("telemetryhub.toml");
        let socket = dir.path().join("no-listener.sock");
        let settings = Settings::default();
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (mut reloader, pipeline) =
            reloader(&settings, file.clone(), &socket, shutdown.clone(), &tracker);
        let made = std::process::Command::new("mkfifo")
            .arg(&file)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());

        let progressed = Arc::new(AtomicBool::new(false));
        // The writer opens the FIFO (releasing the reader) once another task has run, or after
        // 3 s, whichever comes first, and says whether that task ran while the read waited.
        let writer = {
            let (progressed, file) = (progressed.clone(), file.clone());
            std::thread::spawn(move || {
                let until = std::time::Instant::now() + Duration::from_secs(3);
                while !progressed.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let ran = progressed.load(Ordering::SeqCst);
                std::fs::write(&file, "").expect("the FIFO opens for writing");
                ran
            })
        };
        let other = {
            let progressed = progressed.clone();
            tokio::spawn(async move {
                // After the reload has started reading (it runs first, below).
                tokio::time::sleep(Duration::from_millis(50)).await;
                progressed.store(true, Ordering::SeqCst);
            })
        };
        let outcome = reloader.reload(Trigger::Http).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        other.await.expect("the other task ends");
        assert!(
            writer.join().expect("the writer ends"),
            "another task ran while the reload waited for the file"
        );
        shutdown.cancel();
        pipeline
            .drain(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    }

    #[test]
    fn restart_only_settings_keep_their_running_values_and_are_named() {
        let running = Settings::default();
        let mut loaded = Settings::default();
        loaded.http.listen = "127.0.0.1:9999".parse().expect("an address");
        loaded.http.ingest_max_samples = 7;
        loaded.buffer.capacity = 5;
        loaded.buffer.high_watermark = 0.5;
        loaded.pipeline.history = 3;
        loaded.uplink = Some(UplinkSettings::new("mqtt://127.0.0.1:1"));
        let (next, changed) = keep_restart_only(&running, loaded);
        assert_eq!(
            changed,
            ["http.listen", "buffer.capacity", "pipeline", "uplink"]
        );
        // The report names them as the documented list does.
        for key in &changed {
            assert!(
                super::super::RESTART_REQUIRED.contains(&key.as_str()),
                "{key}"
            );
        }
        assert_eq!(next.http.listen, running.http.listen);
        assert_eq!(next.buffer.capacity, running.buffer.capacity);
        assert_eq!(next.pipeline, running.pipeline);
        assert_eq!(next.uplink, None);
        // The live ones are taken.
        assert_eq!(next.http.ingest_max_samples, 7);
        assert_eq!(next.buffer.high_watermark, 0.5);
    }

    #[test]
    fn an_uplinks_broker_settings_are_live_and_its_message_format_is_not() {
        let running = Settings {
            uplink: Some(UplinkSettings::new("mqtt://127.0.0.1:1")),
            ..Settings::default()
        };
        let mut loaded = running.clone();
        let uplink = loaded.uplink.as_mut().expect("set above");
        uplink.url = "mqtt://127.0.0.1:2".to_owned();
        uplink.max_batch += 1;
        let (next, changed) = keep_restart_only(&running, loaded);
        assert_eq!(changed, ["uplink.max_batch"]);
        let next = next.uplink.expect("kept");
        assert_eq!(next.url, "mqtt://127.0.0.1:2");
        assert_eq!(Some(next.max_batch), running.uplink.map(|u| u.max_batch));
    }
}
