//! The data path without HTTP: device tasks → ring buffer → dispatcher → worker stage, started
//! on a caller's `TaskTracker` under a caller's `CancellationToken`, and drained in order.
//!
//! [`crate::app`] wraps it with the HTTP API; `telemetryhub bench` drives it alone.

use std::sync::Arc;
use std::time::Duration;

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
    /// The devices, in configuration order.
    pub devices: Vec<DeviceHandle>,
    /// The uplink's handle, when one is configured.
    pub uplink: Option<UplinkHandle>,
    device_tasks: Vec<JoinHandle<()>>,
    dispatcher: JoinHandle<()>,
    devices_cancel: CancellationToken,
    running_uplink: Option<Uplink>,
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
        let mut pipeline = Self::start_stages(settings, tracker, cancel, process, uplink);
        for device in &settings.devices {
            let device_cancel = pipeline.devices_cancel.child_token();
            match (device.kind, &device.serial, &device.address) {
                // A Modbus RTU device is on a tty too: the protocol is the task's business.
                (DeviceKind::Serial | DeviceKind::ModbusRtu, Some(serial), _) => {
                    let connector = SerialConnector::new(serial.clone());
                    pipeline.spawn_device(device, connector, tracker, device_cancel);
                }
                (DeviceKind::ModbusTcp, _, Some(address)) => {
                    let connector = TcpConnector::new(address.as_str());
                    pipeline.spawn_device(device, connector, tracker, device_cancel);
                }
                _ => {
                    let connector = SimConnector::new(
                        device.simulator.clone(),
                        Duration::from_millis(device.sample_interval_ms),
                        tracker.clone(),
                        device_cancel.clone(),
                    );
                    pipeline.spawn_device(device, connector, tracker, device_cancel);
                }
            }
        }
        pipeline
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
        let mut pipeline = Self::start_stages(settings, tracker, cancel, process, uplink);
        for (index, device) in settings.devices.iter().enumerate() {
            let device_cancel = pipeline.devices_cancel.child_token();
            let link = connector(index, device, &device_cancel);
            pipeline.spawn_device(device, link, tracker, device_cancel);
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
        let dispatcher = tracker.spawn(dispatcher.run());
        Self {
            buffer,
            worker,
            pool,
            workers,
            devices: Vec::new(),
            uplink: running_uplink.as_ref().map(Uplink::handle),
            device_tasks: Vec::new(),
            dispatcher,
            devices_cancel: cancel.child_token(),
            running_uplink,
        }
    }

    /// Spawns the task of one device reading from `connector`'s links.
    fn spawn_device<C: Connector>(
        &mut self,
        device: &DeviceSettings,
        connector: C,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) {
        let kind = device.kind.as_str();
        let (task, handle) = DeviceTask::new(device, kind, connector, self.buffer.clone(), cancel);
        self.device_tasks.push(tracker.spawn(task.run()));
        self.devices.push(handle);
    }

    /// Stops the sources, then lets the buffer drain into the workers until `deadline`;
    /// whatever is still queued then is counted as dropped for `shutdown`. The uplink stops
    /// last: the spool takes every processed batch, and what is not yet forwarded stays in it.
    pub async fn drain(self, deadline: tokio::time::Instant) -> Ledger {
        self.devices_cancel.cancel();
        for task in self.device_tasks {
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
