//! Where the state lives in etcd, and how values are encoded. Pure: no I/O.
//!
//! Under the operator's prefix `P` (`--etcd-prefix`), each cluster has its own prefix,
//! so one range read or watch covers a cluster or everything:
//!
//! ```text
//! P c/<cluster>/g                    guard: rewritten by every affiliate creation
//! P c/<cluster>/a/<affiliate>        the affiliate: flags, expiry, data
//! P c/<cluster>/e/<affiliate>/<blob> one endpoint: creation ordinal, expiry
//! P c/-                              sentinel: written to mark a point in history
//! ```
//!
//! IDs and endpoint blobs are hex-encoded, so any byte string is a key segment and an
//! endpoint's key is its bytes (byte-exact dedup by key). Each key carries a lease for
//! its expiry; the expiry is also in the value, because the update rules compare
//! expiries (an endpoint's is raised, never lowered) and leases are per bucket.

use bytes::{BufMut, Bytes, BytesMut};

/// What a key under the prefix names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Guard {
        cluster: String,
    },
    Affiliate {
        cluster: String,
        affiliate: String,
    },
    Endpoint {
        cluster: String,
        affiliate: String,
        blob: Vec<u8>,
    },
}

/// Key builder and parser for one prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: Vec<u8>,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.as_bytes().to_vec(),
        }
    }

    fn cluster_prefix(&self, cluster: &str) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"c/");
        k.extend_from_slice(hex::encode(cluster).as_bytes());
        k.push(b'/');
        k
    }

    /// Every key of the service: what the mirror watches.
    pub fn all(&self) -> (Vec<u8>, Vec<u8>) {
        let mut p = self.prefix.clone();
        p.extend_from_slice(b"c/");
        let end = range_end(&p);
        (p, end)
    }

    /// Written to mark a point in etcd's history that the mirror will see (inside the
    /// watched range; `parse` ignores it).
    pub fn sentinel(&self) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"c/-");
        k
    }

    pub fn guard(&self, cluster: &str) -> Vec<u8> {
        let mut k = self.cluster_prefix(cluster);
        k.push(b'g');
        k
    }

    pub fn affiliate(&self, cluster: &str, affiliate: &str) -> Vec<u8> {
        let mut k = self.cluster_prefix(cluster);
        k.extend_from_slice(b"a/");
        k.extend_from_slice(hex::encode(affiliate).as_bytes());
        k
    }

    /// The range of an affiliate's endpoint keys.
    pub fn endpoints(&self, cluster: &str, affiliate: &str) -> (Vec<u8>, Vec<u8>) {
        let mut k = self.cluster_prefix(cluster);
        k.extend_from_slice(b"e/");
        k.extend_from_slice(hex::encode(affiliate).as_bytes());
        k.push(b'/');
        let end = range_end(&k);
        (k, end)
    }

    pub fn endpoint(&self, cluster: &str, affiliate: &str, blob: &[u8]) -> Vec<u8> {
        let (mut k, _) = self.endpoints(cluster, affiliate);
        k.extend_from_slice(hex::encode(blob).as_bytes());
        k
    }

    /// Names a key read back from etcd; `None` for anything this layout never writes
    /// (another program's keys under the same prefix are ignored, not trusted).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let rest = key
            .strip_prefix(self.prefix.as_slice())?
            .strip_prefix(b"c/")?;
        let rest = std::str::from_utf8(rest).ok()?;
        let mut parts = rest.split('/');
        let cluster = unhex_str(parts.next()?)?;
        let key = match (parts.next()?, parts.next(), parts.next()) {
            ("g", None, None) => Key::Guard { cluster },
            ("a", Some(a), None) => Key::Affiliate {
                cluster,
                affiliate: unhex_str(a)?,
            },
            ("e", Some(a), Some(b)) => Key::Endpoint {
                cluster,
                affiliate: unhex_str(a)?,
                blob: hex::decode(b).ok()?,
            },
            _ => return None,
        };
        parts.next().is_none().then_some(key)
    }
}

fn unhex_str(s: &str) -> Option<String> {
    String::from_utf8(hex::decode(s).ok()?).ok()
}

/// The smallest key after every key starting with `prefix` (etcd's `range_end`).
pub fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

const VERSION: u8 = 1;
/// Set when the write replaced the data: watchers are told, as the memory backend
/// tells them of every update that carries data, even the same bytes.
const DATA_SET: u8 = 1;

/// An affiliate's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffiliateValue {
    pub data_set: bool,
    /// Unix milliseconds.
    pub expiry_ms: i64,
    pub data: Bytes,
}

