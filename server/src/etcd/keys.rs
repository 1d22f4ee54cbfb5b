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
//! endpoint's key is its bytes (byte-exact dedup by key). Affiliate and endpoint keys
//! carry a lease for their expiry; the expiry is also in the value, because the update
//! rules compare expiries (an endpoint's is raised, never lowered) and leases are per
//! bucket. The guard and the sentinel have none: the guard lives while its cluster has
//! affiliates (see `writer::EtcdState::retire_guards`).

use bytes::{BufMut, Bytes};

use crate::limits::{AFFILIATE_ENDPOINT_MAX, AFFILIATE_ID_MAX, CLUSTER_ID_MAX};
use crate::state::Blob;

/// What a key under the prefix names, borrowing its ids from the key. An endpoint's
/// blob is decoded straight into its inline form: a blob no request could carry is not
/// a key this layout writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'k> {
    Guard {
        cluster: HexId<'k>,
    },
    Affiliate {
        cluster: HexId<'k>,
        affiliate: HexId<'k>,
    },
    Endpoint {
        cluster: HexId<'k>,
        affiliate: HexId<'k>,
        blob: Blob,
    },
}

impl<'k> Key<'k> {
    pub fn cluster(&self) -> HexId<'k> {
        match self {
            Key::Guard { cluster }
            | Key::Affiliate { cluster, .. }
            | Key::Endpoint { cluster, .. } => *cluster,
        }
    }

    /// The affiliate the key belongs to (none for a cluster's guard).
    pub fn affiliate(&self) -> Option<HexId<'k>> {
        match self {
            Key::Guard { .. } => None,
            Key::Affiliate { affiliate, .. } | Key::Endpoint { affiliate, .. } => Some(*affiliate),
        }
    }
}

/// An id as a key spells it: the lowercase hex of its UTF-8 bytes, 1 to [`ID_MAX`]
/// of them, as the RPCs accept (checked by [`Layout::parse`]). One id has one
/// spelling, so ids compare equal exactly when their spellings do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HexId<'k>(&'k [u8]);

impl<'k> HexId<'k> {
    fn checked(hex: &'k [u8]) -> Option<Self> {
        let mut buf = [0; ID_MAX];
        let bytes = buf.get_mut(..hex.len() / 2)?;
        (!hex.is_empty()
            && lowercase_hex(hex)
            && hex::decode_to_slice(hex, bytes).is_ok()
            && std::str::from_utf8(bytes).is_ok())
        .then_some(Self(hex))
    }

    /// The id, in one allocation of its exact size.
    pub fn decode(&self) -> String {
        let mut s = String::with_capacity(self.0.len() / 2);
        self.decode_into(&mut s);
        s
    }

    /// The id, decoded into `buf` (whose allocation is reused).
    pub fn decode_into<'b>(&self, buf: &'b mut String) -> &'b str {
        buf.clear();
        self.push_to(buf);
        buf.as_str()
    }

    /// Appends the id to `out`.
    pub fn push_to(&self, out: &mut String) {
        debug_assert!(
            self.0.len() / 2 <= ID_MAX,
            "a HexId is only made by `checked`"
        );
        let mut buf = [0; ID_MAX];
        let Some(bytes) = buf.get_mut(..self.0.len() / 2) else {
            return;
        };
        // Checked when parsed: valid hex of valid UTF-8, at most `ID_MAX` bytes.
        if hex::decode_to_slice(self.0, bytes).is_err() {
            return;
        }
        out.push_str(std::str::from_utf8(bytes).unwrap_or_default());
    }
}

/// The longest id a key may carry: what the RPCs accept.
const ID_MAX: usize = if CLUSTER_ID_MAX > AFFILIATE_ID_MAX {
    CLUSTER_ID_MAX
} else {
    AFFILIATE_ID_MAX
};

