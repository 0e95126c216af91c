//! Valid but suspicious settings: loaded, and reported by `Settings::warnings`.

use super::*;

#[test]
fn the_defaults_warn_about_nothing() {
    assert_eq!(Settings::default().warnings(), Vec::<String>::new());
    let from_file = Settings::from_toml(DEFAULT_TOML).unwrap();
    assert_eq!(from_file.warnings(), Vec::<String>::new());
}

#[test]
fn an_ingest_limit_above_the_capacity_is_a_warning() {
    let settings = load_toml(
        "[http]\ningest_max_samples = 5000\n[buffer]\ncapacity = 1000\n",
        &[],
    )
    .unwrap();
    let warnings = settings.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert!(w.starts_with("http.ingest_max_samples"), "{w}");
    assert!(
        w.contains("buffer.capacity (1000)") && w.contains("5000"),
        "{w}"
    );
    // At the capacity, it fits.
    let settings = load_toml(
        "[http]\ningest_max_samples = 1000\n[buffer]\ncapacity = 1000\n",
        &[],
    )
    .unwrap();
    assert!(settings.warnings().is_empty());
}

#[test]
fn a_simulator_that_never_delivers_is_a_warning() {
    for (key, value) in [
        ("corrupt_rate", "1.0"),
        ("drop_rate", "1.0"),
        ("disconnect_rate", "1.0"),
    ] {
        let text = format!("[[devices]]\nid = \"d\"\n[devices.simulator]\n{key} = {value}\n");
        let warnings = load_toml(&text, &[]).unwrap().warnings();
        assert_eq!(warnings.len(), 1, "{key}: {warnings:?}");
        assert!(
            warnings[0].starts_with(&format!("devices[0].simulator.{key}")),
            "{warnings:?}"
        );
    }
    let text = "[[devices]]\nid = \"d\"\n[devices.simulator]\ncorrupt_rate = 0.99\n";
    assert!(load_toml(text, &[]).unwrap().warnings().is_empty());
}

#[test]
fn a_paced_simulator_slower_than_its_interval_is_a_warning() {
    // 39 bytes at 2400 baud: 163 ms a frame, against a 100 ms interval.
    let text = "[[devices]]\nid = \"d\"\n[devices.simulator]\nbaud = 2400\n";
    let warnings = load_toml(text, &[]).unwrap().warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("devices[0].simulator.baud"),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("163 ms"), "{warnings:?}");
    let text = "[[devices]]\nid = \"d\"\n[devices.simulator]\nbaud = 9600\n";
    assert!(load_toml(text, &[]).unwrap().warnings().is_empty());
}
