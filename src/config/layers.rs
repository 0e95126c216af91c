//! Layering: a TOML file merged over the defaults, then `TELEMETRYHUB__SECTION__KEY`
//! environment overrides, before the result is deserialised (typing each override by its
//! field, see [`super::de`]) and validated.

use std::cmp::Ordering;
use std::path::Path;

use super::ConfigError;
use super::de::EnvMarks;

pub(super) fn parse_table(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            message: err.to_string(),
        })
}

/// One `TELEMETRYHUB__A__B__C=value` variable: its name, its path and its text.
struct EnvOverride {
    var: String,
    segments: Vec<String>,
    text: String,
}

/// Applies every variable named `prefix` + `A__B__C` to `root` and returns where their text
/// went. Segments are lower-cased, except that a segment matching an existing key in any case
/// takes that key (a unit `degC` from the file); a numeric segment indexes an array
/// (`TELEMETRYHUB__DEVICES__0__SAMPLE_INTERVAL_MS=50`), where the next index appends.
///
/// The variables are applied in path order, numeric segments compared as numbers, so
/// `DEVICES__2__ID` set before `DEVICES__1__ID` in the environment still appends 1, then 2;
/// an index that would leave a gap is an error naming its variable.
pub(super) fn apply_env_overrides(
    root: &mut toml::Value,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<EnvMarks, ConfigError> {
    let mut overrides = Vec::new();
    for (var, text) in env {
        let Some(path) = var.strip_prefix(prefix) else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "empty key segment".to_owned(),
            });
        }
        overrides.push(EnvOverride {
            var,
            segments,
            text,
        });
    }
    // Stable: the same path twice keeps the environment's order, the last one winning.
    overrides.sort_by(|a, b| compare_paths(&a.segments, &b.segments));
    let mut marks = EnvMarks::default();
    for o in overrides {
        set_path(root, &mut marks, &o.segments, o.text).map_err(|message| ConfigError::Env {
            var: o.var,
            message,
        })?;
    }
    Ok(marks)
}

/// Path order, segment by segment; two numeric segments compare as numbers.
fn compare_paths(a: &[String], b: &[String]) -> Ordering {
    fn number(s: &str) -> Option<&str> {
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.trim_start_matches('0'))
    }
    for (x, y) in a.iter().zip(b) {
        let order = match (number(x), number(y)) {
            (Some(x), Some(y)) => x.len().cmp(&y.len()).then_with(|| x.cmp(y)),
            _ => x.cmp(y),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// Puts `text` at `segments` below `target`, marking it as a variable's text.
fn set_path(
    target: &mut toml::Value,
    marks: &mut EnvMarks,
    segments: &[String],
    text: String,
) -> Result<(), String> {
    let Some((head, rest)) = segments.split_first() else {
        *target = toml::Value::String(text);
        *marks = EnvMarks {
            text: true,
            ..EnvMarks::default()
        };
        return Ok(());
    };
    if marks.text {
        // A variable set this whole table or list as TOML text; a later one changes a key in
        // it, so it must be a table or list now.
        let Some(value) = parse_container(target) else {
            return Err(format!(
                "`{}` was set to text that is not a TOML table or array",
                head
            ));
        };
        *target = value;
        marks.text = false;
    }
    let (key, child) = match target {
        toml::Value::Table(table) => {
            let key = table
                .keys()
                .find(|k| k.eq_ignore_ascii_case(head))
                .cloned()
                .unwrap_or_else(|| head.clone());
            let child = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            (key, child)
        }
        toml::Value::Array(items) => {
            let index: usize = head
                .parse()
                .map_err(|_| format!("`{head}` is not an array index"))?;
            let len = items.len();
            match index.cmp(&len) {
                Ordering::Less => {}
                Ordering::Equal => items.push(toml::Value::Table(toml::Table::new())),
                Ordering::Greater => {
                    return Err(format!(
                        "index {index} leaves a gap: the list has {len} item{}, so the next \
                         index is {len}; set index {len} first (indices count from 0)",
                        if len == 1 { "" } else { "s" }
                    ));
                }
            }
            (index.to_string(), &mut items[index])
        }
        _ => return Err("a parent key is not a table".to_owned()),
    };
    set_path(child, marks.children.entry(key).or_default(), rest, text)
}

/// A variable's text that holds a TOML table or array, parsed.
fn parse_container(value: &toml::Value) -> Option<toml::Value> {
    let text = value.as_str()?;
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()?
        .remove("v")
        .filter(|v| v.is_table() || v.is_array())
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
