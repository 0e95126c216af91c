//! A real Mosquitto broker for the uplink tests: started on a free loopback port with its own
//! config, stopped and started again on the same port to make outages, killed on drop; and a
//! subscriber that records every message it receives.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemetryhub::config::UplinkSettings;
use tokio::task::JoinHandle;

use super::helpers::{DEADLINE, wait_until};

/// Uplink settings for the tests: gateway `gw`, quick reconnects (50 ms to 500 ms).
pub fn uplink_settings(url: String) -> UplinkSettings {
    let mut u = UplinkSettings::new(url);
    u.gateway_id = Some("gw".into());
    u.reconnect_initial_ms = 50;
    u.reconnect_max_ms = 500;
    u
}

/// A Mosquitto process on 127.0.0.1.
pub struct Broker {
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker on a free port, allowing anonymous clients.
    pub async fn start() -> Broker {
        Self::start_with("allow_anonymous true\n").await
    }

    /// Starts a broker with extra config lines (auth, say).
    pub async fn start_with(extra: &str) -> Broker {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        // Persistent, so that a subscriber's session (and the messages queued for it while it
        // reconnects) survives a stop and start of the broker: the tests count every message.
        let conf = format!(
            "listener {port} 127.0.0.1\nuser root\npersistence true\npersistence_location {}/\nlog_dest stderr\nlog_type error\nmax_inflight_messages 0\nmax_queued_messages 0\n{extra}",
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write the broker config");
        let mut broker = Broker {
            port,
            dir,
            child: None,
        };
        broker.resume().await;
        broker
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (an outage); it saves its sessions first.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and waits until it accepts connections.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mosquitto is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_until(DEADLINE, "the broker accepts connections", async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("a local address").port()
}

/// Messages as received: (topic, payload).
type Messages = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A subscriber on `topic` that keeps every message, and reconnects (with a persistent
/// session, QoS 1) when the broker comes back.
pub struct Subscriber {
    messages: Messages,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Subscribes and waits until the subscription is acknowledged.
    pub async fn start(port: u16, topic: &str) -> Subscriber {
        let mut options = MqttOptions::new(
            format!("test-sub-{}-{port}", std::process::id()),
            "127.0.0.1",
            port,
        );
        options
            .set_keep_alive(Duration::from_secs(5))
            // A persistent session: messages published while it reconnects wait for it.
            .set_clean_session(false)
            .set_max_packet_size(32 << 20, 32 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let store = messages.clone();
        let topic = topic.to_owned();
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        store.lock().unwrap().push((p.topic, p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed_rx)
            .await
            .expect("subscribed in time")
            .expect("the subscriber runs");
        Subscriber { messages, task }
    }

    /// Every message so far: (topic, payload).
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        self.messages.lock().unwrap().clone()
    }

    /// How many messages so far.
    pub fn len(&self) -> usize {
        self.messages.lock().unwrap().len()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS listener for a broker: a private CA and a server certificate for 127.0.0.1, made with
/// `openssl` in a directory of their own.
pub struct TlsFiles {
    /// The port the TLS listener will use.
    pub port: u16,
    /// The CA certificate (PEM) that signed the server's.
    pub ca: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl TlsFiles {
    /// Makes the CA and the server certificate (P-256, valid two days).
    pub fn new() -> TlsFiles {
        let dir = tempfile::tempdir().expect("a temp dir");
        let d = dir.path();
        std::fs::write(d.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl runs (scripts/test.sh installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=test-ca",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        ]);
        TlsFiles {
            port: free_port(),
            ca: d.join("ca.pem"),
            dir,
        }
    }

    /// Config lines for a broker: a TLS listener on `port` with these files.
    pub fn listener(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "listener {} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
            self.port
        )
    }

    /// The TLS listener's URL.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }
}
