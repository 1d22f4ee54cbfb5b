//! Which version of our WIT package a component was built against, read from its
//! import and export names (`discovery:registry/host@0.1.0`) before anything is
//! compiled, so a plugin for another major gets a clear error instead of a link
//! failure.

use anyhow::{Result, bail};
use wasmparser::{Parser, Payload};

/// The package this daemon implements.
pub const PACKAGE: &str = "discovery:registry";
pub const VERSION: (u64, u64, u64) = (0, 1, 2);

/// Checks that the component exports our `registry` interface and that every
/// `discovery:registry` name it imports or exports is a version this host can
/// serve: same major (for 0.x, same minor) and not newer.
pub fn check(wasm: &[u8]) -> Result<()> {
    if !wasmparser::Parser::is_component(wasm) {
        bail!("not a WebAssembly component (build the plugin for wasm32-wasip2)");
    }
    let mut exports_registry = false;
    for payload in Parser::new(0).parse_all(wasm) {
        let names: Vec<&str> = match payload? {
            Payload::ComponentImportSection(imports) => imports
                .into_iter()
                .map(|i| i.map(|i| i.name.name))
                .collect::<Result<_, _>>()?,
            Payload::ComponentExportSection(exports) => {
                let names: Vec<&str> = exports
                    .into_iter()
                    .map(|e| e.map(|e| e.name.name))
                    .collect::<Result<_, _>>()?;
                exports_registry |= names
                    .iter()
                    .any(|n| n.starts_with(&format!("{PACKAGE}/registry@")));
                names
            }
            _ => continue,
        };
        for name in names {
            let Some(rest) = name.strip_prefix(PACKAGE).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("");
            let parsed = parse_version(version)
                .ok_or_else(|| anyhow::anyhow!("{name:?} has no usable version"))?;
            if !compatible(parsed) {
                bail!(
                    "plugin was built for {PACKAGE}@{version}; this daemon serves {PACKAGE}@{}.{}.{} \
                     (rebuild the plugin with a matching SDK)",
                    VERSION.0,
                    VERSION.1,
                    VERSION.2
                );
            }
        }
    }
    if !exports_registry {
        bail!("component does not export {PACKAGE}/registry: it is not a registry plugin");
    }
    Ok(())
}

fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// Semver compatibility as wasmtime applies it, plus "not newer than ours": a
/// newer minor may call functions this host lacks.
fn compatible(v: (u64, u64, u64)) -> bool {
    let same_line = if VERSION.0 == 0 {
        v.0 == 0 && v.1 == VERSION.1
    } else {
        v.0 == VERSION.0
    };
    same_line && v <= VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_within_the_line_are_accepted() {
        assert!(compatible((0, 1, 0)), "0.1.0 plugins keep loading");
        assert!(compatible((0, 1, 1)));
        assert!(compatible((0, 1, 2)));
        assert!(!compatible((0, 2, 0)), "another 0.x minor is another major");
        assert!(!compatible((0, 1, 3)), "newer than this host");
        assert!(!compatible((1, 0, 0)));
        assert_eq!(parse_version("0.1.0"), Some((0, 1, 0)));
        assert_eq!(parse_version("0.1"), None);
        assert_eq!(parse_version("0.1.0-pre"), None);
    }

    #[test]
    fn core_modules_are_refused() {
        let core_module = b"\0asm\x01\0\0\0";
        let error = check(core_module).unwrap_err().to_string();
        assert!(error.contains("not a WebAssembly component"), "{error}");
    }
}
