//! The capabilities a plugin declares it cannot work without, read from a custom
//! section before anything is compiled. The SDK writes it
//! (`export_registry!(T, needs = ["cluster-crypto"])`): capability names, one per
//! line. A plugin without the section declares nothing.

use anyhow::{Result, bail};
use wasmparser::{Parser, Payload};

use super::Capability;

/// The custom section's name (in the component or any module inside it).
pub const SECTION: &str = "discovery:registry/needs";

/// The capabilities `wasm` declares it needs, without duplicates, in order.
pub fn declared(wasm: &[u8]) -> Result<Vec<Capability>> {
    let mut needs = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let Payload::CustomSection(section) = payload? else {
            continue;
        };
        if section.name() != SECTION {
            continue;
        }
        let Ok(text) = std::str::from_utf8(section.data()) else {
            bail!("its {SECTION} section is not UTF-8");
        };
        for name in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some(capability) = Capability::parse(name) else {
                bail!(
                    "it needs the capability {:?}, which this daemon does not offer (known: {})",
                    name.chars().take(64).collect::<String>(),
                    Capability::ALL.map(Capability::name).join(", ")
                );
            };
            if !needs.contains(&capability) {
                needs.push(capability);
            }
        }
    }
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core module with one custom section (the parser treats components and
    /// modules alike here).
    fn module_with_section(name: &str, data: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(data);
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        wasm.push(0); // custom section id
        wasm.push(body.len() as u8);
        wasm.extend(body);
        wasm
    }

    #[test]
    fn reads_the_declared_needs() {
        let wasm = module_with_section(SECTION, b"cluster-crypto\n\ncluster-crypto\nfiles\n");
        assert_eq!(
            declared(&wasm).unwrap(),
            [Capability::ClusterCrypto, Capability::Files]
        );
        assert!(declared(b"\0asm\x01\0\0\0").unwrap().is_empty());
    }

    #[test]
    fn unknown_needs_are_refused() {
        let wasm = module_with_section(SECTION, b"sockets\n");
        let error = declared(&wasm).unwrap_err().to_string();
        assert!(
            error.contains("\"sockets\", which this daemon does not offer"),
            "{error}"
        );
    }
}
