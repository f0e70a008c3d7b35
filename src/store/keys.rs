//! Store key encoding: injective, with a hash tag that only the library writes.
//!
//! A key is
//!
//! ```text
//! <prefix>{<group, 3 hex digits>}<namespace length, decimal>:<namespace><mode><payload>
//! ```
//!
//! * `prefix` is configured (printable ASCII, no braces, no spaces), so the first `{` of every
//!   key is the library's. Redis Cluster hashes the text between the first `{` and the first `}`
//!   after it, so that tag is always exactly the group: user data after it cannot create or move
//!   it. Keys of one group share a slot and can be synced in one script call.
//! * The group is a keyed hash of (namespace, identifier) modulo the number of groups.
//! * The namespace (the policy or layer name) is length-prefixed, so any byte may appear in it.
//! * `mode` is `r` (the identifier as is: at most the length cap, and only bytes from
//!   `A-Z a-z 0-9 . _ - : @ / + =`), `x` (the identifier in hex: at most the length cap, other
//!   bytes) or `h` (32 hex digits of a keyed 128-bit SipHash of namespace and identifier: longer
//!   identifiers, and secrets such as API keys, which therefore never reach the store or its
//!   logs).
//!
//! Every key can be parsed back to (namespace, mode, payload), and `r`/`x` payloads back to the
//! identifier, so the encoding is injective up to collisions of a 128-bit keyed hash.

use std::fmt;
use std::hash::Hasher;
use std::sync::Arc;

use siphasher::sip::SipHasher13;
use siphasher::sip128::{Hasher128, SipHasher24};

/// The default cap on identifier length, in bytes; longer identifiers are hashed.
pub const DEFAULT_MAX_IDENTIFIER_LEN: usize = 256;

/// The default number of hash-tag groups.
pub const DEFAULT_GROUPS: u16 = 16;

/// The most groups an encoder may have (the tag is three hex digits).
pub const MAX_GROUPS: u16 = 4096;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "tg:";

/// An encoded store key, cheap to clone, with its hash-tag group.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey {
    bytes: Arc<[u8]>,
    group: u16,
}

impl StoreKey {
    /// The bytes sent to the store.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The hash-tag group: keys of one group share a Redis Cluster slot.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// A key made of raw bytes, for tests and tools that address the store directly. Keys
    /// built this way bypass the encoding guarantees; the group is 0.
    pub fn from_raw(bytes: impl Into<Vec<u8>>) -> Self {
        StoreKey {
            bytes: bytes.into().into(),
            group: 0,
        }
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({:?})", String::from_utf8_lossy(&self.bytes))
    }
}

/// An invalid [`KeyEncoder`] setting.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyConfigError {
    /// The prefix is longer than 64 bytes, or has a byte outside printable ASCII, or a brace.
    #[error("key prefix must be at most 64 printable ASCII bytes without '{{', '}}' or spaces")]
    Prefix,
    /// The number of groups is 0 or above `MAX_GROUPS` (4096).
    #[error("groups must be in 1..=4096")]
    Groups,
    /// The identifier cap is 0 or above 4096.
    #[error("the identifier length cap must be in 1..=4096")]
    MaxLen,
}

/// Builds store keys: a prefix, groups and a hashing secret shared by every node.
#[derive(Clone)]
pub struct KeyEncoder {
    prefix: Arc<str>,
    groups: u16,
    max_len: usize,
    k0: u64,
    k1: u64,
}

impl fmt::Debug for KeyEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEncoder")
            .field("prefix", &self.prefix)
            .field("groups", &self.groups)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl Default for KeyEncoder {
    fn default() -> Self {
        KeyEncoder {
            prefix: DEFAULT_PREFIX.into(),
            groups: DEFAULT_GROUPS,
            max_len: DEFAULT_MAX_IDENTIFIER_LEN,
            // A fixed public key: stable across processes and versions. Set a secret one with
            // `with_secret` so that hashed secrets cannot be guessed offline.
            k0: 0x746f_6c6c_6761_7465,
            k1: 0x6b65_7973_2d76_3031,
        }
    }
}

