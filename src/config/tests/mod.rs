//! Tests of loading, layering and validating settings.

use std::time::Duration;

use super::*;
use crate::buffer::OverflowPolicy;

mod display;
mod env;
mod ignored;
mod modbus;
mod pairs;
mod ranges;
mod warnings;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load_toml(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = std::env::temp_dir().join(format!(
        "telemetryhub-config-{}-{}",
        std::process::id(),
        text.len() + vars.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{:x}.toml",
        text.bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b))
    ));
    std::fs::write(&path, text).unwrap();
    let result = Settings::load(Some(&path), env(vars));
    let _ = std::fs::remove_file(&path);
    result
}

fn invalid_key(err: ConfigError) -> String {
    match err {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("expected an invalid key, got {other}"),
    }
}

#[test]
fn built_in_defaults_equal_the_default_file() {
    assert_eq!(
        Settings::from_toml(DEFAULT_TOML).unwrap(),
        Settings::default()
    );
    assert_eq!(Settings::load(None, env(&[])).unwrap(), Settings::default());
}

#[test]
fn the_default_file_sets_every_key() {
    // Every key the defaults serialise must appear in the file (workers is documented
    // there as a comment because "unset" is its default).
    fn keys(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    keys(&format!("{prefix}{k}."), v, out);
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    keys(prefix, item, out);
                }
            }
            _ => out.push(prefix.trim_end_matches('.').to_owned()),
        }
    }
    let mut from_defaults = Vec::new();
    keys(
        "",
        &toml::Value::try_from(Settings::default()).unwrap(),
        &mut from_defaults,
    );
    let mut from_file = Vec::new();
    keys(
        "",
        &toml::Value::Table(DEFAULT_TOML.parse().unwrap()),
        &mut from_file,
    );
    from_defaults.sort();
    from_file.sort();
    assert_eq!(from_defaults, from_file);
    assert!(DEFAULT_TOML.contains("# workers = "));
    assert!(DEFAULT_TOML.contains("# stale_after_ms = "));
    assert!(DEFAULT_TOML.contains("# read_timeout_ms = "));
    assert!(DEFAULT_TOML.contains("# api_token = "));
}

#[test]
fn serial_devices_and_several_devices_parse() {
    let text = "[[devices]]\nid = \"a\"\nsample_interval_ms = 10\n\n[[devices]]\nid = \"tty1\"\nkind = \"serial\"\n[devices.serial]\npath = \"/dev/ttyUSB0\"\nbaud = 9600\nparity = \"even\"\nstop_bits = 2\n";
    let settings = load_toml(text, &[]).unwrap();
    assert_eq!(settings.devices.len(), 2);
    assert_eq!(settings.devices[0].stale_after(), Duration::from_millis(50));
    let serial = settings.devices[1].serial.as_ref().unwrap();
    assert_eq!(settings.devices[1].kind, DeviceKind::Serial);
    assert_eq!(
        (
            serial.baud,
            serial.data_bits,
            serial.parity,
            serial.stop_bits
        ),
        (9600, 8, Parity::Even, 2)
    );
}

#[test]
fn the_token_is_compared_exactly_and_never_printed() {
    let settings = Settings::load(
        None,
        env(&[("TELEMETRYHUB__HTTP__API_TOKEN", "s3cret-token")]),
    )
    .unwrap();
    let token = settings.http.api_token.as_ref().unwrap();
    assert!(token.matches(b"s3cret-token"));
    assert!(!token.matches(b"s3cret-tokem"));
    assert!(!token.matches(b"s3cret"));
    assert!(!token.matches(b""));
    assert!(!format!("{settings:?}").contains("s3cret"));
}

#[test]
fn a_file_changes_only_what_it_sets() {
    let settings = load_toml("[buffer]\ncapacity = 50\n", &[]).unwrap();
    assert_eq!(settings.buffer.capacity, 50);
    assert_eq!(settings.buffer.overflow, OverflowPolicy::DropOldest);
    assert_eq!(settings.devices, Settings::default().devices);
}

