//! Named channels end to end: a simulated device reporting several channels shows each one in
//! `/devices/{id}`, `/status`, `/samples` and the `telemetryhub_channel_value` gauge, and
//! `POST /samples` takes an optional channel (the device's default otherwise), refusing a bad
//! one with a 400 naming the field. (A frame naming a channel over a real pty: `serial.rs`.)

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use telemetryhub::config::{DeviceSettings, Settings};

use crate::helpers::{DEADLINE, TestApp, f64_at, fast_device, json_of, spawn_app, wait_until};

/// A simulated device reporting `temperature` and `humidity`, whose default channel is `level`.
fn multi_channel(id: &str) -> DeviceSettings {
    let mut device = fast_device(id);
    device.channel = "level".to_owned();
    device.simulator.channels = vec!["temperature".to_owned(), "humidity".to_owned()];
    device
}

fn only(device: DeviceSettings) -> impl FnOnce(&mut Settings) {
    move |settings| settings.devices = vec![device]
}

/// The statistics entry of `device` for `channel` and `source`, if there is one.
fn series<'a>(device: &'a Value, channel: &str, source: &str) -> Option<&'a Value> {
    device["series"]
        .as_array()?
        .iter()
        .find(|s| s["channel"] == channel && s["source"] == source)
}

/// Channels of the samples `GET /samples` shows for `device`.
async fn sample_channels(app: &TestApp, device: &str) -> BTreeSet<String> {
    let (code, body) = app.get_json("/samples?limit=1000").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body["samples"]
        .as_array()
        .expect("samples is an array")
        .iter()
        .filter(|s| s["device"] == device)
        .map(|s| {
            s["channel"]
                .as_str()
                .expect("every sample has a channel")
                .to_owned()
        })
        .collect()
}

async fn post_samples(app: &TestApp, body: &Value) -> (StatusCode, Value) {
    let response = app.post_samples(body).await;
    json_of(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_channel_device_shows_statistics_samples_and_a_gauge_per_channel() {
    let app = spawn_app(only(multi_channel("multi0"))).await;
    wait_until(DEADLINE, "both channels have 10 samples", async || {
        let device = app.device("multi0").await;
        ["temperature", "humidity"]
            .iter()
            .all(|c| series(&device, c, "link").is_some_and(|s| s["count"].as_u64() >= Some(10)))
    })
    .await;

    for device in [
        app.device("multi0").await,
        app.status().await["devices"][0].clone(),
    ] {
        assert_eq!(device["default_channel"], "level", "{device}");
        let channels: Vec<_> = device["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["channel"].as_str().unwrap(), s["unit"].as_str().unwrap()))
            .collect();
        // Every frame names a channel: the default one never appears; ordered by channel.
        assert_eq!(
            channels,
            [("humidity", "arb.units"), ("temperature", "arb.units")],
            "{device}"
        );
        // Each channel on its own signal: temperature 42 ± 1, humidity 52 ± 1 (noise 0.01).
        for (channel, level) in [("temperature", 42.0), ("humidity", 52.0)] {
            let s = series(&device, channel, "link").unwrap();
            for stat in ["/min", "/max", "/last"] {
                let v = f64_at(s, stat);
                assert!((v - level).abs() <= 1.02, "{channel}{stat} = {v}: {device}");
            }
        }
        // No single figure for a link reporting two quantities.
        assert!(device["stats"].is_null(), "{device}");
    }

    let status = app.status().await;
    let latest = &status["latest_sample"];
    assert_eq!(latest["device"], "multi0", "{status}");
    assert!(
        ["temperature", "humidity"].contains(&latest["channel"].as_str().unwrap_or_default()),
        "{status}"
    );
    assert_eq!(
        sample_channels(&app, "multi0").await,
        BTreeSet::from(["humidity".to_owned(), "temperature".to_owned()])
    );

    let scrape = app.scrape().await;
    assert_eq!(
        scrape.type_of("telemetryhub_channel_value"),
        Some("gauge"),
        "{:?}",
        scrape.types
    );
    for (channel, level) in [("temperature", 42.0), ("humidity", 52.0)] {
        let labels = [
            ("device", "multi0"),
            ("channel", channel),
            ("unit", "arb.units"),
        ];
        let value = scrape.value("telemetryhub_channel_value", &labels);
        assert!((value - level).abs() <= 1.02, "{channel}: {value}");
    }
    let series_of_device = scrape.find("telemetryhub_channel_value", &[("device", "multi0")]);
    assert_eq!(series_of_device.len(), 2, "{series_of_device:?}");
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_samples_carry_their_channel_or_the_devices_default_and_a_bad_one_is_a_400() {
    let mut device = multi_channel("post0");
    device.autostart = false;
    let app = spawn_app(only(device)).await;

    let (code, body) = post_samples(
        &app,
        &json!([
            {"device": "post0", "value": 1013.25, "unit": "hPa", "channel": "pressure"},
            {"device": "post0", "value": 7.5, "unit": "m"},
        ]),
    )
    .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    wait_until(
        DEADLINE,
        "both posted samples in the statistics",
        async || {
            let device = app.device("post0").await;
            series(&device, "pressure", "http").is_some()
                && series(&device, "level", "http").is_some()
        },
    )
    .await;
    let device = app.device("post0").await;
    let pressure = series(&device, "pressure", "http").unwrap();
    assert_eq!(
        (pressure["unit"].as_str(), pressure["last"].as_f64()),
        (Some("hPa"), Some(1013.25))
    );
    let level = series(&device, "level", "http").unwrap();
    assert_eq!(
        (level["unit"].as_str(), level["last"].as_f64()),
        (Some("m"), Some(7.5))
    );
    assert_eq!(
        sample_channels(&app, "post0").await,
        BTreeSet::from(["level".to_owned(), "pressure".to_owned()])
    );
    let scrape = app.scrape().await;
    let labels = [
        ("device", "post0"),
        ("channel", "pressure"),
        ("unit", "hPa"),
    ];
    assert_eq!(scrape.value("telemetryhub_channel_value", &labels), 1013.25);

    for (bad, why) in [
        (json!("rel humidity"), "must be 1-32 characters"),
        (json!(""), "must be 1-32 characters"),
        (json!("c".repeat(33)), "must be 1-32 characters"),
        (json!(12), "invalid type"),
    ] {
        let (code, body) = post_samples(
            &app,
            &json!([
                {"device": "post0", "value": 1, "unit": "V"},
                {"device": "post0", "value": 1, "unit": "V", "channel": bad},
            ]),
        )
        .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("samples[1].channel"), "{bad}: {body}");
        assert!(error.contains(why), "{bad}: {body}");
    }
    // Refused whole: nothing of the bad requests was accepted.
    let status = app.status().await;
    assert_eq!(status["metrics"]["samples_processed"], 2, "{status}");
    app.shut_down().await;
}