fn safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@' | b'/' | b'+' | b'=')
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 15)]);
    }
}

impl KeyEncoder {
    /// An encoder with `prefix` (at most 64 printable ASCII bytes, no braces or spaces), the
    /// default groups, identifier cap and (public) hashing key.
    pub fn new(prefix: &str) -> Result<Self, KeyConfigError> {
        if prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}') {
            return Err(KeyConfigError::Prefix);
        }
        Ok(KeyEncoder {
            prefix: prefix.into(),
            ..KeyEncoder::default()
        })
    }

    /// Sets the secret key of the keyed hashes (same on every node). Without it, hashed
    /// identifiers use a public key: fine for length capping, weak for low-entropy secrets.
    pub fn with_secret(mut self, secret: [u8; 16]) -> Self {
        let (a, b) = secret.split_at(8);
        self.k0 = u64::from_le_bytes(a.try_into().unwrap_or([0; 8]));
        self.k1 = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        self
    }

    /// Sets the number of hash-tag groups (1..=4096, same on every node). More groups spread
    /// keys over more Redis Cluster slots; each group is one script call per sync.
    pub fn with_groups(mut self, groups: u16) -> Result<Self, KeyConfigError> {
        if groups == 0 || groups > MAX_GROUPS {
            return Err(KeyConfigError::Groups);
        }
        self.groups = groups;
        Ok(self)
    }

    /// Sets the identifier length cap (1..=4096 bytes); longer identifiers are hashed.
    pub fn with_max_identifier_len(mut self, max_len: usize) -> Result<Self, KeyConfigError> {
        if max_len == 0 || max_len > 4096 {
            return Err(KeyConfigError::MaxLen);
        }
        self.max_len = max_len;
        Ok(self)
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The number of groups.
    pub fn groups(&self) -> u16 {
        self.groups
    }

    fn feed(h: &mut impl Hasher, namespace: &str, identifier: &[u8]) {
        h.write(&(namespace.len() as u64).to_le_bytes());
        h.write(namespace.as_bytes());
        h.write(identifier);
    }

    fn group_of(&self, namespace: &str, identifier: &[u8]) -> u16 {
        let mut h = SipHasher13::new_with_keys(self.k0 ^ 0x0067_726f_7570, self.k1);
        Self::feed(&mut h, namespace, identifier);
        (h.finish() % u64::from(self.groups)) as u16
    }

    fn digest(&self, namespace: &str, identifier: &[u8]) -> [u8; 16] {
        let mut h = SipHasher24::new_with_keys(self.k0, self.k1);
        Self::feed(&mut h, namespace, identifier);
        h.finish128().as_bytes()
    }

    fn head(&self, group: u16, namespace: &str, cap: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + 16 + namespace.len() + cap);
        out.extend_from_slice(self.prefix.as_bytes());
        out.push(b'{');
        out.push(HEX[usize::from(group >> 8) & 15]);
        out.push(HEX[usize::from(group >> 4) & 15]);
        out.push(HEX[usize::from(group) & 15]);
        out.push(b'}');
        out.extend_from_slice(namespace.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(namespace.as_bytes());
        out
    }

    /// The key of `identifier` under `namespace` (the policy or layer name).
    pub fn encode(&self, namespace: &str, identifier: &[u8]) -> StoreKey {
        if identifier.len() > self.max_len {
            return self.encode_secret(namespace, identifier);
        }
        let group = self.group_of(namespace, identifier);
        let mut out = self.head(group, namespace, 2 * identifier.len() + 1);
        if identifier.iter().all(|&b| safe_byte(b)) {
            out.push(b'r');
            out.extend_from_slice(identifier);
        } else {
            out.push(b'x');
            push_hex(&mut out, identifier);
        }
        StoreKey {
            bytes: out.into(),
            group,
        }
    }

    /// The key of a secret identifier (an API key, a token): always hashed, so the secret never
    /// reaches the store.
    pub fn encode_secret(&self, namespace: &str, identifier: &[u8]) -> StoreKey {
        let group = self.group_of(namespace, identifier);
        let mut out = self.head(group, namespace, 33);
        out.push(b'h');
        push_hex(&mut out, &self.digest(namespace, identifier));
        StoreKey {
            bytes: out.into(),
            group,
        }
    }

    /// The key of the node registry (`<prefix>{nodes}`), distinct from every encoded key.
    pub fn registry_key(&self) -> StoreKey {
        let mut out = self.prefix.as_bytes().to_vec();
        out.extend_from_slice(b"{nodes}");
        StoreKey {
            bytes: out.into(),
            group: 0,
        }
    }
}

