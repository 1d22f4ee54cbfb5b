//! Keepalive enforcement on the wire (Q25): a client that pings more often than every
//! 10 s is sent away with GOAWAY ENHANCE_YOUR_CALM after grpc-go's strike count.

mod common;

use common::*;

#[tokio::test]
async fn ping_flood_gets_goaway_enhance_your_calm() {
    let server = start(config()).await;
    let tcp = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    let (_send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut pings = conn.ping_pong().expect("ping handle");
    let driver = tokio::spawn(conn);

    // The first ping and two quick strikes are tolerated.
    for _ in 0..3 {
        within("pong", pings.ping(h2::Ping::opaque()))
            .await
            .unwrap();
    }
    // The third strike ends the connection.
    let _ = within("last ping", pings.ping(h2::Ping::opaque())).await;
    let ended = within("connection end", driver).await.unwrap();
    let err = ended.expect_err("the server closed the connection");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    assert!(err.is_go_away(), "{err:?}");

    // Well-behaved clients are unaffected.
    let mut c = client(&server).await;
    c.hello(hello("c", "v1.0.0")).await.unwrap();
    server.shutdown().await.unwrap();
}
