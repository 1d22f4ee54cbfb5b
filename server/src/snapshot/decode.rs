//! Snapshot bytes → state, one record at a time (reference §4.11).
//!
//! Each cluster is inserted as soon as it is decoded, so a corrupt or truncated file
//! still restores everything before the damage (Q4). Nothing here trusts the input: a
//! length is checked against [`MAX_CLUSTER_SNAPSHOT_SIZE`] before reading, and buffers
//! grow only as bytes actually arrive.

use std::io::{self, Read};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prost::Message;

use super::{Dropped, Stats};
use crate::grpc::validate;
use crate::limits::{MAX_CLUSTER_SNAPSHOT_SIZE, TTL_MAX};
use crate::proto::storage::{AffiliateSnapshot, ClusterSnapshot, EndpointSnapshot};
use crate::state::affiliate::Blob;
use crate::state::{Affiliate, DuplicateCluster, Endpoint, State};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unexpected number {0}")]
    UnexpectedNumber(u64),
    #[error("unexpected type {0}")]
    UnexpectedType(u64),
    #[error("varint overflow")]
    VarintOverflow,
    #[error("cluster snapshot is too large: {0} bytes")]
    ClusterSnapshotTooLarge(u64),
    #[error("failed to read bytes: {0}")]
    Truncated(io::Error),
    #[error("failed to decode cluster snapshot: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(transparent)]
    Duplicate(#[from] DuplicateCluster),
    #[error("failed to read snapshot: {0}")]
    Io(io::Error),
}

/// Reads one varint and says how many bytes it took; `Ok(None)` on a clean EOF before
/// its first byte.
fn read_varint(r: &mut impl Read) -> Result<Option<(u64, u64)>, DecodeError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let mut byte = [0u8; 1];
        match r.read_exact(&mut byte) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && i == 0 => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(DecodeError::Truncated(e));
            }
            Err(e) => return Err(DecodeError::Io(e)),
        }
        let b = byte[0];
        // The tenth byte may only carry the top bit of a u64.
        if i == 9 && b > 1 {
            return Err(DecodeError::VarintOverflow);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::VarintOverflow)
}

