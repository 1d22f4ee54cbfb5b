//! Accept loops: one per listener, HTTP/1.1 and HTTP/2 (h2c or TLS) on each, graceful
//! shutdown with a bounded grace period.
//!
//! Every accepted socket gets TCP_NODELAY (small gRPC messages must not wait for
//! Nagle), and every request carries the transport peer as [`ConnInfo`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;

use super::keepalive::Enforced;
use crate::grpc::peer::ConnInfo;
use crate::limits::{
    HTTP_SHUTDOWN_TIMEOUT, KEEPALIVE_MIN_TIME, READ_HEADER_TIMEOUT, TLS_HANDSHAKE_TIMEOUT,
};

/// A request handler shared by every connection of a listener.
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<Body>> + Send + Sync>;

/// Binds a Go-style address: `:3000` means every address, IPv6 and IPv4 when possible.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    if let Some(port) = addr.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid address {addr:?}"),
            )
        })?;
        return match TcpListener::bind(("::", port)).await {
            Ok(l) => Ok(l),
            // No IPv6 on this host.
            Err(_) => TcpListener::bind(("0.0.0.0", port)).await,
        };
    }
    TcpListener::bind(addr).await
}

/// Accepts one connection and sets TCP_NODELAY on it: a small gRPC response must not
/// wait for the client's delayed ACK (Nagle), which multiplies tail latency.
pub async fn accept(listener: &TcpListener) -> std::io::Result<(TcpStream, SocketAddr)> {
    let (tcp, remote) = listener.accept().await?;
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(peer = %remote, error = %e, "failed to set TCP_NODELAY");
    }
    Ok((tcp, remote))
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_HEADER_TIMEOUT);
    b.http2().timer(TokioTimer::new());
    b
}

async fn run_connection<I>(
    io: I,
    remote: SocketAddr,
    handler: Handler,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnInfo { remote });
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let io = Enforced::new(io, KEEPALIVE_MIN_TIME);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, peer = %remote, "connection ended with an error");
    }
}

/// Serves `listener` until `shutdown`, then gives open connections
/// [`HTTP_SHUTDOWN_TIMEOUT`] to finish.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Handler,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(builder());
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(&listener) => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let conn_args = (remote, handler.clone(), builder.clone(), graceful.watcher());
        match &tls {
            None => {
                let (remote, handler, builder, watcher) = conn_args;
                tokio::spawn(run_connection(tcp, remote, handler, builder, watcher));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let (remote, handler, builder, watcher) = conn_args;
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    let stream = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = handshake => match r {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        },
                    };
                    run_connection(stream, remote, handler, builder, watcher).await;
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(HTTP_SHUTDOWN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            server = name,
            "connections still open after the shutdown grace period"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr);
        let (client, accepted) = tokio::join!(client, accept(&listener));
        let client = client.unwrap();
        assert!(!client.nodelay().unwrap(), "the default is off");
        let (tcp, remote) = accepted.unwrap();
        assert_eq!(remote, client.local_addr().unwrap());
        assert!(tcp.nodelay().unwrap());
    }
}
