//! gRPC through the host, to the endpoints the operator configured for this
//! plugin. The host does HTTP/2, TLS and keepalive; the plugin encodes and decodes
//! the protobuf messages (with `prost`, say). A call's messages and its end arrive
//! as [`Registry::on_ready`](crate::Registry::on_ready) with the call's ID.
//!
//! ```ignore
//! let channel = Channel::open("https://discovery.example/", Duration::from_secs(180))?;
//! let call = channel.unary("/pkg.Service/Method", &request.encode_to_vec(), Some(timeout))?;
//! // later, in on_ready(id) with id == call.id():
//! match call.next() {
//!     Some(CallEvent::Message(bytes)) => { /* decode */ }
//!     Some(CallEvent::Finished(status)) if status.code != 0 => { /* failed */ }
//!     _ => {}
//! }
//! ```

use std::time::Duration;

use crate::bindings::discovery::registry::grpc as host;
pub use host::{CallEvent, Status};

/// A gRPC status code: the call succeeded.
pub const OK: u32 = 0;

/// An open channel to one endpoint (one HTTP/2 connection, shared by its calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel(u32);

impl Channel {
    /// Opens the channel to `endpoint` (`http://` plaintext, `https://` or
    /// `grpc://` TLS); fails, naming it, if the operator did not grant it.
    /// `keepalive` is the ping interval while calls are open (at least 10 s).
    pub fn open(endpoint: &str, keepalive: Duration) -> Result<Channel, String> {
        let ms = keepalive.as_millis().min(u32::MAX as u128) as u32;
        host::open_channel(endpoint, ms).map(Channel)
    }

    /// Starts a unary call of `method` (`/package.Service/Method`).
    pub fn unary(
        &self,
        method: &str,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Call, String> {
        host::start_unary(self.0, method, request, timeout_ms(timeout)).map(Call)
    }

    /// Starts a server-streaming call of `method`.
    pub fn server_stream(
        &self,
        method: &str,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Call, String> {
        host::start_server_stream(self.0, method, request, timeout_ms(timeout)).map(Call)
    }
}

fn timeout_ms(timeout: Option<Duration>) -> u32 {
    // At least 1 ms: 0 means no timeout.
    timeout.map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
}

/// A call in flight. Dropping it cancels the call.
#[derive(Debug, PartialEq, Eq)]
pub struct Call(u32);

impl Call {
    /// The ID [`Registry::on_ready`](crate::Registry::on_ready) reports for it.
    pub fn id(&self) -> u32 {
        self.0
    }

    /// The next message or the call's end, if it has one now.
    pub fn next(&self) -> Option<CallEvent> {
        host::next(self.0)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        host::close_call(self.0);
    }
}
