//! MQTT broker URLs: `mqtt://`, `mqtts://` (and `tcp://`, `ssl://`).

/// Where an MQTT URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://` (or `ssl://`): TLS.
    pub tls: bool,
}

/// `url` with any user info (`user:password@`) replaced by `***@`, for
/// messages and the printed config: a password in a URL is never shown.
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]).into(),
        None => url.into(),
    }
}

/// Parses `mqtt://host:port` (or `tcp://`, port 1883 by default) and
/// `mqtts://host:port` (or `ssl://`, port 8883 by default). User info in the
/// URL is refused (it would be logged with the URL): the credentials go in
/// `mqtt.username` and `mqtt.password` / `mqtt.password_file`.
pub fn parse_mqtt_url(raw: &str) -> Result<MqttUrl, String> {
    let shown = redact_url(raw);
    let url: &str = &shown;
    if url != raw {
        return Err(format!(
            "{url:?} has user info: set mqtt.username and mqtt.password (or mqtt.password_file) instead of putting them in the URL"
        ));
    }
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("tcp://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("ssl://") {
        (r, true)
    } else {
        return Err(format!(
            "{url:?} is not an mqtt://host:port or mqtts://host:port URL"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?} in {url:?} is not a number"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok(MqttUrl {
        host: host.trim_matches(['[', ']']).to_string(),
        port,
        tls,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        let u = |h: &str, port, tls| MqttUrl {
            host: h.into(),
            port,
            tls,
        };
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(),
            u("127.0.0.1", 1884, false)
        );
        assert_eq!(
            parse_mqtt_url("tcp://broker").unwrap(),
            u("broker", 1883, false)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://broker").unwrap(),
            u("broker", 8883, true)
        );
        assert_eq!(
            parse_mqtt_url("ssl://127.0.0.1:8884/").unwrap(),
            u("127.0.0.1", 8884, true)
        );
        assert!(parse_mqtt_url("mqtt://h:x").is_err());
        assert!(parse_mqtt_url("h:1883").is_err());
        assert!(parse_mqtt_url("https://h").is_err());
    }
}
