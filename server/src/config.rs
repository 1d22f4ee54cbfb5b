//! Command-line flags, with upstream's names and defaults so the binary is a drop-in
//! replacement (§4.12). Go-style single-dash flags (`-addr :3000`) and Go durations
//! (`1m30s`) are accepted too, so existing manifests keep working.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

/// Parses a Go `time.Duration` string: a sequence of decimal numbers with units
/// `ns`, `us`/`µs`, `ms`, `s`, `m`, `h` (e.g. `1m`, `1.5h`, `10m30s`); a bare `0` too.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() || t.starts_with('-') {
        return Err(err());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

/// Parses a boolean like Go's `strconv.ParseBool` (which Go's `flag` package uses):
/// `1`, `t`, `T`, `TRUE`, `true`, `True` and `0`, `f`, `F`, `FALSE`, `false`, `False`.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

/// `--state-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateBackend {
    Memory,
    Etcd,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "discovery-service",
    version,
    about = "Cluster discovery service, wire-compatible with Sidero's"
)]
pub struct Config {
    /// gRPC listen address (plus the site pages when TLS is on).
    #[arg(long, default_value = ":3000")]
    pub addr: String,
    /// Site pages listen address; empty disables.
    #[arg(long, default_value = ":3001")]
    pub landing_addr: String,
    /// Prometheus metrics listen address; empty disables.
    #[arg(long, default_value = ":2122")]
    pub metrics_addr: String,
    /// Development (human-readable) logs instead of JSON; also `MODE=dev`.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub debug: bool,
    /// Garbage collection period of the state.
    #[arg(long, default_value = "1m", value_parser = parse_go_duration)]
    pub gc_interval: Duration,
    /// Redirect every client to this `host:port` in Hello.
    #[arg(long, default_value = "")]
    pub redirect_endpoint: String,
    /// Persist the state to a snapshot file.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub snapshots_enabled: bool,
    /// Snapshot file.
    #[arg(long, default_value = "/var/discovery-service/state.binpb")]
    pub snapshot_path: PathBuf,
    /// Snapshot save period.
    #[arg(long, default_value = "10m", value_parser = parse_go_duration)]
    pub snapshot_interval: Duration,
    /// TLS certificate (PEM); with --key-path enables TLS, reloaded when it changes.
    #[arg(long, default_value = "")]
    pub certificate_path: String,
    /// TLS private key (PEM).
    #[arg(long, default_value = "")]
    pub key_path: String,
    /// Trust the X-Real-IP header. Only behind a proxy that overwrites it: otherwise
    /// clients choose their reported IP and rate-limit key.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub trust_x_real_ip: bool,
    /// Trust the first X-Forwarded-For entry (same caveat as --trust-x-real-ip).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub trust_first_x_forwarded_for: bool,
    /// Report an empty client IP in Hello.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub disable_client_ip_reporting: bool,
    /// Disable the unauthenticated `/inspect` page.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub disable_inspect: bool,
    /// Where the state lives: `memory` (this process; snapshots make it survive
    /// restarts) or `etcd` (shared by every replica pointed at the same etcd and prefix,
    /// so any replica serves any cluster; snapshots are off, etcd is the durable copy).
    #[arg(long, value_enum, default_value_t = StateBackend::Memory)]
    pub state_backend: StateBackend,
    /// etcd client URLs, comma-separated (`http://etcd-0:2379,http://etcd-1:2379`);
    /// `https://` with --etcd-ca for TLS.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this service's state in etcd; replicas sharing state use the same.
    #[arg(long, default_value = "/discovery-service/")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members that check clients; with --etcd-key.
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// Client private key (PEM) for --etcd-cert.
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// Width of an etcd lease bucket: keys expiring within one share a lease and
    /// expire at its end (tests shorten it).
    #[arg(long, default_value = "5s", value_parser = parse_go_duration, hide = true)]
    pub etcd_lease_bucket: Duration,
    /// With nothing applied from etcd for this long, a replica writes a marker key so
    /// its watch position stays recent (tests shorten it).
    #[arg(long, default_value = "1m", value_parser = parse_go_duration, hide = true)]
    pub etcd_quiet_mark: Duration,
    /// Token refill per client IP per second (tests lower it).
    #[arg(long, default_value_t = crate::limits::IP_RATE_REQUESTS_PER_SECOND_MAX, hide = true)]
    pub rate_limit_per_second: f64,
    /// Token bucket size per client IP.
    #[arg(long, default_value_t = crate::limits::IP_RATE_BURST_SIZE_MAX, hide = true)]
    pub rate_limit_burst: u32,
}

