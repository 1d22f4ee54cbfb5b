//! A Talos node and our daemon on one discovery service see each other. The
//! Talos side is written here from the protocol reference (§6 payload, §7.2 key,
//! §7.3 AES-GCM data, §7.4 AES-ECB endpoints, §8 client calls), with the crypto
//! crates and prost directly — none of the daemon's own code — so the daemon is
//! checked against the reference, not against itself.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes_gcm::aead::Aead;
use base64::Engine as _;
use common::{Daemon, SECRET, Service, json};
use discovery_service::proto::server::cluster_client::ClusterClient;
use discovery_service::proto::server::{AffiliateUpdateRequest, HelloRequest, WatchRequest};
use prost::Message;

/// `sidero.discovery.client.Affiliate` and friends (reference §6.1).
mod payload {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Affiliate {
        #[prost(string, tag = "1")]
        pub node_id: String,
        #[prost(bytes = "vec", repeated, tag = "2")]
        pub addresses: Vec<Vec<u8>>,
        #[prost(string, tag = "3")]
        pub hostname: String,
        #[prost(string, tag = "4")]
        pub nodename: String,
        #[prost(string, tag = "5")]
        pub machine_type: String,
        #[prost(string, tag = "6")]
        pub operating_system: String,
        #[prost(message, optional, tag = "7")]
        pub kubespan: Option<KubeSpan>,
        #[prost(message, optional, tag = "8")]
        pub control_plane: Option<ControlPlane>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KubeSpan {
        #[prost(string, tag = "1")]
        pub public_key: String,
        #[prost(bytes = "vec", tag = "2")]
        pub address: Vec<u8>,
        #[prost(message, repeated, tag = "3")]
        pub additional_addresses: Vec<IpPrefix>,
        #[prost(message, repeated, tag = "4")]
        pub exclude_advertised_addresses: Vec<IpPrefix>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IpPrefix {
        #[prost(bytes = "vec", tag = "1")]
        pub ip: Vec<u8>,
        #[prost(uint32, tag = "2")]
        pub bits: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Endpoint {
        #[prost(bytes = "vec", tag = "1")]
        pub ip: Vec<u8>,
        #[prost(uint32, tag = "2")]
        pub port: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ControlPlane {
        #[prost(uint32, tag = "1")]
        pub api_server_port: u32,
    }
}

/// The raw key: the base64-decoded secret, no KDF (§7.2).
fn key() -> [u8; 32] {
    base64::engine::general_purpose::STANDARD
        .decode(SECRET)
        .unwrap()
        .try_into()
        .unwrap()
}

/// nonce ‖ ciphertext ‖ tag, no associated data (§7.3).
fn seal(plaintext: &[u8]) -> Vec<u8> {
    let cipher = aes_gcm::Aes256Gcm::new(&key().into());
    let nonce: [u8; 12] = rand::random();
    let mut out = nonce.to_vec();
    out.extend(cipher.encrypt(&nonce.into(), plaintext).unwrap());
    out
}

fn open(data: &[u8]) -> Vec<u8> {
    let cipher = aes_gcm::Aes256Gcm::new(&key().into());
    let (nonce, sealed) = data.split_at(12);
    cipher
        .decrypt(aes_gcm::Nonce::from_slice(nonce), sealed)
        .expect("our daemon's data opens with the cluster key")
}

/// One length byte, the Endpoint message, zeros to a block boundary, each block
/// AES-encrypted on its own (§7.4).
fn seal_endpoint(endpoint: SocketAddr) -> Vec<u8> {
    let message = payload::Endpoint {
        ip: ip_bytes(endpoint.ip()),
        port: endpoint.port().into(),
    }
    .encode_to_vec();
    let mut blocks = vec![message.len() as u8];
    blocks.extend(message);
    blocks.resize(blocks.len().div_ceil(16) * 16, 0);
    let cipher = aes::Aes256::new(&key().into());
    for block in blocks.chunks_mut(16) {
        cipher.encrypt_block(block.into());
    }
    blocks
}

fn open_endpoint(blob: &[u8]) -> SocketAddr {
    let cipher = aes::Aes256::new(&key().into());
    let mut blocks = blob.to_vec();
    for block in blocks.chunks_mut(16) {
        cipher.decrypt_block(block.into());
    }
    let size = blocks[0] as usize;
    let endpoint = payload::Endpoint::decode(&blocks[1..1 + size]).unwrap();
    SocketAddr::new(ip_from(&endpoint.ip), endpoint.port as u16)
}

/// netip.Addr binary form (§6.2).
fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from(bytes: &[u8]) -> IpAddr {
    match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap()),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).unwrap()),
        n => panic!("{n}-byte address"),
    }
}

const TALOS_NODE: &str = "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC";
const CLUSTER: &str = "talos-mixed-cluster";
const KUBESPAN_KEY: &str = "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=";

