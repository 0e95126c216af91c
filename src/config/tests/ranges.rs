//! Every numeric key of `config/default.toml` at its extremes: each value is either accepted or
//! refused with an error naming exactly that key, from a file and from the environment alike.

use super::*;

const U64_MAX: &str = "18446744073709551615";
const I64_MAX: &str = "9223372036854775807";

/// Where a key lives: the TOML that opens its table, the environment prefix of the same table,
/// and the dotted name errors use.
struct Table {
    toml: &'static str,
    env: &'static str,
    key: &'static str,
}

const HTTP: Table = Table {
    toml: "[http]\n",
    env: "TELEMETRYHUB__HTTP__",
    key: "http.",
};
const BUFFER: Table = Table {
    toml: "[buffer]\n",
    env: "TELEMETRYHUB__BUFFER__",
    key: "buffer.",
};
const PIPELINE: Table = Table {
    toml: "[pipeline]\n",
    env: "TELEMETRYHUB__PIPELINE__",
    key: "pipeline.",
};
const DEVICE: Table = Table {
    toml: "[[devices]]\nid = \"d\"\n",
    env: "TELEMETRYHUB__DEVICES__0__",
    key: "devices[0].",
};
/// A device whose backoff cap leaves room for the initial delay's whole range.
const DEVICE_WIDE_BACKOFF: Table = Table {
    toml: "[[devices]]\nid = \"d\"\nbackoff_max_ms = 3600000\n",
    env: "TELEMETRYHUB__DEVICES__0__",
    key: "devices[0].",
};
const SIMULATOR: Table = Table {
    toml: "[[devices]]\nid = \"d\"\n[devices.simulator]\n",
    env: "TELEMETRYHUB__DEVICES__0__SIMULATOR__",
    key: "devices[0].simulator.",
};
/// A serial device, its `serial` table inline so that the key written next is the device's.
const SERIAL_DEVICE: Table = Table {
    toml: "[[devices]]\nid = \"d\"\nkind = \"serial\"\nserial = { path = \"/dev/ttyX\" }\n",
    env: "TELEMETRYHUB__DEVICES__0__",
    key: "devices[0].",
};
const SERIAL: Table = Table {
    toml: "[[devices]]\nid = \"d\"\nkind = \"serial\"\n[devices.serial]\npath = \"/dev/ttyX\"\n",
    env: "TELEMETRYHUB__DEVICES__0__SERIAL__",
    key: "devices[0].serial.",
};

