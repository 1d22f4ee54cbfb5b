//! State → snapshot bytes. Pure: time is passed in, bytes go to any writer.

use std::io::{self, Write};
use std::time::Instant;

use prost::Message;

use super::Stats;
use crate::proto::storage::{AffiliateSnapshot, ClusterSnapshot, EndpointSnapshot};
use crate::state::{Cluster, State};

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
    let mut affiliates = Vec::new();
    cluster.for_each(|aid, a| {
        affiliates.push(AffiliateSnapshot {
            id: aid.to_owned(),
            expiration: None,
            data: a.data().clone(),
            endpoints: a
                .endpoints()
                .iter()
                .map(|e| EndpointSnapshot {
                    expiration: None,
                    data: e.blob.clone(),
                    ttl: Some(ttl(e.expiry, now)),
                })
                .collect(),
            ttl: Some(ttl(a.expiry(), now)),
        });
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

/// Writes every cluster of `state` to `out`, locking one cluster at a time and reusing
/// one buffer. An empty state writes nothing, which is a valid empty snapshot.
pub fn export(state: &State, now: Instant, out: &mut impl Write) -> io::Result<Stats> {
    let mut stats = Stats::default();
    let mut buf = Vec::new();
    for (id, cluster) in state.clusters() {
        let snap = cluster_snapshot(&id, &cluster, now);
        stats.clusters += 1;
        stats.affiliates += snap.affiliates.len();
        stats.endpoints += snap
            .affiliates
            .iter()
            .map(|a| a.endpoints.len())
            .sum::<usize>();
        buf.clear();
        write_record(&mut buf, &snap);
        out.write_all(&buf)?;
        stats.size_bytes += buf.len() as u64;
    }
    Ok(stats)
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
    fn empty_state_is_a_zero_byte_snapshot() {
        let mut out = Vec::new();
        let stats = export(&State::new(), Instant::now(), &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(stats, Stats::default());
    }
}