/// The hash tag of a key as Redis Cluster computes it: the bytes between the first `{` and the
/// first `}` after it, if that is not empty; otherwise the whole key. Only the cluster's slot
/// routing needs it.
#[cfg(any(test, feature = "redis"))]
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses a key back into (namespace, mode, payload), proving the layout is unambiguous.
    fn parse<'k>(enc: &KeyEncoder, key: &'k [u8]) -> (u16, &'k [u8], u8, &'k [u8]) {
        let rest = key.strip_prefix(enc.prefix().as_bytes()).unwrap();
        assert_eq!(rest[0], b'{');
        assert_eq!(rest[4], b'}');
        let group = u16::from_str_radix(std::str::from_utf8(&rest[1..4]).unwrap(), 16).unwrap();
        let rest = &rest[5..];
        let colon = rest.iter().position(|&b| b == b':').unwrap();
        let n: usize = std::str::from_utf8(&rest[..colon]).unwrap().parse().unwrap();
        let ns = &rest[colon + 1..colon + 1 + n];
        let rest = &rest[colon + 1 + n..];
        (group, ns, rest[0], &rest[1..])
    }

    fn decode(mode: u8, payload: &[u8]) -> Option<Vec<u8>> {
        match mode {
            b'r' => Some(payload.to_vec()),
            b'x' => Some(
                payload
                    .chunks(2)
                    .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
                    .collect(),
            ),
            _ => None,
        }
    }

    fn ident() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(
                prop_oneof![Just(b'{'), Just(b'}'), Just(b':'), Just(b'a'), Just(b'1')],
                0..20
            ),
            proptest::collection::vec(any::<u8>(), 250..300),
        ]
    }

    fn namespace() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z:{}]{0,6}", ".{0,8}"]
    }

    proptest! {
        #[test]
        fn encoding_round_trips_and_the_tag_is_ours(ns in namespace(), id in ident(), secret in any::<bool>()) {
            let enc = KeyEncoder::new("app:rl:").unwrap();
            let key = if secret { enc.encode_secret(&ns, &id) } else { enc.encode(&ns, &id) };
            let bytes = key.as_bytes();
            let (group, pns, mode, payload) = parse(&enc, bytes);
            prop_assert_eq!(group, key.group());
            prop_assert!(group < enc.groups());
            prop_assert_eq!(pns, ns.as_bytes());
            let tag = format!("{:03x}", group);
            prop_assert_eq!(hash_tag(bytes), tag.as_bytes());
            // Long or secret identifiers never appear in the key.
            if secret || id.len() > DEFAULT_MAX_IDENTIFIER_LEN {
                prop_assert_eq!(mode, b'h');
                prop_assert_eq!(payload.len(), 32);
            } else {
                prop_assert_eq!(decode(mode, payload), Some(id.clone()));
            }
            prop_assert!(bytes.len() <= enc.prefix().len() + 5 + 21 + ns.len() + 1 + 2 * DEFAULT_MAX_IDENTIFIER_LEN);
        }

        #[test]
        fn encoding_is_injective(a in (namespace(), ident()), b in (namespace(), ident())) {
            let enc = KeyEncoder::default();
            if a != b {
                prop_assert_ne!(enc.encode(&a.0, &a.1), enc.encode(&b.0, &b.1));
                prop_assert_ne!(enc.encode_secret(&a.0, &a.1), enc.encode_secret(&b.0, &b.1));
            } else {
                prop_assert_eq!(enc.encode(&a.0, &a.1), enc.encode(&b.0, &b.1));
            }
        }

        #[test]
        fn braces_in_user_data_never_change_the_tag(ns in namespace(), id in ident(), at in 0usize..40) {
            // Inserting braces into the identifier changes the key but the tag stays a group.
            let enc = KeyEncoder::default();
            let mut braced = id.clone();
            let at = at.min(braced.len());
            braced.splice(at..at, b"{x}{".iter().copied());
            let key = enc.encode(&ns, &braced);
            let tag = format!("{:03x}", key.group());
            prop_assert_eq!(hash_tag(key.as_bytes()), tag.as_bytes());
            prop_assert_ne!(key, enc.encode(&ns, &id));
        }
    }

    #[test]
    fn layout_examples() {
        let enc = KeyEncoder::new("rl:").unwrap();
        let k = enc.encode("ip", b"203.0.113.7");
        let s = String::from_utf8(k.as_bytes().to_vec()).unwrap();
        assert!(s.starts_with("rl:{"), "{s}");
        assert!(s.ends_with("}2:ipr203.0.113.7"), "{s}");
        let k = enc.encode("user", b"a b");
        assert!(k.as_bytes().ends_with(b"4:userx612062"));
        let secret = enc.encode_secret("key", b"sk_live_abcdef");
        assert!(!String::from_utf8_lossy(secret.as_bytes()).contains("sk_live"));
        let long = vec![b'a'; 300];
        assert_eq!(enc.encode("u", &long).as_bytes().len(), "rl:{000}1:uh".len() + 32);
        assert_eq!(enc.registry_key().as_bytes(), b"rl:{nodes}");
        // A different secret moves hashed keys and groups, not plain ones' payloads.
        let other = enc.clone().with_secret([7; 16]);
        assert_ne!(other.encode_secret("key", b"sk_live_abcdef"), secret);
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert_eq!(KeyEncoder::new("a{b").unwrap_err(), KeyConfigError::Prefix);
        assert_eq!(KeyEncoder::new("a b").unwrap_err(), KeyConfigError::Prefix);
        assert_eq!(KeyEncoder::new(&"p".repeat(65)).unwrap_err(), KeyConfigError::Prefix);
        assert!(KeyEncoder::new("").is_ok());
        assert_eq!(
            KeyEncoder::default().with_groups(0).unwrap_err(),
            KeyConfigError::Groups
        );
        assert_eq!(
            KeyEncoder::default().with_groups(4097).unwrap_err(),
            KeyConfigError::Groups
        );
        assert_eq!(
            KeyEncoder::default().with_max_identifier_len(0).unwrap_err(),
            KeyConfigError::MaxLen
        );
        let one = KeyEncoder::default().with_groups(1).unwrap();
        assert_eq!(one.encode("a", b"b").group(), 0);
    }

    /// Fault C4: an attacker who knows the hashing key can pick identifiers that all land in
    /// one group (one slot, one master); with a secret key the same identifiers spread.
    #[test]
    fn adversarial_identifiers_spread_over_groups_under_a_secret_key() {
        let public = KeyEncoder::default();
        let crafted: Vec<Vec<u8>> = (0u32..)
            .map(|i| format!("{{000}}attacker-{i}").into_bytes())
            .filter(|id| public.encode("ip", id).group() == 0)
            .take(1600)
            .collect();
        let secret = KeyEncoder::default().with_secret(*b"deployment-keyyy");
        let mut per_group = [0u32; DEFAULT_GROUPS as usize];
        for id in &crafted {
            let key = secret.encode("ip", id);
            assert_eq!(hash_tag(key.as_bytes()), format!("{:03x}", key.group()).as_bytes());
            per_group[usize::from(key.group())] += 1;
        }
        let (min, max) = (per_group.iter().min().unwrap(), per_group.iter().max().unwrap());
        assert!(*min > 0 && max / min < 2, "{per_group:?}");
    }

    #[test]
    fn hash_tag_follows_redis_rules() {
        assert_eq!(hash_tag(b"a{b}c"), b"b");
        assert_eq!(hash_tag(b"a{}c{d}"), b"a{}c{d}");
        assert_eq!(hash_tag(b"abc"), b"abc");
        assert_eq!(hash_tag(b"{a}{b}"), b"a");
    }
}
