//! Kafka security in typed keys (`kafka.security_protocol`, `[kafka.tls]`,
//! `[kafka.sasl]`), mapped onto librdkafka's properties in one place for the
//! producer, the admin client and the consumer. `kafka.properties` stays the
//! pass-through for everything else; setting a property both ways is an error.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::{Deserialize, Serialize};

use super::{secret, Secret, SecurityKind};

pub const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
pub const MECHANISMS: [&str; 3] = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"];

/// `[kafka.tls]`: used when `security_protocol` is `ssl` or `sasl_ssl`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTlsConfig {
    /// PEM CA certificate(s) of the brokers. Unset: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Passphrase of an encrypted `key_file` (or `key_password_file`).
    pub key_password: Option<Secret>,
    pub key_password_file: Option<PathBuf>,
}

/// `[kafka.sasl]`: used when `security_protocol` is `sasl_ssl` or `sasl_plaintext`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSaslConfig {
    /// SCRAM-SHA-512 (default), SCRAM-SHA-256 or PLAIN.
    pub mechanism: String,
    #[serde(deserialize_with = "secret::lenient_opt_string")]
    pub username: Option<String>,
    /// The password (or `password_file`, or the environment variable).
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
}

impl Default for KafkaSaslConfig {
    fn default() -> Self {
        KafkaSaslConfig {
            mechanism: "SCRAM-SHA-512".into(),
            username: None,
            password: None,
            password_file: None,
        }
    }
}

/// The three security keys of a `[kafka]` section, as one view.
#[derive(Debug)]
pub struct KafkaSecurity<'a> {
    pub protocol: &'a str,
    pub tls: &'a KafkaTlsConfig,
    pub sasl: &'a KafkaSaslConfig,
    pub properties: &'a BTreeMap<String, String>,
}

impl<'a> KafkaSecurity<'a> {
    /// The connection keys of a `[kafka]` section (the gateway's producer and
    /// the aggregator's consumer have the same four).
    pub fn of(
        protocol: &'a str,
        tls: &'a KafkaTlsConfig,
        sasl: &'a KafkaSaslConfig,
        properties: &'a BTreeMap<String, String>,
    ) -> Self {
        KafkaSecurity {
            protocol,
            tls,
            sasl,
            properties,
        }
    }
}

impl KafkaSecurity<'_> {
    fn protocol(&self) -> String {
        self.protocol.to_ascii_lowercase()
    }

    fn uses_tls(&self) -> bool {
        matches!(self.protocol().as_str(), "ssl" | "sasl_ssl")
    }

    fn uses_sasl(&self) -> bool {
        self.protocol().starts_with("sasl_")
    }

    /// Checks without I/O. Errors are `(key, why)`, keys relative to `[kafka]`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, why: String| Err((k.to_string(), why));
        let p = self.protocol();
        if !PROTOCOLS.contains(&p.as_str()) {
            return err(
                "security_protocol",
                format!("{:?} is not one of {}", self.protocol, PROTOCOLS.join(", ")),
            );
        }
        for (typed, prop) in self.librdkafka_keys() {
            if self.properties.contains_key(prop) {
                return err(
                    &format!("properties.\"{prop}\""),
                    format!("it is set by `kafka.{typed}`; remove one of them"),
                );
            }
        }
        let tls = self.tls;
        let tls_set = tls.ca_file.is_some() || tls.cert_file.is_some() || tls.key_file.is_some();
        if tls_set && !self.uses_tls() {
            return err(
                "tls",
                format!("[kafka.tls] is set but security_protocol is {p:?}; use \"ssl\" or \"sasl_ssl\""),
            );
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return err(
                "tls.cert_file",
                "set both tls.cert_file and tls.key_file for a client certificate".into(),
            );
        }
        let sasl = self.sasl;
        if self.uses_sasl() {
            if !MECHANISMS.contains(&sasl.mechanism.as_str()) {
                return err(
                    "sasl.mechanism",
                    format!(
                        "{:?} is not one of {}",
                        sasl.mechanism,
                        MECHANISMS.join(", ")
                    ),
                );
            }
            if sasl.username.as_deref().unwrap_or("").is_empty() {
                return err(
                    "sasl.username",
                    format!("is required with security_protocol {p:?}"),
                );
            }
            if sasl.password.is_none() && sasl.password_file.is_none() {
                return err(
                    "sasl.password",
                    format!("is required with security_protocol {p:?} (or sasl.password_file)"),
                );
            }
        } else if sasl.username.is_some() || sasl.password.is_some() || sasl.password_file.is_some()
        {
            return err(
                "sasl",
                format!("[kafka.sasl] is set but security_protocol is {p:?}; use \"sasl_ssl\" (or \"sasl_plaintext\")"),
            );
        }
        Ok(())
    }

    /// The librdkafka properties the typed keys set, as (typed key, property).
    fn librdkafka_keys(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        if self.protocol() != "plaintext" {
            v.push(("security_protocol", "security.protocol"));
        }
        let t = self.tls;
        if t.ca_file.is_some() {
            v.push(("tls.ca_file", "ssl.ca.location"));
        }
        if t.cert_file.is_some() {
            v.push(("tls.cert_file", "ssl.certificate.location"));
        }
        if t.key_file.is_some() {
            v.push(("tls.key_file", "ssl.key.location"));
        }
        if t.key_password.is_some() || t.key_password_file.is_some() {
            v.push(("tls.key_password", "ssl.key.password"));
        }
        if self.uses_sasl() {
            v.push(("sasl.mechanism", "sasl.mechanisms"));
            v.push(("sasl.mechanism", "sasl.mechanism"));
            v.push(("sasl.username", "sasl.username"));
            v.push(("sasl.password", "sasl.password"));
        }
        v
    }

    /// Sets the librdkafka properties (before the pass-through ones).
    pub fn apply(&self, c: &mut ClientConfig) {
        let p = self.protocol();
        if p != "plaintext" {
            c.set("security.protocol", &p);
        }
        if self.uses_tls() {
            let t = self.tls;
            let path = |p: &PathBuf| p.display().to_string();
            if let Some(f) = &t.ca_file {
                c.set("ssl.ca.location", path(f));
            }
            if let Some(f) = &t.cert_file {
                c.set("ssl.certificate.location", path(f));
            }
            if let Some(f) = &t.key_file {
                c.set("ssl.key.location", path(f));
            }
            if let Some(pw) = &t.key_password {
                c.set("ssl.key.password", pw.expose());
            }
        }
        if self.uses_sasl() {
            let s = self.sasl;
            c.set("sasl.mechanisms", &s.mechanism);
            if let Some(u) = &s.username {
                c.set("sasl.username", u);
            }
            if let Some(pw) = &s.password {
                c.set("sasl.password", pw.expose());
            }
        }
    }

    /// The SASL user, for messages.
    pub fn user(&self) -> Option<&str> {
        if self.uses_sasl() {
            self.sasl.username.as_deref()
        } else {
            self.properties.get("sasl.username").map(String::as_str)
        }
    }
}

