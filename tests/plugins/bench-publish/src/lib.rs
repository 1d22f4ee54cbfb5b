//! Times `publish` from inside the guest: each round publishes `count` affiliates
//! (alternating two versions so every round changes every resource) and the
//! plugin reports the timings through its status note:
//! `publish count=1000 rounds=100 median_us=… p90_us=… max_us=…`.
//! Config: `{"count": 1000, "rounds": 100}` (numbers only, read without serde).

use std::time::Instant;

use discovery_sdk::{
    Affiliate, IpAddress, MachineType, Registry, export_registry, publish, set_status,
};

struct BenchPublish {
    count: u32,
    rounds: u32,
    done: bool,
}

fn number(config: &str, key: &str, default: u32) -> u32 {
    config
        .split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|rest| {
            let digits: String = rest
                .trim()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .unwrap_or(default)
}

fn affiliates(count: u32, round: u32) -> Vec<Affiliate> {
    (0..count)
        .map(|i| Affiliate {
            node_id: format!("bench-node-{i:05}-abcdefghijklmnopqrstuvwxyz0123"),
            hostname: format!("worker-{i}.bench.example"),
            nodename: format!("worker-{i}"),
            machine_type: MachineType::Worker,
            operating_system: "Talos (v1.12.0)".into(),
            addresses: vec![
                IpAddress::Ipv4((10, (i >> 8) as u8, i as u8, (round % 2) as u8 + 1)),
                IpAddress::Ipv6((0xfd00, 0, 0, 0, 0, 0, i as u16, 1)),
            ],
            kubespan: None,
            control_plane: None,
        })
        .collect()
}

impl Registry for BenchPublish {
    const PREFIX: &'static str = "bench";

    fn new(config: &str) -> Result<Self, String> {
        Ok(BenchPublish {
            count: number(config, "count", 1000),
            rounds: number(config, "rounds", 100),
            done: false,
        })
    }

    fn on_local_change(&mut self, _local: Option<Affiliate>) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        let lists = [affiliates(self.count, 0), affiliates(self.count, 1)];
        let mut micros = Vec::with_capacity(self.rounds as usize);
        for round in 0..self.rounds {
            let list = &lists[(round % 2) as usize];
            let started = Instant::now();
            let rejected = publish(list);
            micros.push(started.elapsed().as_micros() as u64);
            if !rejected.is_empty() {
                return Err(format!(
                    "{} rejected: {}",
                    rejected.len(),
                    rejected[0].reason
                ));
            }
        }
        micros.sort_unstable();
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
        set_status(
            true,
            &format!(
                "publish count={} rounds={} median_us={} p90_us={} max_us={}",
                self.count,
                self.rounds,
                at(0.5),
                at(0.9),
                micros[micros.len() - 1]
            ),
        );
        self.done = true;
        Ok(())
    }
}

export_registry!(BenchPublish);