/// How this layout spells bytes: lowercase only, so that each value has one key.
fn lowercase_hex(s: &[u8]) -> bool {
    s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Key builder and parser for one prefix. A key is built in one allocation of its
/// exact size, or into the caller's buffer (`put_*`, with `*_len` to size it: a
/// transaction's keys share one buffer), and parsing allocates nothing: the mirror
/// parses every key of every change, and short-lived scraps between the copies it
/// keeps would stay resident as heap fragments.
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

    /// `P c/<cluster>/`.
    fn put_cluster(&self, k: &mut impl BufMut, cluster: &str) {
        k.put_slice(&self.prefix);
        k.put_slice(b"c/");
        put_hex(k, cluster.as_bytes());
        k.put_u8(b'/');
    }

    fn cluster_len(&self, cluster: &str) -> usize {
        self.prefix.len() + 3 + 2 * cluster.len()
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
        exact(self.guard_len(cluster), |k| self.put_guard(k, cluster))
    }

    pub fn guard_len(&self, cluster: &str) -> usize {
        self.cluster_len(cluster) + 1
    }

    pub fn put_guard(&self, k: &mut impl BufMut, cluster: &str) {
        self.put_cluster(k, cluster);
        k.put_u8(b'g');
    }

    pub fn affiliate(&self, cluster: &str, affiliate: &str) -> Vec<u8> {
        exact(self.affiliate_len(cluster, affiliate), |k| {
            self.put_affiliate(k, cluster, affiliate)
        })
    }

    pub fn affiliate_len(&self, cluster: &str, affiliate: &str) -> usize {
        self.cluster_len(cluster) + 2 + 2 * affiliate.len()
    }

    pub fn put_affiliate(&self, k: &mut impl BufMut, cluster: &str, affiliate: &str) {
        self.put_cluster(k, cluster);
        k.put_slice(b"a/");
        put_hex(k, affiliate.as_bytes());
    }

    /// The range of a cluster's affiliate keys.
    pub fn affiliates(&self, cluster: &str) -> (Vec<u8>, Vec<u8>) {
        let k = exact(self.cluster_len(cluster) + 2, |k| {
            self.put_cluster(k, cluster);
            k.put_slice(b"a/");
        });
        let end = range_end(&k);
        (k, end)
    }

    /// `P c/<cluster>/e/<affiliate>/`.
    fn put_endpoints_prefix(&self, k: &mut impl BufMut, cluster: &str, affiliate: &str) {
        self.put_cluster(k, cluster);
        k.put_slice(b"e/");
        put_hex(k, affiliate.as_bytes());
        k.put_u8(b'/');
    }

    /// The range of an affiliate's endpoint keys.
    pub fn endpoints(&self, cluster: &str, affiliate: &str) -> (Vec<u8>, Vec<u8>) {
        let k = exact(self.endpoint_len(cluster, affiliate, &[]), |k| {
            self.put_endpoints_prefix(k, cluster, affiliate)
        });
        let end = range_end(&k);
        (k, end)
    }

    pub fn endpoint(&self, cluster: &str, affiliate: &str, blob: &[u8]) -> Vec<u8> {
        exact(self.endpoint_len(cluster, affiliate, blob), |k| {
            self.put_endpoint(k, cluster, affiliate, blob)
        })
    }

    pub fn endpoint_len(&self, cluster: &str, affiliate: &str, blob: &[u8]) -> usize {
        self.cluster_len(cluster) + 3 + 2 * affiliate.len() + 2 * blob.len()
    }

    pub fn put_endpoint(&self, k: &mut impl BufMut, cluster: &str, affiliate: &str, blob: &[u8]) {
        self.put_endpoints_prefix(k, cluster, affiliate);
        put_hex(k, blob);
    }

    /// Names a key read back from etcd; `None` for anything this layout never writes
    /// (another program's keys under the same prefix are ignored, not trusted).
    /// Allocates nothing.
    pub fn parse<'k>(&self, key: &'k [u8]) -> Option<Key<'k>> {
        let rest = key
            .strip_prefix(self.prefix.as_slice())?
            .strip_prefix(b"c/")?;
        let mut parts = rest.split(|&b| b == b'/');
        let cluster = HexId::checked(parts.next()?)?;
        let key = match (parts.next()?, parts.next(), parts.next(), parts.next()) {
            (b"g", None, None, None) => Key::Guard { cluster },
            (b"a", Some(a), None, None) => Key::Affiliate {
                cluster,
                affiliate: HexId::checked(a)?,
            },
            (b"e", Some(a), Some(b), None) if lowercase_hex(b) => {
                let mut blob = [0; AFFILIATE_ENDPOINT_MAX];
                let blob = blob.get_mut(..b.len() / 2)?;
                hex::decode_to_slice(b, blob).ok()?;
                Key::Endpoint {
                    cluster,
                    affiliate: HexId::checked(a)?,
                    blob: Blob::new(blob)?,
                }
            }
            _ => return None,
        };
        Some(key)
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn put_hex(k: &mut impl BufMut, bytes: &[u8]) {
    for b in bytes {
        k.put_u8(HEX_DIGITS[usize::from(b >> 4)]);
        k.put_u8(HEX_DIGITS[usize::from(b & 0xf)]);
    }
}