/// Reads `*_file` secrets into their values and checks the PEM files (at load).
pub fn resolve_files(
    tls: &mut KafkaTlsConfig,
    sasl: &mut KafkaSaslConfig,
    prefix: &str,
) -> Result<(), String> {
    secret::resolve(
        &mut sasl.password,
        &sasl.password_file,
        &format!("{prefix}.sasl.password"),
    )?;
    secret::resolve(
        &mut tls.key_password,
        &tls.key_password_file,
        &format!("{prefix}.tls.key_password"),
    )?;
    secret::check_readable(&tls.ca_file, &format!("{prefix}.tls.ca_file"))?;
    secret::check_readable(&tls.cert_file, &format!("{prefix}.tls.cert_file"))?;
    secret::check_readable(&tls.key_file, &format!("{prefix}.tls.key_file"))?;
    check_pem(tls, prefix)
}

/// The PEM files parse (and an encrypted key opens with its password), so a
/// wrong file is a configuration error rather than a client that never connects.
fn check_pem(tls: &KafkaTlsConfig, prefix: &str) -> Result<(), String> {
    let bad = |key: &str, p: &PathBuf, why: String| {
        format!(
            "invalid value for `{prefix}.tls.{key}`: {}: {why}",
            p.display()
        )
    };
    for (key, file) in [("ca_file", &tls.ca_file), ("cert_file", &tls.cert_file)] {
        if let Some(p) = file {
            let pem = std::fs::read(p).map_err(|e| bad(key, p, e.to_string()))?;
            match openssl::x509::X509::stack_from_pem(&pem) {
                Ok(certs) if !certs.is_empty() => {}
                Ok(_) => return Err(bad(key, p, "no PEM certificate in it".into())),
                Err(e) => return Err(bad(key, p, format!("not PEM certificates ({e})"))),
            }
        }
    }
    if let Some(p) = &tls.key_file {
        let pem = std::fs::read(p).map_err(|e| bad("key_file", p, e.to_string()))?;
        let parsed = match &tls.key_password {
            Some(pw) => {
                openssl::pkey::PKey::private_key_from_pem_passphrase(&pem, pw.expose().as_bytes())
            }
            None => openssl::pkey::PKey::private_key_from_pem(&pem),
        };
        parsed.map_err(|_| {
            bad(
                "key_file",
                p,
                "not a PEM private key, or encrypted and tls.key_password is wrong or missing"
                    .into(),
            )
        })?;
    }
    Ok(())
}

