//! Who a request comes from: the client address (through trusted proxies only), its group, the
//! user id or hashed API key, and the keys built from them.

use std::fmt::{self, Write as _};
use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use ::http::{HeaderMap, HeaderValue};
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::config::{mask, ClientIp, ForwardedHeader};

/// The most forwarding hops examined from the right; a longer chain of trusted proxies counts
/// as malformed.
const MAX_HOPS: usize = 32;

/// The most bytes of a user id used as it is; longer ids are hashed.
const MAX_USER_ID: usize = 64;

/// A key built without allocating: at most [`KeyBuf::CAP`] bytes.
#[derive(Clone, Copy)]
pub(crate) struct KeyBuf {
    buf: [u8; KeyBuf::CAP],
    len: u8,
}

/// The decimal digits of each byte value, left-aligned, and their count.
static OCTETS: [[u8; 4]; 256] = {
    let mut t = [[0u8; 4]; 256];
    let mut i = 0;
    while i < 256 {
        let v = i as u8;
        t[i] = if v >= 100 {
            [b'0' + v / 100, b'0' + v / 10 % 10, b'0' + v % 10, 3]
        } else if v >= 10 {
            [b'0' + v / 10, b'0' + v % 10, 0, 2]
        } else {
            [b'0' + v, 0, 0, 1]
        };
        i += 1;
    }
    t
};

impl KeyBuf {
    pub(crate) const CAP: usize = 72;

    pub(crate) fn new() -> Self {
        KeyBuf {
            buf: [0; Self::CAP],
            len: 0,
        }
    }

    fn push(&mut self, s: &str) {
        let _ = fmt::Write::write_str(self, s);
    }

    /// ASCII bytes only (digits), so the buffer stays UTF-8.
    fn push_ascii(&mut self, bytes: &[u8]) {
        let len = self.len as usize;
        if bytes.is_ascii() && len + bytes.len() <= Self::CAP {
            self.buf[len..len + bytes.len()].copy_from_slice(bytes);
            self.len = (len + bytes.len()) as u8;
        }
    }

    /// One ASCII byte.
    fn push_byte(&mut self, b: u8) {
        let len = self.len as usize;
        if b.is_ascii() && len < Self::CAP {
            self.buf[len] = b;
            self.len += 1;
        }
    }

    /// `a.b.c.d`, written as one fixed-size copy (the longest form, 15 bytes, with room to
    /// spare).
    fn push_ipv4(&mut self, octets: [u8; 4]) {
        let mut out = [0u8; 20];
        let mut n = 0;
        for o in octets {
            // Each octet's digits and a dot, written whole; only the digits are kept.
            let [a, b, c, len] = OCTETS[usize::from(o)];
            out[n..n + 4].copy_from_slice(&[a, b, c, b'.']);
            n += usize::from(len);
            out[n] = b'.';
            n += 1;
        }
        let n = n - 1; // no dot after the last octet
        let len = self.len as usize;
        if let Some(dest) = self.buf.get_mut(len..len + out.len()) {
            // Digits and dots only: the buffer stays UTF-8 up to the new length.
            dest.copy_from_slice(&out);
            self.len = (len + n) as u8;
        }
    }

    /// `n` in decimal.
    fn push_u8(&mut self, n: u8) {
        if n >= 100 {
            self.push_byte(b'0' + n / 100);
        }
        if n >= 10 {
            self.push_byte(b'0' + n / 10 % 10);
        }
        self.push_byte(b'0' + n % 10);
    }

    pub(crate) fn as_str(&self) -> &str {
        // SAFETY: only whole `&str`s (`write_str` refuses what does not fit) and ASCII bytes
        // (`push_ascii`, `push_byte`) are ever written, so the bytes up to `len` are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.buf[..self.len as usize]) }
    }
}

impl fmt::Write for KeyBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let len = self.len as usize;
        if len + s.len() > Self::CAP {
            return Err(fmt::Error);
        }
        self.buf[len..len + s.len()].copy_from_slice(s.as_bytes());
        self.len = (len + s.len()) as u8;
        Ok(())
    }
}

