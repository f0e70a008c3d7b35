//! How a key becomes the identifier bytes of its store key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A key type that distributed mode can name in the store. The bytes must identify the key:
/// two different keys must never write the same bytes.
pub trait Identifier {
    /// Appends the key's identifying bytes.
    fn write_identifier(&self, out: &mut Vec<u8>);
}

impl Identifier for String {
    fn write_identifier(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl Identifier for Box<str> {
    fn write_identifier(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl Identifier for Vec<u8> {
    fn write_identifier(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

macro_rules! display_identifier {
    ($($t:ty),*) => {$(
        impl Identifier for $t {
            fn write_identifier(&self, out: &mut Vec<u8>) {
                use std::io::Write;
                let _ = write!(out, "{self}");
            }
        }
    )*};
}

display_identifier!(u16, u32, u64, u128, usize, i32, i64, IpAddr, Ipv4Addr, Ipv6Addr);
