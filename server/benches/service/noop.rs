//! The baseline: a tonic server for the same generated `Cluster` service that does no
//! work. Every unary RPC returns an empty response at once. Watch sends one empty
//! message (the "snapshot") and then whatever AffiliateUpdate publishes on a single
//! `tokio::sync::broadcast` channel: AffiliateUpdate builds one `WatchResponse` with
//! the request's affiliate (only if someone watches) and sends it, which is the least
//! that delivers one message per watcher. No cluster IDs, no state, no validation,
//! no rate limiting, no metrics, no logging. Same tokio defaults as the real binary
//! (multi-thread runtime, one worker per core), TCP_NODELAY on accepted sockets.

use std::pin::Pin;

use discovery_service::proto::server::cluster_server::{Cluster, ClusterServer};
use discovery_service::proto::server::{
    Affiliate, AffiliateDeleteRequest, AffiliateDeleteResponse, AffiliateUpdateRequest,
    AffiliateUpdateResponse, HelloRequest, HelloResponse, ListRequest, ListResponse, WatchRequest,
    WatchResponse,
};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Argument that makes the bench binary run as the no-op server.
pub const FLAG: &str = "--noop-server";

struct Noop {
    tx: broadcast::Sender<WatchResponse>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for Noop {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        Ok(Response::new(HelloResponse::default()))
    }

    async fn affiliate_update(
        &self,
        req: Request<AffiliateUpdateRequest>,
    ) -> Result<Response<AffiliateUpdateResponse>, Status> {
        if self.tx.receiver_count() > 0 {
            let r = req.into_inner();
            let _ = self.tx.send(WatchResponse {
                affiliates: vec![Affiliate {
                    id: r.affiliate_id,
                    data: r.affiliate_data.unwrap_or_default(),
                    endpoints: r.affiliate_endpoints,
                }],
                deleted: false,
            });
        }
        Ok(Response::new(AffiliateUpdateResponse {}))
    }

    async fn affiliate_delete(
        &self,
        _: Request<AffiliateDeleteRequest>,
    ) -> Result<Response<AffiliateDeleteResponse>, Status> {
        Ok(Response::new(AffiliateDeleteResponse {}))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(ListResponse::default()))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let rx = self.tx.subscribe();
        let first = futures::stream::once(async { Ok(WatchResponse::default()) });
        let live = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(m) => return Some((Ok(m), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(first.chain(live).boxed()))
    }
}

/// Serves on an ephemeral loopback port until killed; announces the address with the
/// same JSON `listening` line as the real binary.
pub fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (tx, _) = broadcast::channel(64);
        println!(
            "{}",
            serde_json::json!({"message": "listening", "server": "grpc", "address": addr.to_string()})
        );
        tonic::transport::Server::builder()
            .add_service(ClusterServer::new(Noop { tx }))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
}