impl fmt::Debug for KeyBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The client address of a request whose TCP peer is `peer`.
///
/// When `peer` is not in `trusted_proxies` (or none is configured), the peer is the client: no
/// header is read. When it is, the configured header is walked from the right, skipping
/// trusted proxies, and the first address that is not one is the client (the rightmost
/// untrusted hop: the leftmost entries are whatever the client sent, and are never believed
/// while a trusted hop stands to their right). A malformed entry reached during the walk, a
/// missing header, or more than 32 trusted hops: the peer is the client. When every hop is a
/// trusted proxy, the leftmost one is.
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are returned as IPv4.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, cfg: &ClientIp) -> IpAddr {
    let peer = peer.to_canonical();
    let trusted = |ip: IpAddr| cfg.trusted_proxies.iter().any(|c| c.contains(ip));
    if cfg.trusted_proxies.is_empty() || !trusted(peer) {
        return peer;
    }
    match cfg.header {
        ForwardedHeader::XRealIp => {
            let mut values = headers.get_all("x-real-ip").iter();
            match (values.next(), values.next()) {
                (Some(v), None) => v
                    .to_str()
                    .ok()
                    .and_then(parse_node)
                    .map_or(peer, |ip| ip.to_canonical()),
                _ => peer,
            }
        }
        ForwardedHeader::XForwardedFor => {
            let hops = headers
                .get_all("x-forwarded-for")
                .iter()
                .rev()
                .flat_map(|v| split_rev(v, b','))
                .map(|s| std::str::from_utf8(s).ok().and_then(parse_node));
            walk(hops, peer, trusted)
        }
        ForwardedHeader::Forwarded => {
            let hops = headers
                .get_all("forwarded")
                .iter()
                .rev()
                .flat_map(|v| split_rev(v, b','))
                .map(|element| std::str::from_utf8(element).ok().and_then(forwarded_for));
            walk(hops, peer, trusted)
        }
    }
}

fn walk(hops: impl Iterator<Item = Option<IpAddr>>, peer: IpAddr, trusted: impl Fn(IpAddr) -> bool) -> IpAddr {
    let mut last = None;
    for (i, hop) in hops.enumerate() {
        if i >= MAX_HOPS {
            return peer;
        }
        let Some(ip) = hop.map(|ip| ip.to_canonical()) else {
            return peer;
        };
        if !trusted(ip) {
            return ip;
        }
        last = Some(ip);
    }
    last.unwrap_or(peer)
}

/// The parts of a header value between separators, from the right.
fn split_rev(v: &HeaderValue, sep: u8) -> impl Iterator<Item = &[u8]> {
    v.as_bytes().rsplit(move |b| *b == sep)
}

/// An address, optionally with a port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim_matches(|c: char| c == ' ' || c == '\t');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The `for=` node of one RFC 7239 element (`for=192.0.2.60;proto=http;by=203.0.113.43`).
/// `unknown`, obfuscated identifiers and elements without `for` are `None` (malformed here).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    for pair in element.split(';') {
        let (k, v) = pair.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("for") {
            let v = v.trim();
            let v = match v.strip_prefix('"') {
                Some(q) => q.strip_suffix('"')?,
                None => v,
            };
            return parse_node(v);
        }
    }
    None
}

/// Appends the ip layer's key of `ip`: the client address under its group prefix
/// (`203.0.113.7`, `2001:db8:1:2::/64`).
fn push_ip_key(k: &mut KeyBuf, ip: IpAddr, cfg: &ClientIp) {
    let ip = ip.to_canonical();
    let (prefix, full) = match ip {
        IpAddr::V4(_) => (cfg.ipv4_prefix, 32),
        IpAddr::V6(_) => (cfg.ipv6_prefix, 128),
    };
    match mask(ip, prefix) {
        IpAddr::V4(v4) => k.push_ipv4(v4.octets()),
        v6 => {
            let _ = write!(k, "{v6}");
        }
    }
    if prefix != full {
        k.push_byte(b'/');
        k.push_u8(prefix);
    }
}

