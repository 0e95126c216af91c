//! The data path without HTTP: device tasks → ring buffer → dispatcher → worker stage, started
//! on a caller's `TaskTracker` under a caller's `CancellationToken`, and drained in order.
//!
//! [`crate::app`] wraps it with the HTTP API; `telemetryhub bench` drives it alone.
//!
//! The device tasks, the simulators they read and the dispatcher run on a thread of their own
//! ([`Lane`]), not on the runtime that started the pipeline; the worker stage runs on that
//! thread's blocking pool.
//!
//! The devices are a set that a live reload changes while everything runs
//! ([`DeviceControl::apply`]): an added device gets a task, a removed one's task stops, a
//! changed one's task is replaced; every other task runs on untouched.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::buffer::RingBuffer;
use crate::config::{DeviceKind, DeviceSettings, Settings};
use crate::device::modbus::TcpConnector;
use crate::device::serial::SerialConnector;
use crate::device::sim::SimConnector;
use crate::device::{Connector, DeviceHandle, DeviceTask};
use crate::dispatch::{Dispatcher, PoolGauges, ProcessFn};
use crate::ledger::Ledger;
use crate::swap::Swap;
use crate::uplink::{Opened, Uplink, UplinkHandle};
use crate::worker::Worker;

/// Longest wait for running worker batches once the grace period is over.
const FINAL_WAIT: Duration = Duration::from_secs(2);

/// The running stages, and handles on them for the API.
pub struct Pipeline {
    /// The ring buffer (and its ledger).
    pub buffer: Arc<RingBuffer>,
    /// The worker stage's shared state.
    pub worker: Arc<Worker>,
    /// Batch gauges.
    pub pool: Arc<PoolGauges>,
    /// Worker permits.
    pub workers: usize,
    /// The devices, in configuration order; replaced whole when a reload changes the set.
    pub devices: Arc<Swap<[DeviceHandle]>>,
    /// The uplink's handle, when one is configured.
    pub uplink: Option<UplinkHandle>,
    device_set: Arc<tokio::sync::Mutex<DeviceSet>>,
    dispatcher: JoinHandle<()>,
    devices_cancel: CancellationToken,
    running_uplink: Option<Uplink>,
    /// Last: dropped after everything above.
    _lane: LaneThread,
}

/// The pipeline's own thread: a current-thread runtime that runs every device's task (and the
/// simulator a simulated device's link connects to) and the dispatcher, so a link's reads, the
/// pushes into the buffer and the dispatcher's pops hand over on one thread. On the shared
/// multi-thread runtime each wake-up of a device task (its link readable) or of the dispatcher
/// also woke the runtime's other thread to look for work: measured on the pty, this thread
/// takes about a sixth less CPU per frame (docs/PERFORMANCE.md, "Sixth pass"). A simulator on
/// another thread than its reader would cost a cross-thread wake per 4 KiB of link each way
/// (measured there too). The lane also keeps the links' reads off the threads that serve HTTP,
/// and HTTP off the thread that reads the links.
///
/// The thread ends once the [`LaneThread`] is dropped (with the pipeline) and every task on
/// the lane has ended; until then a task runs on, as it would on the caller's runtime.
#[derive(Clone)]
struct Lane {
    runtime: Handle,
    tasks: TaskTracker,
}

/// The lane's thread, kept by the pipeline.
struct LaneThread {
    lane: Lane,
    _stop: oneshot::Sender<()>,
}

impl LaneThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let lane = Lane {
            runtime: runtime.handle().clone(),
            tasks: TaskTracker::new(),
        };
        let tasks = lane.tasks.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                    tasks.close();
                    tasks.wait().await;
                });
                runtime.shutdown_timeout(FINAL_WAIT);
            })?;
        Ok(Self { lane, _stop: stop })
    }
}

impl Lane {
    /// Runs `task` on the lane, tracked by `tracker` too.
    fn spawn<F>(&self, tracker: &TaskTracker, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tracker.spawn_on(self.tasks.track_future(task), &self.runtime)
    }
}

/// The running devices: one task each, in configuration order.
struct DeviceSet {
    running: Vec<RunningDevice>,
    /// Tasks a reload retired that may still be finishing a push into a full `block` buffer;
    /// the drain waits for them too.
    retired: Vec<JoinHandle<()>>,
    /// What the API reads; stored again after every change.
    live: Arc<Swap<[DeviceHandle]>>,
    buffer: Arc<RingBuffer>,
    tracker: TaskTracker,
    /// Where the device tasks run, and the simulators they connect to.
    lane: Lane,
    /// The parent of every device's token: cancelled when the pipeline drains.
    cancel: CancellationToken,
}

