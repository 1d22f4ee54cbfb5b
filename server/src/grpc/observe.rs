//! The interceptor chain around every RPC, in upstream's order (§4.9): request logger →
//! rate limiter → gRPC metrics → panic recovery → handler. Throttled requests are
//! therefore logged but not counted in `grpc_server_*`.

use std::any::Any;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Status};

use super::peer::{self, ConnInfo, Trust};
use crate::limits;
use crate::metrics::{GRPC_SERVICE, Metrics, code_name};
use crate::proto::server::{
    AffiliateDeleteRequest, AffiliateUpdateRequest, HelloRequest, ListRequest, WatchRequest,
};
use crate::ratelimit::IpRateLimiter;

fn clip(s: &str) -> String {
    if s.len() <= limits::LOGGED_ID_MAX {
        return s.to_owned();
    }
    let mut end = limits::LOGGED_ID_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Request fields worth a log line.
#[derive(Debug, Default, Clone)]
pub struct Fields {
    cluster_id: String,
    affiliate_id: Option<String>,
    client_version: Option<String>,
}

pub trait Describe {
    fn fields(&self) -> Fields;
}

impl Describe for HelloRequest {
    fn fields(&self) -> Fields {
        Fields {
            cluster_id: clip(&self.cluster_id),
            affiliate_id: None,
            client_version: Some(clip(&self.client_version)),
        }
    }
}

impl Describe for AffiliateUpdateRequest {
    fn fields(&self) -> Fields {
        Fields {
            cluster_id: clip(&self.cluster_id),
            affiliate_id: Some(clip(&self.affiliate_id)),
            client_version: None,
        }
    }
}

impl Describe for AffiliateDeleteRequest {
    fn fields(&self) -> Fields {
        Fields {
            cluster_id: clip(&self.cluster_id),
            affiliate_id: Some(clip(&self.affiliate_id)),
            client_version: None,
        }
    }
}

impl Describe for ListRequest {
    fn fields(&self) -> Fields {
        Fields {
            cluster_id: clip(&self.cluster_id),
            ..Fields::default()
        }
    }
}

impl Describe for WatchRequest {
    fn fields(&self) -> Fields {
        Fields {
            cluster_id: clip(&self.cluster_id),
            ..Fields::default()
        }
    }
}

/// The `grpc-timeout` header as a duration: 1–8 digits and a unit (§ gRPC over HTTP/2).
pub fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A panic payload as text, like Go's `%v` of a recovered value.
pub fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

/// `/<service>/<method>`, as logged.
struct FullMethod(&'static str);

impl std::fmt::Display for FullMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{GRPC_SERVICE}/{}", self.0)
    }
}

/// The client IP as logged; empty when unknown.
struct Peer(Option<IpAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => Ok(()),
        }
    }
}

/// Shared by every call: metrics, limiter and which headers to trust.
#[derive(Debug)]
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<IpRateLimiter>,
    pub trust: Trust,
}

/// One RPC in flight. Finishing it records the outcome; dropping it unfinished (the
/// client went away) records a cancellation for unary calls and a normal end for
/// streams, which is how upstream reports a watcher that left.
#[derive(Debug)]
pub struct Call {
    obs: Arc<Observer>,
    method: &'static str,
    method_index: usize,
    kind: &'static str,
    pub peer: Option<IpAddr>,
    start: Instant,
    fields: Fields,
    counted: bool,
    done: bool,
}

impl Observer {
    /// Logger and rate limiter: admits the call or fails it with ResourceExhausted.
    pub async fn begin<R: Describe>(
        self: &Arc<Self>,
        method: &'static str,
        kind: &'static str,
        req: &Request<R>,
    ) -> Result<Call, Status> {
        let (mut call, deadline) = self.start(method, kind, req);
        self.admit(&mut call, deadline).await?;
        Ok(call)
    }