impl AffiliateValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = BytesMut::with_capacity(10 + self.data.len());
        b.put_u8(VERSION);
        b.put_u8(if self.data_set { DATA_SET } else { 0 });
        b.put_i64(self.expiry_ms);
        b.put_slice(&self.data);
        b.to_vec()
    }

    pub fn decode(v: &Bytes) -> Option<Self> {
        if v.len() < 10 || v[0] != VERSION {
            return None;
        }
        Some(Self {
            data_set: v[1] & DATA_SET != 0,
            expiry_ms: i64::from_be_bytes(v[2..10].try_into().ok()?),
            data: v.slice(10..),
        })
    }
}

/// An endpoint's value. The ordinal keeps the request's order among endpoints created
/// by one transaction (they share a creation revision): endpoints are listed by
/// creation revision, then ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointValue {
    pub ordinal: u16,
    /// Unix milliseconds: the endpoint's own expiry (its lease may end earlier, with
    /// its affiliate's).
    pub expiry_ms: i64,
}

impl EndpointValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(11);
        b.push(VERSION);
        b.extend_from_slice(&self.ordinal.to_be_bytes());
        b.extend_from_slice(&self.expiry_ms.to_be_bytes());
        b
    }

    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != 11 || v[0] != VERSION {
            return None;
        }
        Some(Self {
            ordinal: u16::from_be_bytes(v[1..3].try_into().ok()?),
            expiry_ms: i64::from_be_bytes(v[3..11].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_for_any_id_and_blob() {
        let l = Layout::new("/discovery/");
        let odd = "a/b\u{0}c é";
        assert_eq!(
            l.parse(&l.guard(odd)),
            Some(Key::Guard {
                cluster: odd.into()
            })
        );
        assert_eq!(
            l.parse(&l.affiliate(odd, "x/y")),
            Some(Key::Affiliate {
                cluster: odd.into(),
                affiliate: "x/y".into()
            })
        );
        assert_eq!(
            l.parse(&l.endpoint("c", "a", &[0, 255, 47])),
            Some(Key::Endpoint {
                cluster: "c".into(),
                affiliate: "a".into(),
                blob: vec![0, 255, 47]
            })
        );
    }

    #[test]
    fn keys_of_one_cluster_or_affiliate_share_a_prefix() {
        let l = Layout::new("p/");
        let (start, end) = l.all();
        let (eps, eps_end) = l.endpoints("c", "a");
        for k in [
            l.guard("c"),
            l.affiliate("c", "a"),
            l.endpoint("c", "a", b"e"),
        ] {
            assert!(k >= start && k < end);
        }
        let e = l.endpoint("c", "a", b"e");
        assert!(e >= eps && e < eps_end);
        // Another affiliate's endpoints, even one whose id extends this one's, are not.
        let other = l.endpoint("c", "ab", b"e");
        assert!(!(other >= eps && other < eps_end));
        assert!(!(l.affiliate("c", "a") >= eps && l.affiliate("c", "a") < eps_end));
    }

    #[test]
    fn foreign_keys_are_not_ours() {
        let l = Layout::new("p/");
        for k in [
            &b"q/c/63/g"[..],
            b"p/c/zz/g",
            b"p/c/63/x",
            b"p/c/63/a/61/extra",
            b"p/c/63/e/61",
            b"p/c/ff/g", // not UTF-8
            b"p/",
            b"p/c/-",
        ] {
            assert_eq!(l.parse(k), None, "{}", String::from_utf8_lossy(k));
        }
    }

    #[test]
    fn range_end_is_the_next_prefix() {
        assert_eq!(range_end(b"ab"), b"ac");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff"), vec![0]);
    }

    #[test]
    fn values_round_trip_and_garbage_is_refused() {
        let a = AffiliateValue {
            data_set: true,
            expiry_ms: 1_700_000_000_123,
            data: Bytes::from_static(b"data"),
        };
        assert_eq!(AffiliateValue::decode(&Bytes::from(a.encode())), Some(a));
        let e = EndpointValue {
            ordinal: 3,
            expiry_ms: -5,
        };
        assert_eq!(EndpointValue::decode(&e.encode()), Some(e));
        assert_eq!(
            AffiliateValue::decode(&Bytes::from_static(b"\x02\0\0\0\0\0\0\0\0\0")),
            None
        );
        assert_eq!(AffiliateValue::decode(&Bytes::from_static(b"\x01")), None);
        assert_eq!(EndpointValue::decode(b"\x01\0"), None);
    }
}
