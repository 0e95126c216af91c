//! Tables and keys the gateway would ignore are refused instead of silently dropped.

use super::*;

const SERIAL: &str =
    "[[devices]]\nid = \"tty\"\nkind = \"serial\"\n[devices.serial]\npath = \"/dev/ttyX\"\n";

#[test]
fn a_serial_device_refuses_a_simulator_table_it_would_ignore() {
    for table in [
        "corrupt_rate = 1.5", // invalid: used to pass, unchecked
        "unit = \"degC\"",    // valid, but a serial device never simulates
        "baud = 9600",
    ] {
        let text = format!("{SERIAL}[devices.simulator]\n{table}\n");
        let err = load_toml(&text, &[]).expect_err(&text);
        let message = err.to_string();
        assert_eq!(invalid_key(err), "devices[0].simulator", "{table}");
        assert!(
            message.contains("serial") && message.contains("remove"),
            "{message}"
        );
    }
    // A table that only restates the defaults changes nothing and is accepted, so the
    // default device can be turned into a serial one from the environment.
    load_toml(&format!("{SERIAL}[devices.simulator]\nseed = 0\n"), &[]).unwrap();
    let settings = Settings::load(
        None,
        env(&[
            ("TELEMETRYHUB__DEVICES__0__KIND", "serial"),
            ("TELEMETRYHUB__DEVICES__0__SERIAL__PATH", "/dev/ttyUSB0"),
        ]),
    )
    .unwrap();
    assert_eq!(settings.devices[0].kind, DeviceKind::Serial);
}

#[test]
fn a_simulated_device_refuses_a_serial_table() {
    let text = "[[devices]]\nid = \"a\"\n[devices.serial]\npath = \"/dev/ttyX\"\n";
    let err = load_toml(text, &[]).unwrap_err();
    assert_eq!(invalid_key(err), "devices[0].serial");
}

#[test]
fn a_processing_range_for_a_unit_no_sample_can_carry_is_refused() {
    // Units are 1 to 16 of A-Z a-z 0-9 . _ / % - in frames and in POST /samples alike.
    for unit in ["deg C", "a_unit_of_17_char", "µV"] {
        let text = format!("[processing.units.{unit:?}]\nmin = 0.0\nmax = 1.0\n");
        let err = load_toml(&text, &[]).expect_err(&text);
        let message = err.to_string();
        assert_eq!(invalid_key(err), format!("processing.units.{unit}"));
        assert!(message.contains("never"), "{message}");
    }
    load_toml(
        "[processing.units.\"m/s%_-.9\"]\nmin = 0.0\nmax = 1.0\n",
        &[],
    )
    .unwrap();
}
