//! `[uplink]` (the MQTT broker processed samples are forwarded to) and `[spool]` (the disk
//! queue in front of it).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigError, Secret};
use crate::spool::WhenFull;

/// The forwarder's broker and message format. Absent: no uplink, no spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSettings {
    /// The broker: `mqtt://host:port` (1883 by default) or `mqtts://host:port` (8883).
    pub url: String,
    /// MQTT client id; unset: `telemetryhub-<gateway_id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// User name for the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for the broker; prefer `TELEMETRYHUB__UPLINK__PASSWORD`. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// PEM file of the certificate authorities trusted for `mqtts://`; unset: the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Topic template with `{gateway}` and `{device}`; unset: `telemetryhub/{gateway}/{device}`
    /// for `json`, `v1/gateway/telemetry` for `thingsboard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// This gateway's name in topics and payloads; unset: the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<String>,
    /// Payload format.
    #[serde(default)]
    pub format: UplinkFormat,
    /// Most samples in one MQTT message.
    #[serde(default = "default_max_batch")]
    pub max_batch: u32,
    /// Most messages published and not yet acknowledged (QoS 1) at once. Measured against
    /// Mosquitto 2.0.11 with ~90 KB messages: 64 replays a backlog at several million samples
    /// a second.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// MQTT keep-alive, in seconds.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u16,
    /// First reconnect delay; doubles per failed attempt, with random jitter of up to half.
    #[serde(default = "default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Cap on the reconnect delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

/// The payload format of uplink messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkFormat {
    /// `{"gateway", "device", "samples": [{"seq", "value", "unit", "channel", "timestamp"}]}`,
    /// one device per message.
    #[default]
    Json,
    /// The ThingsBoard gateway telemetry API: `{"<device>": [{"ts": ms, "values": {...}}]}`,
    /// keyed by each sample's channel.
    Thingsboard,
}

impl UplinkFormat {
    /// The format's name, as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Thingsboard => "thingsboard",
        }
    }
}

impl std::fmt::Display for UplinkFormat {
    /// The name as in the config, so logs show what users write.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_max_batch() -> u32 {
    1000
}
fn default_max_inflight() -> u16 {
    64
}
fn default_keep_alive_secs() -> u16 {
    30
}
fn default_reconnect_initial_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (IPv6 hosts in brackets).
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err(format!(
            "`{url}` is not an MQTT URL: use mqtt://host:port or mqtts://host:port"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#', ' ']) {
        return Err(format!(
            "`{url}`: only mqtt[s]://host[:port] (no path, query or user; set username and password)"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed `[` in the host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    let port = match port {
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("`{url}`: the port must be 1 to 65535"))?,
    };
    Ok(BrokerUrl {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// Placeholders a topic template may use.
const PLACEHOLDERS: [&str; 2] = ["{gateway}", "{device}"];

fn check_topic_template(template: &str) -> Result<(), String> {
    if template.is_empty() || template.len() > 1024 {
        return Err("must be 1 to 1024 bytes".to_owned());
    }
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("`{template}`: unclosed `{{`"))?;
        let placeholder = &after[..=close];
        if !PLACEHOLDERS.contains(&placeholder) {
            return Err(format!(
                "unknown placeholder `{placeholder}`; use {{gateway}} and {{device}}"
            ));
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') || template.contains(['+', '#', '\0']) {
        return Err(format!(
            "`{template}`: a topic has no wildcards (+ #), NUL or stray `}}`"
        ));
    }
    Ok(())
}

/// Whether `name` can stand in a topic level: no `/`, wildcards or control characters.
fn topic_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.contains(['/', '+', '#'])
        && !name.chars().any(char::is_control)
}

/// The host name, for the default gateway id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| topic_safe(s))
        .unwrap_or_else(|| "telemetryhub".to_owned())
}

impl UplinkSettings {
    /// An uplink to `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_id: None,
            username: None,
            password: None,
            ca_file: None,
            topic: None,
            gateway_id: None,
            format: UplinkFormat::Json,
            max_batch: default_max_batch(),
            max_inflight: default_max_inflight(),
            keep_alive_secs: default_keep_alive_secs(),
            reconnect_initial_ms: default_reconnect_initial_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
        }
    }

    /// The parsed broker URL (valid after validation).
    pub fn broker(&self) -> Result<BrokerUrl, String> {
        parse_broker_url(&self.url)
    }

    /// The gateway id, resolving "unset" to the host name.
    pub fn gateway(&self) -> String {
        self.gateway_id.clone().unwrap_or_else(host_name)
    }

    /// The client id, resolving "unset".
    pub fn client(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("telemetryhub-{}", self.gateway()))
    }

    /// The topic template, resolving "unset" per format.
    pub fn topic_template(&self) -> &str {
        match (&self.topic, self.format) {
            (Some(topic), _) => topic,
            (None, UplinkFormat::Json) => "telemetryhub/{gateway}/{device}",
            (None, UplinkFormat::Thingsboard) => "v1/gateway/telemetry",
        }
    }

    /// The first reconnect delay.
    pub fn reconnect_initial(&self) -> Duration {
        Duration::from_millis(self.reconnect_initial_ms)
    }

    /// The reconnect delay cap.
    pub fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str| format!("uplink.{k}");
        self.broker()
            .map_err(|message| ConfigError::invalid(key("url"), message))?;
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 256 || id.chars().any(char::is_control))
        {
            return Err(ConfigError::invalid(
                key("client_id"),
                "must be 1 to 256 characters, none of them control characters",
            ));
        }
        if let Some(user) = &self.username
            && (user.is_empty() || user.len() > 1024)
        {
            return Err(ConfigError::invalid(
                key("username"),
                "must be 1 to 1024 bytes",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(ConfigError::invalid(
                key("password"),
                "needs uplink.username (MQTT sends no password without a user name)",
            ));
        }
        if self.ca_file.is_some() && !self.url.starts_with("mqtts://") {
            return Err(ConfigError::invalid(
                key("ca_file"),
                "is only used with an mqtts:// url",
            ));
        }
        check_topic_template(self.topic_template())
            .map_err(|message| ConfigError::invalid(key("topic"), message))?;
        if let Some(gateway) = &self.gateway_id
            && !topic_safe(gateway)
        {
            return Err(ConfigError::invalid(
                key("gateway_id"),
                "must be 1 to 128 characters without `/`, `+`, `#` or control characters",
            ));
        }
        if !(1..=100_000).contains(&self.max_batch) {
            return Err(ConfigError::invalid(
                key("max_batch"),
                "must be between 1 and 100000 samples",
            ));
        }
        if self.max_inflight == 0 {
            return Err(ConfigError::invalid(
                key("max_inflight"),
                "must be between 1 and 65535",
            ));
        }
        if self.keep_alive_secs < 5 {
            return Err(ConfigError::invalid(
                key("keep_alive_secs"),
                "must be between 5 and 65535 seconds",
            ));
        }
        if !(1..=600_000).contains(&self.reconnect_initial_ms) {
            return Err(ConfigError::invalid(
                key("reconnect_initial_ms"),
                "must be between 1 and 600000",
            ));
        }
        if !(self.reconnect_initial_ms..=3_600_000).contains(&self.reconnect_max_ms) {
            return Err(ConfigError::invalid(
                key("reconnect_max_ms"),
                "must be between reconnect_initial_ms and 3600000",
            ));
        }
        Ok(())
    }
}