/// The keys a request is counted under: its ip key and its identity key.
///
/// An anonymous client's identity is `a:` and its ip key, so both live in one buffer (the ip
/// key is its tail) and are formatted once.
#[derive(Clone)]
pub(crate) struct Keys {
    /// `a:` and the ip key.
    anonymous: KeyBuf,
    /// The identity of an identified client: user id or API key.
    identified: Option<KeyBuf>,
}

impl Keys {
    /// No keys yet: [`set_client`](Self::set_client) writes them in place (the request path
    /// keeps them where they are, instead of moving them along with its plan).
    pub(crate) fn empty() -> Keys {
        Keys {
            anonymous: KeyBuf::new(),
            identified: None,
        }
    }

    /// The keys of an anonymous client at `ip`.
    pub(crate) fn set_client(&mut self, ip: IpAddr, cfg: &ClientIp) {
        let anonymous = &mut self.anonymous;
        anonymous.len = 0;
        anonymous.push_byte(b'a');
        anonymous.push_byte(b':');
        push_ip_key(anonymous, ip, cfg);
        self.identified = None;
    }

    /// Counts the client under `identity` (a [`user_key`] or an [`api_key`]).
    pub(crate) fn identify(&mut self, identity: KeyBuf) {
        self.identified = Some(identity);
    }

    /// The ip key and the identity key.
    pub(crate) fn get(&self) -> (&str, &str) {
        let anonymous = self.anonymous.as_str();
        let ip = anonymous.get(2..).unwrap_or("");
        (ip, self.identified.as_ref().map_or(anonymous, KeyBuf::as_str))
    }
}

fn hex(out: &mut KeyBuf, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        let pair = [DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]];
        out.push_ascii(&pair);
    }
}

/// The identity key of a user: `u:<id>`, or `h:<hash>` for an id over 64 bytes.
pub(crate) fn user_key(id: &str) -> KeyBuf {
    let mut k = KeyBuf::new();
    if id.len() <= MAX_USER_ID {
        k.push("u:");
        k.push(id);
    } else {
        let mut h = SipHasher13::new_with_keys(0, 0);
        h.write(id.as_bytes());
        k.write_str("h:").ok();
        hex(&mut k, &h.finish128().as_bytes());
    }
    k
}

