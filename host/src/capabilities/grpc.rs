//! The `grpc` capability: a plugin calls gRPC methods on the endpoints its
//! operator configured for it, and nothing else. The host does HTTP/2 (tonic),
//! TLS (rustls, with the system roots or a CA the operator grants) and keepalive;
//! the plugin encodes and decodes messages itself, so this module moves bytes.
//!
//! Shapes: [`GrpcGrant`] (what was granted, built from config), [`Channels`] (one
//! lazily connected channel per endpoint, shared by a plugin's incarnations) and
//! [`GrpcChannels`] (the channel handles of one incarnation). Calls run as host
//! calls (`runtime::host_calls`): a task on the plugin's runtime handing its
//! messages over one at a time, each a `ready(call)` event, all cancelled with
//! the incarnation.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::limits;
use crate::runtime::host_calls::{HandOver, HostCalls, Outbox};

/// Where a plugin may connect: `host:port` and whether it is TLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrpcTarget {
    /// `host:port`, IPv6 in brackets, as Talos normalizes endpoints.
    pub authority: String,
    pub tls: bool,
}

impl GrpcTarget {
    /// Talos's normalization of a discovery endpoint URL: `http://` is plaintext
    /// (default port 80), `https://` and `grpc://` are TLS (default port 443); the
    /// path and query are dropped. The URL must already have passed the config's
    /// endpoint check.
    pub fn parse(url: &str) -> Result<GrpcTarget, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not a URL (http://, https:// or grpc://)"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" | "grpc" => true,
            _ => return Err(format!("{url:?}: scheme must be http, https or grpc")),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match host_port.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
                (format!("[{host}]"), after.strip_prefix(':'))
            }
            None => match host_port.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (host_port.to_string(), None),
            },
        };
        if host.is_empty() || host == "[]" {
            return Err(format!("{url:?}: the host is missing"));
        }
        let port = match port.filter(|p| !p.is_empty()) {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?}: bad port"))?,
            None => default_port,
        };
        Ok(GrpcTarget {
            authority: format!("{}:{port}", host.to_ascii_lowercase()),
            tls,
        })
    }

    /// The host without port or brackets, for TLS server names.
    fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    fn uri(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl std::fmt::Display for GrpcTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

/// The endpoints an operator granted one plugin, and the CA it trusts for them.
#[derive(Clone, Debug, Default)]
pub struct GrpcGrant {
    pub targets: Vec<GrpcTarget>,
    /// PEM certificates replacing the system roots for this plugin's TLS.
    pub ca_pem: Option<Vec<u8>>,
}

impl GrpcGrant {
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The target for `url`, if it was granted.
    pub fn check(&self, plugin: &str, url: &str) -> Result<GrpcTarget, String> {
        let target = GrpcTarget::parse(url)?;
        if self.targets.contains(&target) {
            return Ok(target);
        }
        Err(format!(
            "endpoint {target} is not granted to plugin {plugin} (grant it in \
             plugins.{plugin}.grants.endpoints, or configure it as the registry's endpoint)"
        ))
    }
}

/// One channel per granted endpoint, connected on first use and reconnected by
/// tonic after failures; kept across the plugin's restarts.
#[derive(Default)]
pub struct Channels {
    open: Mutex<HashMap<GrpcTarget, Channel>>,
}

impl Channels {
    /// The channel to `target`, created (lazily connecting) on first use. Must be
    /// called on the plugin's runtime: the connection runs there.
    pub fn get(
        &self,
        grant: &GrpcGrant,
        target: &GrpcTarget,
        keepalive: Duration,
    ) -> Result<Channel, String> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = open.get(target) {
            return Ok(channel.clone());
        }
        let mut endpoint = Endpoint::from_shared(target.uri())
            .map_err(|e| format!("{target}: {e}"))?
            .connect_timeout(limits::GRPC_CONNECT_TIMEOUT)
            // The reference's client keepalive, never faster than the server's
            // 10 s minimum (or it would be told to calm down).
            .http2_keep_alive_interval(keepalive.max(limits::GRPC_KEEPALIVE_MIN))
            .keep_alive_timeout(limits::GRPC_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(false);
        if target.tls {
            let mut tls = ClientTlsConfig::new().domain_name(target.host());
            tls = match &grant.ca_pem {
                Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                None => tls.with_native_roots(),
            };
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("{target}: TLS: {e}"))?;
        }
        let channel = endpoint.connect_lazy();
        open.insert(target.clone(), channel.clone());
        Ok(channel)
    }
}