/// When spooled records are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncSetting {
    /// `"always"`: before a batch counts as spooled.
    Always,
    /// Every this many milliseconds.
    IntervalMs(u64),
}

impl std::fmt::Display for FsyncSetting {
    /// As in the config: `always`, or the interval in milliseconds.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::IntervalMs(ms) => write!(f, "{ms}"),
        }
    }
}

impl Serialize for FsyncSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Always => s.serialize_str("always"),
            Self::IntervalMs(ms) => s.serialize_u64(*ms),
        }
    }
}

impl<'de> Deserialize<'de> for FsyncSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Ms(u64),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected \"always\" or an interval in milliseconds")
        })? {
            Raw::Text(text) if text == "always" => Ok(Self::Always),
            Raw::Text(text) => match text.parse() {
                // An environment override arrives as text.
                Ok(ms) => Ok(Self::IntervalMs(ms)),
                Err(_) => Err(serde::de::Error::custom(format!(
                    "`{text}`: expected \"always\" or an interval in milliseconds"
                ))),
            },
            Raw::Ms(ms) => Ok(Self::IntervalMs(ms)),
        }
    }
}

/// The spool: where processed samples wait for the uplink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    /// The spool directory (created if missing).
    #[serde(default = "default_spool_path")]
    pub path: PathBuf,
    /// Most bytes of spool files on disk.
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
    /// `block` or `drop_oldest`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// `"always"` or an interval in milliseconds.
    #[serde(default = "default_fsync")]
    pub fsync: FsyncSetting,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            path: default_spool_path(),
            max_bytes: default_spool_max_bytes(),
            when_full: WhenFull::Block,
            fsync: default_fsync(),
        }
    }
}

fn default_spool_path() -> PathBuf {
    PathBuf::from("data/spool")
}
fn default_spool_max_bytes() -> u64 {
    256 << 20
}
fn default_fsync() -> FsyncSetting {
    FsyncSetting::IntervalMs(100)
}

impl SpoolSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid("spool.path", "must not be empty"));
        }
        if !((1 << 20)..=(1 << 40)).contains(&self.max_bytes) {
            return Err(ConfigError::invalid(
                "spool.max_bytes",
                "must be between 1048576 (1 MiB) and 1099511627776 (1 TiB)",
            ));
        }
        if let FsyncSetting::IntervalMs(ms) = self.fsync
            && !(1..=60_000).contains(&ms)
        {
            return Err(ConfigError::invalid(
                "spool.fsync",
                "must be \"always\" or an interval between 1 and 60000 ms",
            ));
        }
        Ok(())
    }

    /// The spool's options.
    pub fn options(&self) -> crate::spool::SpoolOptions {
        crate::spool::SpoolOptions {
            dir: self.path.clone(),
            max_bytes: self.max_bytes,
            when_full: self.when_full,
            fsync: match self.fsync {
                FsyncSetting::Always => crate::spool::Fsync::Always,
                FsyncSetting::IntervalMs(ms) => {
                    crate::spool::Fsync::Interval(Duration::from_millis(ms))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_default_ports() {
        let ok = [
            ("mqtt://127.0.0.1", "127.0.0.1", 1883, false),
            ("mqtt://broker:1884/", "broker", 1884, false),
            ("mqtts://broker", "broker", 8883, true),
            ("mqtt://[::1]:1999", "::1", 1999, false),
        ];
        for (url, host, port, tls) in ok {
            let b = parse_broker_url(url).unwrap();
            assert_eq!((b.host.as_str(), b.port, b.tls), (host, port, tls), "{url}");
        }
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://u:p@h",
            "mqtt://h/path",
            "mqtt://[::1",
            "broker:1883",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_templates_know_their_placeholders() {
        for ok in ["a/{gateway}/{device}", "fixed/topic", "{device}"] {
            assert!(check_topic_template(ok).is_ok(), "{ok}");
        }
        for bad in ["a/{host}", "a/{device", "a/+/b", "a/#", "", "x}"] {
            assert!(check_topic_template(bad).is_err(), "{bad}");
        }
    }
}
