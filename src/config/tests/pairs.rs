//! Combinations of settings that are each in range but can never work together: refused with
//! a message that says what to change.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use super::*;
use crate::config::device::SHORTEST_FRAME;
use crate::device::codec::{Frame, FrameCodec, InvalidReason, encode_frame};
use crate::device::sim::Simulator;

/// The key and message of a refused config.
fn refusal(text: &str) -> (String, String) {
    match load_toml(text, &[]) {
        Err(ConfigError::Invalid { key, message }) => (key, message),
        other => panic!("{text}: expected a refusal, got {other:?}"),
    }
}

fn device(lines: &str) -> String {
    format!("[[devices]]\nid = \"d\"\n{lines}\n")
}

#[test]
fn an_explicit_read_timeout_must_exceed_the_interval() {
    let (key, message) = refusal(&device("sample_interval_ms = 2000\nread_timeout_ms = 2000"));
    assert_eq!(key, "devices[0].read_timeout_ms");
    assert!(message.contains("sample_interval_ms (2000)"), "{message}");
    assert!(
        message.contains("unset") && message.contains("6000"),
        "{message}"
    );
    load_toml(
        &device("sample_interval_ms = 2000\nread_timeout_ms = 2001"),
        &[],
    )
    .unwrap();
    // A device sending as fast as it can takes any read timeout.
    load_toml(&device("sample_interval_ms = 0\nread_timeout_ms = 1"), &[]).unwrap();
}

#[test]
fn an_explicit_staleness_limit_must_exceed_the_interval() {
    let (key, message) = refusal(&device("sample_interval_ms = 1000\nstale_after_ms = 500"));
    assert_eq!(key, "devices[0].stale_after_ms");
    assert!(message.contains("sample_interval_ms (1000)"), "{message}");
    assert!(message.contains("/readyz"), "{message}");
    assert!(message.contains("5000"), "{message}");
    load_toml(
        &device("sample_interval_ms = 1000\nstale_after_ms = 1001"),
        &[],
    )
    .unwrap();
}

#[test]
fn the_simulator_signal_stays_within_its_documented_band() {
    // The longest-frame computation relies on 42 + sin(seq / 10) staying within 41..=43.
    for seq in (0..200_000).chain([u32::MAX - 1, u32::MAX]) {
        let v = Simulator::signal(seq);
        assert!((41.0..=43.0).contains(&v), "seq {seq}: {v}");
    }
}

/// The frame the simulator sends at its worst: largest seq, value furthest from zero.
fn worst_frame(sim: &SimulatorSettings) -> BytesMut {
    let mut longest = BytesMut::new();
    for value in [43.0 + sim.noise, 41.0 - sim.noise] {
        let mut frame = BytesMut::new();
        encode_frame(u32::MAX, value, &sim.unit, &mut frame);
        if frame.len() > longest.len() {
            longest = frame;
        }
    }
    longest
}

#[test]
fn a_simulated_device_needs_max_frame_len_to_fit_the_simulators_frames() {
    let (key, message) = refusal(&device("max_frame_len = 16"));
    assert_eq!(key, "devices[0].max_frame_len");
    // $TH,4294967295,43.010000,arb.units*CC\r\n
    assert!(message.contains("at least 38"), "{message}");
    load_toml(&device("max_frame_len = 38"), &[]).unwrap();
    refusal(&device("max_frame_len = 37"));

    for (unit, noise) in [("arb.units", 0.01), ("abcdefghijklmnop", 1e6), ("V", 100.0)] {
        let sim = SimulatorSettings {
            unit: unit.to_owned(),
            noise,
            ..SimulatorSettings::default()
        };
        let frame = worst_frame(&sim);
        let min = sim.longest_frame_len();
        assert_eq!(min, frame.len() - 1, "{unit} {noise}");
        // The decoder takes the frame at exactly that limit, and not one byte below.
        let decoded = FrameCodec::new(min).decode(&mut frame.clone()).unwrap();
        assert!(matches!(decoded, Some(Frame::Sample(_))), "{decoded:?}");
        let decoded = FrameCodec::new(min - 1).decode(&mut frame.clone()).unwrap();
        assert_eq!(decoded, Some(Frame::Invalid(InvalidReason::TooLong)));
        let text = format!(
            "[[devices]]\nid = \"d\"\nmax_frame_len = {}\n[devices.simulator]\nunit = \"{unit}\"\nnoise = {noise:?}\n",
            min - 1
        );
        let (key, message) = refusal(&text);
        assert_eq!(key, "devices[0].max_frame_len");
        assert!(message.contains(&format!("at least {min}")), "{message}");
    }
    // A serial device's frames are whatever the device sends: only the range applies.
    load_toml(
        "[[devices]]\nid = \"d\"\nkind = \"serial\"\nmax_frame_len = 16\n[devices.serial]\npath = \"/dev/ttyX\"\n",
        &[],
    )
    .unwrap();
}

