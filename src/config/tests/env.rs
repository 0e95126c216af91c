//! Environment overrides: typed by the field they set, applied in path order.

use super::*;

fn load_env(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load(None, env(vars))
}

#[test]
fn string_fields_take_the_text_as_it_is() {
    for token in [
        "123456", "1e10", "0x1F", "true", "inf", "nan", "1_000", "[1]", "{a=1}",
    ] {
        let settings = load_env(&[("TELEMETRYHUB__HTTP__API_TOKEN", token)])
            .unwrap_or_else(|err| panic!("{token}: {err}"));
        let secret = settings.http.api_token.expect("the token is set");
        assert!(secret.matches(token.as_bytes()), "{token}");
    }
    let settings = load_env(&[
        ("TELEMETRYHUB__DEVICES__0__ID", "123"),
        ("TELEMETRYHUB__DEVICES__0__SIMULATOR__UNIT", "1e10"),
        ("TELEMETRYHUB__DEVICES__1__ID", "0x1F"),
        ("TELEMETRYHUB__DEVICES__1__KIND", "serial"),
        ("TELEMETRYHUB__DEVICES__1__SERIAL__PATH", "123"),
        ("TELEMETRYHUB__HTTP__ALLOWED_HOSTS__0", "123"),
        ("TELEMETRYHUB__LOG__LEVEL", "warn"),
    ])
    .unwrap();
    assert_eq!(settings.devices[0].id, "123");
    assert_eq!(settings.devices[0].simulator.unit, "1e10");
    assert_eq!(settings.devices[1].id, "0x1F");
    let serial = settings.devices[1].serial.as_ref().unwrap();
    assert_eq!(serial.path, Path::new("123"));
    assert_eq!(settings.http.allowed_hosts, ["123"]);
    assert_eq!(settings.log.level, "warn");
}

#[test]
fn every_string_field_takes_numeric_text() {
    // Every string-typed leaf of a settings tree with every optional table and key set,
    // found from its serialised form: set to digits, none is refused as the wrong type.
    let mut full = Settings::default();
    full.http.api_token = Some(Secret::new("t"));
    full.http.allowed_hosts = vec!["gw.lan".to_owned()];
    full.pipeline.workers = Some(2);
    full.devices[0].read_timeout_ms = Some(1000);
    full.devices[0].stale_after_ms = Some(1000);
    full.devices
        .push(DeviceSettings::serial("tty", "/dev/ttyUSB0"));
    fn strings(path: &str, value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::String(_) => out.push(path.to_owned()),
            toml::Value::Table(t) => t
                .iter()
                .for_each(|(k, v)| strings(&format!("{path}__{}", k.to_uppercase()), v, out)),
            toml::Value::Array(items) => items
                .iter()
                .enumerate()
                .for_each(|(i, v)| strings(&format!("{path}__{i}"), v, out)),
            _ => {}
        }
    }
    let mut vars = Vec::new();
    strings(
        "TELEMETRYHUB",
        &toml::Value::try_from(&full).unwrap(),
        &mut vars,
    );
    assert!(vars.len() >= 10, "{vars:?}");
    // Make device 1 serial from the environment too, so its serial table is taken.
    let base = [
        ("TELEMETRYHUB__DEVICES__1__ID", "tty"),
        ("TELEMETRYHUB__DEVICES__1__KIND", "serial"),
        ("TELEMETRYHUB__DEVICES__1__SERIAL__PATH", "/dev/ttyUSB0"),
    ];
    for var in vars {
        let mut set = base.to_vec();
        set.push((&var, "12345"));
        if let Err(err) = load_env(&set) {
            let message = err.to_string();
            assert!(!message.contains("invalid type"), "{var}=12345: {message}");
        }
    }
}

