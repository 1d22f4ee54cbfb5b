//! HTTP side: accept loops, request routing, site pages and metrics.
//!
//! The main listener routes by content type like upstream: `application/grpc` goes to
//! the gRPC service, everything else to the site pages.

pub mod keepalive;
pub mod landing;
pub mod metrics;
pub mod serve;

use std::sync::Arc;

use futures::FutureExt;
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::grpc::ClusterService;
use crate::proto::server::cluster_server::ClusterServer;
use landing::Landing;
use serve::Handler;

fn is_grpc(req: &http::Request<Incoming>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// gRPC plus site pages, for the main listener.
pub fn main_handler(grpc: ClusterServer<ClusterService>, landing: Arc<Landing>) -> Handler {
    let pages = landing_handler(landing);
    Arc::new(move |req| {
        if is_grpc(&req) {
            let grpc = grpc.clone();
            async move {
                match grpc.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
            .boxed()
        } else {
            pages(req)
        }
    })
}

/// Site pages only, for the landing listener.
pub fn landing_handler(landing: Arc<Landing>) -> Handler {
    Arc::new(move |req| {
        let landing = landing.clone();
        async move { landing.handle(req.uri().path(), req.uri().query()).await }.boxed()
    })
}

/// Prometheus metrics, for the metrics listener.
pub fn metrics_handler(metrics: Arc<crate::metrics::Metrics>) -> Handler {
    Arc::new(move |req| {
        let metrics = metrics.clone();
        async move { metrics::handle(&metrics, req.uri().path()) }.boxed()
    })
}