#[tokio::test(flavor = "multi_thread")]
async fn a_talos_peer_and_our_daemon_see_each_other() {
    let service = Service::start(&[]);
    let config = format!(
        "cluster:\n  id: {CLUSTER}\n  secret: {SECRET}\n  discovery:\n    registries:\n      \
         service: {{endpoint: \"{}\"}}\n\
         node:\n  stateDir: state\n  hostname: ours.example\n  nodename: ours\n  \
         machineType: controlplane\n  addresses: [127.0.0.7]\n  controlPlane: {{apiServerPort: 6443}}\n  \
         kubespan:\n    publicKey: {KUBESPAN_KEY}\n    address: fd50::7\n    \
         endpoints: [\"127.0.0.7:51820\"]\n    excludeAdvertisedNetworks: [0.0.0.0/0]\n",
        service.endpoint()
    );
    let daemon = tokio::task::spawn_blocking(move || Daemon::start(&config))
        .await
        .unwrap();
    let our_id = json(&daemon.cli(&["get", "identities", "-o", "json"]))["spec"]["nodeId"]
        .as_str()
        .unwrap()
        .to_string();

    // The Talos node: Hello, its affiliate, then Watch (§8.2).
    let mut client = ClusterClient::connect(service.endpoint()).await.unwrap();
    client
        .hello(HelloRequest {
            cluster_id: CLUSTER.into(),
            client_version: "v1.12.0".into(),
        })
        .await
        .unwrap();
    let talos = payload::Affiliate {
        node_id: TALOS_NODE.into(),
        addresses: vec![ip_bytes("10.5.0.9".parse().unwrap())],
        hostname: "talos-peer.example".into(),
        nodename: "talos-peer".into(),
        machine_type: "worker".into(),
        operating_system: "Talos (v1.12.0)".into(),
        kubespan: Some(payload::KubeSpan {
            public_key: KUBESPAN_KEY.into(),
            address: ip_bytes("fd50::9".parse().unwrap()),
            additional_addresses: vec![],
            exclude_advertised_addresses: vec![],
        }),
        control_plane: None,
    };
    client
        .affiliate_update(AffiliateUpdateRequest {
            cluster_id: CLUSTER.into(),
            affiliate_id: TALOS_NODE.into(),
            affiliate_data: Some(seal(&talos.encode_to_vec()).into()),
            affiliate_endpoints: vec![seal_endpoint("10.5.0.9:51820".parse().unwrap()).into()],
            ttl: Some(prost_types::Duration {
                seconds: 1800,
                nanos: 0,
            }),
        })
        .await
        .unwrap();

    // Our daemon shows the Talos node as a member, with the reference's mapping.
    let daemon = tokio::task::spawn_blocking(move || {
        daemon.wait_members(&["ours", "talos-peer"], Duration::from_secs(10));
        daemon
    })
    .await
    .unwrap();
    let raw = common::json_lines(&daemon.cli(common::RAW_AFFILIATES));
    let peer = raw
        .iter()
        .find(|r| r["metadata"]["id"] == format!("service/{TALOS_NODE}"))
        .expect("the Talos node's raw affiliate");
    assert_eq!(peer["spec"]["hostname"], "talos-peer.example");
    assert_eq!(peer["spec"]["nodename"], "talos-peer");
    assert_eq!(peer["spec"]["machineType"], "worker");
    assert_eq!(peer["spec"]["operatingSystem"], "Talos (v1.12.0)");
    assert_eq!(peer["spec"]["addresses"], serde_json::json!(["10.5.0.9"]));
    assert_eq!(peer["spec"]["kubespan"]["address"], "fd50::9");
    assert_eq!(
        peer["spec"]["kubespan"]["endpoints"],
        serde_json::json!(["10.5.0.9:51820"])
    );

    // And the Talos node opens what our daemon published, field by field.
    let mut watch = client
        .watch(WatchRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The public address the service reports (127.0.0.1 here) joins our KubeSpan
    // endpoints, as in Talos: follow the stream until our update carries it.
    let mut ours = None;
    let wanted: Vec<SocketAddr> = vec![
        "127.0.0.7:51820".parse().unwrap(),
        "127.0.0.1:51820".parse().unwrap(),
    ];
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = watch.message().await.unwrap() {
            if let Some(affiliate) = message.affiliates.into_iter().find(|a| a.id == our_id)
                && !affiliate.data.is_empty()
            {
                let endpoints: Vec<SocketAddr> = affiliate
                    .endpoints
                    .iter()
                    .map(|b| open_endpoint(b))
                    .collect();
                let done = endpoints == wanted;
                ours = Some(affiliate);
                if done {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("our affiliate with endpoints {wanted:?}; last seen {ours:?}"));
    let ours = ours.unwrap();
    let opened = payload::Affiliate::decode(&open(&ours.data)[..]).unwrap();
    assert_eq!(opened.node_id, our_id);
    assert_eq!(opened.hostname, "ours.example");
    assert_eq!(opened.nodename, "ours");
    assert_eq!(opened.machine_type, "controlplane");
    assert_eq!(opened.addresses, [ip_bytes("127.0.0.7".parse().unwrap())]);
    assert!(
        opened.operating_system.contains('('),
        "{}",
        opened.operating_system
    );
    assert_eq!(opened.control_plane.unwrap().api_server_port, 6443);
    let kubespan = opened.kubespan.unwrap();
    assert_eq!(kubespan.public_key, KUBESPAN_KEY);
    assert_eq!(kubespan.address, ip_bytes("fd50::7".parse().unwrap()));
    assert_eq!(
        kubespan.exclude_advertised_addresses,
        [payload::IpPrefix {
            ip: vec![0, 0, 0, 0],
            bits: 0
        }]
    );
    // Endpoints are deterministic: the same one seals to the same blob here.
    assert_eq!(
        ours.endpoints[0].to_vec(),
        seal_endpoint("127.0.0.7:51820".parse().unwrap())
    );
}