#[test]
fn environment_overrides_win_over_the_file() {
    let settings = load_toml(
        "[buffer]\ncapacity = 50\n",
        &[
            ("TELEMETRYHUB__BUFFER__CAPACITY", "70"),
            ("TELEMETRYHUB__BUFFER__OVERFLOW", "block"),
            ("TELEMETRYHUB__HTTP__LISTEN", "0.0.0.0:9000"),
            ("TELEMETRYHUB__DEVICES__0__SAMPLE_INTERVAL_MS", "5"),
            ("TELEMETRYHUB__DEVICES__0__SIMULATOR__UNIT", "degC"),
            ("UNRELATED", "x"),
        ],
    )
    .unwrap();
    assert_eq!(settings.buffer.capacity, 70);
    assert_eq!(settings.buffer.overflow, OverflowPolicy::Block);
    assert_eq!(settings.http.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(settings.devices[0].sample_interval_ms, 5);
    assert_eq!(settings.devices[0].simulator.unit, "degC");
}

#[test]
fn a_string_where_a_number_belongs_names_the_key() {
    let err = load_toml("[buffer]\ncapacity = \"abc\"\n", &[]).unwrap_err();
    let message = err.to_string();
    assert_eq!(invalid_key(err), "buffer.capacity");
    assert!(message.contains("abc"), "{message}");
    let err = Settings::load(None, env(&[("TELEMETRYHUB__BUFFER__CAPACITY", "abc")])).unwrap_err();
    assert_eq!(invalid_key(err), "buffer.capacity");
}

#[test]
fn unknown_keys_are_errors() {
    let err = load_toml("[buffer]\ncapacty = 5\n", &[]).unwrap_err();
    assert!(err.to_string().contains("capacty"), "{err}");
    let err = load_toml("[bufer]\ncapacity = 5\n", &[]).unwrap_err();
    assert!(err.to_string().contains("bufer"), "{err}");
}

#[test]
fn values_that_cannot_work_are_rejected_by_name() {
    let cases = [
        ("[pipeline]\nworkers = 0\n", "pipeline.workers"),
        ("[http]\napi_token = \"\"\n", "http.api_token"),
        ("[http]\nprotect_reads = true\n", "http.protect_reads"),
        ("[http]\nbody_limit_bytes = 0\n", "http.body_limit_bytes"),
        (
            "[http]\nrequest_timeout_ms = 0\n",
            "http.request_timeout_ms",
        ),
        ("[buffer]\nhigh_watermark = 1.5\n", "buffer.high_watermark"),
        ("[buffer]\ncapacity = 0\n", "buffer.capacity"),
        ("[pipeline]\nbatch_max = 0\n", "pipeline.batch_max"),
        ("[pipeline]\nhistory = 0\n", "pipeline.history"),
        ("[buffer]\noverflow = \"sometimes\"\n", "buffer.overflow"),
        ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
        (
            "[http]\nallowed_hosts = [\"gw.lan:8080\"]\n",
            "http.allowed_hosts",
        ),
        ("[pipeline]\nworkers = -1\n", "pipeline.workers"),
        ("[log]\nlevel = \"=[\"\n", "log.level"),
        (
            "[processing.units.V]\nmin = 5.0\nmax = 1.0\n",
            "processing.units.V",
        ),
        ("devices = []\n", "devices"),
        ("[[devices]]\nid = \"a b\"\n", "devices[0].id"),
        (
            "[[devices]]\nid = \"a\"\n[[devices]]\nid = \"a\"\n",
            "devices[1].id",
        ),
        (
            "[[devices]]\nid = \"a\"\nfailure_threshold = 0\n",
            "devices[0].failure_threshold",
        ),
        (
            "[[devices]]\nid = \"a\"\nread_timeout_ms = 0\n",
            "devices[0].read_timeout_ms",
        ),
        (
            "[[devices]]\nid = \"a\"\nbackoff_initial_ms = 10\nbackoff_max_ms = 5\n",
            "devices[0].backoff_max_ms",
        ),
        (
            "[[devices]]\nid = \"a\"\nmax_frame_len = 4\n",
            "devices[0].max_frame_len",
        ),
        (
            "[[devices]]\nid = \"a\"\nkind = \"usb\"\n",
            "devices[0].kind",
        ),
        (
            "[[devices]]\nid = \"a\"\n[devices.simulator]\ncorrupt_rate = 1.5\n",
            "devices[0].simulator.corrupt_rate",
        ),
        (
            "[[devices]]\nid = \"a\"\n[devices.simulator]\nunit = \"bad unit\"\n",
            "devices[0].simulator.unit",
        ),
        (
            "[[devices]]\nid = \"a\"\nchannel = \"\"\n",
            "devices[0].channel",
        ),
        (
            "[[devices]]\nid = \"a\"\nchannel = \"rel humidity\"\n",
            "devices[0].channel",
        ),
        (
            "[[devices]]\nid = \"a\"\nchannel = \"c234567890123456789012345678901234\"\n",
            "devices[0].channel",
        ),
        (
            "[[devices]]\nid = \"a\"\n[devices.simulator]\nchannels = [\"t\", \"h/2\"]\n",
            "devices[0].simulator.channels[1]",
        ),
        (
            "[[devices]]\nid = \"a\"\n[devices.simulator]\nchannels = [\"t\", \"h\", \"t\"]\n",
            "devices[0].simulator.channels[2]",
        ),
        (
            "[[devices]]\nid = \"a\"\n[devices.simulator]\nchannels = [\"a\",\"b\",\"c\",\"d\",\
             \"e\",\"f\",\"g\",\"h\",\"i\",\"j\",\"k\",\"l\",\"m\",\"n\",\"o\",\"p\",\"q\"]\n",
            "devices[0].simulator.channels",
        ),
        (
            // Frames naming a 32-character channel are longer than 48 bytes.
            "[[devices]]\nid = \"a\"\nmax_frame_len = 48\n[devices.simulator]\n\
             channels = [\"c2345678901234567890123456789012\"]\n",
            "devices[0].max_frame_len",
        ),
    ];
    for (text, key) in cases {
        let err = load_toml(text, &[]).expect_err(text);
        assert_eq!(invalid_key(err), key, "{text}");
    }
}

#[test]
fn channels_are_configured_per_device_and_per_simulator() {
    let settings = load_toml(
        "[[devices]]\nid = \"a\"\nchannel = \"level\"\n[devices.simulator]\n\
         channels = [\"temperature\", \"humidity\"]\n",
        &[],
    )
    .unwrap();
    assert_eq!(settings.devices[0].channel, "level");
    assert_eq!(
        settings.devices[0].simulator.channels,
        ["temperature", "humidity"]
    );
    assert_eq!(Settings::default().devices[0].channel, "value");
    let from_env = Settings::load(None, env(&[("TELEMETRYHUB__DEVICES__0__CHANNEL", "flow")]));
    assert_eq!(from_env.unwrap().devices[0].channel, "flow");
}

#[test]
fn the_simulators_longest_frame_counts_its_longest_channel() {
    let plain = SimulatorSettings::default();
    let named = SimulatorSettings {
        channels: vec!["t".into(), "c2345678901234567890123456789012".into()],
        ..SimulatorSettings::default()
    };
    // ",<channel>" and a second channel's level above 50 (same digit count as 42).
    assert_eq!(named.longest_frame_len(), plain.longest_frame_len() + 33);
}

#[test]
fn syntax_errors_and_missing_files_are_reported() {
    assert!(matches!(
        load_toml("[buffer\n", &[]),
        Err(ConfigError::Syntax { .. })
    ));
    let err =
        Settings::load(Some(Path::new("/nonexistent/telemetryhub.toml")), env(&[])).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

#[test]
fn malformed_environment_paths_are_errors() {
    for var in [
        "TELEMETRYHUB__BUFFER____CAPACITY",
        "TELEMETRYHUB__DEVICES__X__ID",
        "TELEMETRYHUB__DEVICES__9__ID",
    ] {
        let err = Settings::load(None, env(&[(var, "1")])).unwrap_err();
        assert!(matches!(err, ConfigError::Env { .. }), "{var}: {err}");
    }
}