#[test]
fn numbers_and_booleans_are_still_typed() {
    let settings = load_env(&[
        ("TELEMETRYHUB__HTTP__API_TOKEN", "t"),
        ("TELEMETRYHUB__HTTP__PROTECT_READS", "true"),
        ("TELEMETRYHUB__PIPELINE__WORKERS", "4"),
        ("TELEMETRYHUB__BUFFER__HIGH_WATERMARK", "0.5"),
        ("TELEMETRYHUB__BUFFER__CAPACITY", "5_000"),
        ("TELEMETRYHUB__DEVICES__0__READ_TIMEOUT_MS", "1000"),
        ("TELEMETRYHUB__DEVICES__0__STALE_AFTER_MS", "2000"),
        (
            "TELEMETRYHUB__DEVICES__0__SIMULATOR__SEED",
            "18446744073709551615",
        ),
        (
            "TELEMETRYHUB__HTTP__ALLOWED_HOSTS",
            "[\"a.lan\", \"b.lan\"]",
        ),
    ])
    .unwrap();
    assert!(settings.http.protect_reads);
    assert_eq!(settings.pipeline.workers, Some(4));
    assert_eq!(settings.buffer.high_watermark, 0.5);
    assert_eq!(settings.buffer.capacity, 5000);
    assert_eq!(settings.devices[0].read_timeout_ms, Some(1000));
    assert_eq!(settings.devices[0].stale_after_ms, Some(2000));
    assert_eq!(settings.devices[0].simulator.seed, u64::MAX);
    assert_eq!(settings.http.allowed_hosts, ["a.lan", "b.lan"]);
    for (var, value) in [
        ("TELEMETRYHUB__HTTP__PROTECT_READS", "yes"),
        ("TELEMETRYHUB__PIPELINE__WORKERS", ""),
        ("TELEMETRYHUB__BUFFER__CAPACITY", "1e3"),
    ] {
        let err = load_env(&[(var, value)]).unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { .. }),
            "{var}={value}: {err}"
        );
    }
}

#[test]
fn array_indices_do_not_depend_on_the_order_of_variables() {
    let forward = [
        ("TELEMETRYHUB__DEVICES__1__ID", "one"),
        ("TELEMETRYHUB__DEVICES__2__ID", "two"),
    ];
    let backward = [forward[1], forward[0]];
    for vars in [&forward[..], &backward[..]] {
        let settings = load_env(vars).unwrap_or_else(|err| panic!("{vars:?}: {err}"));
        let ids: Vec<_> = settings.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["sim0", "one", "two"], "{vars:?}");
    }
    // Numeric order, not text order: 10 comes after 9.
    let mut vars: Vec<(String, String)> = (1..=10)
        .rev()
        .map(|i| (format!("TELEMETRYHUB__DEVICES__{i}__ID"), format!("d{i}")))
        .collect();
    vars.push((
        "TELEMETRYHUB__DEVICES__10__SAMPLE_INTERVAL_MS".into(),
        "7".into(),
    ));
    let settings = Settings::load(None, vars).unwrap();
    assert_eq!(settings.devices.len(), 11);
    assert_eq!(settings.devices[10].id, "d10");
    assert_eq!(settings.devices[10].sample_interval_ms, 7);
}

#[test]
fn an_index_that_leaves_a_gap_names_the_variable() {
    let err = load_env(&[("TELEMETRYHUB__DEVICES__5__ID", "x")]).unwrap_err();
    let ConfigError::Env { var, message } = &err else {
        panic!("expected an environment error, got {err}");
    };
    assert_eq!(var, "TELEMETRYHUB__DEVICES__5__ID");
    assert!(
        message.contains("1 item") && message.contains("index 1"),
        "{message}"
    );
}

#[test]
fn map_keys_match_the_file_whatever_their_case() {
    // Variable names are upper case; the unit `degC` from the file is still the one changed.
    let text = "[processing.units.degC]\nmin = 0.0\nmax = 10.0\n";
    let settings = load_toml(
        text,
        &[("TELEMETRYHUB__PROCESSING__UNITS__DEGC__MAX", "50")],
    )
    .unwrap();
    assert_eq!(settings.processing.units["degC"].max, 50.0);
    assert!(!settings.processing.units.contains_key("degc"));
}

#[test]
fn a_table_set_whole_can_then_be_changed_key_by_key() {
    let settings = load_env(&[
        ("TELEMETRYHUB__DEVICES", "[{ id = \"a\" }, { id = \"b\" }]"),
        ("TELEMETRYHUB__DEVICES__1__SAMPLE_INTERVAL_MS", "20"),
    ])
    .unwrap();
    let ids: Vec<_> = settings.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(settings.devices[1].sample_interval_ms, 20);
}
