//! Keepalive enforcement: grpc-go's `EnforcementPolicy{MinTime: 10s}` for HTTP/2 (Q25).
//!
//! hyper answers PINGs itself and does not expose them, so this watches the frames on
//! the wire instead: a wrapper around the connection scans frame headers in both
//! directions. A client PING that comes less than `MinTime` after the previous one is a
//! strike, as in grpc-go; strikes are forgiven whenever the server sends HEADERS or DATA
//! (clients legitimately ping more often while receiving data, e.g. for BDP estimation).
//! After more than [`MAX_PING_STRIKES`] the server sends GOAWAY `ENHANCE_YOUR_CALM` with
//! `too_many_pings` (so grpc-go clients back off their keepalive) and closes.
//!
//! Unlike grpc-go, pings on a connection without streams are held to the same
//! `MinTime`, not to two hours: upstream never enforced anything, so clients that
//! permit pings without streams must keep working.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::MAX_PING_STRIKES;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame header as seen on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

/// Incremental HTTP/2 frame-header scanner over a byte stream split arbitrarily.
#[derive(Debug)]
pub struct Scanner {
    /// Bytes of the client preface still expected (reading side only).
    preface_left: usize,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    /// Not HTTP/2 (e.g. HTTP/1.1 on the same port): stop scanning.
    off: bool,
}

impl Scanner {
    /// For bytes the client sends: the connection preface comes first.
    pub fn client_to_server() -> Self {
        Self {
            preface_left: PREFACE.len(),
            header: [0; FRAME_HEADER],
            header_len: 0,
            skip: 0,
            off: false,
        }
    }

    /// For bytes the server sends: frames from the start.
    pub fn server_to_client() -> Self {
        Self {
            preface_left: 0,
            ..Self::client_to_server()
        }
    }

    pub fn is_off(&self) -> bool {
        self.off
    }

    /// True between frames: nothing of a frame has been consumed yet.
    pub fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.header_len == 0 && self.skip == 0
    }

    /// Consumes `bytes`, calling `on_frame` for every complete frame header.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(FrameHeader)) {
        while !bytes.is_empty() && !self.off {
            if self.preface_left > 0 {
                let done = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(bytes.len());
                if bytes[..n] != PREFACE[done..done + n] {
                    self.off = true;
                    return;
                }
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == FRAME_HEADER {
                    let h = self.header;
                    self.header_len = 0;
                    self.skip =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    on_frame(FrameHeader {
                        kind: h[3],
                        flags: h[4],
                        stream,
                    });
                }
            }
        }
    }
}

/// grpc-go's ping-strike accounting, with time passed in.
#[derive(Debug)]
pub struct PingPolicy {
    min_time: Duration,
    last_ping: Option<Instant>,
    strikes: u32,
    forgive: bool,
}

impl PingPolicy {
    pub fn new(min_time: Duration) -> Self {
        Self {
            min_time,
            last_ping: None,
            strikes: 0,
            forgive: false,
        }
    }

    /// The server sent HEADERS or DATA: the next ping starts a clean slate.
    pub fn server_sent_data(&mut self) {
        self.forgive = true;
    }

    /// A client PING arrived at `now`; true when the client must be sent away.
    pub fn on_ping(&mut self, now: Instant) -> bool {
        let previous = self.last_ping.replace(now);
        if std::mem::take(&mut self.forgive) {
            self.strikes = 0;
            return false;
        }
        if previous.is_some_and(|p| now < p + self.min_time) {
            self.strikes += 1;
        }
        self.strikes > MAX_PING_STRIKES
    }
}

/// GOAWAY(last stream, ENHANCE_YOUR_CALM, "too_many_pings").
pub fn goaway_too_many_pings(last_stream: u32) -> Vec<u8> {
    let debug = b"too_many_pings";
    let len = 8 + debug.len();
    let mut f = Vec::with_capacity(FRAME_HEADER + len);
    f.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    f.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    f.extend_from_slice(debug);
    f
}

/// A connection with keepalive enforcement.
#[derive(Debug)]
pub struct Enforced<I> {
    inner: I,
    inbound: Scanner,
    outbound: Scanner,
    policy: PingPolicy,
    last_stream: u32,
    /// Set once the client has been sent away; every later I/O fails.
    calm_down: bool,
}