/// A value and whether it is accepted.
type Case = (&'static str, bool);

/// Every numeric key with its extremes. Values TOML cannot hold (`u64::MAX`) are tried from the
/// environment only.
fn rows() -> Vec<(Table, &'static str, Vec<Case>)> {
    let ms_1h: Vec<Case> = vec![
        ("0", false),
        ("1", true),
        ("3600000", true),
        ("3600001", false),
        (I64_MAX, false),
        (U64_MAX, false),
        ("-1", false),
        ("1.5", false),
    ];
    let probability: Vec<Case> = vec![
        ("0.0", true),
        ("-0.0", true),
        ("1.0", true),
        ("1.0000001", false),
        ("-0.1", false),
        ("nan", false),
        ("inf", false),
        ("-inf", false),
    ];
    let any_finite: Vec<Case> = vec![
        ("0.0", true),
        ("-1.7976931348623157e308", true),
        ("1.7976931348623157e308", true),
        ("nan", false),
        ("inf", false),
        ("-inf", false),
    ];
    vec![
        (
            HTTP,
            "body_limit_bytes",
            vec![
                ("0", false),
                ("1", true),
                ("268435456", true),
                ("268435457", false),
                (I64_MAX, false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            HTTP,
            "ingest_max_samples",
            vec![
                ("0", false),
                ("1", true),
                ("1000000", true),
                ("1000001", false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (HTTP, "request_timeout_ms", ms_1h.clone()),
        (HTTP, "header_read_timeout_ms", ms_1h.clone()),
        (
            HTTP,
            "max_concurrent_requests",
            vec![
                ("0", false),
                ("1", true),
                ("1000000", true),
                ("1000001", false),
                // Above tokio's Semaphore::MAX_PERMITS (usize::MAX >> 3), which panics.
                ("2305843009213693952", false),
                (I64_MAX, false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            BUFFER,
            "capacity",
            vec![
                ("0", false),
                ("1", true),
                ("10000000", true),
                ("10000001", false),
                ("1000000000", false),
                (I64_MAX, false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            BUFFER,
            "high_watermark",
            vec![
                ("0.0", false),
                ("1e-9", true),
                ("0.5", true),
                ("1.0", true),
                ("1.0000001", false),
                ("-0.5", false),
                ("nan", false),
                ("inf", false),
                ("-inf", false),
            ],
        ),
        (
            PIPELINE,
            "batch_max",
            vec![
                ("0", false),
                ("1", true),
                ("1000000", true),
                ("1000001", false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            PIPELINE,
            "workers",
            vec![
                ("0", false),
                ("1", true),
                ("1024", true),
                ("1025", false),
                ("2305843009213693952", false),
                (I64_MAX, false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            PIPELINE,
            "history",
            vec![
                ("0", false),
                ("1", true),
                ("1000000", true),
                ("1000001", false),
                (U64_MAX, false),
            ],
        ),
        (
            PIPELINE,
            "shutdown_grace_ms",
            vec![
                ("0", true),
                ("3600000", true),
                ("3600001", false),
                (I64_MAX, false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            DEVICE,
            "sample_interval_ms",
            vec![
                ("0", true),
                ("1", true),
                ("3600000", true),
                ("3600001", false),
                (I64_MAX, false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            DEVICE,
            "read_timeout_ms",
            vec![
                ("0", false),
                // Not above the sample interval (100 ms).
                ("100", false),
                ("101", true),
                ("86400000", true),
                ("86400001", false),
                (I64_MAX, false),
                (U64_MAX, false),
            ],
        ),
        (
            DEVICE,
            "stale_after_ms",
            vec![
                ("0", false),
                ("100", false),
                ("101", true),
                ("86400000", true),
                ("86400001", false),
                (I64_MAX, false),
                (U64_MAX, false),
            ],
        ),
        (
            DEVICE,
            "failure_threshold",
            vec![
                ("0", false),
                ("1", true),
                ("1000000", true),
                ("1000001", false),
                ("4294967295", false),
                ("4294967296", false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (DEVICE_WIDE_BACKOFF, "backoff_initial_ms", ms_1h.clone()),
        (
            DEVICE,
            "backoff_max_ms",
            vec![
                ("0", false),
                // Below backoff_initial_ms (100).
                ("99", false),
                ("100", true),
                ("3600000", true),
                ("3600001", false),
                (I64_MAX, false),
                (U64_MAX, false),
            ],
        ),
        (
            DEVICE,
            "max_frame_len",
            vec![
                ("0", false),
                ("15", false),
                // The simulator's longest frame does not fit.
                ("16", false),
                ("128", true),
                ("65536", true),
                ("65537", false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            SERIAL_DEVICE,
            "max_frame_len",
            vec![
                ("15", false),
                ("16", true),
                ("65536", true),
                ("65537", false),
            ],
        ),
        (
            DEVICE,
            "command_timeout_ms",
            vec![
                ("0", false),
                ("1", true),
                ("60000", true),
                ("60001", false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (DEVICE, "scale", any_finite.clone()),
        (DEVICE, "offset", any_finite),
        (
            SIMULATOR,
            "noise",
            vec![
                ("0.0", true),
                ("-0.0", true),
                ("1000000.0", true),
                ("1000000.5", false),
                ("1e300", false),
                ("-1.0", false),
                ("nan", false),
                ("inf", false),
            ],
        ),
        (
            SIMULATOR,
            "seed",
            vec![("0", true), (I64_MAX, true), (U64_MAX, true), ("-1", false)],
        ),
        (
            SIMULATOR,
            "baud",
            vec![
                ("0", true),
                ("1", false),
                ("49", false),
                // A frame takes 8 s: longer than the read timeout.
                ("50", false),
                ("9600", true),
                ("4000000", true),
                ("4000001", false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (SIMULATOR, "corrupt_rate", probability.clone()),
        (SIMULATOR, "drop_rate", probability.clone()),
        (SIMULATOR, "stall_rate", probability.clone()),
        (SIMULATOR, "disconnect_rate", probability),
        (
            SIMULATOR,
            "stall_ms",
            vec![
                ("0", true),
                ("3600000", true),
                ("3600001", false),
                (U64_MAX, false),
                ("-1", false),
            ],
        ),
        (
            SERIAL,
            "baud",
            vec![
                ("0", false),
                ("49", false),
                // The shortest frame takes 2.8 s: longer than the read timeout.
                ("50", false),
                ("300", true),
                ("4000000", true),
                ("4000001", false),
                (U64_MAX, false),
            ],
        ),
        (
            SERIAL,
            "data_bits",
            vec![
                ("4", false),
                ("5", true),
                ("8", true),
                ("9", false),
                ("256", false),
                ("-1", false),
            ],
        ),
        (
            SERIAL,
            "stop_bits",
            vec![("0", false), ("1", true), ("2", true), ("3", false)],
        ),
    ]
}

/// Whether the settings load, or else the key the error names.
fn outcome(result: Result<Settings, ConfigError>) -> Result<(), String> {
    result.map(drop).map_err(|err| match err {
        ConfigError::Invalid { key, .. } => key,
        other => format!("<not a key error: {other}>"),
    })
}

#[test]
fn every_numeric_key_is_checked_at_its_extremes() {
    let mut failures = Vec::new();
    for (table, name, cases) in rows() {
        let key = format!("{}{name}", table.key);
        for (value, ok) in cases {
            let expected = if ok { Ok(()) } else { Err(key.clone()) };
            let var = format!("{}{}", table.env, name.to_ascii_uppercase());
            let from_env = outcome(load_toml(table.toml, &[(&var, value)]));
            if from_env != expected {
                failures.push(format!(
                    "{var}={value}: {from_env:?}, expected {expected:?}"
                ));
            }
            if value == U64_MAX {
                continue; // TOML integers are 64-bit signed.
            }
            let text = format!("{}{name} = {value}\n", table.toml);
            let from_file = outcome(load_toml(&text, &[]));
            if from_file != expected {
                failures.push(format!(
                    "{key} = {value}: {from_file:?}, expected {expected:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn processing_ranges_need_finite_ordered_bounds() {
    for (text, ok) in [
        (
            "min = -1.7976931348623157e308\nmax = 1.7976931348623157e308",
            true,
        ),
        ("min = 1.0\nmax = 1.0", true),
        ("min = 1.0\nmax = 0.0", false),
        ("min = nan\nmax = 1.0", false),
        ("min = 0.0\nmax = inf", false),
        ("min = -inf\nmax = 0.0", false),
    ] {
        let result = outcome(load_toml(&format!("[processing.units.V]\n{text}\n"), &[]));
        let expected = if ok {
            Ok(())
        } else {
            Err("processing.units.V".to_owned())
        };
        assert_eq!(result, expected, "{text}");
    }
}