/// A key built in one allocation of its exact size.
fn exact(len: usize, build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut k = Vec::with_capacity(len);
    build(&mut k);
    debug_assert_eq!(k.len(), len);
    k
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
        exact(Self::len(&self.data), |b| {
            Self::put(b, self.data_set, self.expiry_ms, &self.data)
        })
    }

    pub fn len(data: &[u8]) -> usize {
        10 + data.len()
    }

    /// The value's bytes, from borrowed data.
    pub fn put(b: &mut impl BufMut, data_set: bool, expiry_ms: i64, data: &[u8]) {
        b.put_u8(VERSION);
        b.put_u8(if data_set { DATA_SET } else { 0 });
        b.put_i64(expiry_ms);
        b.put_slice(data);
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
    pub const LEN: usize = 11;

    pub fn encode(&self) -> Vec<u8> {
        exact(Self::LEN, |b| self.put(b))
    }

    pub fn put(&self, b: &mut impl BufMut) {
        b.put_u8(VERSION);
        b.put_u16(self.ordinal);
        b.put_i64(self.expiry_ms);
    }

    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != Self::LEN || v[0] != VERSION {
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

    /// A parsed key with its ids decoded: (kind, cluster, affiliate, blob).
    fn named(l: &Layout, key: &[u8]) -> Option<(char, String, String, Vec<u8>)> {
        Some(match l.parse(key)? {
            Key::Guard { cluster } => ('g', cluster.decode(), String::new(), Vec::new()),
            Key::Affiliate { cluster, affiliate } => {
                ('a', cluster.decode(), affiliate.decode(), Vec::new())
            }
            Key::Endpoint {
                cluster,
                affiliate,
                blob,
            } => ('e', cluster.decode(), affiliate.decode(), blob.to_vec()),
        })
    }

    #[test]
    fn keys_round_trip_for_any_id_and_blob() {
        let l = Layout::new("/discovery/");
        let odd = "a/b\u{0}c é";
        assert_eq!(
            named(&l, &l.guard(odd)),
            Some(('g', odd.into(), String::new(), vec![]))
        );
        assert_eq!(
            named(&l, &l.affiliate(odd, "x/y")),
            Some(('a', odd.into(), "x/y".into(), vec![]))
        );
        assert_eq!(
            named(&l, &l.endpoint("c", "a", &[0, 255, 47])),
            Some(('e', "c".into(), "a".into(), vec![0, 255, 47]))
        );
        let longest = "é".repeat(ID_MAX / 2);
        assert_eq!(
            named(&l, &l.affiliate(&longest, &longest)),
            Some(('a', longest.clone(), longest, vec![]))
        );
    }

    #[test]
    fn an_id_decodes_into_a_reused_buffer() {
        let l = Layout::new("p/");
        let key = l.affiliate("cluster", "node-1");
        let Some(Key::Affiliate { cluster, affiliate }) = l.parse(&key) else {
            panic!("not an affiliate key");
        };
        let mut buf = String::with_capacity(64);
        assert_eq!(cluster.decode_into(&mut buf), "cluster");
        assert_eq!(affiliate.decode_into(&mut buf), "node-1");
        assert_eq!(buf.capacity(), 64);
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
            b"p/c/6A/g", // not how we spell it
            b"p/c/6/g",  // odd
            b"p/c//g",   // an empty id: the RPCs refuse them
            b"p/c/63/a/",
            b"p/c/63/e/61/AB",
            b"p/",
            b"p/c/-",
        ] {
            assert_eq!(l.parse(k), None, "{}", String::from_utf8_lossy(k));
        }
        let long = format!("p/c/{}/g", "61".repeat(ID_MAX + 1));
        assert_eq!(
            l.parse(long.as_bytes()),
            None,
            "an id longer than any RPC accepts"
        );
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
