//! systemd service notifications (`Type=notify` / `Type=notify-reload`, `WatchdogSec=`): the
//! gateway tells the service manager when it is ready, reloading and stopping, and proves it is
//! alive with watchdog pings.
//!
//! Messages go as datagrams to the socket named by `NOTIFY_SOCKET`, read once at start-up by
//! [`Notifier::from_env`]; without it (not started by systemd) every call is a no-op. The
//! messages are formatted by the `sd-notify` crate; the [`Notifier`] owns its socket path
//! rather than reading the environment on every call, so tests can aim one at a socket of their
//! own without touching the process environment.
//!
//! # What the watchdog proves
//! [`Notifier::spawn_watchdog`] pings from a task on the gateway's own runtime, every half
//! `WATCHDOG_USEC` (as `sd_watchdog_enabled(3)` advises). Before each ping it runs a liveness
//! check supplied by the app: taking a snapshot of the ring buffer's ledger, through the lock
//! every stage goes through. So the pings stop, and systemd restarts the service, when the
//! runtime stalls (every worker thread blocked, the timer driver stuck) or when the buffer lock
//! is deadlocked. It deliberately does not require samples to flow: idle or disconnected
//! devices are normal, and a backlog under overload is counted in the ledger rather than being
//! a hang.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Sends state changes to the service manager; a no-op when there is none.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// The notification socket (`@name` for an abstract socket), when there is one.
    socket: Option<PathBuf>,
    /// The watchdog interval asked for with `WATCHDOG_USEC`, when there is one.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier systemd asked for through `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring
    /// `WATCHDOG_PID`); a no-op one when they are not set.
    pub fn from_env() -> Self {
        Self {
            socket: std::env::var_os("NOTIFY_SOCKET")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        }
    }

    /// A notifier sending to `socket`, with watchdog pings every half `watchdog` if given.
    pub fn to_socket(socket: impl Into<PathBuf>, watchdog: Option<Duration>) -> Self {
        Self {
            socket: Some(socket.into()),
            watchdog,
        }
    }

    /// Whether there is a service manager to notify.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// `READY=1`: the listener is bound and the devices have started (and, after
    /// [`Self::reloading`], the new configuration is applied).
    pub fn ready(&self) {
        self.send_logged(&[NotifyState::Ready], "READY=1");
    }

    /// `STOPPING=1`: the drain has started.
    pub fn stopping(&self) {
        self.send_logged(&[NotifyState::Stopping], "STOPPING=1");
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (the current `CLOCK_MONOTONIC` time, which
    /// `Type=notify-reload` requires to match the reload to its request).
    ///
    /// A live reload (SIGHUP, `POST /-/reload`) calls this before it re-reads the configuration
    /// and [`Self::ready`] once the outcome is known — applied or refused, either way the
    /// gateway is running again — but neither once shutdown has begun. With
    /// `Type=notify-reload` (systemd 253 and later) that is what makes `systemctl reload` wait
    /// for the reload to finish. The packaged unit is `Type=notify` with
    /// `ExecReload=/bin/kill -HUP $MAINPID` (Debian 12 ships systemd 252): there `systemctl
    /// reload` returns as soon as `kill` has sent the signal, before the reload is applied,
    /// and says nothing of its outcome; the journal and
    /// `telemetryhub_config_last_reload_successful` do, and `POST /-/reload` answers with it.
    pub fn reloading(&self) {
        if !self.is_enabled() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send_logged(&[NotifyState::Reloading, now], "RELOADING=1"),
            Err(err) => tracing::warn!(error = %err, "Cannot read the monotonic clock."),
        }
    }

    /// Starts the watchdog task on `tracker` if `WATCHDOG_USEC` asked for one: every half
    /// interval it runs `alive` (which must return promptly; see the module docs) and sends
    /// `WATCHDOG=1`. It stops when `cancel` is cancelled.
    pub fn spawn_watchdog(
        &self,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        mut alive: impl FnMut() + Send + 'static,
    ) {
        let (Some(_), Some(interval)) = (&self.socket, self.watchdog) else {
            return;
        };
        let notifier = self.clone();
        let period = (interval / 2).max(Duration::from_millis(1));
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(period);
            // After a stall, do not fire a burst of catch-up pings: one ping, then the period.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        alive();
                        notifier.send_logged(&[NotifyState::Watchdog], "WATCHDOG=1");
                    }
                }
            }
        });
    }

    /// Sends `states`; a failure is logged (systemd then acts on the missing message, e.g. a
    /// start-up timeout) and otherwise ignored: notifications are not worth stopping for.
    fn send_logged(&self, states: &[NotifyState<'_>], what: &str) {
        if let Err(err) = self.send(states) {
            tracing::warn!(message = what, error = %err, "Cannot notify the service manager.");
        }
    }

    /// One datagram with one `KEY=VALUE` line per state, as `sd_notify(3)` sends them.
    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let message: String = states.iter().map(|s| format!("{s}\n")).collect();
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = message.as_bytes();
        let sent = match socket.to_str().and_then(|s| s.strip_prefix('@')) {
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(bytes, &addr)?
            }
            _ => sock.send_to(bytes, socket)?,
        };
        if sent == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "incomplete datagram",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A socket in a fresh temporary directory, and a notifier aimed at it.
    fn listener(watchdog: Option<Duration>) -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, socket, Notifier::to_socket(path, watchdog))
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram arrives");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn reloading_then_ready_sends_monotonic_usec_then_ready() {
        let (_dir, socket, notifier) = listener(None);
        let before = NotifyState::monotonic_usec_now().unwrap();
        notifier.reloading();
        notifier.ready();
        let reloading = receive(&socket);
        let mut lines = reloading.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading:?}");
        let usec: i128 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
        let NotifyState::MonotonicUsec(before) = before else {
            unreachable!()
        };
        let after = match NotifyState::monotonic_usec_now().unwrap() {
            NotifyState::MonotonicUsec(after) => after,
            _ => unreachable!(),
        };
        assert!(
            (before..=after).contains(&usec),
            "{usec} not in {before}..={after}"
        );
        assert_eq!(receive(&socket), "READY=1\n");
    }

    #[test]
    fn stopping_is_sent() {
        let (_dir, socket, notifier) = listener(None);
        notifier.stopping();
        assert_eq!(receive(&socket), "STOPPING=1\n");
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_nothing_fails() {
        let notifier = Notifier::default();
        assert!(!notifier.is_enabled());
        notifier.ready();
        notifier.reloading();
        notifier.stopping();
        assert!(notifier.send(&[NotifyState::Ready]).is_ok());
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::to_socket(dir.path().join("absent.sock"), None);
        assert!(notifier.send(&[NotifyState::Ready]).is_err());
        notifier.ready(); // logged, not fatal
    }

    #[tokio::test]
    async fn the_watchdog_pings_while_alive_and_stops_when_cancelled() {
        let (_dir, socket, notifier) = listener(Some(Duration::from_millis(20)));
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let checks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = checks.clone();
        notifier.spawn_watchdog(&tracker, cancel.clone(), move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        tokio::task::spawn_blocking(move || {
            for _ in 0..3 {
                assert_eq!(receive(&socket), "WATCHDOG=1\n");
            }
        })
        .await
        .unwrap();
        assert!(checks.load(std::sync::atomic::Ordering::Relaxed) >= 3);
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("the watchdog task ends when cancelled");
    }

    #[test]
    fn the_watchdog_goes_quiet_while_the_runtime_is_stalled_and_resumes_after() {
        let (_dir, socket, notifier) = listener(Some(Duration::from_millis(20)));
        // One runtime thread: blocking it stalls the whole runtime, watchdog task included.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (pinged_tx, pinged_rx) = tokio::sync::oneshot::channel();
        let (stalled_tx, stalled_rx) = std::sync::mpsc::channel();
        let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
        let (resumed_tx, resumed_rx) = tokio::sync::oneshot::channel();
        let checker = std::thread::spawn(move || {
            assert_eq!(receive(&socket), "WATCHDOG=1\n");
            pinged_tx.send(()).unwrap();
            stalled_rx.recv().unwrap();
            // Pings sent before the stall are already queued (a unix datagram is queued as it
            // is sent): drain them; nothing can be sent while the only runtime thread is held.
            socket.set_nonblocking(true).unwrap();
            while socket.recv(&mut [0u8; 64]).is_ok() {}
            socket.set_nonblocking(false).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let quiet = socket.recv(&mut [0u8; 64]).is_err();
            resume_tx.send(()).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let after = receive(&socket);
            resumed_tx.send(()).unwrap();
            (quiet, after)
        });
        runtime.block_on(async {
            let tracker = TaskTracker::new();
            let cancel = CancellationToken::new();
            notifier.spawn_watchdog(&tracker, cancel.clone(), || {});
            pinged_rx.await.unwrap();
            // The stall: the runtime's only thread held until the checker has watched a
            // 200 ms window (ten ping periods).
            stalled_tx.send(()).unwrap();
            resume_rx.recv().unwrap();
            // Running again: the checker gets a ping again.
            resumed_rx.await.unwrap();
            cancel.cancel();
            tracker.close();
            tracker.wait().await;
        });
        let (quiet, after) = checker.join().unwrap();
        assert!(quiet, "a ping was sent while the runtime was stalled");
        assert_eq!(after, "WATCHDOG=1\n");
    }

    #[test]
    fn no_watchdog_task_without_watchdog_usec() {
        let (_dir, _socket, notifier) = listener(None);
        let tracker = TaskTracker::new();
        notifier.spawn_watchdog(&tracker, CancellationToken::new(), || {});
        assert!(tracker.is_empty());
    }
}