/// The identity key of an API key: `k:` and 32 hex digits of its keyed SipHash. The raw key
/// is never stored.
pub(crate) fn api_key(raw: &[u8], secret: &[u8; 16]) -> KeyBuf {
    let mut h = SipHasher13::new_with_key(secret);
    h.write(raw);
    let mut k = KeyBuf::new();
    k.write_str("k:").ok();
    hex(&mut k, &h.finish128().as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cidr;

    fn cfg(header: ForwardedHeader, trusted: &[&str]) -> ClientIp {
        ClientIp {
            header,
            trusted_proxies: trusted.iter().map(|s| s.parse::<Cidr>().unwrap()).collect(),
            ..ClientIp::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_are_believed_only_from_trusted_proxies() {
        let xff = cfg(ForwardedHeader::XForwardedFor, &["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.2")]);
        // Untrusted peer: the header is the client's own words.
        assert_eq!(client_ip(ip("203.0.113.9"), &h, &xff), ip("203.0.113.9"));
        // Trusted peer: the rightmost untrusted hop, not the forged leftmost one.
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &xff), ip("198.51.100.7"));
        // Several header lines are one list, in order.
        let h2 = headers(&[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.7")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h2, &xff), ip("198.51.100.7"));
        // Malformed entry reached: the peer.
        let bad = headers(&[("x-forwarded-for", "198.51.100.7, garbage")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &bad, &xff), ip("10.0.0.1"));
        // No header: the peer. All hops trusted: the leftmost.
        assert_eq!(client_ip(ip("10.0.0.1"), &HeaderMap::new(), &xff), ip("10.0.0.1"));
        let inner = headers(&[("x-forwarded-for", "10.9.9.9, 10.0.0.3")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &inner, &xff), ip("10.9.9.9"));
        // Ports, brackets and mapped addresses.
        let ported = headers(&[("x-forwarded-for", "[2001:db8::1]:443, ::ffff:10.0.0.5")]);
        assert_eq!(client_ip(ip("::ffff:10.0.0.1"), &ported, &xff), ip("2001:db8::1"));
        // Too many trusted hops.
        let long = vec!["10.0.0.1"; 40].join(",");
        let long = headers(&[("x-forwarded-for", &long)]);
        assert_eq!(client_ip(ip("10.0.0.1"), &long, &xff), ip("10.0.0.1"));
    }

    #[test]
    fn rfc7239_and_x_real_ip() {
        let fwd = cfg(ForwardedHeader::Forwarded, &["10.0.0.0/8"]);
        let h = headers(&[(
            "forwarded",
            r#"for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.2;by=10.0.0.1"#,
        )]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &fwd), ip("2001:db8:cafe::17"));
        let unknown = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &unknown, &fwd), ip("10.0.0.1"));
        // The header the proxy does not set is ignored.
        let xff_only = headers(&[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &xff_only, &fwd), ip("10.0.0.1"));

        let real = cfg(ForwardedHeader::XRealIp, &["10.0.0.0/8"]);
        let h = headers(&[("x-real-ip", "198.51.100.7")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &real), ip("198.51.100.7"));
        assert_eq!(client_ip(ip("192.0.2.1"), &h, &real), ip("192.0.2.1"));
        let two = headers(&[("x-real-ip", "198.51.100.7"), ("x-real-ip", "6.6.6.6")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &two, &real), ip("10.0.0.1"));
    }

    fn ip_key(ip: IpAddr, cfg: &ClientIp) -> String {
        let mut keys = Keys::empty();
        keys.set_client(ip, cfg);
        let (ip_key, identity) = keys.get();
        assert_eq!(identity, format!("a:{ip_key}"));
        ip_key.to_owned()
    }

    #[test]
    fn ipv4_keys_are_the_dotted_decimal_form() {
        let c = ClientIp::default();
        for v in 0..=255u8 {
            for ip in [[v, 0, 9, 255], [1, v, 10, 99], [100, 200, v, 7], [0, 0, 0, v], [v; 4]] {
                let ip = IpAddr::from(ip);
                assert_eq!(ip_key(ip, &c), ip.to_string());
            }
        }
    }

    #[test]
    fn keys_group_and_hash() {
        let c = ClientIp::default();
        assert_eq!(ip_key(ip("203.0.113.7"), &c), "203.0.113.7");
        assert_eq!(ip_key(ip("::ffff:203.0.113.7"), &c), "203.0.113.7");
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1"), &c), "2001:db8:1:2::/64");
        assert_eq!(ip_key(ip("10.0.100.255"), &c), "10.0.100.255");
        assert_eq!(ip_key(ip("0.9.99.100"), &c), "0.9.99.100");
        let c24 = ClientIp {
            ipv4_prefix: 24,
            ..ClientIp::default()
        };
        assert_eq!(ip_key(ip("10.0.100.255"), &c24), "10.0.100.0/24");
        assert_eq!(api_key(b"x", &[0; 16]).as_str().len(), 34);
        let long = "x".repeat(5000);
        assert!(user_key(&long).as_str().starts_with("h:"));
        assert_eq!(user_key("alice").as_str(), "u:alice");
        let k = api_key(b"sk_live_secret", &[7; 16]);
        assert!(k.as_str().starts_with("k:") && k.as_str().len() == 34);
        assert!(!k.as_str().contains("secret"));
        assert_ne!(k.as_str(), api_key(b"sk_live_secret", &[8; 16]).as_str());
    }
}
