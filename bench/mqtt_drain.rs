//! Benchmark helper: the MQTT client alone. A rumqttc subscriber with a
//! persistent session (QoS 1, PUBACKs written by rumqttc itself as soon as a
//! message is read) that counts messages and does nothing else: the floor of
//! the gateway's MQTT side, as `kafka_produce --headers` is of its Kafka side.
//!
//!   cargo run --release --example mqtt_drain -- HOST PORT CLIENT_ID FILTER COUNT
//!
//! COUNT 0: subscribe the session and leave (to prime a drain). Otherwise
//! prints one JSON line once COUNT messages arrived:
//! {"count":N,"seconds":S,"rate":R,"cpu_us_per_message":C}.

#[path = "cpu.rs"]
mod cpu;
use cpu::cpu_seconds;

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, host, port, id, filter, count] = &args[..] else {
        return Err("usage: mqtt_drain HOST PORT CLIENT_ID FILTER COUNT".into());
    };
    let count: u64 = count.parse()?;
    let mut o = MqttOptions::new(id, host, port.parse()?);
    o.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 1000);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    let mut got = 0u64;
    loop {
        match el.poll().await? {
            Event::Incoming(Packet::SubAck(_)) if count == 0 => break,
            Event::Incoming(Packet::Publish(_)) => {
                got += 1;
                if got == count {
                    break;
                }
            }
            _ => {}
        }
    }
    if count > 0 {
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        println!(
            "{{\"count\":{got},\"seconds\":{secs:.3},\"rate\":{:.0},\"cpu_us_per_message\":{:.3}}}",
            got as f64 / secs,
            cpu / got as f64 * 1e6
        );
    }
    // The last PUBACKs go out with the DISCONNECT.
    client.disconnect().await?;
    while let Ok(ev) = el.poll().await {
        if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(())
}
