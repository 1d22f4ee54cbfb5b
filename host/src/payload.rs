//! The `sidero.discovery.client` protobuf payload (reference §6): what an affiliate
//! and each of its KubeSpan endpoints look like inside the encrypted blobs.
//!
//! The messages are written by hand with field numbers from
//! `proto/sidero/discovery/client/affiliate.proto`: five small messages are clearer
//! than generated code, and prost's derive already writes canonical proto3 (fields
//! in ascending order, defaults omitted), byte-equal to what Talos sends.

use std::net::SocketAddr;

use discovery_common::netip;
use prost::Message;
use thiserror::Error;

use crate::specs::{AffiliateSpec, ControlPlaneSpec, IpPrefix, KubeSpanSpec, MachineType};

/// Why a payload from the network could not be read.
#[derive(Debug, Error)]
pub enum PayloadError {
    #[error("unmarshal failure: {0}")]
    Unmarshal(#[from] prost::DecodeError),
    #[error("endpoint unmarshal failure: {0}")]
    EndpointUnmarshal(prost::DecodeError),
    #[error("endpoint has no valid IP address")]
    EndpointIp,
    #[error("endpoint port {0} is out of range")]
    EndpointPort(u32),
}

#[derive(Clone, PartialEq, Message)]
struct Affiliate {
    #[prost(string, tag = "1")]
    node_id: String,
    #[prost(bytes = "vec", repeated, tag = "2")]
    addresses: Vec<Vec<u8>>,
    #[prost(string, tag = "3")]
    hostname: String,
    #[prost(string, tag = "4")]
    nodename: String,
    #[prost(string, tag = "5")]
    machine_type: String,
    #[prost(string, tag = "6")]
    operating_system: String,
    #[prost(message, optional, tag = "7")]
    kubespan: Option<KubeSpan>,
    #[prost(message, optional, tag = "8")]
    control_plane: Option<ControlPlane>,
}

#[derive(Clone, PartialEq, Message)]
struct KubeSpan {
    #[prost(string, tag = "1")]
    public_key: String,
    #[prost(bytes = "vec", tag = "2")]
    address: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    additional_addresses: Vec<IpPrefixPb>,
    /// discovery-api v0.1.8; the number is the reference's best guess (§6.1). Were it
    /// wrong, peers would skip the field as unknown and only this filter is lost.
    #[prost(message, repeated, tag = "4")]
    exclude_advertised_addresses: Vec<IpPrefixPb>,
}

#[derive(Clone, PartialEq, Message)]
struct IpPrefixPb {
    #[prost(bytes = "vec", tag = "1")]
    ip: Vec<u8>,
    #[prost(uint32, tag = "2")]
    bits: u32,
}

#[derive(Clone, PartialEq, Message)]
struct Endpoint {
    #[prost(bytes = "vec", tag = "1")]
    ip: Vec<u8>,
    #[prost(uint32, tag = "2")]
    port: u32,
}

#[derive(Clone, PartialEq, Message)]
struct ControlPlane {
    #[prost(uint32, tag = "1")]
    api_server_port: u32,
}

/// Serializes an affiliate as the plaintext of its GCM data blob.
///
/// KubeSpan endpoints are left out: they travel as separate ECB blobs so the server
/// can deduplicate them across submitters (see `crypto::ClusterKey::seal_endpoint`).
/// Which parts to send (Talos sends `kubespan` only with a public key) is the
/// caller's choice: a present `kubespan` or `control_plane` is always written, even
/// when empty, because peers tell an empty message from a missing one.
pub fn encode(spec: &AffiliateSpec) -> Vec<u8> {
    let message = Affiliate {
        node_id: spec.node_id.clone(),
        addresses: spec
            .addresses
            .iter()
            .map(|&ip| netip::addr_to_bytes(ip))
            .collect(),
        hostname: spec.hostname.clone(),
        nodename: spec.nodename.clone(),
        machine_type: spec.machine_type.as_str().to_owned(),
        operating_system: spec.operating_system.clone(),
        kubespan: spec.kubespan.as_ref().map(|k| KubeSpan {
            public_key: k.public_key.clone(),
            address: k.address.map(netip::addr_to_bytes).unwrap_or_default(),
            additional_addresses: prefixes_to_pb(&k.additional_addresses),
            exclude_advertised_addresses: prefixes_to_pb(&k.exclude_advertised_networks),
        }),
        control_plane: spec.control_plane.map(|c| ControlPlane {
            api_server_port: u32::from(c.port),
        }),
    };
    message.encode_to_vec()
}

/// Reads a decrypted data blob the way Talos turns it into a raw affiliate (§9.4):
/// the machine type through `MachineType::parse_talos`, unreadable addresses,
/// prefixes and ports dropped rather than failing the whole affiliate.
///
/// The result's `kubespan.endpoints` is empty; the caller adds the decrypted endpoint
/// blobs there, in server order, and only when `kubespan` is present (as Talos does).
pub fn decode(data: &[u8]) -> Result<AffiliateSpec, PayloadError> {
    let message = Affiliate::decode(data)?;
    Ok(AffiliateSpec {
        node_id: message.node_id,
        addresses: message
            .addresses
            .iter()
            .filter_map(|b| netip::addr_from_bytes(b))
            .collect(),
        hostname: message.hostname,
        nodename: message.nodename,
        operating_system: message.operating_system,
        machine_type: MachineType::parse_talos(&message.machine_type),
        kubespan: message.kubespan.map(|k| KubeSpanSpec {
            public_key: k.public_key,
            address: netip::addr_from_bytes(&k.address),
            additional_addresses: prefixes_from_pb(&k.additional_addresses),
            endpoints: Vec::new(),
            exclude_advertised_networks: prefixes_from_pb(&k.exclude_advertised_addresses),
        }),
        // A port over 16 bits is as unreadable as a bad address: dropped.
        control_plane: message
            .control_plane
            .and_then(|c| u16::try_from(c.api_server_port).ok())
            .map(|port| ControlPlaneSpec { port }),
    })
}

/// Serializes one KubeSpan endpoint, the plaintext of an ECB endpoint blob.
pub fn encode_endpoint(addr: SocketAddr) -> Vec<u8> {
    Endpoint {
        ip: netip::addr_to_bytes(addr.ip()),
        port: u32::from(addr.port()),
    }
    .encode_to_vec()
}

/// Reads one decrypted endpoint. An endpoint without a usable address or with a port
/// over 65535 is an error: it could not be dialled.
pub fn decode_endpoint(data: &[u8]) -> Result<SocketAddr, PayloadError> {
    let endpoint = Endpoint::decode(data).map_err(PayloadError::EndpointUnmarshal)?;
    let ip = netip::addr_from_bytes(&endpoint.ip).ok_or(PayloadError::EndpointIp)?;
    let port =
        u16::try_from(endpoint.port).map_err(|_| PayloadError::EndpointPort(endpoint.port))?;
    Ok(SocketAddr::new(ip, port))
}

fn prefixes_to_pb(prefixes: &[IpPrefix]) -> Vec<IpPrefixPb> {
    prefixes
        .iter()
        .map(|p| IpPrefixPb {
            ip: netip::addr_to_bytes(p.addr),
            bits: u32::from(p.bits),
        })
        .collect()
}

/// Drops prefixes whose address is unreadable or whose length doesn't fit its family.
fn prefixes_from_pb(prefixes: &[IpPrefixPb]) -> Vec<IpPrefix> {
    prefixes
        .iter()
        .filter_map(|p| IpPrefix::new(netip::addr_from_bytes(&p.ip)?, u8::try_from(p.bits).ok()?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    fn prefix(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    /// The local affiliate of Talos's service-registry test (§11).
    fn talos_control_plane() -> AffiliateSpec {
        AffiliateSpec {
            node_id: "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC".into(),
            addresses: vec![ip("192.168.3.4")],
            hostname: "foo.com".into(),
            nodename: "bar".into(),
            operating_system: String::new(),
            machine_type: MachineType::Controlplane,
            kubespan: Some(KubeSpanSpec {
                public_key: "PLPNBddmTgHJhOw0vcifFtBk8dAwN9d1TJbRMOqDa0=".into(),
                address: Some(ip("fd50:8d60:4238:6302:f857:23ff:fe21:d1e0")),
                additional_addresses: vec![prefix("10.244.3.1/24")],
                endpoints: vec![
                    "10.0.0.2:51820".parse().unwrap(),
                    "192.168.3.4:51820".parse().unwrap(),
                ],
                exclude_advertised_networks: vec![prefix("0.0.0.0/0")],
            }),
            control_plane: Some(ControlPlaneSpec { port: 6443 }),
        }
    }

    /// One length-delimited field, written independently of prost.
    fn field(tag: u8, value: &[u8]) -> Vec<u8> {
        assert!(value.len() < 128, "test helper writes one-byte lengths");
        let mut out = vec![tag, value.len() as u8];
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn encodes_the_exact_bytes_talos_expects() {
        let unhex = |s: &str| hex::decode(s).unwrap();
        let kubespan = [
            field(0x0a, b"PLPNBddmTgHJhOw0vcifFtBk8dAwN9d1TJbRMOqDa0="),
            field(0x12, &unhex("fd508d6042386302f85723fffe21d1e0")),
            // 10.244.3.1/24: ip 0af40301, bits 24.
            field(
                0x1a,
                &[field(0x0a, &unhex("0af40301")), vec![0x10, 24]].concat(),
            ),
            // 0.0.0.0/0: ip 00000000, bits 0 omitted as the proto3 default.
            field(0x22, &field(0x0a, &unhex("00000000"))),
        ]
        .concat();
        let expected = [
            field(0x0a, b"7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC"),
            field(0x12, &unhex("c0a80304")),
            field(0x1a, b"foo.com"),
            field(0x22, b"bar"),
            field(0x2a, b"controlplane"),
            // operating_system empty: omitted.
            field(0x3a, &kubespan),
            // control_plane 6443 = 50·128 + 43: varint ab 32.
            field(0x42, &[0x08, 0xab, 0x32]),
        ]
        .concat();
        assert_eq!(
            hex::encode(encode(&talos_control_plane())),
            hex::encode(expected)
        );
    }

    #[test]
    fn omits_absent_parts_and_defaults() {
        let spec = AffiliateSpec {
            node_id: "n".into(),
            ..Default::default()
        };
        // Only node_id and the machine type, which always has a name.
        let expected = [field(0x0a, b"n"), field(0x2a, b"unknown")].concat();
        assert_eq!(encode(&spec), expected);

        // Present but empty sub-messages are still written.
        let spec = AffiliateSpec {
            kubespan: Some(KubeSpanSpec::default()),
            control_plane: Some(ControlPlaneSpec { port: 0 }),
            ..spec
        };
        let expected = [expected, vec![0x3a, 0x00, 0x42, 0x00]].concat();
        assert_eq!(encode(&spec), expected);
    }

    #[test]
    fn round_trips_without_endpoints() {
        let spec = talos_control_plane();
        let decoded = decode(&encode(&spec)).unwrap();
        let mut expected = spec;
        expected.kubespan.as_mut().unwrap().endpoints.clear();
        assert_eq!(decoded, expected);

        let worker = AffiliateSpec {
            node_id: "w".into(),
            addresses: vec![ip("10.0.0.1"), ip("::ffff:10.0.0.1"), ip("2001:db8::1")],
            hostname: "w.example".into(),
            nodename: "w".into(),
            operating_system: "Talos (v1.12.0)".into(),
            machine_type: MachineType::Worker,
            kubespan: None,
            control_plane: None,
        };
        assert_eq!(decode(&encode(&worker)).unwrap(), worker);
    }

    #[test]
    fn decode_follows_talos_parsing() {
        let message = Affiliate {
            node_id: "n".into(),
            addresses: vec![
                vec![10, 0, 0, 1],
                vec![],        // no address: dropped
                vec![1, 2, 3], // bad length: dropped
                [netip::addr_to_bytes(ip("fe80::1")), b"eth0".to_vec()].concat(), // zone dropped
                netip::addr_to_bytes(ip("::ffff:1.2.3.4")), // stays v6
            ],
            machine_type: String::new(),
            kubespan: Some(KubeSpan {
                address: vec![1, 2],
                additional_addresses: vec![
                    IpPrefixPb {
                        ip: vec![10, 244, 0, 0],
                        bits: 16,
                    },
                    IpPrefixPb {
                        ip: vec![10, 244, 0, 0],
                        bits: 33,
                    },
                    IpPrefixPb {
                        ip: vec![10],
                        bits: 8,
                    },
                ],
                exclude_advertised_addresses: vec![IpPrefixPb {
                    ip: vec![0; 16],
                    bits: 0,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = decode(&message.encode_to_vec()).unwrap();
        assert_eq!(
            spec.addresses,
            vec![ip("10.0.0.1"), ip("fe80::1"), ip("::ffff:1.2.3.4")]
        );
        assert!(spec.addresses[2].is_ipv6());
        // Q19: an empty machine type is a worker.
        assert_eq!(spec.machine_type, MachineType::Worker);
        let kubespan = spec.kubespan.unwrap();
        assert_eq!(kubespan.address, None);
        assert_eq!(kubespan.additional_addresses, vec![prefix("10.244.0.0/16")]);
        assert_eq!(kubespan.exclude_advertised_networks, vec![prefix("::/0")]);

        let odd = Affiliate {
            machine_type: "join".into(),
            ..Default::default()
        };
        assert_eq!(
            decode(&odd.encode_to_vec()).unwrap().machine_type,
            MachineType::Worker
        );
        let big_port = Affiliate {
            control_plane: Some(ControlPlane {
                api_server_port: 70000,
            }),
            ..Default::default()
        };
        assert_eq!(
            decode(&big_port.encode_to_vec()).unwrap().control_plane,
            None
        );
        let odd = Affiliate {
            machine_type: "master".into(),
            ..Default::default()
        };
        assert_eq!(
            decode(&odd.encode_to_vec()).unwrap().machine_type,
            MachineType::Unknown
        );
    }

    /// The `m` column of reference §7.4.
    #[test]
    fn endpoints_encode_as_the_reference_shows() {
        let cases = [
            ("192.168.3.4:51820", "0a04c0a8030410ec9403"),
            ("10.0.0.2:51820", "0a040a00000210ec9403"),
            ("1.1.1.1:343", "0a040101010110d702"),
            (
                "[fd50:8d60:4238:6302:f857:23ff:fe21:d1e0]:51820",
                "0a10fd508d6042386302f85723fffe21d1e010ec9403",
            ),
        ];
        for (addr, m) in cases {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(hex::encode(encode_endpoint(addr)), m, "{addr}");
            assert_eq!(decode_endpoint(&hex::decode(m).unwrap()).unwrap(), addr);
        }
    }

    #[test]
    fn bad_endpoints_are_errors() {
        // Empty ip, port 0: the last row of §7.4, which nobody can dial.
        assert!(matches!(
            decode_endpoint(&[]),
            Err(PayloadError::EndpointIp)
        ));
        let big_port = Endpoint {
            ip: vec![1, 1, 1, 1],
            port: 70000,
        }
        .encode_to_vec();
        assert!(matches!(
            decode_endpoint(&big_port),
            Err(PayloadError::EndpointPort(70000))
        ));
        assert!(matches!(
            decode_endpoint(&[0x0a, 0x05, 1]),
            Err(PayloadError::EndpointUnmarshal(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = rand::rng();
        let valid = encode(&talos_control_plane());
        for _ in 0..20_000 {
            let len = rng.random_range(0..200);
            let mut data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = decode(&data);
            let _ = decode_endpoint(&data);
            // Flipped bytes in a real payload reach deeper into the decoder.
            data.clone_from(&valid);
            let at = rng.random_range(0..data.len());
            data[at] = rng.random();
            data.truncate(rng.random_range(0..=data.len()));
            let _ = decode(&data);
        }
    }
}