/// One device's task and what it was started with.
struct RunningDevice {
    settings: DeviceSettings,
    handle: DeviceHandle,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What a reload did to the devices, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeviceChanges {
    /// New devices, each with a new task.
    pub added: Vec<String>,
    /// Devices no longer configured: their tasks stopped; what they had read stays in the
    /// buffer and is processed.
    pub removed: Vec<String>,
    /// Devices whose link or timing settings changed: their tasks were replaced (new link,
    /// counters from zero).
    pub restarted: Vec<String>,
    /// Devices whose calibration alone changed: the workers apply it; the task runs on.
    pub recalibrated: Vec<String>,
    /// Devices left exactly as they were.
    pub unchanged: Vec<String>,
}

/// Changes the running devices: [`Pipeline::device_control`].
#[derive(Clone)]
pub struct DeviceControl {
    set: Arc<tokio::sync::Mutex<DeviceSet>>,
}

/// Waits out a change of the running devices in progress: [`Pipeline::devices_settled`].
///
/// For the API's commands: a live reload may end a device's task between a request loading
/// the device list and commanding the device; once the reload is done, the request finds the
/// device gone or under a new task in the published list.
#[derive(Clone)]
pub struct DevicesSettled {
    set: Arc<tokio::sync::Mutex<DeviceSet>>,
}

impl DevicesSettled {
    /// Returns once no reload is changing the devices (at once when none is). A reload waits
    /// at most `STOP_WAIT` for the devices it retires, so this wait is bounded.
    pub async fn wait(&self) {
        drop(self.set.lock().await);
    }
}

impl Pipeline {
    /// Starts every stage on `tracker`; devices stop when `cancel` is cancelled or on
    /// [`Self::drain`]. Each device's link is its configured kind: a tty, or the embedded
    /// simulator. With `uplink` (see [`crate::uplink::open`]), processed samples go on to the
    /// spool and the broker.
    pub fn start(
        settings: &Settings,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        process: Option<ProcessFn>,
        uplink: Option<Opened>,
    ) -> Self {
        let pipeline = Self::start_stages(settings, tracker, cancel, process, uplink);
        {
            let mut set = pipeline
                .device_set
                .try_lock()
                .expect("nobody else holds the new pipeline's devices");
            for device in &settings.devices {
                let running = set.spawn_configured(device);
                set.running.push(running);
            }
            set.publish();
        }
        pipeline
    }

    /// The handle a live reload changes the broker settings with, with an uplink.
    pub fn uplink_control(&self) -> Option<crate::uplink::UplinkControl> {
        self.running_uplink.as_ref().map(Uplink::control)
    }

    /// The handle a live reload changes the devices with.
    pub fn device_control(&self) -> DeviceControl {
        DeviceControl {
            set: self.device_set.clone(),
        }
    }

    /// The handle the API waits out a reload's device changes with.
    pub fn devices_settled(&self) -> DevicesSettled {
        DevicesSettled {
            set: self.device_set.clone(),
        }
    }

    /// Like [`Self::start`], but every device's link comes from `connector(index, device,
    /// cancel)`, whatever its configured kind: for harnesses that drive the pipeline with links
    /// of their own (`telemetryhub bench`). `cancel` ends the device; a connector that spawns
    /// tasks should end them with it.
    pub fn start_with<C: Connector>(
        settings: &Settings,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        process: Option<ProcessFn>,
        uplink: Option<Opened>,
        mut connector: impl FnMut(usize, &DeviceSettings, &CancellationToken) -> C,
    ) -> Self {
        let pipeline = Self::start_stages(settings, tracker, cancel, process, uplink);
        {
            let mut set = pipeline
                .device_set
                .try_lock()
                .expect("nobody else holds the new pipeline's devices");
            for (index, device) in settings.devices.iter().enumerate() {
                let device_cancel = set.cancel.child_token();
                let link = connector(index, device, &device_cancel);
                let running = set.spawn(device, link, device_cancel);
                set.running.push(running);
            }
            set.publish();
        }
        pipeline
    }

