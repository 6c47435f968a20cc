//! `--print-config`: the effective configuration as TOML, secrets masked.

use std::collections::BTreeMap;

use serde::Serialize;

/// Masks librdkafka properties that carry secrets (sasl.password, ssl.key.password, ...).
pub fn mask_properties(props: &mut BTreeMap<String, String>) {
    for (k, v) in props.iter_mut() {
        if k.contains("password") || k.contains("secret") || k.ends_with(".key.pem") {
            *v = "********".into();
        }
    }
}

pub(super) fn toml_string<T: Serialize>(v: &T) -> String {
    // serde_json -> toml via config's own TOML writer is not available; a
    // hand-rolled writer over serde_json keeps dependencies down.
    let value = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
    let mut out = String::new();
    if let serde_json::Value::Object(map) = value {
        write_table(&mut out, "", &map);
    }
    out
}

fn write_table(out: &mut String, prefix: &str, map: &serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    for (k, v) in map {
        match v {
            Value::Object(_) | Value::Null => {}
            other => out.push_str(&format!("{} = {}\n", toml_key(k), toml_value(other))),
        }
    }
    for (k, v) in map {
        if let Value::Object(sub) = v {
            let name = if prefix.is_empty() {
                toml_key(k)
            } else {
                format!("{prefix}.{}", toml_key(k))
            };
            out.push_str(&format!("\n[{name}]\n"));
            write_table(out, &name, sub);
        }
    }
}

fn toml_key(k: &str) -> String {
    if k.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

fn toml_value(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Number(n) if n.is_f64() => {
            let s = n.to_string();
            if s.contains(['.', 'e', 'E']) {
                s
            } else {
                format!("{s}.0")
            }
        }
        other => other.to_string(),
    }
}
