//! Layering: a TOML file merged over the defaults, then `TELEMETRYHUB__SECTION__KEY`
//! environment overrides, before the result is deserialised and validated.

use std::path::Path;

use super::ConfigError;

pub(super) fn parse_table(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            message: err.to_string(),
        })
}

/// Sets one key from `TELEMETRYHUB__A__B__C=value`. Segments are lower-cased; a numeric segment
/// indexes an array (`TELEMETRYHUB__DEVICES__0__SAMPLE_INTERVAL_MS=50`). The value is read as a
/// TOML value when it parses as one (`50`, `true`, `1.5`), else as a string.
pub(super) fn apply_env_override(
    root: &mut toml::Value,
    var: &str,
    path: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err(ConfigError::Env {
            var: var.to_owned(),
            message: "empty key segment".to_owned(),
        });
    }
    set_path(root, &segments, parse_env_value(value)).map_err(|message| ConfigError::Env {
        var: var.to_owned(),
        message: message.to_owned(),
    })
}

fn set_path(
    target: &mut toml::Value,
    segments: &[String],
    value: toml::Value,
) -> Result<(), &'static str> {
    let Some((head, rest)) = segments.split_first() else {
        *target = value;
        return Ok(());
    };
    let child = match target {
        toml::Value::Table(table) => table
            .entry(head.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new())),
        toml::Value::Array(items) => {
            let index: usize = head.parse().map_err(|_| "expected a numeric array index")?;
            if index == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            items.get_mut(index).ok_or("array index out of range")?
        }
        _ => return Err("a parent key is not a table"),
    };
    set_path(child, rest, value)
}

/// Overlays `top` on `base`: tables merge key by key, anything else (arrays included) replaces.
pub(super) fn merge(base: &mut toml::Value, top: toml::Value) {
    match (base, top) {
        (toml::Value::Table(base), toml::Value::Table(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

fn parse_env_value(value: &str) -> toml::Value {
    // `key = <value>` parses scalars, arrays and inline tables exactly as a file would.
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}
