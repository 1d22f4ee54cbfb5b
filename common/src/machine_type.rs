//! A node's role, with Talos's names and parsing.

use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum MachineType {
    #[default]
    Unknown,
    Init,
    Controlplane,
    Worker,
}

impl MachineType {
    /// Talos's `ParseType`: empty and `join` mean worker (kept for compatibility,
    /// reference Q19); anything unrecognised is `unknown`.
    pub fn parse_talos(s: &str) -> MachineType {
        match s {
            "init" => MachineType::Init,
            "controlplane" => MachineType::Controlplane,
            "" | "worker" | "join" => MachineType::Worker,
            _ => MachineType::Unknown,
        }
    }

    /// The text Talos shows: `unknown`, `init`, `controlplane` or `worker`.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineType::Unknown => "unknown",
            MachineType::Init => "init",
            MachineType::Controlplane => "controlplane",
            MachineType::Worker => "worker",
        }
    }

    /// Init and control-plane nodes run the Kubernetes API server.
    pub fn is_control_plane(self) -> bool {
        matches!(self, MachineType::Init | MachineType::Controlplane)
    }
}

impl fmt::Display for MachineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_talos_parse_type() {
        for (text, want) in [
            ("init", MachineType::Init),
            ("controlplane", MachineType::Controlplane),
            ("worker", MachineType::Worker),
            ("join", MachineType::Worker),
            ("", MachineType::Worker),
            ("Worker", MachineType::Unknown),
            ("boss", MachineType::Unknown),
        ] {
            assert_eq!(MachineType::parse_talos(text), want, "{text:?}");
        }
        for t in [
            MachineType::Unknown,
            MachineType::Init,
            MachineType::Controlplane,
            MachineType::Worker,
        ] {
            assert_eq!(t.to_string(), t.as_str());
        }
        assert!(MachineType::Init.is_control_plane());
        assert!(!MachineType::Worker.is_control_plane());
    }
}
