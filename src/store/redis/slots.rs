//! Redis Cluster's addressing: the hash slot of a key ([`key_slot`]), the masters' addresses
//! ([`NodeAddr`]), which master serves each slot ([`SlotMap`], read from `CLUSTER SLOTS`), and
//! the `MOVED`/`ASK` redirections that correct it.

use std::sync::Arc;

use redis::{ConnectionAddr, ConnectionInfo, Value};

use super::wire::{as_text, as_u64};
use crate::store::keys::hash_tag;
use crate::store::{ErrorClass, StoreError};

/// Redis Cluster hash slots.
const SLOTS: usize = 16384;

const NO_OWNER: u16 = u16::MAX;

/// The hash slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of its hash tag.
pub fn key_slot(key: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in hash_tag(key) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS as u16
}

/// A master's address as the cluster announces it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct NodeAddr {
    pub(super) host: Arc<str>,
    pub(super) port: u16,
}

impl NodeAddr {
    /// Parses `host:port` (the host may be empty: then it is `default_host`; IPv6 hosts keep
    /// their colons).
    pub(super) fn parse(s: &str, default_host: &str) -> Option<NodeAddr> {
        let (host, port) = s.rsplit_once(':')?;
        let host = if host.is_empty() { default_host } else { host };
        Some(NodeAddr {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port: port.parse().ok()?,
        })
    }
}

/// `host:port`, with an IPv6 host in brackets (`[::1]:7000`), as [`NodeAddr::parse`] reads it.
impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which master serves each slot.
pub(super) struct SlotMap {
    owner: Vec<u16>,
    /// The masters, each once.
    pub(super) nodes: Vec<NodeAddr>,
}

/// The index of `addr` in `nodes`, added at the end when missing.
fn index_of(nodes: &mut Vec<NodeAddr>, addr: NodeAddr) -> usize {
    match nodes.iter().position(|n| *n == addr) {
        Some(i) => i,
        None => {
            nodes.push(addr);
            nodes.len() - 1
        }
    }
}

impl SlotMap {
    /// The master that serves `slot`, if any.
    pub(super) fn node(&self, slot: u16) -> Option<&NodeAddr> {
        self.nodes.get(usize::from(*self.owner.get(usize::from(slot))?))
    }

    /// This map with `slot` served by `addr` (after a `MOVED` reply).
    pub(super) fn with(&self, slot: u16, addr: NodeAddr) -> SlotMap {
        let mut nodes = self.nodes.clone();
        let i = index_of(&mut nodes, addr);
        let mut owner = self.owner.clone();
        owner[usize::from(slot)] = i as u16;
        SlotMap { owner, nodes }
    }

    /// Parses a `CLUSTER SLOTS` reply from the node at `from`.
    pub(super) fn parse(reply: &Value, from: &NodeAddr) -> Result<SlotMap, StoreError> {
        let bad = || StoreError::new(ErrorClass::Protocol, "unexpected CLUSTER SLOTS reply");
        let Value::Array(ranges) = reply else { return Err(bad()) };
        let mut map = SlotMap {
            owner: vec![NO_OWNER; SLOTS],
            nodes: Vec::new(),
        };
        for range in ranges {
            let Value::Array(r) = range else { return Err(bad()) };
            let (Some(start), Some(end), Some(Value::Array(master))) = (r.first(), r.get(1), r.get(2)) else {
                return Err(bad());
            };
            let (start, end) = (as_u64(start).ok_or_else(bad)?, as_u64(end).ok_or_else(bad)?);
            if start > end || end >= SLOTS as u64 || master.len() < 2 {
                return Err(bad());
            }
            let host = as_text(&master[0]);
            // An empty or unknown host means "the address you reached me at".
            let host: Arc<str> = if host.is_empty() || host == "?" {
                from.host.clone()
            } else {
                host.into()
            };
            let port = as_u64(&master[1]).and_then(|p| u16::try_from(p).ok()).ok_or_else(bad)?;
            let i = index_of(&mut map.nodes, NodeAddr { host, port });
            for s in start..=end {
                map.owner[s as usize] = i as u16;
            }
        }
        if map.nodes.is_empty() {
            return Err(StoreError::new(
                ErrorClass::Transient,
                "the cluster serves no slots yet (CLUSTER SLOTS is empty)",
            ));
        }
        Ok(map)
    }
}
/// The address of a seed, from its connection settings.
pub(super) fn node_addr(info: &ConnectionInfo) -> Result<NodeAddr, StoreError> {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => Ok(NodeAddr {
            host: host.as_str().into(),
            port: *port,
        }),
        _ => Err(StoreError::new(
            ErrorClass::Config,
            "a Redis Cluster is reached over TCP: use redis:// or rediss:// URLs",
        )),
    }
}

/// Reads the `slot host:port` of a `MOVED` or `ASK` reply; an empty host is `from`'s.
pub(super) fn parse_redirect(details: Option<&str>, from: &NodeAddr) -> Option<(u16, NodeAddr)> {
    let mut words = details?.split_whitespace();
    let slot: u16 = words.next()?.parse().ok().filter(|&s: &u16| usize::from(s) < SLOTS)?;
    Some((slot, NodeAddr::parse(words.next()?, &from.host)?))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag: the whole key is hashed (value from an independent CRC16).
        assert_eq!(key_slot(b"foo{}{bar}"), 8363);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn redirects_parse() {
        let from = NodeAddr {
            host: "10.0.0.9".into(),
            port: 7000,
        };
        let (slot, to) = parse_redirect(Some("3999 127.0.0.1:6381"), &from).unwrap();
        assert_eq!((slot, &*to.host, to.port), (3999, "127.0.0.1", 6381));
        let (_, to) = parse_redirect(Some("1 :6390"), &from).unwrap();
        assert_eq!((&*to.host, to.port), ("10.0.0.9", 6390));
        let (_, to) = parse_redirect(Some("2 ::1:6390"), &from).unwrap();
        assert_eq!((&*to.host, to.port), ("::1", 6390));
        // Shown as it is read back.
        assert_eq!(to.to_string(), "[::1]:6390");
        assert_eq!(NodeAddr::parse(&to.to_string(), "x"), Some(to));
        assert_eq!(from.to_string(), "10.0.0.9:7000");
        assert!(parse_redirect(Some("16384 127.0.0.1:1"), &from).is_none());
        assert!(parse_redirect(Some("x 127.0.0.1:1"), &from).is_none());
        assert!(parse_redirect(None, &from).is_none());
    }

    #[test]
    fn slot_map_parses_and_updates() {
        let from = NodeAddr {
            host: "127.0.0.1".into(),
            port: 7000,
        };
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(8191), node("", 7000)]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                node("127.0.0.2", 7001),
                node("127.0.0.3", 7002),
            ]),
        ]);
        let map = SlotMap::parse(&reply, &from).unwrap();
        assert_eq!(map.nodes.len(), 2);
        assert_eq!(map.node(0), Some(&from));
        assert_eq!(map.node(16383).unwrap().port, 7001);
        let moved = map.with(5, NodeAddr::parse("127.0.0.2:7001", "").unwrap());
        assert_eq!(moved.node(5).unwrap().port, 7001);
        assert_eq!(moved.nodes.len(), 2);
        assert!(SlotMap::parse(&Value::Array(vec![]), &from).is_err());
        assert!(SlotMap::parse(&Value::Nil, &from).is_err());
        let bad = Value::Array(vec![Value::Array(vec![Value::Int(5), Value::Int(1), node("", 1)])]);
        assert!(SlotMap::parse(&bad, &from).is_err());
    }
}
