//! Never returns from `describe`: the daemon must refuse to start with it rather
//! than hang. Written against the raw bindings, since the SDK's `describe` cannot
//! misbehave.

use discovery_sdk::bindings::exports::discovery::registry::registry::{Guest, RegistryInfo};

struct HangingDescribe;

impl Guest for HangingDescribe {
    fn describe(_config: String) -> Result<RegistryInfo, String> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    fn run(_config: String) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
discovery_sdk::bindings::__export_bindings!(HangingDescribe with_types_in discovery_sdk::bindings);

// Natively the export is not emitted; refer to the impl so it counts as used.
#[cfg(not(target_arch = "wasm32"))]
const _: () = {
    let _ = HangingDescribe::describe;
};
