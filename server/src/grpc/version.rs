//! Normalizes `client_version` into a bounded metric label (§4.3): `vX.Y.Z` → `vX.Y`,
//! any pre-release or build suffix → `vX.Y-pre`, anything else → `unknown`; and
//! caps how many distinct labels the server keeps, since clients choose them.

use std::collections::HashSet;
use std::sync::Mutex;

pub const UNKNOWN: &str = "unknown";

/// The labels handed out so far; at most `max` distinct ones (`unknown` included).
#[derive(Debug)]
pub struct VersionLabels {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl VersionLabels {
    pub fn new(max: usize) -> VersionLabels {
        VersionLabels {
            seen: Mutex::new(HashSet::from([UNKNOWN.to_string()])),
            max,
        }
    }

    /// The label for `version`: its normalized form while the cap allows a new one
    /// (or it was seen before), `unknown` after that.
    pub fn label(&self, version: &str) -> String {
        let label = label(version);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&label) {
            return label;
        }
        if seen.len() >= self.max {
            return UNKNOWN.into();
        }
        seen.insert(label.clone());
        label
    }
}

fn digits(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
}

pub fn label(version: &str) -> String {
    let Some(rest) = version.strip_prefix('v') else {
        return UNKNOWN.into();
    };
    let (core, pre) = match rest.split_once('-') {
        Some((core, suffix)) => (core, !suffix.is_empty()),
        None => (rest, false),
    };
    let mut parts = core.split('.');
    let (Some(major), Some(minor), Some(patch), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return UNKNOWN.into();
    };
    if !digits(major, 2) || !digits(minor, 3) || !digits(patch, usize::MAX) {
        return UNKNOWN.into();
    }
    if rest.ends_with('-') {
        return UNKNOWN.into();
    }
    if pre {
        format!("v{major}.{minor}-pre")
    } else {
        format!("v{major}.{minor}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_labels_are_capped() {
        let labels = VersionLabels::new(3);
        assert_eq!(labels.label("v1.12.0"), "v1.12");
        assert_eq!(labels.label("v1.13.0-alpha.1"), "v1.13-pre");
        assert_eq!(labels.label("v1.14.0"), "unknown", "the cap counts unknown");
        assert_eq!(labels.label("v1.12.3"), "v1.12", "labels seen before stay");
        assert_eq!(labels.label("garbage"), "unknown");
        for minor in 0..1000 {
            assert!(
                ["v1.12", "v1.13-pre", "unknown"]
                    .contains(&labels.label(&format!("v9.{minor}.0")).as_str())
            );
        }
    }

    #[test]
    fn reference_examples() {
        for (input, want) in [
            ("v0.13.0", "v0.13"),
            ("v0.13.0-beta.0", "v0.13-pre"),
            ("v0.14.0-alpha.0-7-gf7d9f211-dirty", "v0.14-pre"),
            ("v1.8.3-7-gf7d9f211", "v1.8-pre"),
            ("v1.12.0", "v1.12"),
            ("", "unknown"),
            ("1.2.3", "unknown"),
            ("v1.2", "unknown"),
            ("v123.1.0", "unknown"),
            ("v1.1234.0", "unknown"),
            ("v1.2.x", "unknown"),
            ("v1.2.3.4", "unknown"),
            ("vv1.2.3", "unknown"),
        ] {
            assert_eq!(label(input), want, "{input}");
        }
    }
}
