//! MQTT over TLS (`mqtts://`): the broker verified against a CA file (or the
//! system's roots), an optional client certificate for mutual TLS. Built on
//! the system OpenSSL through native-tls, the same library librdkafka uses.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::SecurityKind;

/// `[mqtt.tls]` (gateway) and the simulator's TLS flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTlsConfig {
    /// PEM CA certificate(s) that signed the broker's certificate; only these
    /// are trusted. Unset: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1; unencrypted).
    pub key_file: Option<PathBuf>,
}

impl MqttTlsConfig {
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Checks without I/O; `prefix` is e.g. `mqtt.tls`.
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(format!(
                "invalid value for `{prefix}.cert_file`: set both `{prefix}.cert_file` and `{prefix}.key_file` for a client certificate"
            ));
        }
        Ok(())
    }

    /// Checks that the files exist and are readable (at load).
    pub fn check_files(&self, prefix: &str) -> Result<(), String> {
        super::secret::check_readable(&self.ca_file, &format!("{prefix}.ca_file"))?;
        super::secret::check_readable(&self.cert_file, &format!("{prefix}.cert_file"))?;
        super::secret::check_readable(&self.key_file, &format!("{prefix}.key_file"))
    }

    /// What is wrong with the client certificate's validity period now, if
    /// anything (expired, or not valid yet). A broker that refuses it under
    /// TLS 1.3 may close the connection before its alert is read (the client
    /// then sees only "connection reset"), so this names the cause.
    pub fn client_certificate_problem(&self) -> Option<String> {
        let path = self.cert_file.as_ref()?;
        let pem = std::fs::read(path).ok()?;
        let cert = openssl::x509::X509::from_pem(&pem).ok()?;
        let now = openssl::asn1::Asn1Time::days_from_now(0).ok()?;
        if cert.not_after() < now {
            Some(format!(
                "our client certificate {} expired on {}",
                path.display(),
                cert.not_after()
            ))
        } else if cert.not_before() > now {
            Some(format!(
                "our client certificate {} is not valid before {}",
                path.display(),
                cert.not_before()
            ))
        } else {
            None
        }
    }

    /// A connector for rumqttc's `TlsConfiguration::NativeConnector`.
    pub fn connector(&self) -> Result<native_tls::TlsConnector, String> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))
        };
        let mut b = native_tls::TlsConnector::builder();
        b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
        if let Some(ca) = &self.ca_file {
            let pem = read(ca, "CA file")?;
            let certs = openssl::x509::X509::stack_from_pem(&pem)
                .map_err(|e| format!("CA file {}: not PEM certificates: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!("CA file {}: no certificate in it", ca.display()));
            }
            for c in certs {
                let der = c.to_der().map_err(|e| e.to_string())?;
                let cert = native_tls::Certificate::from_der(&der).map_err(|e| e.to_string())?;
                b.add_root_certificate(cert);
            }
            // A private CA is the only trust: a public certificate for the
            // same name must not be accepted instead.
            b.disable_built_in_roots(true);
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            let cert_pem = read(cert, "client certificate")?;
            let key_pem = read(key, "client key")?;
            // native-tls wants PKCS#8; accept what openssl/easy-rsa write too.
            let pkey = openssl::pkey::PKey::private_key_from_pem(&key_pem)
                .map_err(|e| format!("client key {}: not a PEM private key: {e}", key.display()))?;
            let pkcs8 = pkey
                .private_key_to_pem_pkcs8()
                .map_err(|e| format!("client key {}: {e}", key.display()))?;
            let id = native_tls::Identity::from_pkcs8(&cert_pem, &pkcs8).map_err(|e| {
                format!(
                    "client certificate {} with key {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
            b.identity(id);
        }
        b.build().map_err(|e| format!("TLS setup: {e}"))
    }
}

/// Whether an MQTT connection error is a TLS or login failure, from rumqttc's
/// message (the v3.1.1 and v5 clients have different error types).
pub fn classify(error: &str) -> Option<SecurityKind> {
    let e = error.to_ascii_lowercase();
    if e.contains("connection refused")
        && (e.contains("badusernamepassword")
            || e.contains("notauthorized")
            || e.contains("bad user")
            || e.contains("not authori"))
    {
        return Some(SecurityKind::Auth);
    }
    if e.starts_with("tls")
        || e.contains("ssl")
        || e.contains("certificate")
        || e.contains("alert")
        || e.contains("handshake")
    {
        return Some(SecurityKind::Tls);
    }
    None
}

/// [`classify`], and an unclassified connection reset is a TLS failure when
/// our client certificate is out of its validity period (`cert_problem`, see
/// [`MqttTlsConfig::client_certificate_problem`]): returns the kind and the
/// error to report.
pub fn classify_with(error: &str, cert_problem: Option<&str>) -> Option<(SecurityKind, String)> {
    if let Some(kind) = classify(error) {
        return Some((kind, error.to_string()));
    }
    let e = error.to_ascii_lowercase();
    let dropped = e.contains("reset by peer") || e.contains("closed") || e.contains("eof");
    match cert_problem {
        Some(p) if dropped => Some((SecurityKind::Tls, format!("{error}: {p}"))),
        _ => None,
    }
}

/// A hint for a plaintext client whose connection a TLS listener drops.
pub fn plaintext_hint(url: &str, error: &str) -> &'static str {
    let plain = url.starts_with("mqtt://") || url.starts_with("tcp://");
    if plain && (error.contains("reset by peer") || error.contains("deserialization")) {
        " (if the broker expects TLS on this port, use an mqtts:// URL)"
    } else {
        ""
    }
}

/// A readable sentence for a classified MQTT failure.
pub fn describe(kind: SecurityKind, url: &str, user: Option<&str>, error: &str) -> String {
    match kind {
        SecurityKind::Tls => {
            let hint = if error.contains("certificate required")
                || error.contains("peer did not return")
            {
                " (the broker requires a client certificate: set cert_file and key_file)"
            } else if error.contains("certificate expired") {
                " (the broker refused our client certificate: it has expired)"
            } else if error.contains("unknown ca") || error.contains("bad certificate") {
                " (the broker refused our client certificate: not signed by a CA it trusts)"
            } else if error.contains("verify failed") {
                " (the broker's certificate is not signed by the configured CA, has expired, or does not name this host)"
            } else {
                ""
            };
            format!("TLS with {url} failed: {error}{hint}")
        }
        SecurityKind::Auth => format!(
            "MQTT login refused by {url} for user {}: {error}",
            user.unwrap_or("(none)")
        ),
        SecurityKind::Acl => format!("not authorized by {url}: {error}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classifies_rumqttc_errors() {
        assert_eq!(
            classify(
                "TLS: Native TLS error error:0A000086:SSL routines::certificate verify failed"
            ),
            Some(SecurityKind::Tls)
        );
        assert_eq!(
            classify("I/O: error:0A00045C:SSL routines::tlsv13 alert certificate required"),
            Some(SecurityKind::Tls)
        );
        assert_eq!(
            classify("Connection refused, return code: `BadUserNamePassword`"),
            Some(SecurityKind::Auth)
        );
        assert_eq!(
            classify("Connection refused, return code: `NotAuthorized`"),
            Some(SecurityKind::Auth)
        );
        assert_eq!(classify("I/O: Connection refused (os error 111)"), None);
        assert_eq!(classify("Network timeout"), None);
    }

    /// Mosquitto refusing an expired client certificate under TLS 1.3 can
    /// reach us as a bare reset (its alert lost with the connection): seen in
    /// simulators/tests/secure.rs, where the error then named no cause.
    #[test]
    fn a_reset_with_an_expired_client_certificate_names_it() {
        let reset = "Mqtt state: Mqtt serialization/deserialization error: IO: Connection reset by peer (os error 104)";
        let expired = "our client certificate c.pem expired on Dec  3 00:00:00 2026 GMT";
        let (kind, e) = classify_with(reset, Some(expired)).unwrap();
        assert_eq!(kind, SecurityKind::Tls);
        assert!(
            e.contains("expired on") && e.contains("reset by peer"),
            "{e}"
        );
        assert_eq!(classify_with(reset, None), None);
        assert_eq!(
            classify_with("I/O: Connection refused (os error 111)", Some(expired)),
            None
        );
    }

    #[test]
    fn half_a_client_certificate_is_an_error() {
        let t = MqttTlsConfig {
            cert_file: Some("c.pem".into()),
            ..Default::default()
        };
        let e = t.validate("mqtt.tls").unwrap_err();
        assert!(e.contains("mqtt.tls.key_file"), "{e}");
    }
}
