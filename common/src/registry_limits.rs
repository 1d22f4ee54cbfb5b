//! Limits of the plugin boundary (`wit/registry.wit`) that the daemon enforces and
//! the SDK respects.

use std::time::Duration;

/// Affiliates one `publish` takes (a discovery service holds at most 1024 per
/// cluster); the excess gets one rejection.
pub const PUBLISH_MAX: usize = 2048;
/// The longest one `next-event` waits; a plugin simply waits again after it.
pub const NEXT_EVENT_MAX_WAIT: Duration = Duration::from_secs(3600);