/// What a call hands the plugin.
#[derive(Debug, PartialEq, Eq)]
pub enum CallEvent {
    Message(Bytes),
    Finished { code: u32, message: String },
}

impl HandOver for CallEvent {
    fn bytes(&self) -> usize {
        match self {
            CallEvent::Message(bytes) => bytes.len(),
            CallEvent::Finished { message, .. } => message.len(),
        }
    }
}

/// The channels one plugin incarnation opened, by handle.
pub struct GrpcChannels {
    plugin: String,
    open: HashMap<u32, Channel>,
}

impl GrpcChannels {
    pub fn new(plugin: &str) -> GrpcChannels {
        GrpcChannels {
            plugin: plugin.to_string(),
            open: HashMap::new(),
        }
    }

    /// Opens (or reuses) the channel to a granted endpoint.
    pub fn open(
        &mut self,
        calls: &mut HostCalls,
        grant: &GrpcGrant,
        shared: &Channels,
        url: &str,
        keepalive: Duration,
    ) -> Result<u32, String> {
        let target = grant.check(&self.plugin, url)?;
        if self.open.len() >= limits::GRPC_CHANNELS_MAX {
            return Err(format!(
                "too many open channels (at most {})",
                limits::GRPC_CHANNELS_MAX
            ));
        }
        let channel = shared.get(grant, &target, keepalive)?;
        let handle = calls.handle();
        self.open.insert(handle, channel);
        Ok(handle)
    }

    /// Starts a call on an open channel; its messages and end arrive as
    /// [`CallEvent`]s through `calls`.
    pub fn start(
        &self,
        calls: &mut HostCalls,
        channel: u32,
        method: &str,
        request: Vec<u8>,
        timeout: Option<Duration>,
        streaming: bool,
    ) -> Result<u32, String> {
        let channel = self
            .open
            .get(&channel)
            .ok_or_else(|| format!("no open channel {channel}"))?
            .clone();
        let path = http::uri::PathAndQuery::from_str(method)
            .ok()
            .filter(|p| p.as_str().starts_with('/') && p.query().is_none())
            .ok_or_else(|| {
                format!("{method:?} is not a gRPC method path (/package.Service/Method)")
            })?;
        let request = Bytes::from(request);
        calls.start("gRPC", limits::GRPC_CALLS_MAX, move |out| async move {
            let call = run_call(channel, path, request, streaming, &out);
            let finished = match timeout {
                Some(timeout) => tokio::time::timeout(timeout, call)
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("call timed out"))),
                None => call.await,
            };
            let status = finished.err().unwrap_or_else(|| Status::ok(""));
            out.send(CallEvent::Finished {
                code: status.code() as u32,
                message: describe(&status),
            })
            .await;
        })
    }
}

