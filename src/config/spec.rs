//! The file as written: the serde form of every section, and how a document is read into it
//! (the validation turns it into a [`Config`](super::Config)).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Number, Value};

use super::{document, BodyStyle, ConfigError, FailurePolicy, ForwardedHeader, HeaderStyle, PolicyHeader};
use crate::Algorithm;

/// The top-level fields of the file. A document with none of them is the flat form: tier
/// names mapped to policies, as the seed's `rate-limit-tiers.json` has them.
const FIELDS: &[&str] = &[
    "tiers",
    "default_tier",
    "anonymous_tier",
    "layers",
    "endpoints",
    "client_ip",
    "api_key",
    "allow",
    "deny",
    "block_duration",
    "shadow",
    "response",
    "failure_policy",
    "redis",
    "max_keys",
];

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a JSON object such as {\"tiers\": {\"free\": {\"points\": 100, \"duration\": 60}}}"
)]
pub(super) struct ConfigSpec {
    /// Read from the flat form: the tiers are the document, and their paths have no prefix.
    #[serde(skip)]
    pub(super) flat: bool,
    #[serde(default)]
    pub(super) tiers: Option<BTreeMap<String, PolicyInput>>,
    #[serde(default)]
    pub(super) default_tier: Option<String>,
    #[serde(default)]
    pub(super) anonymous_tier: Option<String>,
    #[serde(default)]
    pub(super) layers: LayersSpec,
    #[serde(default)]
    pub(super) endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub(super) client_ip: ClientIpSpec,
    #[serde(default)]
    pub(super) api_key: Option<ApiKeySpec>,
    #[serde(default)]
    pub(super) allow: ListsSpec,
    #[serde(default)]
    pub(super) deny: ListsSpec,
    #[serde(default)]
    pub(super) block_duration: Option<Number>,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) response: ResponseSpec,
    #[serde(default)]
    pub(super) failure_policy: FailurePolicy,
    #[serde(default)]
    pub(super) redis: Option<RedisSpec>,
    #[serde(default)]
    pub(super) max_keys: Option<u64>,
}

/// A policy as written: numbers kept as written (so that a rejected one is echoed as it is),
/// required fields optional (so that a missing one is reported at its own path).
#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a policy object such as {\"points\": 100, \"duration\": 60}"
)]
pub(super) struct PolicyInput {
    #[serde(default)]
    pub(super) algorithm: Algorithm,
    #[serde(default)]
    pub(super) points: Option<Number>,
    #[serde(default)]
    pub(super) duration: Option<Number>,
    #[serde(default)]
    pub(super) burst: Option<Number>,
    #[serde(default)]
    pub(super) block_duration: Option<Number>,
    /// The ip layer only.
    #[serde(default)]
    pub(super) applies_to: Option<Value>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object such as {\"ip\": {\"points\": 1000, \"duration\": 60}, \"user\": true, \"endpoint\": true}"
)]
pub(super) struct LayersSpec {
    #[serde(default)]
    pub(super) ip: Option<PolicyInput>,
    #[serde(default = "yes")]
    pub(super) user: bool,
    #[serde(default = "yes")]
    pub(super) endpoint: bool,
}

fn yes() -> bool {
    true
}

impl Default for LayersSpec {
    fn default() -> Self {
        LayersSpec {
            ip: None,
            user: true,
            endpoint: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an endpoint object such as {\"method\": \"POST\", \"path\": \"/api/x\", \"policy\": {...}}"
)]
pub(super) struct EndpointSpec {
    #[serde(default = "any_method")]
    pub(super) method: String,
    #[serde(default)]
    pub(super) path: Option<String>,
    #[serde(default)]
    pub(super) policy: Option<PolicyInput>,
}

fn any_method() -> String {
    "*".into()
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with trusted_proxies, header, ipv6_prefix and ipv4_prefix"
)]
pub(super) struct ClientIpSpec {
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    #[serde(default)]
    pub(super) header: ForwardedHeader,
    #[serde(default)]
    pub(super) ipv6_prefix: Option<u64>,
    #[serde(default)]
    pub(super) ipv4_prefix: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object such as {\"header\": \"x-api-key\"}")]
pub(super) struct ApiKeySpec {
    #[serde(default)]
    pub(super) header: Option<String>,
    #[serde(default)]
    pub(super) secret: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "an object with ips and users")]
pub(super) struct ListsSpec {
    #[serde(default)]
    pub(super) ips: Vec<String>,
    #[serde(default)]
    pub(super) users: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with headers, policy_header, body and key_error_status"
)]
pub(super) struct ResponseSpec {
    #[serde(default)]
    pub(super) headers: HeaderStyle,
    #[serde(default)]
    pub(super) policy_header: PolicyHeader,
    #[serde(default)]
    pub(super) body: BodyStyle,
    #[serde(default)]
    pub(super) key_error_status: Option<u64>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object such as {\"url\": \"redis://127.0.0.1:6379\"}"
)]
pub(super) struct RedisSpec {
    #[serde(default)]
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) key_prefix: Option<String>,
    #[serde(default)]
    pub(super) sync_interval: Option<Number>,
    #[serde(default)]
    pub(super) batch_size: Option<u64>,
    #[serde(default)]
    pub(super) cluster: bool,
}

impl ConfigSpec {
    /// The document as written: the full form, or the flat form read as its `tiers`. A
    /// UTF-8 byte-order mark before the document is skipped; anything but whitespace after it
    /// is an error.
    pub(super) fn read(json: &str) -> Result<ConfigSpec, ConfigError> {
        let doc = document::parse(json).map_err(ConfigError::from)?;
        match doc {
            Value::Object(map) if map.is_empty() || map.keys().any(|k| FIELDS.contains(&k.as_str())) => {
                typed::<ConfigSpec>(Value::Object(map))
            }
            flat @ Value::Object(_) => Ok(ConfigSpec {
                flat: true,
                tiers: Some(typed(flat)?),
                ..ConfigSpec::default()
            }),
            other => {
                let got = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                Err(ConfigError::one(
                    "",
                    format!(
                        "the document must be a JSON object, {{\"tiers\": {{...}}, ...}} or tier names \
                         mapped to policies (got {got})"
                    ),
                ))
            }
        }
    }
}

/// A document's fields, with the path of the first value of the wrong type or an unknown
/// field.
fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigError::one(path, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use crate::Policy;

    #[test]
    fn the_shipped_file_is_valid() {
        let c = Config::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/rate-limit-tiers.json")).unwrap();
        for (tier, points) in [
            ("anonymous", 20),
            ("free", 100),
            ("premium", 1000),
            ("enterprise", 10000),
        ] {
            assert_eq!(c.tiers[tier], Policy::per_minute(points), "{tier}");
        }
        assert!(c.endpoints[0].matches("POST", "/api/ai/generate"));
        assert_eq!(c.endpoints[0].policy, Policy::per_hour(10));
    }
}
