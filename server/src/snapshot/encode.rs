//! State → snapshot bytes. Pure: time is passed in, bytes go to any writer.

use std::io::{self, Write};
use std::time::Instant;

use prost::Message;

use super::Stats;
use crate::proto::storage::{AffiliateSnapshot, ClusterSnapshot, EndpointSnapshot};
use crate::state::{Affiliate, Cluster, State};

/// Tag of `StateSnapshot.clusters`: field 1, wire type 2 (length-delimited).
pub const CLUSTER_RECORD_TAG: u8 = 0x0a;

/// Remaining lifetime at `now`, truncated toward zero to whole seconds as upstream does;
/// negative for entries that expired but were not collected yet.
pub fn ttl(expiry: Instant, now: Instant) -> prost_types::Duration {
    let seconds = match expiry.checked_duration_since(now) {
        Some(d) => d.as_secs() as i64,
        None => -(now.duration_since(expiry).as_secs() as i64),
    };
    prost_types::Duration { seconds, nanos: 0 }
}

/// Copies one cluster under its lock; the bytes are shared, not copied.
pub fn cluster_snapshot(id: &str, cluster: &Cluster, now: Instant) -> ClusterSnapshot {
    let affiliates = cluster.with_affiliates(|all| {
        all.map(|(aid, a)| AffiliateSnapshot {
            id: aid.to_string(),
            expiration: None,
            data: a.data().clone(),
            endpoints: a
                .endpoints()
                .iter()
                .map(|e| EndpointSnapshot {
                    expiration: None,
                    data: e.blob.to_bytes(),
                    ttl: Some(ttl(e.expiry, now)),
                })
                .collect(),
            ttl: Some(ttl(a.expiry(), now)),
        })
        .collect()
    });
    ClusterSnapshot {
        id: id.to_owned(),
        affiliates,
    }
}

/// Appends one `clusters` record to `buf`.
pub fn write_record(buf: &mut Vec<u8>, cluster: &ClusterSnapshot) {
    buf.push(CLUSTER_RECORD_TAG);
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = cluster.encode_length_delimited(buf);
}

/// Direct protobuf encoding of the snapshot messages, written straight from the live
/// affiliates so a save allocates nothing per affiliate (no id copies, no refcount
/// traffic on the blobs). Produces exactly the bytes of `ClusterSnapshot::encode`.
mod wire {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

    pub fn duration_len(seconds: i64) -> usize {
        if seconds == 0 {
            0
        } else {
            key_len(1) + encoded_len_varint(seconds as u64)
        }
    }

    /// Length of a length-delimited field holding `len` bytes.
    pub fn field_len(tag: u32, len: usize) -> usize {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }

    /// Length of a bytes/string field, omitted when empty (proto3).
    pub fn bytes_len(tag: u32, len: usize) -> usize {
        if len == 0 { 0 } else { field_len(tag, len) }
    }

    pub fn put_header(tag: u32, len: usize, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    }

    pub fn put_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
        if !b.is_empty() {
            put_header(tag, b.len(), buf);
            buf.extend_from_slice(b);
        }
    }

    /// A `google.protobuf.Duration` field of whole seconds (always present).
    pub fn put_duration(tag: u32, seconds: i64, buf: &mut Vec<u8>) {
        put_header(tag, duration_len(seconds), buf);
        if seconds != 0 {
            encode_key(1, WireType::Varint, buf);
            encode_varint(seconds as u64, buf);
        }
    }
}

fn endpoint_len(blob: &[u8], ttl_seconds: i64) -> usize {
    wire::bytes_len(2, blob.len()) + wire::field_len(3, wire::duration_len(ttl_seconds))
}

fn affiliate_len(id: &str, a: &Affiliate, now: Instant) -> usize {
    let mut len = wire::bytes_len(1, id.len()) + wire::bytes_len(3, a.data().len());
    for e in a.endpoints() {
        len += wire::field_len(4, endpoint_len(&e.blob, ttl(e.expiry, now).seconds));
    }
    len + wire::field_len(5, wire::duration_len(ttl(a.expiry(), now).seconds))
}

