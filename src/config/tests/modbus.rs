//! The Modbus keys: a valid register map loads; each kind of mistake is refused naming its key.

use super::*;

const TCP: &str = "[[devices]]\nid = \"plc\"\nkind = \"modbus_tcp\"\naddress = \"127.0.0.1:502\"\n";
const RTU: &str = "[[devices]]\nid = \"rtu\"\nkind = \"modbus_rtu\"\nserial = { path = \"/dev/ttyX\", baud = 9600, parity = \"even\" }\n";
const REG: &str = "[[devices.registers]]\nchannel = \"t\"\ntable = \"input\"\naddress = 0\ndata_type = \"int16\"\n";

fn reg(lines: &str) -> String {
    format!("[[devices.registers]]\n{lines}\n")
}

#[test]
fn the_example_register_map_loads() {
    let text = include_str!("../../../config/modbus-example.toml");
    let settings = Settings::from_toml(text).unwrap();
    let plc = &settings.devices[0];
    assert_eq!(plc.kind, DeviceKind::ModbusTcp);
    assert_eq!(plc.modbus_unit_id(), 1);
    assert_eq!(plc.registers.len(), 6);
    assert_eq!(plc.registers[3].byte_order, ByteOrder::Cdab);
    assert_eq!(plc.registers[2].data_type, DataType::Float32);
    assert!(plc.registers[4].writable);
    assert_eq!(plc.interval(), Duration::from_millis(1000));
}

#[test]
fn an_rtu_device_reuses_the_serial_line_settings() {
    let settings = load_toml(&format!("{RTU}unit_id = 17\n{REG}"), &[]).unwrap();
    let d = &settings.devices[0];
    assert_eq!(d.kind, DeviceKind::ModbusRtu);
    let serial = d.serial.as_ref().unwrap();
    assert_eq!((serial.baud, serial.parity), (9600, Parity::Even));
    assert_eq!(d.modbus_unit_id(), 17);
    assert_eq!(d.modbus_retries(), 1);
    assert_eq!(d.modbus_timeout(), Duration::from_millis(500));
}

