//! How the simulated devices log in: TLS (`mqtts://`, a CA file), a client
//! certificate shared or per device, a user name and password shared or per
//! device. Per-device credentials mean one connection per device, so the
//! broker's ACL sees each device as itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use iot_gateway::security::mqtt::MqttTlsConfig;
use iot_gateway::security::secret::read_secret_file;
use iot_gateway::security::Secret;

/// The TLS and login flags (also keys of a scenario file).
#[derive(clap::Args, Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthArgs {
    /// CA certificate (PEM) that signed the broker's certificate, for mqtts://
    /// URLs. [default: the system's trusted roots]
    #[arg(long, value_name = "FILE")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, used by every connection.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// Per-device client certificates: DIR/<device>.crt and DIR/<device>.key
    /// (one connection per device; the broker sees each device as itself).
    #[arg(long, value_name = "DIR")]
    pub(crate) device_certs: Option<PathBuf>,
    /// MQTT user name of every connection.
    #[arg(long, value_name = "NAME")]
    pub(crate) username: Option<String>,
    /// File whose first line is the password of --username (or set
    /// SIMULATOR_MQTT_PASSWORD).
    #[arg(long, value_name = "FILE")]
    pub(crate) password_file: Option<PathBuf>,
    /// Per-device passwords, lines of `device:password`; each device logs in
    /// as itself (one connection per device).
    #[arg(long, value_name = "FILE")]
    pub(crate) device_passwords: Option<PathBuf>,
}

impl AuthArgs {
    /// Flags over the scenario's keys.
    pub(crate) fn or(self, sc: AuthArgs) -> AuthArgs {
        AuthArgs {
            ca_file: self.ca_file.or(sc.ca_file),
            cert: self.cert.or(sc.cert),
            key: self.key.or(sc.key),
            device_certs: self.device_certs.or(sc.device_certs),
            username: self.username.or(sc.username),
            password_file: self.password_file.or(sc.password_file),
            device_passwords: self.device_passwords.or(sc.device_passwords),
        }
    }
}

/// Checked login settings.
#[derive(Debug, Clone, Default)]
pub(crate) struct Auth {
    pub(crate) tls: Option<MqttTlsConfig>,
    device_certs: Option<PathBuf>,
    username: Option<String>,
    password: Option<Secret>,
    device_passwords: Option<HashMap<String, Secret>>,
}

/// The environment variable with the password of `--username`.
pub(crate) const PASSWORD_ENV: &str = "SIMULATOR_MQTT_PASSWORD";

impl Auth {
    pub(crate) fn from_args(a: AuthArgs, tls_url: bool) -> Result<Auth> {
        let wants_tls = a.ca_file.is_some() || a.cert.is_some() || a.device_certs.is_some();
        if wants_tls && !tls_url {
            bail!("--ca-file, --cert and --device-certs need an mqtts:// broker URL");
        }
        if a.device_certs.is_some() && a.cert.is_some() {
            bail!("--cert and --device-certs: use one of them");
        }
        if a.device_passwords.is_some() && (a.username.is_some() || a.password_file.is_some()) {
            bail!("--device-passwords and --username/--password-file: use one of them");
        }
        let password = match (&a.password_file, std::env::var(PASSWORD_ENV)) {
            (Some(f), _) => Some(read_secret_file(f, "--password-file").map_err(|e| anyhow!(e))?),
            (None, Ok(p)) if !p.is_empty() => Some(Secret::new(p)),
            _ => None,
        };
        if password.is_some() && a.username.is_none() {
            bail!("a password (--password-file or {PASSWORD_ENV}) needs --username");
        }
        let device_passwords = a
            .device_passwords
            .as_deref()
            .map(read_device_passwords)
            .transpose()?;
        let tls = tls_url.then(|| MqttTlsConfig {
            ca_file: a.ca_file.clone(),
            cert_file: a.cert.clone(),
            key_file: a.key.clone(),
        });
        if let Some(t) = &tls {
            t.check_files("tls").map_err(|e| anyhow!(e))?;
        }
        Ok(Auth {
            tls,
            device_certs: a.device_certs,
            username: a.username,
            password,
            device_passwords,
        })
    }

    /// Whether each device needs a connection of its own.
    pub(crate) fn per_device(&self) -> bool {
        self.device_certs.is_some() || self.device_passwords.is_some()
    }

    /// The transport and login of the connection for `device` (per-device
    /// credentials) or of any connection.
    pub(crate) fn for_connection(
        &self,
        device: &str,
    ) -> Result<(rumqttc::Transport, Option<(String, String)>)> {
        let transport = match &self.tls {
            None => rumqttc::Transport::Tcp,
            Some(base) => {
                let mut t = base.clone();
                if let Some(dir) = &self.device_certs {
                    let (crt, key) = (
                        dir.join(format!("{device}.crt")),
                        dir.join(format!("{device}.key")),
                    );
                    for f in [&crt, &key] {
                        if let Err(e) = std::fs::File::open(f) {
                            bail!(
                                "--device-certs: no certificate for device {device}: {}: {e}",
                                f.display()
                            );
                        }
                    }
                    t.cert_file = Some(crt);
                    t.key_file = Some(key);
                }
                let c = t.connector().map_err(|e| anyhow!(e))?;
                rumqttc::Transport::Tls(rumqttc::TlsConfiguration::NativeConnector(c))
            }
        };
        let login = if let Some(map) = &self.device_passwords {
            let pw = map
                .get(device)
                .ok_or_else(|| anyhow!("--device-passwords has no password for device {device}"))?;
            Some((device.to_string(), pw.expose().to_string()))
        } else {
            self.username.as_ref().map(|u| {
                (
                    u.clone(),
                    self.password
                        .as_ref()
                        .map(|p| p.expose().to_string())
                        .unwrap_or_default(),
                )
            })
        };
        Ok((transport, login))
    }

    /// The user name shown in messages.
    pub(crate) fn user_for(&self, device: &str) -> Option<String> {
        if self.device_passwords.is_some() {
            Some(device.to_string())
        } else if self.device_certs.is_some() {
            Some(format!("{device} (certificate)"))
        } else {
            self.username.clone()
        }
    }
}

fn read_device_passwords(path: &Path) -> Result<HashMap<String, Secret>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("--device-passwords {}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((dev, pw)) = line.split_once(':') else {
            bail!(
                "--device-passwords {} line {}: not `device:password`",
                path.display(),
                i + 1
            );
        };
        out.insert(dev.trim().to_string(), Secret::new(pw));
    }
    if out.is_empty() {
        bail!("--device-passwords {}: no entries", path.display());
    }
    Ok(out)
}
