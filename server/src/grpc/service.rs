//! The `sidero.discovery.server.Cluster` service: validation, then the state layer,
//! with errors mapped to the reference's codes and messages (§4.3–§4.6).

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Code, Request, Response, Status};

use super::observe::{Call, Describe, Observer, panic_message};
use super::{peer, validate};
use crate::backend::Backend;
use crate::limits::WATCH_BUFFER;
use crate::proto::server::cluster_server::Cluster;
use crate::proto::server::{
    Affiliate, AffiliateDeleteRequest, AffiliateDeleteResponse, AffiliateUpdateRequest,
    AffiliateUpdateResponse, HelloRequest, HelloResponse, ListRequest, ListResponse,
    RedirectMessage, WatchRequest, WatchResponse,
};
use crate::state::{AffiliateView, Lost, Notification, Subscription, Update};

/// Behaviour switches of the service.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Returned by every valid Hello when set.
    pub redirect_endpoint: Option<String>,
    /// Hello reports an empty `client_ip` (Q8).
    pub disable_client_ip_reporting: bool,
}

#[derive(Debug, Clone)]
pub struct ClusterService {
    backend: Backend,
    observer: Arc<Observer>,
    options: Arc<Options>,
    shutdown: CancellationToken,
}

fn to_proto(v: AffiliateView) -> Affiliate {
    Affiliate {
        id: v.id,
        data: v.data,
        endpoints: v.endpoints,
    }
}

/// `now + ttl` for a signed TTL in nanoseconds, clamped to what `Instant` can hold.
fn expiry(now: Instant, ttl_nanos: i128) -> Instant {
    let abs = Duration::from_nanos(ttl_nanos.unsigned_abs().min(u128::from(u64::MAX)) as u64);
    if ttl_nanos >= 0 {
        now.checked_add(abs).unwrap_or(now)
    } else {
        now.checked_sub(abs).unwrap_or(now)
    }
}

