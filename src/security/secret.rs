//! Secrets in configuration: a value that prints as `********` wherever it
//! goes (Debug, the effective config of `check-config`), given inline, through
//! the environment (`GATEWAY__MQTT__PASSWORD`, ...) or as a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

/// A password or passphrase. Only [`Secret::expose`] shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

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
