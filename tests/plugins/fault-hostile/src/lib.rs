//! Hostile rather than buggy: stays within every per-call limit while trying to
//! take the daemon's resources. Config `{"mode": ...}`:
//! - `duty-cycle`: busy 900 ms, waits 1 ms, repeats, to hold a core without ever
//!   tripping the CPU budget;
//! - `hoard-files`: opens the file `/granted/data.txt` again and again and keeps
//!   every descriptor, retrying each millisecond once the host says no; its status
//!   says how many it holds and the last error;
//! - `hoard-pollables`: creates clock pollables and keeps them all;
//! - `fifo`: opens the FIFO `/granted/fifo` (which blocks a thread until a writer
//!   comes, if the host lets it) and reports the outcome in its status.

use std::time::{Duration, Instant};

use discovery_sdk::bindings::discovery::registry::host::{Event, next_event};
use discovery_sdk::{Affiliate, Registry, export_registry, set_status};

struct Hostile {
    mode: String,
}

impl Registry for Hostile {
    const PREFIX: &'static str = "hostile";

    fn new(config: &str) -> Result<Self, String> {
        let mode = config.split('"').nth(3).unwrap_or("").to_string();
        Ok(Hostile { mode })
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        match self.mode.as_str() {
            "duty-cycle" => duty_cycle(),
            "hoard-files" => hoard_files(),
            "hoard-pollables" => hoard_pollables(),
            "fifo" => fifo(),
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

/// Waits `ms`; false once the daemon stops.
fn pause(ms: u32) -> bool {
    !matches!(next_event(ms), Event::Shutdown)
}

fn duty_cycle() -> Result<(), String> {
    let mut x: u64 = 0;
    loop {
        let busy = Instant::now();
        while busy.elapsed() < Duration::from_millis(900) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        if !pause(1) {
            return Ok(());
        }
    }
}

fn hoard_files() -> Result<(), String> {
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/granted/data.txt") {
            Ok(file) => held.push(file),
            Err(e) => {
                set_status(
                    true,
                    &format!("holding {} files; last error: {e}", held.len()),
                );
                if !pause(1) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
fn hoard_pollables() -> Result<(), String> {
    let mut held = Vec::new();
    loop {
        held.push(wasip2::clocks::monotonic_clock::subscribe_duration(
            3_600_000_000_000,
        ));
        set_status(true, &format!("holding {} pollables", held.len()));
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn hoard_pollables() -> Result<(), String> {
    Err("wasm only".into())
}

fn fifo() -> Result<(), String> {
    let outcome = match std::fs::File::open("/granted/fifo") {
        Ok(_) => "fifo: opened".to_string(),
        Err(e) => format!("fifo: {e}"),
    };
    set_status(false, &outcome);
    while pause(3_600_000) {}
    Ok(())
}

export_registry!(Hostile);