    /// The buffer, the worker stage, the uplink and the dispatcher, with no device yet.
    fn start_stages(
        settings: &Settings,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        process: Option<ProcessFn>,
        uplink: Option<Opened>,
    ) -> Self {
        let buffer = Arc::new(RingBuffer::new(
            settings.buffer.capacity,
            settings.buffer.overflow,
        ));
        let worker = Arc::new(Worker::new(
            &settings.processing,
            &settings.devices,
            settings.pipeline.history,
        ));
        let workers = settings.pipeline.worker_count();
        let mut dispatcher = Dispatcher::new(
            buffer.clone(),
            worker.clone(),
            workers,
            settings.pipeline.batch_max,
            tracker.clone(),
        );
        if let Some(process) = process {
            dispatcher = dispatcher.with_process(process);
        }
        let running_uplink = uplink.map(|opened| {
            Uplink::start(opened, workers, buffer.clone(), tracker)
                .expect("the spool writer thread starts")
        });
        if let Some(uplink) = &running_uplink {
            dispatcher = dispatcher.with_stage(uplink.stage());
        }
        let pool = dispatcher.gauges();
        let lane = LaneThread::start().expect("the pipeline thread starts");
        let dispatcher = lane.lane.spawn(tracker, dispatcher.run());
        let devices_cancel = cancel.child_token();
        let devices: Arc<Swap<[DeviceHandle]>> = Arc::new(Swap::new(Arc::from(Vec::new())));
        let device_set = DeviceSet {
            running: Vec::new(),
            retired: Vec::new(),
            live: devices.clone(),
            buffer: buffer.clone(),
            tracker: tracker.clone(),
            lane: lane.lane.clone(),
            cancel: devices_cancel.clone(),
        };
        Self {
            buffer,
            worker,
            pool,
            workers,
            devices,
            uplink: running_uplink.as_ref().map(Uplink::handle),
            device_set: Arc::new(tokio::sync::Mutex::new(device_set)),
            dispatcher,
            devices_cancel,
            running_uplink,
            _lane: lane,
        }
    }

    /// Stops the sources, then lets the buffer drain into the workers until `deadline`;
    /// whatever is still queued then is counted as dropped for `shutdown`. The uplink stops
    /// last: the spool takes every processed batch, and what is not yet forwarded stays in it.
    pub async fn drain(self, deadline: tokio::time::Instant) -> Ledger {
        self.devices_cancel.cancel();
        // A reload in progress holds the set; its devices end at once, since their tokens are
        // children of the one just cancelled.
        let (running, retired) = {
            let mut set = self.device_set.lock().await;
            (
                std::mem::take(&mut set.running),
                std::mem::take(&mut set.retired),
            )
        };
        for device in running {
            let _ = device.task.await;
        }
        // Retired tasks still pushing end too (their tokens are children of the same one).
        for task in retired {
            let _ = task.await;
        }
        self.buffer.close();
        let mut dispatcher = self.dispatcher;
        if tokio::time::timeout_at(deadline, &mut dispatcher)
            .await
            .is_err()
        {
            let abandoned = self.buffer.abandon();
            warn!(
                abandoned,
                "Grace period over; queued samples counted as dropped."
            );
            if tokio::time::timeout(FINAL_WAIT, dispatcher).await.is_err() {
                error!("Worker batches still running after the grace period; abandoning them.");
            }
        }
        if let Some(uplink) = self.running_uplink {
            uplink.stop().await;
        }
        self.buffer.ledger()
    }
}

impl DeviceSet {
    /// Starts the task of `device` on the link its kind says. The one place a device kind
    /// turns into a link: a new kind is a new arm here.
    fn spawn_configured(&self, device: &DeviceSettings) -> RunningDevice {
        let cancel = self.cancel.child_token();
        match (device.kind, &device.serial, &device.address) {
            // A Modbus RTU device is on a tty too: the protocol is the task's business.
            (DeviceKind::Serial | DeviceKind::ModbusRtu, Some(serial), _) => {
                let connector = SerialConnector::new(serial.clone());
                self.spawn(device, connector, cancel)
            }
            (DeviceKind::ModbusTcp, _, Some(address)) => {
                let connector = TcpConnector::new(address.as_str());
                self.spawn(device, connector, cancel)
            }
            _ => {
                let connector = SimConnector::new(
                    device.simulator.clone(),
                    Duration::from_millis(device.sample_interval_ms),
                    self.tracker.clone(),
                    cancel.clone(),
                );
                self.spawn(device, connector, cancel)
            }
        }
    }

    /// Spawns the task of one device reading from `connector`'s links.
    fn spawn<C: Connector>(
        &self,
        device: &DeviceSettings,
        connector: C,
        cancel: CancellationToken,
    ) -> RunningDevice {
        let kind = device.kind.as_str();
        let (task, handle) =
            DeviceTask::new(device, kind, connector, self.buffer.clone(), cancel.clone());
        RunningDevice {
            settings: device.clone(),
            handle,
            cancel,
            task: self.lane.spawn(&self.tracker, task.run()),
        }
    }

