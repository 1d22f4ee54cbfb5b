//! The discovery service's wire messages (`sidero.discovery.server`, reference
//! §3), as prost types. Written out by hand: ten small messages, and no build
//! step for a plugin crate. The field numbers are the reference's.

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Affiliate {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub endpoints: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub cluster_id: String,
    #[prost(string, tag = "2")]
    pub client_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RedirectMessage {
    #[prost(string, tag = "1")]
    pub endpoint: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloResponse {
    #[prost(message, optional, tag = "1")]
    pub redirect: Option<RedirectMessage>,
    #[prost(bytes = "vec", tag = "2")]
    pub client_ip: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AffiliateUpdateRequest {
    #[prost(string, tag = "1")]
    pub cluster_id: String,
    #[prost(string, tag = "2")]
    pub affiliate_id: String,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub affiliate_data: Option<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub affiliate_endpoints: Vec<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub ttl: Option<Duration>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AffiliateDeleteRequest {
    #[prost(string, tag = "1")]
    pub cluster_id: String,
    #[prost(string, tag = "2")]
    pub affiliate_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    #[prost(string, tag = "1")]
    pub cluster_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    #[prost(message, repeated, tag = "1")]
    pub affiliates: Vec<Affiliate>,
    #[prost(bool, tag = "2")]
    pub deleted: bool,
}

/// The service's methods.
pub const HELLO: &str = "/sidero.discovery.server.Cluster/Hello";
pub const AFFILIATE_UPDATE: &str = "/sidero.discovery.server.Cluster/AffiliateUpdate";
pub const AFFILIATE_DELETE: &str = "/sidero.discovery.server.Cluster/AffiliateDelete";
pub const WATCH: &str = "/sidero.discovery.server.Cluster/Watch";

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn encodes_the_reference_fields() {
        let update = AffiliateUpdateRequest {
            cluster_id: "c".into(),
            affiliate_id: "a".into(),
            affiliate_data: Some(vec![1]),
            affiliate_endpoints: vec![vec![2]],
            ttl: Some(Duration {
                seconds: 1800,
                nanos: 0,
            }),
        };
        assert_eq!(
            update.encode_to_vec(),
            [
                0x0a, 1, b'c', 0x12, 1, b'a', 0x1a, 1, 1, 0x22, 1, 2, 0x2a, 3, 0x08, 0x88, 0x0e
            ]
        );
        let hello =
            HelloResponse::decode(&[0x0a, 3, 0x0a, 1, b'x', 0x12, 4, 1, 2, 3, 4][..]).unwrap();
        assert_eq!(hello.redirect.unwrap().endpoint, "x");
        assert_eq!(hello.client_ip, [1, 2, 3, 4]);
    }
}
