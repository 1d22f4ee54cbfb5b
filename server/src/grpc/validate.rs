//! Request validation: limits, order and messages are part of the wire contract (§4.2).

use tonic::Status;

use crate::limits::{
    AFFILIATE_DATA_MAX, AFFILIATE_ENDPOINT_MAX, AFFILIATE_ID_MAX, CLUSTER_ID_MAX, TTL_MAX,
};
use crate::proto::server::AffiliateUpdateRequest;

/// The cluster ID rule, for requests and snapshot imports alike.
pub fn check_cluster_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("cluster ID can't be empty");
    }
    if id.len() > CLUSTER_ID_MAX {
        return Err("cluster ID is too long");
    }
    Ok(())
}

/// The affiliate ID rule, for requests and snapshot imports alike.
pub fn check_affiliate_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("affiliate ID can't be empty");
    }
    if id.len() > AFFILIATE_ID_MAX {
        return Err("affiliate ID is too long");
    }
    Ok(())
}

/// The affiliate data size rule.
pub fn check_data(data: &[u8]) -> Result<(), &'static str> {
    if data.len() > AFFILIATE_DATA_MAX {
        return Err("affiliate data is too big");
    }
    Ok(())
}

/// The endpoint size rule.
pub fn check_endpoint(endpoint: &[u8]) -> Result<(), &'static str> {
    if endpoint.len() > AFFILIATE_ENDPOINT_MAX {
        return Err("affiliate endpoint is too big");
    }
    Ok(())
}

pub fn cluster_id(id: &str) -> Result<(), Status> {
    check_cluster_id(id).map_err(Status::invalid_argument)
}

pub fn affiliate_id(id: &str) -> Result<(), Status> {
    check_affiliate_id(id).map_err(Status::invalid_argument)
}

/// A TTL as signed nanoseconds: negative and missing TTLs are accepted (Q24).
pub fn ttl_nanos(ttl: Option<&prost_types::Duration>) -> i128 {
    ttl.map(|d| i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos))
        .unwrap_or(0)
}

/// Validates an update in the reference's order: cluster ID, affiliate ID, data size,
/// each endpoint, TTL. Returns the TTL in signed nanoseconds.
pub fn update(req: &AffiliateUpdateRequest) -> Result<i128, Status> {
    cluster_id(&req.cluster_id)?;
    affiliate_id(&req.affiliate_id)?;
    if let Some(d) = &req.affiliate_data {
        check_data(d).map_err(Status::invalid_argument)?;
    }
    for e in &req.affiliate_endpoints {
        check_endpoint(e).map_err(Status::invalid_argument)?;
    }
    let ttl = ttl_nanos(req.ttl.as_ref());
    if ttl > TTL_MAX.as_nanos() as i128 {
        return Err(Status::invalid_argument("ttl is too large"));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn req() -> AffiliateUpdateRequest {
        AffiliateUpdateRequest {
            cluster_id: "c".into(),
            affiliate_id: "a".into(),
            affiliate_data: None,
            affiliate_endpoints: vec![],
            ttl: None,
        }
    }

    fn msg(r: &AffiliateUpdateRequest) -> String {
        update(r).unwrap_err().message().to_owned()
    }

    #[test]
    fn order_of_checks() {
        let mut r = req();
        r.cluster_id.clear();
        r.affiliate_id.clear();
        r.ttl = Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        });
        assert_eq!(msg(&r), "cluster ID can't be empty");
        r.cluster_id = "x".repeat(257);
        assert_eq!(msg(&r), "cluster ID is too long");
        r.cluster_id = "x".repeat(256);
        assert_eq!(msg(&r), "affiliate ID can't be empty");
        r.affiliate_id = "x".repeat(257);
        assert_eq!(msg(&r), "affiliate ID is too long");
        r.affiliate_id = "x".repeat(256);
        r.affiliate_data = Some(Bytes::from(vec![0; 2049]));
        r.affiliate_endpoints = vec![Bytes::from(vec![0; 33])];
        assert_eq!(msg(&r), "affiliate data is too big");
        r.affiliate_data = Some(Bytes::from(vec![0; 2048]));
        assert_eq!(msg(&r), "affiliate endpoint is too big");
        r.affiliate_endpoints = vec![Bytes::from(vec![0; 32])];
        assert_eq!(msg(&r), "ttl is too large");
        assert_eq!(update(&r).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn ttl_bounds() {
        let mut r = req();
        r.ttl = Some(prost_types::Duration {
            seconds: 1800,
            nanos: 0,
        });
        assert_eq!(update(&r).unwrap(), 1_800_000_000_000);
        r.ttl = Some(prost_types::Duration {
            seconds: 1800,
            nanos: 1,
        });
        assert!(update(&r).is_err());
        r.ttl = Some(prost_types::Duration {
            seconds: -5,
            nanos: 0,
        });
        assert_eq!(update(&r).unwrap(), -5_000_000_000);
        r.ttl = None;
        assert_eq!(update(&r).unwrap(), 0);
        r.ttl = Some(prost_types::Duration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        });
        assert!(update(&r).is_err());
    }

    #[test]
    fn ids_are_measured_in_bytes() {
        // 128 two-byte characters are 256 bytes: allowed; one more is not.
        assert!(cluster_id(&"é".repeat(128)).is_ok());
        assert!(cluster_id(&format!("{}x", "é".repeat(128))).is_err());
    }
}