/// Whether a librdkafka error (from the client's error callback) is a TLS,
/// login or authorization failure, with a sentence saying which.
pub fn classify(
    error: &KafkaError,
    reason: &str,
    user: Option<&str>,
) -> Option<(SecurityKind, String)> {
    use RDKafkaErrorCode as C;
    let user = user.unwrap_or("(none)");
    let code = error.rdkafka_error_code();
    // "... (after 327ms in state AUTH_REQ, 1 identical error(s) suppressed)"
    // differs on every retry; without it a repeat is recognised (and not re-logged).
    let reason = match reason.rfind(" (after ") {
        Some(i) if reason.ends_with(')') => &reason[..i],
        _ => reason,
    };
    let r = reason.to_ascii_lowercase();
    if matches!(code, Some(C::Authentication | C::SaslAuthenticationFailed))
        || r.contains("sasl authentication")
    {
        return Some((
            SecurityKind::Auth,
            format!("Kafka SASL authentication failed for user {user}: {reason}"),
        ));
    }
    if matches!(code, Some(C::SSL))
        || r.contains("ssl handshake")
        || r.contains("certificate verify")
        || (r.contains("alert") && r.contains("certificate"))
    {
        let hint = if r.contains("certificate required") {
            " (the broker requires a client certificate: set kafka.tls.cert_file and key_file)"
        } else if r.contains("certificate expired") {
            " (the broker refused our client certificate: it has expired)"
        } else if r.contains("bad certificate") || r.contains("unknown ca") {
            " (the broker refused our client certificate, or requires one: check kafka.tls.cert_file and key_file)"
        } else if r.contains("verify") {
            " (the broker's certificate is not signed by kafka.tls.ca_file, has expired, or does not name the host)"
        } else {
            ""
        };
        return Some((
            SecurityKind::Tls,
            format!("Kafka TLS failed: {reason}{hint}"),
        ));
    }
    if matches!(
        code,
        Some(
            C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::GroupAuthorizationFailed
        )
    ) {
        return Some((
            SecurityKind::Acl,
            format!("Kafka refused user {user}: {reason} (check the broker's ACLs)"),
        ));
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sec<'a>(
        protocol: &'a str,
        tls: &'a KafkaTlsConfig,
        sasl: &'a KafkaSaslConfig,
        properties: &'a BTreeMap<String, String>,
    ) -> KafkaSecurity<'a> {
        KafkaSecurity {
            protocol,
            tls,
            sasl,
            properties,
        }
    }

    #[test]
    fn sasl_ssl_maps_to_librdkafka_properties() {
        let tls = KafkaTlsConfig {
            ca_file: Some("/ca.pem".into()),
            ..Default::default()
        };
        let sasl = KafkaSaslConfig {
            username: Some("gateway".into()),
            password: Some(Secret::new("pw")),
            ..Default::default()
        };
        let props = BTreeMap::new();
        let s = sec("SASL_SSL", &tls, &sasl, &props);
        s.validate().unwrap();
        let mut c = ClientConfig::new();
        s.apply(&mut c);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("gateway"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
    }

    #[test]
    fn mistakes_name_the_key() {
        let none = KafkaTlsConfig::default();
        let nosasl = KafkaSaslConfig::default();
        let props = BTreeMap::new();
        let e = sec("sasl_sl", &none, &nosasl, &props)
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "security_protocol");
        let e = sec("sasl_ssl", &none, &nosasl, &props)
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "sasl.username");
        let user = KafkaSaslConfig {
            username: Some("u".into()),
            ..Default::default()
        };
        let e = sec("sasl_ssl", &none, &user, &props)
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "sasl.password");
        let e = sec("plaintext", &none, &user, &props)
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "sasl");
        let ca = KafkaTlsConfig {
            ca_file: Some("x".into()),
            ..Default::default()
        };
        let e = sec("plaintext", &ca, &nosasl, &props)
            .validate()
            .unwrap_err();
        assert_eq!(e.0, "tls");
        let mut both = BTreeMap::new();
        both.insert("ssl.ca.location".to_string(), "y".to_string());
        let e = sec("ssl", &ca, &nosasl, &both).validate().unwrap_err();
        assert!(e.0.contains("ssl.ca.location"), "{e:?}");
        // The pass-through alone still works (configs written before the typed keys).
        let mut legacy = BTreeMap::new();
        legacy.insert("security.protocol".to_string(), "ssl".to_string());
        sec("plaintext", &none, &nosasl, &legacy)
            .validate()
            .unwrap();
    }

    #[test]
    fn classifies_librdkafka_errors() {
        let auth = KafkaError::Global(RDKafkaErrorCode::Authentication);
        let (k, m) = classify(&auth, "sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512", Some("gateway")).unwrap();
        assert_eq!(k, SecurityKind::Auth);
        assert!(
            m.contains("SASL authentication failed for user gateway"),
            "{m}"
        );
        let ssl = KafkaError::Global(RDKafkaErrorCode::SSL);
        let (k, m) = classify(&ssl, "ssl://127.0.0.1:9094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed", None).unwrap();
        assert_eq!(k, SecurityKind::Tls);
        assert!(m.contains("certificate verify failed"), "{m}");
        let down = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(classify(
            &down,
            "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused",
            None
        )
        .is_none());
    }
}