impl ClusterService {
    pub fn new(
        backend: Backend,
        observer: Arc<Observer>,
        options: Options,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            backend,
            observer,
            options: Arc::new(options),
            shutdown,
        }
    }

    /// Runs a unary handler inside the interceptor chain, turning a panic into Internal
    /// with the panic message instead of a dropped connection.
    ///
    /// A plain function returning a future, not an `async fn`: the request's headers
    /// are read and dropped before the future is built, so it holds only the message.
    /// The future is allocated for every call, and under 1 KiB glibc's malloc serves
    /// it from its per-thread cache instead of its much slower large-chunk path.
    fn unary<Req, Resp, Fut>(
        &self,
        method: &'static str,
        req: Request<Req>,
        handler: impl FnOnce(Option<std::net::IpAddr>, Req) -> Fut,
    ) -> impl Future<Output = Result<Response<Resp>, Status>>
    where
        Req: Describe,
        Fut: Future<Output = Result<Resp, Status>>,
    {
        let (mut call, deadline) = self.observer.start(method, "unary", &req);
        let req = req.into_inner();
        async move {
            self.observer.admit(&mut call, deadline).await?;
            let peer = call.peer;
            let result = AssertUnwindSafe(async move { handler(peer, req).await })
                .catch_unwind()
                .await
                .unwrap_or_else(|p| Err(Status::internal(panic_message(&*p))));
            call.finish_result(&result);
            result.map(Response::new)
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

/// The live part of a watch: notifications until the client leaves, the server shuts
/// down, or the watcher falls too far behind.
struct Watching {
    sub: Subscription,
    /// Created once per stream, on the stream's own child token: a fresh `cancelled()`
    /// of the shared token on every message would take (twice) the lock of its waiter
    /// list, which every watcher of a fan-out contends on.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    call: Call,
    done: bool,
}

impl Watching {
    async fn next(mut self) -> Option<(Result<WatchResponse, Status>, Self)> {
        if self.done {
            return None;
        }
        let received = tokio::select! {
            biased;
            _ = self.shutdown.as_mut() => Ok(None),
            r = self.sub.recv() => r,
        };
        match received {
            Ok(Some(n)) => {
                let msg = match &*n {
                    Notification::Update(v) => WatchResponse {
                        affiliates: vec![to_proto(v.clone())],
                        deleted: false,
                    },
                    Notification::Deleted(id) => WatchResponse {
                        affiliates: vec![Affiliate {
                            id: id.clone(),
                            ..Affiliate::default()
                        }],
                        deleted: true,
                    },
                };
                self.call.sent();
                Some((Ok(msg), self))
            }
            Ok(None) => {
                self.call.finish(Code::Ok, None);
                None
            }
            Err(Lost) => {
                let status = Status::aborted(Lost.to_string());
                self.call.finish(status.code(), Some(status.message()));
                self.done = true;
                Some((Err(status), self))
            }
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        self.unary("Hello", req, |peer, r| async move {
            // Counted before validation, as upstream (Q24).
            self.observer.metrics.count_hello(&r.client_version);
            validate::cluster_id(&r.cluster_id)?;
            let client_ip = if self.options.disable_client_ip_reporting {
                Vec::new()
            } else {
                peer::ip_bytes(peer)
            };
            Ok(HelloResponse {
                redirect: self
                    .options
                    .redirect_endpoint
                    .clone()
                    .map(|endpoint| RedirectMessage { endpoint }),
                client_ip: client_ip.into(),
            })
        })
        .await
    }

    async fn affiliate_update(
        &self,
        req: Request<AffiliateUpdateRequest>,
    ) -> Result<Response<AffiliateUpdateResponse>, Status> {
        self.unary("AffiliateUpdate", req, |_, r| async move {
            let ttl = validate::update(&r)?;
            let data = r.affiliate_data.as_deref().unwrap_or_default();
            let update = Update {
                affiliate_id: &r.affiliate_id,
                data,
                endpoints: &r.affiliate_endpoints,
            };
            let now = Instant::now();
            self.backend
                .update(&r.cluster_id, &update, expiry(now, ttl))
                .await?;
            Ok(AffiliateUpdateResponse {})
        })
        .await
    }

    async fn affiliate_delete(
        &self,
        req: Request<AffiliateDeleteRequest>,
    ) -> Result<Response<AffiliateDeleteResponse>, Status> {
        self.unary("AffiliateDelete", req, |_, r| async move {
            validate::cluster_id(&r.cluster_id)?;
            validate::affiliate_id(&r.affiliate_id)?;
            self.backend.delete(&r.cluster_id, &r.affiliate_id).await?;
            Ok(AffiliateDeleteResponse {})
        })
        .await
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.unary("List", req, |_, r| async move {
            validate::cluster_id(&r.cluster_id)?;
            let affiliates = self
                .backend
                .list(&r.cluster_id)
                .await?
                .into_iter()
                .map(to_proto)
                .collect();
            Ok(ListResponse { affiliates })
        })
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let mut call = self.observer.begin("Watch", "server_stream", &req).await?;
        let r = req.into_inner();
        let subscribed = AssertUnwindSafe(async {
            validate::cluster_id(&r.cluster_id)?;
            self.backend.watch(&r.cluster_id, WATCH_BUFFER).await
        })
        .catch_unwind()
        .await
        .unwrap_or_else(|p| Err(Status::internal(panic_message(&*p))));
        let (snapshot, sub) = match subscribed {
            Ok(pair) => pair,
            Err(status) => {
                call.finish(status.code(), Some(status.message()));
                return Err(status);
            }
        };
        // The snapshot goes first, even when empty: clients take the first message of
        // every stream as the complete state.
        let first = WatchResponse {
            affiliates: snapshot.into_iter().map(to_proto).collect(),
            deleted: false,
        };
        call.sent();
        let live = Watching {
            sub,
            shutdown: Box::pin(self.shutdown.child_token().cancelled_owned()),
            call,
            done: false,
        };
        let stream = futures::stream::once(async move { Ok(first) })
            .chain(futures::stream::unfold(live, Watching::next))
            .boxed();
        Ok(Response::new(guard_stream(stream)))
    }
}

/// A panic while producing a stream item ends the stream with Internal (and the panic
/// message), never the connection or the process.
fn guard_stream(
    stream: impl Stream<Item = Result<WatchResponse, Status>> + Send + 'static,
) -> WatchStream {
    Box::pin(
        AssertUnwindSafe(stream)
            .catch_unwind()
            .map(|item| match item {
                Ok(item) => item,
                Err(p) => Err(Status::internal(panic_message(&*p))),
            }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::peer::Trust;
    use crate::metrics::Metrics;
    use crate::ratelimit::{IpRateLimiter, Rate};

    fn service() -> ClusterService {
        let state = crate::state::State::new();
        let observer = Arc::new(Observer {
            metrics: Arc::new(Metrics::new(state.clone(), false)),
            limiter: Arc::new(IpRateLimiter::new(Rate::default())),
            trust: Trust::default(),
        });
        ClusterService::new(
            Backend::Memory(state),
            observer,
            Options::default(),
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn handler_panic_is_internal_with_the_message() {
        let svc = service();
        let req = Request::new(HelloRequest::default());
        let r: Result<Response<HelloResponse>, Status> = svc
            .unary("Hello", req, |_, _| async {
                panic!("handler exploded: {}", 42)
            })
            .await;
        let err = r.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::Internal, "handler exploded: 42")
        );
        let handled = svc
            .observer
            .metrics
            .grpc_handled
            .with_label_values(&["unary", crate::metrics::GRPC_SERVICE, "Hello", "Internal"])
            .get();
        assert_eq!(handled, 1);
        // The service keeps working afterwards.
        let ok = svc
            .hello(Request::new(HelloRequest {
                cluster_id: "c".into(),
                client_version: String::new(),
            }))
            .await;
        assert!(ok.is_ok());
    }

    #[tokio::test]
    async fn stream_panic_ends_the_stream_with_internal() {
        let items = futures::stream::iter([0, 1]).map(|i| {
            if i == 1 {
                panic!("stream exploded");
            }
            Ok(WatchResponse::default())
        });
        let mut s = guard_stream(items);
        assert!(s.next().await.unwrap().is_ok());
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::Internal, "stream exploded")
        );
        assert!(s.next().await.is_none());
    }
}
