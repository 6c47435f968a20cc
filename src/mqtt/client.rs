//! One rumqttc client for both protocol versions (MQTT 3.1.1 and 5): the
//! options both services set, the client's requests, and the event loop's
//! events reduced to what the gateway and the simulator act on.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;

use crate::config::MqttVersion;

/// How to connect (what both services set; the rest stays rumqttc's default).
#[allow(missing_debug_implementations)] // rumqttc's Transport has no Debug
pub struct Options {
    pub version: MqttVersion,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub transport: rumqttc::Transport,
    /// User name and password.
    pub login: Option<(String, String)>,
    pub keep_alive: Duration,
    /// Clean session (3.1.1) or clean start (5).
    pub clean_session: bool,
    /// PUBACKs are sent by us (`Client::try_ack`), not on receipt.
    pub manual_acks: bool,
    pub max_packet_bytes: usize,
    /// Outgoing QoS 1 messages unacknowledged at most (3.1.1).
    pub inflight: Option<u16>,
    /// MQTT 5: session expiry and receive maximum.
    pub session_expiry_secs: Option<u32>,
    pub receive_maximum: Option<u16>,
    /// Room in the client's request channel.
    pub requests: usize,
}

/// Sends requests to the event loop.
#[derive(Clone, Debug)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// The connection; polled by one task.
pub enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventLoop::V311(_) => "EventLoop(3.1.1)",
            EventLoop::V5(_) => "EventLoop(5)",
        })
    }
}

/// What the event loop reported, the same for both versions.
#[derive(Debug)]
pub enum Event {
    ConnAck {
        session_present: bool,
    },
    Publish {
        topic: String,
        payload: Bytes,
        /// The packet id to acknowledge (QoS 1).
        pkid: Option<u16>,
    },
    SubAck {
        refused: usize,
    },
    /// Our publish was acknowledged; MQTT 5 may refuse it with a reason.
    PubAck {
        refused: Option<String>,
    },
    /// The PUBACK for this pkid was written (3.1.1).
    AckSent(u16),
    /// We asked to disconnect.
    Disconnecting,
    Other,
}

/// A client and its event loop (nothing is sent until the loop is polled).
pub fn new(o: Options) -> (Client, EventLoop) {
    match o.version {
        MqttVersion::V311 => {
            let mut m = rumqttc::MqttOptions::new(o.client_id, o.host, o.port);
            m.set_keep_alive(o.keep_alive)
                .set_clean_session(o.clean_session)
                .set_manual_acks(o.manual_acks)
                .set_max_packet_size(o.max_packet_bytes, o.max_packet_bytes)
                .set_transport(o.transport);
            if let Some(n) = o.inflight {
                m.set_inflight(n);
            }
            if let Some((u, p)) = o.login {
                m.set_credentials(u, p);
            }
            let (c, el) = rumqttc::AsyncClient::new(m, o.requests);
            (Client::V311(c), EventLoop::V311(Box::new(el)))
        }
        MqttVersion::V5 => {
            let mut m = v5::MqttOptions::new(o.client_id, o.host, o.port);
            m.set_keep_alive(o.keep_alive)
                .set_clean_start(o.clean_session)
                .set_manual_acks(o.manual_acks)
                .set_session_expiry_interval(o.session_expiry_secs)
                .set_receive_maximum(o.receive_maximum)
                .set_max_packet_size(u32::try_from(o.max_packet_bytes).ok())
                .set_transport(o.transport);
            if let Some((u, p)) = o.login {
                m.set_credentials(u, p);
            }
            let (c, el) = v5::AsyncClient::new(m, o.requests);
            (Client::V5(c), EventLoop::V5(Box::new(el)))
        }
    }
}

impl Client {
    /// Publishes with QoS 0 or (`qos1`) 1; waits for room in the request channel.
    pub async fn publish(&self, topic: String, qos1: bool, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V311(c) => {
                let q = if qos1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.publish(topic, q, false, payload).await
            }
            .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let q = if qos1 {
                    v5::mqttbytes::QoS::AtLeastOnce
                } else {
                    v5::mqttbytes::QoS::AtMostOnce
                };
                c.publish(topic, q, false, payload).await
            }
            .map_err(|e| e.to_string()),
        }
    }

    /// Subscribes to `filter` with QoS 1.
    pub async fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V311(c) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .subscribe(filter, v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues the PUBACK for `pkid` without waiting; false if the request
    /// channel is full (or closed).
    pub fn try_ack(&self, pkid: u16) -> bool {
        match self {
            Client::V311(c) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V5(c) => {
                let mut p = v5::mqttbytes::v5::Publish::new(
                    "",
                    v5::mqttbytes::QoS::AtLeastOnce,
                    Vec::new(),
                    None,
                );
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    /// Asks for a clean DISCONNECT (an error only means the loop is gone).
    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V311(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

fn v311(ev: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Outgoing, Packet};
    match ev {
        E::Incoming(Packet::ConnAck(a)) => Event::ConnAck {
            session_present: a.session_present,
        },
        E::Incoming(Packet::Publish(p)) => Event::Publish {
            pkid: (p.qos != rumqttc::QoS::AtMostOnce).then_some(p.pkid),
            topic: p.topic,
            payload: p.payload,
        },
        E::Incoming(Packet::SubAck(s)) => Event::SubAck {
            refused: s
                .return_codes
                .iter()
                .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .count(),
        },
        E::Incoming(Packet::PubAck(_)) => Event::PubAck { refused: None },
        E::Outgoing(Outgoing::PubAck(pkid)) => Event::AckSent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::Disconnecting,
        _ => Event::Other,
    }
}

fn v5(ev: v5::Event) -> Event {
    use v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    use v5::Event as E;
    match ev {
        E::Incoming(Packet::ConnAck(a)) => Event::ConnAck {
            session_present: a.session_present,
        },
        E::Incoming(Packet::Publish(p)) => Event::Publish {
            pkid: (p.qos != v5::mqttbytes::QoS::AtMostOnce).then_some(p.pkid),
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
        },
        E::Incoming(Packet::SubAck(s)) => Event::SubAck {
            refused: s
                .return_codes
                .iter()
                .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .count(),
        },
        E::Incoming(Packet::PubAck(a)) => Event::PubAck {
            refused: match a.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                r => Some(format!("{r:?}")),
            },
        },
        E::Outgoing(rumqttc::Outgoing::Disconnect) => Event::Disconnecting,
        _ => Event::Other,
    }
}

impl EventLoop {
    /// The next event; an error is the connection's (polling again reconnects).
    pub async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V311(el) => el.poll().await.map(v311).map_err(|e| e.to_string()),
            EventLoop::V5(el) => el.poll().await.map(v5).map_err(|e| e.to_string()),
        }
    }

    /// An event the client has already read and queued (one network read
    /// brings several): taken without I/O.
    pub fn buffered(&mut self) -> Option<Event> {
        match self {
            EventLoop::V311(el) => el.state.events.pop_front().map(v311),
            EventLoop::V5(el) => el.state.events.pop_front().map(v5),
        }
    }
}
