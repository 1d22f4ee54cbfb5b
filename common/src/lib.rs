//! What the daemon (`host/`), the discovery service (`server/`) and the plugin SDK
//! (`sdk/`) would otherwise each write for themselves: Talos's text forms of a
//! machine type and an IP prefix, Go's `netip` byte encoding of addresses, Sidero's
//! wire limits, and the limits of the plugin boundary. Standard library only, so
//! it builds for plugins (wasm32-wasip2) as well; `serde` is an optional feature.

pub mod ip_prefix;
pub mod machine_type;
pub mod netip;
pub mod registry_limits;
pub mod sidero_limits;

pub use ip_prefix::IpPrefix;
pub use machine_type::MachineType;
