//! Fuzzes the `POST /samples` body parser with arbitrary bytes.
//!
//! Whatever the body, parsing must not panic; a refusal must be a client error (4xx); an
//! accepted batch must respect the sample limit, name only known devices, valid units and valid channels, and
//! carry timestamps the API can display (every accepted sample is later shown by
//! `GET /samples`, which formats its timestamp).

#![no_main]

use std::time::{Instant, SystemTime};

use axum::response::IntoResponse;
use libfuzzer_sys::fuzz_target;
use telemetryhub::api::ingest::parse_body;
use telemetryhub::device::codec::{valid_channel, valid_unit};
use telemetryhub::sample::format_rfc3339;

const MAX_SAMPLES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let known = |id: &str| id == "sim0" || id == "probe-1";
    let default_channel = |id: &str| known(id).then(|| "value".into());
    let received = (SystemTime::now(), Instant::now());
    match parse_body(data, default_channel, MAX_SAMPLES, received) {
        Ok(samples) => {
            assert!(samples.len() <= MAX_SAMPLES);
            for sample in &samples {
                assert!(known(&sample.labels.device), "{sample:?}");
                assert!(valid_unit(sample.labels.unit.as_bytes()), "{sample:?}");
                assert!(valid_channel(sample.labels.channel.as_bytes()), "{sample:?}");
                let shown = format_rfc3339(sample.timestamp);
                assert!(shown.ends_with('Z'), "{shown}");
            }
        }
        Err(err) => {
            assert!(!err.to_string().is_empty());
            let status = err.into_response().status();
            assert!(status.is_client_error(), "{status}");
        }
    }
});
