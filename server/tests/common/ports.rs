//! Loopback ports for the etcd members tests and benchmarks start (etcd takes its
//! ports as flags, so they are picked before it binds them).

use std::net::TcpListener;

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
