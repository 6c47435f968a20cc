//! Secrets in configuration: a value that prints as `********` wherever it
//! goes (Debug, the effective config of `check-config`), given inline, through
//! the environment (`GATEWAY__MQTT__PASSWORD`, ...) or as a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

/// A password or passphrase. Only [`Secret::expose`] shows it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Secret)
    }
}

/// A string, also when the environment layer parsed it as a number or a bool
/// (`GATEWAY__MQTT__PASSWORD=1234`). The exact text is restored from the
/// environment afterwards ([`raw_env`]): `0123` would otherwise read `123`.
pub fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// [`lenient_string`] for optional fields (user names).
pub fn lenient_opt_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    lenient_string(d).map(Some)
}

/// The exact text of `PREFIX__A__B` for key `a.b`, if set: credentials must not
/// go through the environment layer's number parsing.
pub fn raw_env(prefix: &str, key: &str, get: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    get(&format!(
        "{prefix}__{}",
        key.replace('.', "__").to_uppercase()
    ))
}

pub const MASK: &str = "********";

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(MASK)
    }
}

/// Reads a secret file: the first line, without its line ending (so `echo pw > f`
/// works); an empty or unreadable file is an error naming `key` and the path.
pub fn read_secret_file(path: &Path, key: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("invalid value for `{key}`: {}: {e}", path.display()))?;
    let first = text.lines().next().unwrap_or("").to_string();
    if first.is_empty() {
        return Err(format!(
            "invalid value for `{key}`: {} is empty",
            path.display()
        ));
    }
    Ok(Secret(first))
}

/// The secret from `inline` or from `file` (not both): `key` is the inline key's
/// full name, the file key is `key` + `_file`. Fills `inline` from the file.
pub fn resolve(
    inline: &mut Option<Secret>,
    file: &Option<PathBuf>,
    key: &str,
) -> Result<(), String> {
    match (inline.is_some(), file) {
        (true, Some(_)) => Err(format!(
            "invalid value for `{key}_file`: set `{key}` or `{key}_file`, not both"
        )),
        (false, Some(p)) => {
            *inline = Some(read_secret_file(p, &format!("{key}_file"))?);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks that a PEM file named by `key` can be read (at load, so a wrong path
/// is a configuration error, not a reconnect loop).
pub fn check_readable(path: &Option<PathBuf>, key: &str) -> Result<(), String> {
    if let Some(p) = path {
        std::fs::File::open(p)
            .map_err(|e| format!("invalid value for `{key}`: {}: {e}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), MASK);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"********\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn numbers_from_the_environment_stay_text() {
        #[derive(Deserialize)]
        struct C {
            password: Secret,
            #[serde(default, deserialize_with = "lenient_opt_string")]
            user: Option<String>,
        }
        let c: C = serde_json::from_str(r#"{"password": 123, "user": 42}"#).unwrap();
        assert_eq!(c.password.expose(), "123");
        assert_eq!(c.user.as_deref(), Some("42"));
        let env = |k: &str| (k == "GATEWAY__KAFKA__SASL__PASSWORD").then(|| "0123".to_string());
        assert_eq!(
            raw_env("GATEWAY", "kafka.sasl.password", &env).as_deref(),
            Some("0123")
        );
    }

    #[test]
    fn file_or_inline_not_both() {
        let p = std::env::temp_dir().join(format!("iot-secret-{}", std::process::id()));
        std::fs::write(&p, "s3cret\n").unwrap();
        let mut v = None;
        resolve(&mut v, &Some(p.clone()), "mqtt.password").unwrap();
        assert_eq!(v.as_ref().map(Secret::expose), Some("s3cret"));
        let e = resolve(&mut v, &Some(p.clone()), "mqtt.password").unwrap_err();
        assert!(e.contains("not both"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        let e = resolve(&mut None, &Some(p.clone()), "mqtt.password").unwrap_err();
        assert!(
            e.contains("mqtt.password_file") && e.contains("empty"),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
        let e = resolve(&mut None, &Some(p), "mqtt.password").unwrap_err();
        assert!(e.contains("mqtt.password_file"), "{e}");
    }
}