#[test]
fn every_mistake_is_refused_naming_its_key() {
    let p = "devices[0]";
    let cases: Vec<(String, String)> = vec![
        (format!("{TCP}unit_id = 248\n{REG}"), format!("{p}.unit_id")),
        (format!("{TCP}unit_id = -1\n{REG}"), format!("{p}.unit_id")),
        (
            format!("{TCP}poll_interval_ms = 0\n{REG}"),
            format!("{p}.poll_interval_ms"),
        ),
        (
            format!("{TCP}timeout_ms = 0\n{REG}"),
            format!("{p}.timeout_ms"),
        ),
        (
            format!("{TCP}timeout_ms = 60001\n{REG}"),
            format!("{p}.timeout_ms"),
        ),
        (format!("{TCP}retries = 11\n{REG}"), format!("{p}.retries")),
        (
            format!("{TCP}timeout_ms = 2000\n{REG}"),
            format!("{p}.command_timeout_ms"),
        ),
        (TCP.to_owned(), format!("{p}.registers")),
        (
            format!("[[devices]]\nid = \"x\"\nkind = \"modbus_tcp\"\n{REG}"),
            format!("{p}.address"),
        ),
        (
            format!("[[devices]]\nid = \"x\"\nkind = \"modbus_tcp\"\naddress = \"nohost\"\n{REG}"),
            format!("{p}.address"),
        ),
        (
            format!("[[devices]]\nid = \"x\"\nkind = \"modbus_rtu\"\n{REG}"),
            format!("{p}.serial"),
        ),
        (
            format!(
                "[[devices]]\nid = \"x\"\nkind = \"modbus_rtu\"\naddress = \"h:1\"\nserial = {{ path = \"/dev/x\" }}\n{REG}"
            ),
            format!("{p}.address"),
        ),
        (
            format!(
                "{RTU}{}",
                reg(
                    "channel = \"t\"\ntable = \"input\"\naddress = 0\ndata_type = \"int16\"\nbyte_order = \"ADCB\""
                )
            ),
            format!("{p}.registers[0].byte_order"),
        ),
        (
            format!(
                "{TCP}{}",
                reg("channel = \"t\"\ntable = \"coil\"\naddress = 0\ndata_type = \"int16\"")
            ),
            format!("{p}.registers[0].data_type"),
        ),
        (
            format!(
                "{TCP}{}",
                reg("channel = \"t\"\ntable = \"holding\"\naddress = 0\ndata_type = \"bool\"")
            ),
            format!("{p}.registers[0].data_type"),
        ),
        (
            format!(
                "{TCP}{}",
                reg("channel = \"t\"\ntable = \"holding\"\naddress = 0\ndata_type = \"float128\"")
            ),
            format!("{p}.registers[0].data_type"),
        ),
        (
            format!(
                "{TCP}{}",
                reg("channel = \"t\"\ntable = \"table9\"\naddress = 0\ndata_type = \"int16\"")
            ),
            format!("{p}.registers[0].table"),
        ),
        (
            format!(
                "{TCP}{}",
                reg("channel = \"t\"\ntable = \"holding\"\naddress = 65536\ndata_type = \"int16\"")
            ),
            format!("{p}.registers[0].address"),
        ),
        (
            format!(
                "{TCP}{}",
                reg(
                    "channel = \"t\"\ntable = \"holding\"\naddress = 65535\ndata_type = \"float32\""
                )
            ),
            format!("{p}.registers[0].address"),
        ),
        (
            format!("{TCP}{REG}{REG}"),
            format!("{p}.registers[1].channel"),
        ),
        (
            format!(
                "{TCP}{}",
                reg("channel = \"a b\"\ntable = \"input\"\naddress = 0\ndata_type = \"int16\"")
            ),
            format!("{p}.registers[0].channel"),
        ),
        (
            format!(
                "{TCP}{}",
                reg(
                    "channel = \"t\"\ntable = \"input\"\naddress = 0\ndata_type = \"int16\"\nwritable = true"
                )
            ),
            format!("{p}.registers[0].writable"),
        ),
        (
            format!(
                "{TCP}{}",
                reg(
                    "channel = \"t\"\ntable = \"input\"\naddress = 0\ndata_type = \"int16\"\nscale = nan"
                )
            ),
            format!("{p}.registers[0].scale"),
        ),
        (
            format!(
                "{TCP}{}",
                reg(
                    "channel = \"t\"\ntable = \"input\"\naddress = 0\ndata_type = \"int16\"\nunit = \"\""
                )
            ),
            format!("{p}.registers[0].unit"),
        ),
        (
            format!(
                "{TCP}{}",
                reg(
                    "channel = \"t\"\ntable = \"input\"\naddress = 0\ndata_type = \"int16\"\ncolour = 1"
                )
            ),
            format!("{p}.registers[0]"),
        ),
        (
            format!(
                "{TCP}{}{}",
                reg(
                    "channel = \"a\"\ntable = \"holding\"\naddress = 10\ndata_type = \"uint32\"\nwritable = true"
                ),
                reg(
                    "channel = \"b\"\ntable = \"holding\"\naddress = 11\ndata_type = \"uint16\"\nwritable = true"
                )
            ),
            format!("{p}.registers[1].address"),
        ),
        (
            "[[devices]]\nid = \"s\"\nunit_id = 3\n".to_owned(),
            format!("{p}.unit_id"),
        ),
        (
            format!("[[devices]]\nid = \"s\"\n{REG}"),
            format!("{p}.registers"),
        ),
    ];
    for (text, key) in cases {
        let err = load_toml(&text, &[]).expect_err(&text);
        let got = invalid_key(err);
        assert!(
            got.starts_with(&key),
            "{text}\nexpected key {key}, got {got}"
        );
    }
}

#[test]
fn overlap_is_allowed_when_not_both_writable_or_in_other_tables() {
    let text = format!(
        "{TCP}{}{}{}",
        reg(
            "channel = \"a\"\ntable = \"holding\"\naddress = 10\ndata_type = \"uint32\"\nwritable = true"
        ),
        reg("channel = \"b\"\ntable = \"holding\"\naddress = 11\ndata_type = \"uint16\""),
        reg(
            "channel = \"c\"\ntable = \"coil\"\naddress = 10\ndata_type = \"bool\"\nwritable = true"
        ),
    );
    load_toml(&text, &[]).unwrap();
}

#[test]
fn modbus_keys_come_from_the_environment_too() {
    let err = load_toml(
        &format!("{TCP}{REG}"),
        &[("TELEMETRYHUB__DEVICES__0__UNIT_ID", "300")],
    )
    .unwrap_err();
    assert_eq!(invalid_key(err), "devices[0].unit_id");
}