    /// Shows the running devices to the API.
    fn publish(&self) {
        let handles: Vec<DeviceHandle> = self.running.iter().map(|r| r.handle.clone()).collect();
        self.live.store(Arc::from(handles));
    }
}

/// Whether `a` and `b` differ in calibration at most: then the task need not restart.
fn same_but_calibration(a: &DeviceSettings, b: &DeviceSettings) -> bool {
    let mut b = b.clone();
    b.scale = a.scale;
    b.offset = a.offset;
    *a == b
}

/// How long a device being removed or replaced may take to close its link.
const STOP_WAIT: Duration = Duration::from_secs(2);

impl DeviceControl {
    /// Makes the running devices those of `devices`, in that order; reports what changed.
    ///
    /// Devices whose settings are equal keep their task (and so their link, counters, state
    /// and statistics). Devices removed or changed are retired first: they close their links
    /// and read no more; each task ends once it has pushed what it read (waiting for room in a
    /// full `block` buffer as long as it takes), and what was pushed is processed. Then the new
    /// tasks start. The caller (the reload) applies calibrations to the workers.
    pub async fn apply(&self, devices: &[DeviceSettings]) -> DeviceChanges {
        let mut set = self.set.lock().await;
        let mut old: Vec<Option<RunningDevice>> = std::mem::take(&mut set.running)
            .into_iter()
            .map(Some)
            .collect();
        let mut take_old = |id: &str| {
            old.iter_mut()
                .find(|r| r.as_ref().is_some_and(|r| r.settings.id == id))
                .and_then(Option::take)
        };
        let mut changes = DeviceChanges::default();
        let mut to_stop = Vec::new();
        // `Ok`: keep this task; `Err`: start one for these settings.
        let mut next: Vec<Result<RunningDevice, &DeviceSettings>> = Vec::new();
        for device in devices {
            match take_old(&device.id) {
                Some(running) if running.settings == *device => {
                    changes.unchanged.push(device.id.clone());
                    next.push(Ok(running));
                }
                Some(mut running) if same_but_calibration(&running.settings, device) => {
                    changes.recalibrated.push(device.id.clone());
                    running.settings = device.clone();
                    next.push(Ok(running));
                }
                Some(running) => {
                    changes.restarted.push(device.id.clone());
                    to_stop.push(running);
                    next.push(Err(device));
                }
                None => {
                    changes.added.push(device.id.clone());
                    next.push(Err(device));
                }
            }
        }
        for running in old.into_iter().flatten() {
            changes.removed.push(running.settings.id.clone());
            to_stop.push(running);
        }
        let retired = retire_all(to_stop, &set.tracker).await;
        set.retired.retain(|task| !task.is_finished());
        set.retired.extend(retired);
        set.running = next
            .into_iter()
            .map(|slot| slot.unwrap_or_else(|device| set.spawn_configured(device)))
            .collect();
        set.publish();
        changes
    }
}

/// Retires devices a reload removes or replaces: returns once each has closed its link, with
/// the tasks that may still be finishing a push.
///
/// Not an operator's stop: a stopped device drops the samples it waits to push into a full
/// `block` buffer, and a reload must lose none. A retired device closes its link at once (so a
/// new task may open the same port), reads no more, answers no command, and ends once its push
/// is done, however long a full buffer makes that take; the reload does not wait for that. A
/// task that does not close its link within [`STOP_WAIT`] is cancelled and awaited.
async fn retire_all(devices: Vec<RunningDevice>, tracker: &TaskTracker) -> Vec<JoinHandle<()>> {
    let retire = devices.into_iter().map(|r| async move {
        let RunningDevice {
            handle,
            cancel,
            mut task,
            ..
        } = r;
        match tokio::time::timeout(STOP_WAIT, handle.retire()).await {
            // Once the task has ended, whatever it started with its token ends too.
            Ok(true) => Some(tracker.spawn(async move {
                let _ = task.await;
                cancel.cancel();
            })),
            // Ended already, or stuck: either way it ends here.
            Ok(false) | Err(_) => {
                cancel.cancel();
                let _ = (&mut task).await;
                None
            }
        }
    });
    futures_util::future::join_all(retire)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn lane_tasks_run_on_the_pipeline_thread_and_outlive_the_handle_until_they_end() {
        let thread = LaneThread::start().expect("the lane starts");
        let lane = thread.lane.clone();
        let tracker = TaskTracker::new();
        let name = lane.spawn(&tracker, async {
            std::thread::current().name().map(str::to_owned)
        });
        let name = tokio::time::timeout(WAIT, name)
            .await
            .expect("the task ran")
            .expect("the task did not panic");
        assert_eq!(name.as_deref(), Some("pipeline"));

        // A task still running when the pipeline lets go of its lane runs on to its end.
        let (release, released) = oneshot::channel::<u32>();
        let running = lane.spawn(&tracker, async move { released.await.unwrap_or(0) + 1 });
        drop(thread);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!running.is_finished());
        release.send(41).expect("the task still waits");
        let result = tokio::time::timeout(WAIT, running).await.expect("it ended");
        assert_eq!(result.expect("no panic"), 42);

        // Then the thread has ended: what is spawned on the lane now never runs.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let late = lane.spawn(&tracker, async {});
            match tokio::time::timeout(Duration::from_millis(100), late).await {
                Ok(Err(err)) if err.is_cancelled() => break,
                _ => assert!(
                    tokio::time::Instant::now() < deadline,
                    "the lane's thread did not end"
                ),
            }
        }
    }
}
