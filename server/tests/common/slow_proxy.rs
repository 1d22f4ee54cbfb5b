//! A TCP proxy on loopback in front of one etcd member whose answers can be held back:
//! the member still receives (and commits) every request at once, but while the proxy
//! is slow, what the member sends back reaches the client only after a delay. That is
//! a member whose answers arrive after its client gave up on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub struct SlowProxy {
    /// The client URL to give instead of the member's.
    pub url: String,
    slow: Arc<AtomicBool>,
    /// Bytes the member sent while the proxy was slow.
    delayed: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl SlowProxy {
    /// Proxies to `member` (`http://127.0.0.1:port`); while slow, answers are held
    /// back by `delay`.
    pub async fn start(member: &str, delay: Duration) -> Self {
        let target = member
            .strip_prefix("http://")
            .expect("a plain http:// member")
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let slow = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (slow.clone(), delayed.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(member) = TcpStream::connect(&target).await {
                    tokio::spawn(pipe(client, member, flag.clone(), count.clone(), delay));
                }
            }
        });
        Self {
            url,
            slow,
            delayed,
            accept,
        }
    }

    pub fn set_slow(&self, slow: bool) {
        self.slow.store(slow, Ordering::SeqCst);
    }

    /// How many bytes of answers the member has sent while the proxy was slow (they
    /// reach the client a delay later).
    pub fn delayed_bytes(&self) -> usize {
        self.delayed.load(Ordering::SeqCst)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pipe(
    client: TcpStream,
    member: TcpStream,
    slow: Arc<AtomicBool>,
    delayed: Arc<AtomicUsize>,
    delay: Duration,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_member, mut to_member) = member.into_split();
    // Requests go through at once.
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_client, &mut to_member).await;
    });
    // Answers are stamped when they arrive and delivered in order, none before its
    // stamp (plus the delay if the proxy was slow then).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let down = tokio::spawn(async move {
        let mut buf = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = from_member.read(&mut buf).await {
            let due = Instant::now()
                + if slow.load(Ordering::SeqCst) {
                    delayed.fetch_add(n, Ordering::SeqCst);
                    delay
                } else {
                    Duration::ZERO
                };
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    while let Some((due, bytes)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if to_client.write_all(&bytes).await.is_err() {
            break;
        }
    }
    up.abort();
    down.abort();
}
