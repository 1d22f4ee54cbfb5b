//! Shared helpers: an in-process server on loopback ephemeral ports and a real tonic
//! client. Every wait is bounded.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use discovery_service::proto::server::cluster_client::ClusterClient;
use discovery_service::proto::server::{
    Affiliate, AffiliateUpdateRequest, HelloRequest, ListRequest, WatchRequest, WatchResponse,
};
use discovery_service::{Config, Server};

pub mod etcd;
pub mod ports;
pub mod slow_proxy;
use tonic::transport::Channel;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Asserts that a call failed with this code and message.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    message: &str,
) {
    let status = result.expect_err("the call must fail");
    assert_eq!((status.code(), status.message()), (code, message));
}

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `cond` until it holds, bounded.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Test config: loopback, ephemeral ports, no snapshots, no practical rate limit.
pub fn config() -> Config {
    let mut c = Config::for_tests();
    c.rate_limit_per_second = 1e9;
    c.rate_limit_burst = 1_000_000;
    c
}

/// Starts a server, bounded; the error is the start's own.
pub async fn try_start(config: Config) -> anyhow::Result<Server> {
    within("server start", Server::start(config)).await
}

pub async fn start(config: Config) -> Server {
    try_start(config).await.expect("server starts")
}

pub async fn client_at(addr: SocketAddr) -> ClusterClient<Channel> {
    let url = match addr {
        SocketAddr::V4(a) => format!("http://{a}"),
        SocketAddr::V6(a) => format!("http://{a}"),
    };
    let channel = within("connect", Channel::from_shared(url).unwrap().connect())
        .await
        .expect("connects");
    ClusterClient::new(channel)
}

pub async fn client(server: &Server) -> ClusterClient<Channel> {
    client_at(server.grpc_addr).await
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn update(
    cluster: &str,
    id: &str,
    data: &str,
    endpoints: &[&str],
    ttl_secs: i64,
) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: cluster.into(),
        affiliate_id: id.into(),
        affiliate_data: if data.is_empty() { None } else { Some(b(data)) },
        affiliate_endpoints: endpoints.iter().map(|e| b(e)).collect(),
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
    }
}

pub fn hello(cluster: &str, version: &str) -> HelloRequest {
    HelloRequest {
        cluster_id: cluster.into(),
        client_version: version.into(),
    }
}

pub fn list_req(cluster: &str) -> ListRequest {
    ListRequest {
        cluster_id: cluster.into(),
    }
}

pub fn watch_req(cluster: &str) -> WatchRequest {
    WatchRequest {
        cluster_id: cluster.into(),
    }
}

/// The affiliates a List of `cluster` returns; panics if the call fails.
pub async fn list(c: &mut ClusterClient<Channel>, cluster: &str) -> Vec<Affiliate> {
    c.list(list_req(cluster))
        .await
        .unwrap()
        .into_inner()
        .affiliates
}

/// The upstream snapshot format, encoded by hand: `StateSnapshot{clusters:[{id:"c1",
/// affiliates:[{id:"a1", data:"d", endpoints:[{data:"e", ttl:60s}], ttl:120s}]}]}`.
pub fn upstream_snapshot() -> Vec<u8> {
    hex::decode("0a1a0a02633112140a0261311a016422071201651a02083c2a020878").unwrap()
}

/// Next message of a watch stream, bounded.
pub async fn next(
    stream: &mut tonic::Streaming<WatchResponse>,
) -> Result<Option<WatchResponse>, tonic::Status> {
    within("watch message", stream.message()).await
}

/// Fetches a page over plain HTTP/1.1 on loopback: (status, content type, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let (status, headers, body) = http_get_headers(addr, path).await;
    let ct = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, body)
}

/// Like [`http_get`], with every response header.
pub async fn http_get_headers(addr: SocketAddr, path: &str) -> (u16, http::HeaderMap, String) {
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    let tcp = within("http connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = within("http response", sender.send_request(req))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within("http body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}