/// Reads the next `ClusterSnapshot` record into `buf` and returns the size of the whole
/// record in the file (tag, length and body); `Ok(None)` at a clean end.
pub fn read_record(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<u64>, DecodeError> {
    let Some((tag, tag_bytes)) = read_varint(r)? else {
        return Ok(None);
    };
    if tag >> 3 != 1 {
        return Err(DecodeError::UnexpectedNumber(tag >> 3));
    }
    if tag & 7 != 2 {
        return Err(DecodeError::UnexpectedType(tag & 7));
    }
    let (len, len_bytes) = read_varint(r)?
        .ok_or_else(|| DecodeError::Truncated(io::ErrorKind::UnexpectedEof.into()))?;
    if len > MAX_CLUSTER_SNAPSHOT_SIZE {
        return Err(DecodeError::ClusterSnapshotTooLarge(len));
    }
    buf.clear();
    r.take(len).read_to_end(buf).map_err(DecodeError::Io)?;
    if (buf.len() as u64) < len {
        return Err(DecodeError::Truncated(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(Some(tag_bytes + len_bytes + len))
}

/// Remaining lifetime of an entry: its relative `ttl`, else the legacy absolute
/// `expiration` against the wall clock. `None` when expired: such entries would only
/// go at the first GC, so they are skipped (Q4). Capped at the TTL limit so a garbage
/// value can neither overflow the clock nor pin an entry forever.
fn remaining(
    ttl: Option<&prost_types::Duration>,
    expiration: Option<&prost_types::Timestamp>,
    wall: SystemTime,
) -> Option<Duration> {
    let ns = match expiration {
        Some(exp) if ttl.is_none() => {
            let wall_ns = match wall.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i128,
                Err(e) => -(e.duration().as_nanos() as i128),
            };
            i128::from(exp.seconds) * 1_000_000_000 + i128::from(exp.nanos) - wall_ns
        }
        // A missing TTL counts as zero, as in a request.
        _ => validate::ttl_nanos(ttl),
    };
    if ns <= 0 {
        return None;
    }
    let capped = ns.min(TTL_MAX.as_nanos() as i128);
    Some(Duration::from_nanos(capped as u64))
}

/// A stored endpoint; `None` if expired. An endpoint longer than any request could
/// have stored is counted as dropped.
fn endpoint(
    e: &EndpointSnapshot,
    now: Instant,
    wall: SystemTime,
    dropped: &mut Dropped,
) -> Option<Endpoint> {
    if validate::check_endpoint(&e.data).is_err() {
        dropped.invalid_endpoints += 1;
        return None;
    }
    let left = remaining(e.ttl.as_ref(), e.expiration.as_ref(), wall)?;
    Some(Endpoint {
        blob: Blob::new(&e.data)?,
        expiry: now + left,
        ordinal: 0,
    })
}

/// Converts a decoded affiliate under the update rules: `None` if it had already
/// expired, or if no request could have stored it (then counted in `dropped`, as are
/// the endpoints left out).
pub fn affiliate(
    a: &AffiliateSnapshot,
    now: Instant,
    wall: SystemTime,
    dropped: &mut Dropped,
) -> Option<Affiliate> {
    if validate::check_affiliate_id(&a.id).is_err() || validate::check_data(&a.data).is_err() {
        dropped.invalid_affiliates += 1;
        return None;
    }
    let left = remaining(a.ttl.as_ref(), a.expiration.as_ref(), wall)?;
    let endpoints: Vec<Endpoint> = a
        .endpoints
        .iter()
        .filter_map(|e| endpoint(e, now, wall, dropped))
        .collect();
    let (restored, lost) =
        Affiliate::restored(now + left, Bytes::copy_from_slice(&a.data), endpoints);
    dropped.duplicate_endpoints += lost.duplicates;
    dropped.endpoints_over_limit += lost.over_limit;
    Some(restored)
}

/// Loads records from `r` into `state` until the end or the first error. On error the
/// clusters already inserted stay, and the returned stats (in the error's company)
/// say how many. Entries that break the rules every update obeys are skipped and
/// counted in [`Stats::dropped`].
pub fn import(
    state: &State,
    r: &mut impl Read,
    now: Instant,
    wall: SystemTime,
) -> (Stats, Result<(), DecodeError>) {
    let mut stats = Stats::default();
    let mut buf = Vec::new();
    let result = (|| {
        while let Some(record_size) = read_record(r, &mut buf)? {
            // Whole records, as a save counts them: the load size is the file size.
            stats.size_bytes += record_size;
            // Decoded from `Bytes`, the blobs are slices of the record rather than
            // copies, so each is copied once, by `affiliate`, into its own allocation. The
            // next record is read into a fresh buffer of the same capacity.
            let capacity = buf.capacity();
            let record = Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(capacity)));
            let ClusterSnapshot { id, affiliates } = ClusterSnapshot::decode(record)?;
            if validate::check_cluster_id(&id).is_err() {
                stats.dropped.invalid_clusters += 1;
                continue;
            }
            let dropped = &mut stats.dropped;
            let affiliates: Vec<(String, Affiliate)> = affiliates
                .into_iter()
                .filter_map(|a| affiliate(&a, now, wall, dropped).map(|x| (a.id, x)))
                .collect();
            let imported = state.import_cluster(&id, affiliates)?;
            stats.clusters += 1;
            stats.affiliates += imported.affiliates;
            stats.endpoints += imported.endpoints;
            stats.dropped.affiliates_over_limit += imported.over_limit;
        }
        Ok(())
    })();
    (stats, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::encode::write_record;

    fn record(id: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        let c = ClusterSnapshot {
            id: id.into(),
            affiliates: vec![AffiliateSnapshot {
                id: "af".into(),
                expiration: None,
                data: Bytes::from_static(b"d"),
                endpoints: vec![],
                ttl: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            }],
        };
        write_record(&mut buf, &c);
        buf
    }

    fn load(bytes: &[u8]) -> (State, Stats, Result<(), DecodeError>) {
        let s = State::new();
        let (stats, r) = import(&s, &mut &bytes[..], Instant::now(), SystemTime::now());
        (s, stats, r)
    }

    #[test]
    fn empty_input_is_an_empty_state() {
        let (s, stats, r) = load(&[]);
        r.unwrap();
        assert_eq!((s.cluster_count(), stats.clusters), (0, 0));
    }

    #[test]
    fn wrong_field_number_and_wire_type() {
        let (_, _, r) = load(&[0x12, 0x00]);
        assert_eq!(r.unwrap_err().to_string(), "unexpected number 2");
        let (_, _, r) = load(&[0x08, 0x00]);
        assert_eq!(r.unwrap_err().to_string(), "unexpected type 0");
    }

    #[test]
    fn varint_overflow_and_oversized_length() {
        let (_, _, r) = load(&[
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ]);
        assert!(matches!(r, Err(DecodeError::VarintOverflow)));
        let mut too_big = vec![0x0a];
        let mut n = MAX_CLUSTER_SNAPSHOT_SIZE + 1;
        while n >= 0x80 {
            too_big.push((n as u8) | 0x80);
            n >>= 7;
        }
        too_big.push(n as u8);
        let (_, _, r) = load(&too_big);
        assert!(matches!(r, Err(DecodeError::ClusterSnapshotTooLarge(_))));
    }

    #[test]
    fn truncation_keeps_clusters_before_it() {
        let mut bytes = record("c1");
        let second = record("c2");
        bytes.extend_from_slice(&second[..second.len() - 1]);
        let (s, stats, r) = load(&bytes);
        assert!(
            r.unwrap_err()
                .to_string()
                .starts_with("failed to read bytes")
        );
        assert_eq!(stats.clusters, 1);
        assert_eq!(s.list("c1").len(), 1);
        assert!(s.cluster("c2").is_none());
    }

    #[test]
    fn load_size_counts_whole_records() {
        let mut bytes = record("c1");
        bytes.extend(record("c2"));
        // A tag and a length spelled with redundant varint bytes still count as read.
        let body = &record("c3")[2..];
        bytes.extend_from_slice(&[0x8a, 0x00, 0x80 | body.len() as u8, 0x00]);
        bytes.extend_from_slice(body);
        let (s, stats, r) = load(&bytes);
        r.unwrap();
        assert_eq!(s.cluster_count(), 3);
        assert_eq!(stats.size_bytes, bytes.len() as u64);
    }

    #[test]
    fn duplicate_cluster_is_an_error_after_the_first_loaded() {
        let mut bytes = record("c1");
        bytes.extend(record("c1"));
        let (s, _, r) = load(&bytes);
        assert_eq!(r.unwrap_err().to_string(), "cluster \"c1\" already exists");
        assert_eq!(s.list("c1").len(), 1);
    }

    #[test]
    fn expired_and_garbage_ttls() {
        let wall = SystemTime::now();
        let neg = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(remaining(Some(&neg), None, wall), None);
        assert_eq!(remaining(None, None, wall), None);
        let huge = prost_types::Duration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert_eq!(remaining(Some(&huge), None, wall), Some(TTL_MAX));
        let ts = prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: i32::MIN,
        };
        assert_eq!(remaining(None, Some(&ts), wall), None);
    }
}