impl Config {
    /// Parses process arguments, accepting Go-style `-flag` spellings.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Self {
        Self::parse_from(normalize_args(args))
    }

    /// Defaults for in-process use (tests, benchmarks): loopback, ephemeral ports,
    /// snapshots off.
    pub fn for_tests() -> Self {
        let mut c = Self::parse_from(["discovery-service"]);
        c.addr = "127.0.0.1:0".into();
        c.landing_addr = "127.0.0.1:0".into();
        c.metrics_addr = "127.0.0.1:0".into();
        c.snapshots_enabled = false;
        c
    }

    /// The `--etcd-*` flags as client options.
    pub fn etcd_options(&self) -> crate::etcd::EtcdOptions {
        crate::etcd::EtcdOptions {
            endpoints: self
                .etcd_endpoints
                .iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            lease_bucket: self.etcd_lease_bucket,
            quiet_mark: self.etcd_quiet_mark,
        }
    }

    pub fn tls_enabled(&self) -> bool {
        !self.certificate_path.is_empty() || !self.key_path.is_empty()
    }
}

/// `-addr` → `--addr`: Go's flag package accepts one or two dashes.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let single = a.starts_with('-') && !a.starts_with("--") && a.len() > 2;
            if i > 0 && single && a.as_bytes()[1].is_ascii_alphabetic() {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::from_args(
            std::iter::once("discovery-service")
                .chain(args.iter().copied())
                .map(String::from),
        )
    }

    #[test]
    fn defaults_match_upstream_except_trust() {
        let c = parse(&[]);
        assert_eq!(c.addr, ":3000");
        assert_eq!(c.landing_addr, ":3001");
        assert_eq!(c.metrics_addr, ":2122");
        assert_eq!(c.gc_interval, Duration::from_secs(60));
        assert_eq!(c.snapshot_interval, Duration::from_secs(600));
        assert!(c.snapshots_enabled);
        assert_eq!(
            c.snapshot_path,
            PathBuf::from("/var/discovery-service/state.binpb")
        );
        assert!(!c.trust_x_real_ip && !c.trust_first_x_forwarded_for, "Q7");
        assert!(!c.tls_enabled());
    }

    #[test]
    fn go_style_flags() {
        let c = parse(&[
            "-addr",
            "127.0.0.1:1",
            "-snapshots-enabled=false",
            "--gc-interval=1m30s",
            "-trust-x-real-ip",
            "-landing-addr=",
        ]);
        assert_eq!(c.addr, "127.0.0.1:1");
        assert!(!c.snapshots_enabled);
        assert!(c.trust_x_real_ip);
        assert_eq!(c.gc_interval, Duration::from_secs(90));
        assert_eq!(c.landing_addr, "");
    }

    #[test]
    fn bool_flags_take_go_parse_bool_spellings() {
        let flags = [
            "debug",
            "snapshots-enabled",
            "trust-x-real-ip",
            "trust-first-x-forwarded-for",
            "disable-client-ip-reporting",
            "disable-inspect",
        ];
        let get = |c: &Config, flag: &str| match flag {
            "debug" => c.debug,
            "snapshots-enabled" => c.snapshots_enabled,
            "trust-x-real-ip" => c.trust_x_real_ip,
            "trust-first-x-forwarded-for" => c.trust_first_x_forwarded_for,
            "disable-client-ip-reporting" => c.disable_client_ip_reporting,
            "disable-inspect" => c.disable_inspect,
            _ => unreachable!(),
        };
        let spellings = [
            ("1", true),
            ("t", true),
            ("T", true),
            ("true", true),
            ("TRUE", true),
            ("True", true),
            ("0", false),
            ("f", false),
            ("F", false),
            ("false", false),
            ("FALSE", false),
            ("False", false),
        ];
        for flag in flags {
            for (value, want) in spellings {
                for dashes in ["-", "--"] {
                    let c = parse(&[&format!("{dashes}{flag}={value}")]);
                    assert_eq!(get(&c, flag), want, "{dashes}{flag}={value}");
                }
            }
            // A bare flag means true, as in Go.
            assert!(get(&parse(&[&format!("-{flag}")]), flag), "-{flag}");
            assert!(get(&parse(&[&format!("--{flag}")]), flag), "--{flag}");
            for bad in ["yes", "on", "tRuE", "2", ""] {
                let args = ["discovery-service".to_string(), format!("--{flag}={bad}")];
                assert!(
                    Config::try_parse_from(normalize_args(args)).is_err(),
                    "--{flag}={bad}"
                );
            }
        }
    }

    #[test]
    fn rate_limit_defaults_are_fifteen_per_second_burst_sixty() {
        let c = parse(&[]);
        assert_eq!(c.rate_limit_per_second, 15.0);
        assert_eq!(c.rate_limit_burst, 60);
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("1.5h").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_go_duration("100ms").unwrap(),
            Duration::from_millis(100)
        );
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "10", "1x", "-1s", "m", "1.2.3s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}