    /// The synchronous half of [`Self::begin`]: the call's record and its deadline. Split
    /// out so a caller can let go of the request's headers before waiting for
    /// [`Self::admit`], which keeps the per-RPC future small.
    pub fn start<R: Describe>(
        self: &Arc<Self>,
        method: &'static str,
        kind: &'static str,
        req: &Request<R>,
    ) -> (Call, Option<Instant>) {
        let start = Instant::now();
        let conn = req.extensions().get::<ConnInfo>();
        let peer = peer::client_ip(req.metadata(), conn, self.trust);
        let call = Call {
            obs: self.clone(),
            method,
            method_index: Metrics::method_index(method),
            kind,
            peer,
            start,
            fields: req.get_ref().fields(),
            counted: false,
            done: false,
        };
        if peer.is_none() {
            tracing::warn!(method, "failed to determine the client address");
        }
        let deadline = grpc_timeout(req.metadata()).and_then(|d| start.checked_add(d));
        (call, deadline)
    }

    /// The rate limiter half of [`Self::begin`]: waits for a token within `deadline`,
    /// or finishes `call` with ResourceExhausted.
    pub async fn admit(&self, call: &mut Call, deadline: Option<Instant>) -> Result<(), Status> {
        if let Err(e) = self.limiter.wait(call.peer, deadline).await {
            let status = Status::resource_exhausted(e.to_string());
            call.finish(status.code(), Some(status.message()));
            return Err(status);
        }
        let m = self.metrics.method(call.method_index);
        m.started.inc();
        m.msg_received.inc();
        call.counted = true;
        Ok(())
    }
}

impl Call {
    /// Counts one message sent to the client.
    pub fn sent(&self) {
        self.obs.metrics.method(self.method_index).msg_sent.inc();
    }

    /// Records the outcome once: metrics (if admitted) and one log line.
    pub fn finish(&mut self, code: Code, error: Option<&str>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.start.elapsed();
        if self.counted {
            let m = self.obs.metrics.method(self.method_index);
            m.handled(code).inc();
            m.handling_seconds.observe(elapsed.as_secs_f64());
        }
        // One line per call whose message is the full method name, with the reference's
        // fields (§4.12): info on success, error (with `error`) on failure. Logged as
        // they are, without building strings first: this runs on every call, and most
        // INFO lines are then dropped by the sampler (`logging`) before formatting.
        let method = FullMethod(self.method);
        let peer = Peer(self.peer);
        let f = &self.fields;
        let code = code_name(code);
        if error.is_none() {
            tracing::info!(
                grpc.method = %method,
                duration = ?elapsed,
                code,
                peer.address = %peer,
                cluster_id = f.cluster_id.as_str(),
                affiliate_id = f.affiliate_id.as_deref(),
                client_version = f.client_version.as_deref(),
                "{method}"
            );
        } else {
            tracing::error!(
                grpc.method = %method,
                duration = ?elapsed,
                code,
                error,
                peer.address = %peer,
                cluster_id = f.cluster_id.as_str(),
                affiliate_id = f.affiliate_id.as_deref(),
                client_version = f.client_version.as_deref(),
                "{method}"
            );
        }
    }

    /// Records a handler result.
    pub fn finish_result<T>(&mut self, r: &Result<T, Status>) {
        match r {
            Ok(_) => {
                self.sent();
                self.finish(Code::Ok, None);
            }
            Err(s) => self.finish(s.code(), Some(s.message())),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            let code = if self.kind == "unary" {
                Code::Cancelled
            } else {
                Code::Ok
            };
            self.finish(code, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut md = tonic::metadata::MetadataMap::new();
        for (v, want) in [
            ("1S", Some(Duration::from_secs(1))),
            ("250m", Some(Duration::from_millis(250))),
            ("2H", Some(Duration::from_secs(7200))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("123456789S", None),
            ("S", None),
            ("1x", None),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&md), want, "{v}");
        }
    }

    #[test]
    fn long_ids_are_clipped_on_char_boundaries() {
        let s = "é".repeat(300);
        let c = clip(&s);
        assert!(c.len() <= limits::LOGGED_ID_MAX + "…".len());
        assert_eq!(clip("short"), "short");
    }
}