#[test]
fn a_paced_simulator_must_deliver_a_frame_within_the_read_timeout() {
    // 39 bytes, 390 bits: 7.8 s at 50 baud, against a 3 s read timeout (1 s interval).
    let (key, message) = refusal(&device(
        "sample_interval_ms = 1000\n[devices.simulator]\nbaud = 50",
    ));
    assert_eq!(key, "devices[0].simulator.baud");
    assert!(message.contains("the read timeout (3000 ms)"), "{message}");
    assert!(message.contains("at least 131"), "{message}");
    // At the default 100 ms interval the staleness limit (500 ms) binds first.
    let (key, message) = refusal(&device("[devices.simulator]\nbaud = 50"));
    assert_eq!(key, "devices[0].simulator.baud");
    assert!(
        message.contains("the staleness limit (500 ms)"),
        "{message}"
    );
    assert!(message.contains("at least 781"), "{message}");
    load_toml(&device("[devices.simulator]\nbaud = 781"), &[]).unwrap();
    // With a longer read timeout and staleness limit, 50 baud works.
    load_toml(
        &device(
            "read_timeout_ms = 10000\nstale_after_ms = 10000\ncommand_timeout_ms = 20000\n[devices.simulator]\nbaud = 50",
        ),
        &[],
    )
    .unwrap();
    // A staleness limit shorter than a frame on the line makes readiness flap.
    let (key, message) = refusal(&device(
        "read_timeout_ms = 10000\nstale_after_ms = 5000\n[devices.simulator]\nbaud = 50",
    ));
    assert_eq!(key, "devices[0].simulator.baud");
    assert!(message.contains("stale_after_ms"), "{message}");
}

#[test]
fn a_command_reply_must_fit_in_the_command_timeout() {
    // A reply can wait behind a frame: 780 bits, 780 ms at 1000 baud.
    let (key, message) = refusal(&device(
        "command_timeout_ms = 700\n[devices.simulator]\nbaud = 1000",
    ));
    assert_eq!(key, "devices[0].command_timeout_ms");
    assert!(message.contains("above 780"), "{message}");
    load_toml(
        &device("command_timeout_ms = 781\n[devices.simulator]\nbaud = 1000"),
        &[],
    )
    .unwrap();
}

#[test]
fn a_serial_line_must_carry_the_shortest_frame_within_the_read_timeout() {
    // The shortest frame a device can send is 14 bytes: at 50 baud 8N1, 2.8 s.
    let serial = |extra: &str| {
        format!(
            "[[devices]]\nid = \"d\"\nkind = \"serial\"\n{extra}\n[devices.serial]\npath = \"/dev/ttyX\"\nbaud = 50\n"
        )
    };
    let (key, message) = refusal(&serial("sample_interval_ms = 500"));
    assert_eq!(key, "devices[0].serial.baud");
    assert!(message.contains("the read timeout (1500 ms)"), "{message}");
    assert!(message.contains("at least 94"), "{message}");
    load_toml(
        &serial("sample_interval_ms = 1000\nread_timeout_ms = 5000"),
        &[],
    )
    .unwrap();
    // The shortest frame really is a frame.
    assert!(crate::device::codec::parse_line(SHORTEST_FRAME.trim_ascii_end()).is_ok());
    assert_eq!(SHORTEST_FRAME.len(), 14);
}

#[test]
fn the_backoff_cap_must_not_be_below_the_first_delay() {
    let (key, message) = refusal(&device("backoff_initial_ms = 10\nbackoff_max_ms = 5"));
    assert_eq!(key, "devices[0].backoff_max_ms");
    assert!(message.contains("backoff_initial_ms (10)"), "{message}");
}

#[test]
fn an_api_token_must_be_sendable_in_a_bearer_header() {
    for token in [
        "with space",
        "tab\there",
        "new\nline",
        "héllo",
        " lead",
        "trail ",
    ] {
        let text = format!("[http]\napi_token = {token:?}\n");
        let (key, message) = refusal(&text);
        assert_eq!(key, "http.api_token", "{token:?}");
        assert!(message.contains("visible ASCII"), "{message}");
    }
    load_toml("[http]\napi_token = \"a-Z_0.9~+/=\"\n", &[]).unwrap();
}

#[test]
fn independent_timeouts_are_not_paired() {
    // The header-read timeout runs before a request reaches the router, the request timeout
    // after: any pairing works. So do a grace period shorter than a request and a stall longer
    // than the read timeout (that is what a stall is for).
    load_toml(
        "[http]\nheader_read_timeout_ms = 60000\nrequest_timeout_ms = 1\n[pipeline]\nshutdown_grace_ms = 0\n[[devices]]\nid = \"d\"\n[devices.simulator]\nstall_rate = 0.5\nstall_ms = 60000\n",
        &[],
    )
    .unwrap();
}
