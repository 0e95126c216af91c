//! The device state machine and its circuit breaker, as pure functions.
//!
//! The device task feeds it operator commands (`start`, `stop`, `reset`) and link events (a good
//! frame, a failed read) and acts on the state it returns. Keeping it free of I/O lets every
//! transition be tested exhaustively.

use std::time::Duration;

use serde::Serialize;

/// Where a device is in its life cycle. Serialised as these exact strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default, utoipa::ToSchema)]
pub enum DeviceState {
    /// Not sampling; waiting for `start`.
    #[default]
    Idle,
    /// Reading frames.
    Measuring,
    /// The last read failed; retrying with backoff.
    Error,
    /// The circuit breaker tripped after too many consecutive failures; needs `reset` (or
    /// `stop`, which acknowledges the trip and leaves the device Idle).
    SafeState,
}

impl DeviceState {
    /// Every state, for metrics.
    pub const ALL: [DeviceState; 4] = [Self::Idle, Self::Measuring, Self::Error, Self::SafeState];

    /// The state's name, as in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::Measuring => "Measuring",
            Self::Error => "Error",
            Self::SafeState => "SafeState",
        }
    }

    /// Whether the device wants its link open.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Measuring | Self::Error)
    }

    /// Severity for combining several devices into one state: the worst one wins.
    pub fn severity(self) -> u8 {
        match self {
            Self::Idle => 0,
            Self::Measuring => 1,
            Self::Error => 2,
            Self::SafeState => 3,
        }
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Begin sampling.
    Start,
    /// Stop sampling.
    Stop,
    /// Clear an error or a tripped breaker.
    Reset,
}

impl Command {
    /// The command's name, as in routes and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reset => "reset",
        }
    }
}

/// A command that is not allowed in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} from {from}{}", command.as_str(), hint(*command, *from))]
pub struct IllegalTransition {
    /// The state the device was in.
    pub from: DeviceState,
    /// The command that was refused.
    pub command: Command,
}

fn hint(command: Command, from: DeviceState) -> &'static str {
    match (command, from) {
        (_, DeviceState::SafeState) => "; reset it first",
        (Command::Reset, DeviceState::Measuring) => "; stop it first",
        _ => "",
    }
}

/// The state after an operator command, or why it is refused. Repeating a command that is
/// already in effect (start while measuring, stop while idle) succeeds and changes nothing.
/// Stop is allowed from every state: stopping a tripped device acknowledges the trip and leaves
/// it Idle, so `POST /stop` can always quiet every device. Only a start needs a healthy breaker.
pub fn on_command(from: DeviceState, command: Command) -> Result<DeviceState, IllegalTransition> {
    use DeviceState::*;
    match (from, command) {
        (Idle, Command::Start) => Ok(Measuring),
        (Measuring | Error, Command::Start) => Ok(from),
        (_, Command::Stop) => Ok(Idle),
        (Idle | Error | SafeState, Command::Reset) => Ok(Idle),
        (SafeState, Command::Start) | (Measuring, Command::Reset) => {
            Err(IllegalTransition { from, command })
        }
    }
}

/// The circuit breaker: counts consecutive failures and trips at a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    threshold: u32,
    failures: u32,
}

impl Breaker {
    /// A breaker that trips after `threshold` consecutive failures (at least 1).
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            failures: 0,
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failed read in an active state; returns the next state.
    pub fn on_failure(&mut self, from: DeviceState) -> DeviceState {
        if !from.is_active() {
            return from;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.threshold {
            DeviceState::SafeState
        } else {
            DeviceState::Error
        }
    }

    /// Records a good frame; returns the next state.
    pub fn on_success(&mut self, from: DeviceState) -> DeviceState {
        self.failures = 0;
        if from == DeviceState::Error {
            DeviceState::Measuring
        } else {
            from
        }
    }

    /// Forgets past failures (on stop or reset).
    pub fn clear(&mut self) {
        self.failures = 0;
    }
}

/// Capped exponential backoff: `initial * 2^(failures - 1)`, at most `max`.
pub fn backoff(failures: u32, initial: Duration, max: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    initial.saturating_mul(1 << exponent).min(max)
}

#[cfg(test)]
mod tests {
    use super::DeviceState::*;
    use super::*;

    #[test]
    fn every_command_in_every_state() {
        let table = [
            (Idle, Command::Start, Ok(Measuring)),
            (Idle, Command::Stop, Ok(Idle)),
            (Idle, Command::Reset, Ok(Idle)),
            (Measuring, Command::Start, Ok(Measuring)),
            (Measuring, Command::Stop, Ok(Idle)),
            (Measuring, Command::Reset, Err(())),
            (Error, Command::Start, Ok(Error)),
            (Error, Command::Stop, Ok(Idle)),
            (Error, Command::Reset, Ok(Idle)),
            (SafeState, Command::Start, Err(())),
            (SafeState, Command::Stop, Ok(Idle)),
            (SafeState, Command::Reset, Ok(Idle)),
        ];
        for (from, command, expected) in table {
            let got = on_command(from, command);
            match expected {
                Ok(to) => assert_eq!(got, Ok(to), "{from} + {command:?}"),
                Err(()) => assert_eq!(
                    got,
                    Err(IllegalTransition { from, command }),
                    "{from} + {command:?}"
                ),
            }
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let err = on_command(SafeState, Command::Start).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot start from SafeState; reset it first"
        );
        let err = on_command(Measuring, Command::Reset).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot reset from Measuring; stop it first"
        );
    }

    #[test]
    fn failures_go_to_error_then_trip_at_threshold() {
        let mut breaker = Breaker::new(3);
        assert_eq!(breaker.on_failure(Measuring), Error);
        assert_eq!(breaker.on_failure(Error), Error);
        assert_eq!(breaker.on_failure(Error), SafeState);
        assert_eq!(breaker.failures(), 3);
    }

    #[test]
    fn a_good_frame_recovers_and_clears_the_count() {
        let mut breaker = Breaker::new(3);
        breaker.on_failure(Measuring);
        breaker.on_failure(Error);
        assert_eq!(breaker.on_success(Error), Measuring);
        assert_eq!(breaker.failures(), 0);
        // Two more failures do not trip it: the count restarted.
        assert_eq!(breaker.on_failure(Measuring), Error);
        assert_eq!(breaker.on_failure(Error), Error);
    }

    #[test]
    fn threshold_one_trips_on_the_first_failure() {
        assert_eq!(Breaker::new(1).on_failure(Measuring), SafeState);
    }

    #[test]
    fn failures_outside_active_states_change_nothing() {
        let mut breaker = Breaker::new(1);
        assert_eq!(breaker.on_failure(Idle), Idle);
        assert_eq!(breaker.on_failure(SafeState), SafeState);
        assert_eq!(breaker.failures(), 0);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let ms = Duration::from_millis;
        let delays: Vec<_> = (1..=8).map(|n| backoff(n, ms(100), ms(1000))).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000, 1000, 1000, 1000]
                .map(ms)
                .to_vec()
        );
        assert_eq!(backoff(u32::MAX, ms(100), ms(5000)), ms(5000));
    }
}