impl<I> Enforced<I> {
    pub fn new(inner: I, min_time: Duration) -> Self {
        Self {
            inner,
            inbound: Scanner::client_to_server(),
            outbound: Scanner::server_to_client(),
            policy: PingPolicy::new(min_time),
            last_stream: 0,
            calm_down: false,
        }
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I> Enforced<I> {
    /// Scans bytes the server wrote: HEADERS or DATA forgive earlier ping strikes.
    fn sent(&mut self, bytes: &[u8]) {
        if self.outbound.is_off() {
            return;
        }
        let policy = &mut self.policy;
        self.outbound.feed(bytes, |f| {
            if f.kind == TYPE_DATA || f.kind == TYPE_HEADERS {
                policy.server_sent_data();
            }
        });
    }
}

fn too_many_pings() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "too many pings from the client",
    )
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Enforced<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.calm_down {
            return Poll::Ready(Err(too_many_pings()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.inbound.is_off() || !matches!(result, Poll::Ready(Ok(()))) {
            return result;
        }
        let now = Instant::now();
        let (mut violated, mut last_stream) = (false, this.last_stream);
        let policy = &mut this.policy;
        this.inbound
            .feed(&buf.filled()[before..], |f| match f.kind {
                TYPE_PING if f.flags & FLAG_ACK == 0 => violated |= policy.on_ping(now),
                TYPE_HEADERS => last_stream = last_stream.max(f.stream),
                _ => {}
            });
        this.last_stream = last_stream;
        if !violated {
            return result;
        }
        this.calm_down = true;
        tracing::warn!("client pings too often, sending GOAWAY too_many_pings");
        // Best effort, and only between two of hyper's frames so the stream stays valid.
        if this.outbound.at_boundary() {
            let frame = goaway_too_many_pings(this.last_stream);
            if let Poll::Ready(Ok(n)) = Pin::new(&mut this.inner).poll_write(cx, &frame)
                && n == frame.len()
            {
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
            }
        }
        Poll::Ready(Err(too_many_pings()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Enforced<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.calm_down {
            return Poll::Ready(Err(too_many_pings()));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = result {
            this.sent(&data[..n]);
        }
        result
    }

    /// Passed through, so h2 writes a frame header and its payload in one system call
    /// (and one TCP segment): without it, h2 writes payloads over 1 KiB, such as every
    /// watch notification, separately from their header.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.calm_down {
            return Poll::Ready(Err(too_many_pings()));
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = result {
            for b in bufs {
                let taken = n.min(b.len());
                this.sent(&b[..taken]);
                n -= taken;
                if n == 0 {
                    break;
                }
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn scanner_finds_frames_across_arbitrary_splits() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0; 12]));
        bytes.extend(frame(TYPE_HEADERS, 0x4, 1, &[1, 2, 3]));
        bytes.extend(frame(TYPE_PING, 0, 0, &[0; 8]));
        bytes.extend(frame(TYPE_PING, FLAG_ACK, 0, &[0; 8]));
        for chunk in [1, 2, 7, 9, 10, 1000] {
            let mut s = Scanner::client_to_server();
            let mut seen = Vec::new();
            for c in bytes.chunks(chunk) {
                s.feed(c, |f| seen.push(f));
            }
            assert!(s.at_boundary());
            assert_eq!(
                seen,
                vec![
                    FrameHeader {
                        kind: 0x4,
                        flags: 0,
                        stream: 0
                    },
                    FrameHeader {
                        kind: TYPE_HEADERS,
                        flags: 0x4,
                        stream: 1
                    },
                    FrameHeader {
                        kind: TYPE_PING,
                        flags: 0,
                        stream: 0
                    },
                    FrameHeader {
                        kind: TYPE_PING,
                        flags: FLAG_ACK,
                        stream: 0
                    },
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn http1_turns_the_scanner_off() {
        let mut s = Scanner::client_to_server();
        s.feed(b"GET / HTTP/1.1\r\n", |_| panic!("no frames in HTTP/1.1"));
        assert!(s.is_off());
    }

    #[test]
    fn three_strikes_then_out_and_data_forgives() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut p = PingPolicy::new(Duration::from_secs(10));
        // Every 10 s or slower is fine forever.
        for i in 0..10 {
            assert!(!p.on_ping(s(i * 10)));
        }
        // Fast pings: strikes 1, 2 are tolerated, the third is not.
        let mut p = PingPolicy::new(Duration::from_secs(10));
        assert!(!p.on_ping(s(0)));
        assert!(!p.on_ping(s(1)));
        assert!(!p.on_ping(s(2)));
        assert!(p.on_ping(s(3)));
        // Server data between pings resets the count, like grpc-go.
        let mut p = PingPolicy::new(Duration::from_secs(10));
        for i in 0..20 {
            p.server_sent_data();
            assert!(!p.on_ping(s(i)));
        }
    }

    #[tokio::test]
    async fn vectored_writes_are_passed_through_and_scanned() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut e = Enforced::new(a, Duration::from_secs(10));
        assert_eq!(e.is_write_vectored(), e.get_ref().is_write_vectored());
        let f = frame(TYPE_DATA, 0, 1, &[7, 7, 7]);
        let (head, payload) = f.split_at(FRAME_HEADER);
        let n = e
            .write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(payload)])
            .await
            .unwrap();
        e.write_all(&f[n..]).await.unwrap();
        assert!(e.outbound.at_boundary(), "the frame was scanned to its end");
        assert!(e.policy.forgive, "server DATA forgives ping strikes");
        let mut got = vec![0; f.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn goaway_frame_layout() {
        let f = goaway_too_many_pings(7);
        assert_eq!(&f[..9], &[0, 0, 22, 0x7, 0, 0, 0, 0, 0]);
        assert_eq!(&f[9..13], &7u32.to_be_bytes());
        assert_eq!(&f[13..17], &ENHANCE_YOUR_CALM.to_be_bytes());
        assert_eq!(&f[17..], b"too_many_pings");
    }
}