async fn run_call(
    channel: Channel,
    path: http::uri::PathAndQuery,
    request: Bytes,
    streaming: bool,
    out: &Outbox<CallEvent>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(limits::GRPC_MESSAGE_MAX)
        .max_encoding_message_size(limits::GRPC_MESSAGE_MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not connected: {e}")))?;
    let request = tonic::Request::new(request);
    if !streaming {
        let reply = grpc.unary(request, path, RawCodec).await?;
        out.send(CallEvent::Message(reply.into_inner())).await;
        return Ok(());
    }
    let mut stream = grpc
        .server_streaming(request, path, RawCodec)
        .await?
        .into_inner();
    while let Some(message) = stream.message().await? {
        if !out.send(CallEvent::Message(message)).await {
            return Err(Status::cancelled("closed by the plugin"));
        }
    }
    Ok(())
}

/// A status's message with the causes under it (tonic's transport errors say
/// "tcp connect error" on top and "Connection refused" below).
fn describe(status: &Status) -> String {
    let causes = std::error::Error::source(status).map(super::error_chain);
    match causes {
        Some(causes) if !status.message().contains(&causes) => {
            format!("{}: {causes}", status.message())
        }
        _ => status.message().to_string(),
    }
}

/// Messages as the plugin encoded them: bytes in, bytes out.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(authority: &str, tls: bool) -> GrpcTarget {
        GrpcTarget {
            authority: authority.into(),
            tls,
        }
    }

    #[test]
    fn endpoints_normalize_as_talos_does() {
        for (url, want) in [
            (
                "https://discovery.talos.dev/",
                target("discovery.talos.dev:443", true),
            ),
            ("http://localhost:3000", target("localhost:3000", false)),
            ("grpc://10.0.0.1:3000", target("10.0.0.1:3000", true)),
            ("http://10.0.0.1", target("10.0.0.1:80", false)),
            (
                "https://[2001:470:6d:30e:565d:e162:e2a0:cf5a]:3456/",
                target("[2001:470:6d:30e:565d:e162:e2a0:cf5a]:3456", true),
            ),
            (
                "HTTPS://user@Host.Example/path?q#f",
                target("host.example:443", true),
            ),
        ] {
            assert_eq!(GrpcTarget::parse(url), Ok(want), "{url}");
        }
        for bad in [
            "localhost:3000",
            "ftp://x",
            "https://",
            "https://x:0",
            "https://[::1",
        ] {
            assert!(GrpcTarget::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(target("[::1]:3000", true).host(), "::1");
        assert_eq!(target("x.example:443", true).host(), "x.example");
    }

    #[test]
    fn only_granted_endpoints_open() {
        let grant = GrpcGrant {
            targets: vec![target("127.0.0.1:3000", false)],
            ca_pem: None,
        };
        assert!(grant.check("service", "http://127.0.0.1:3000/").is_ok());
        let refused = grant
            .check("service", "https://127.0.0.1:3000")
            .unwrap_err();
        assert_eq!(
            refused,
            "endpoint https://127.0.0.1:3000 is not granted to plugin service (grant it in \
             plugins.service.grants.endpoints, or configure it as the registry's endpoint)"
        );
        assert!(grant.check("service", "http://127.0.0.2:3000").is_err());
    }

    #[tokio::test]
    async fn calls_are_bounded_and_end_with_a_status() {
        let grant = GrpcGrant {
            targets: vec![target("127.0.0.1:9", false)],
            ca_pem: None,
        };
        let memory = std::sync::Arc::new(crate::runtime::HostMemory::default());
        let mut calls = HostCalls::new(memory.clone());
        let mut channels = GrpcChannels::new("p");
        let shared = Channels::default();
        let channel = channels
            .open(
                &mut calls,
                &grant,
                &shared,
                "http://127.0.0.1:9",
                Duration::from_secs(10),
            )
            .unwrap();
        assert!(
            channels
                .open(
                    &mut calls,
                    &grant,
                    &shared,
                    "http://127.0.0.1:10",
                    Duration::from_secs(10)
                )
                .is_err()
        );
        assert!(
            channels
                .start(&mut calls, channel, "not a path", vec![], None, false)
                .is_err()
        );
        for _ in 0..limits::GRPC_CALLS_MAX {
            channels
                .start(
                    &mut calls,
                    channel,
                    "/x.Y/Z",
                    vec![],
                    Some(Duration::from_secs(5)),
                    false,
                )
                .unwrap();
        }
        let error = channels
            .start(&mut calls, channel, "/x.Y/Z", vec![], None, false)
            .unwrap_err();
        assert!(error.starts_with("too many open gRPC calls"), "{error}");
        // Port 9 (discard) refuses: each call ends with a status, as an event.
        let first = tokio::time::timeout(Duration::from_secs(10), calls.ready())
            .await
            .expect("a call ends");
        match calls.next::<CallEvent>(first) {
            Some(CallEvent::Finished { code, message }) => {
                assert_ne!(code, 0);
                assert!(message.contains("refused"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        calls.close(first);
        drop(calls);
        assert_eq!(memory.total(), 0);
    }
}