/// Appends one `clusters` record for a live cluster, encoding under its lock.
/// Returns (affiliates, endpoints) written.
pub fn write_cluster(
    buf: &mut Vec<u8>,
    id: &str,
    cluster: &Cluster,
    now: Instant,
) -> (usize, usize) {
    let (mut affiliates, mut endpoints) = (0, 0);
    cluster.with_affiliates(|all| {
        // The record's length comes first, so one pass sizes every affiliate and the
        // second writes them, reusing those sizes: each affiliate's endpoints (a separate
        // allocation, a cache miss apiece at 100k affiliates) are visited twice, not three
        // times.
        let sizes: Vec<usize> = all
            .clone()
            .map(|(aid, a)| affiliate_len(aid, a, now))
            .collect();
        let body = wire::bytes_len(1, id.len())
            + sizes.iter().map(|&n| wire::field_len(2, n)).sum::<usize>();
        buf.reserve(1 + prost::encoding::encoded_len_varint(body as u64) + body);
        buf.push(CLUSTER_RECORD_TAG);
        prost::encoding::encode_varint(body as u64, buf);
        wire::put_bytes(1, id.as_bytes(), buf);
        for ((aid, a), size) in all.zip(sizes) {
            affiliates += 1;
            wire::put_header(2, size, buf);
            wire::put_bytes(1, aid.as_bytes(), buf);
            wire::put_bytes(3, a.data(), buf);
            for e in a.endpoints() {
                endpoints += 1;
                let seconds = ttl(e.expiry, now).seconds;
                wire::put_header(4, endpoint_len(&e.blob, seconds), buf);
                wire::put_bytes(2, &e.blob, buf);
                wire::put_duration(3, seconds, buf);
            }
            wire::put_duration(5, ttl(a.expiry(), now).seconds, buf);
        }
    });
    (affiliates, endpoints)
}

/// Encoded records are gathered into chunks of about this size: few system calls even
/// for many tiny clusters, and each byte is copied once, from the chunk into the file.
pub const WRITE_CHUNK: usize = 1 << 20;

/// Encodes every cluster of `state`, locking one cluster at a time, into chunks of about
/// [`WRITE_CHUNK`] bytes. `emit` receives each full chunk and must leave the buffer empty
/// (clear it, or swap in another one). An empty state emits nothing, which is a valid
/// empty snapshot.
pub fn export_chunks(
    state: &State,
    now: Instant,
    mut emit: impl FnMut(&mut Vec<u8>) -> io::Result<()>,
) -> io::Result<Stats> {
    let mut stats = Stats::default();
    let mut buf = Vec::with_capacity(WRITE_CHUNK);
    for (id, cluster) in state.clusters() {
        let before = buf.len();
        let (affiliates, endpoints) = write_cluster(&mut buf, &id, &cluster, now);
        stats.clusters += 1;
        stats.affiliates += affiliates;
        stats.endpoints += endpoints;
        stats.size_bytes += (buf.len() - before) as u64;
        if buf.len() >= WRITE_CHUNK {
            emit(&mut buf)?;
        }
    }
    if !buf.is_empty() {
        emit(&mut buf)?;
    }
    Ok(stats)
}

/// [`export_chunks`] into a writer.
pub fn export(state: &State, now: Instant, out: &mut impl Write) -> io::Result<Stats> {
    export_chunks(state, now, |buf| {
        out.write_all(buf)?;
        buf.clear();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ttl_truncates_toward_zero() {
        let now = Instant::now();
        assert_eq!(ttl(now + Duration::from_millis(1999), now).seconds, 1);
        assert_eq!(ttl(now, now).seconds, 0);
        let later = now + Duration::from_millis(2500);
        assert_eq!(ttl(now, later).seconds, -2);
    }

    #[test]
    fn direct_encoding_matches_prost() {
        use bytes::Bytes;

        use crate::state::Update;
        let state = State::new();
        let now = Instant::now();
        let eps = [Bytes::from_static(b"e1"), Bytes::from_static(b"e2")];
        let cases: [(&str, &[u8], &[Bytes], Duration); 4] = [
            ("full", b"data", &eps, Duration::from_secs(1800)),
            ("no-data", b"", &eps[..1], Duration::from_secs(90)),
            ("zero-ttl", b"d", &[], Duration::ZERO),
            ("long", &[7u8; 2048], &[], Duration::from_millis(1500)),
        ];
        for (id, data, endpoints, ttl) in cases {
            let u = Update {
                affiliate_id: id,
                data,
                endpoints,
            };
            state.update("c", &u, now + ttl).unwrap();
        }
        // An expired, not yet collected entry has a negative TTL.
        let late = now + Duration::from_secs(5);
        let (_, cluster) = state.clusters().pop().unwrap();
        let mut direct = Vec::new();
        let (affiliates, endpoints) = write_cluster(&mut direct, "c", &cluster, late);
        let mut reference = Vec::new();
        write_record(&mut reference, &cluster_snapshot("c", &cluster, late));
        assert_eq!((affiliates, endpoints), (4, 3));
        // Map order is the same for both walks of the same, unchanged map.
        assert_eq!(direct, reference);
    }

    #[test]
    fn empty_state_is_a_zero_byte_snapshot() {
        let mut out = Vec::new();
        let stats = export(&State::new(), Instant::now(), &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(stats, Stats::default());
    }
}
