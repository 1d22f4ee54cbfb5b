//! The deployment files agree with the container file and with the server: every YAML
//! file under `examples/` parses (every document of it); the Kubernetes manifests and
//! the Talos patch run the image `server/Containerfile` builds, on the ports it
//! exposes, with flags the server accepts; the Talos snapshot directory is the image's
//! volume; the etcd endpoints name the etcd StatefulSet's members; the systemd units
//! run the binaries with flags and directories that fit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Parser;
use discovery_service::Config;
use discovery_service::config::normalize_args;
use serde::Deserialize;
use serde_norway::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The one image name everything uses: the tag is the workspace version.
fn image() -> String {
    format!(
        "ghcr.io/discoveryd/discovery-service:{}",
        env!("CARGO_PKG_VERSION")
    )
}

fn read(rel: &str) -> String {
    let path = Path::new(ROOT).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A container file's instructions (keyword upper-cased, continuation lines joined,
/// comments dropped) and its comment lines.
fn instructions(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let (mut out, mut comments, mut current) = (Vec::new(), Vec::new(), String::new());
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(c) = trimmed.strip_prefix('#') {
            comments.push(c.trim().to_owned());
            continue;
        }
        if trimmed.is_empty() && current.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (kw, rest) = current.split_once(char::is_whitespace).unwrap();
                out.push((kw.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "dangling continuation: {current}");
    (out, comments)
}

/// What the examples are checked against.
struct Image {
    ports: BTreeSet<u16>,
    volume: String,
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn containerfile() -> Image {
    let (ins, comments) = instructions(&read("server/Containerfile"));
    assert!(
        comments.iter().any(|c| *c == format!("Image: {}", image())),
        "the Containerfile names the image {}",
        image()
    );
    let final_stage: Vec<_> = {
        let last_from = ins.iter().rposition(|(k, _)| k == "FROM").unwrap();
        ins[last_from..].to_vec()
    };
    let all = |kw: &str| -> Vec<String> {
        final_stage
            .iter()
            .filter(|(k, _)| k == kw)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert!(
        ins.iter().filter(|(k, _)| k == "FROM").count() >= 2,
        "multi-stage"
    );
    let user = all("USER").pop().expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "runs as {user}");
    let labels = all("LABEL").join(" ");
    assert!(
        labels.contains(&format!(
            "org.opencontainers.image.version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{labels}"
    );
    assert!(labels.contains("org.opencontainers.image.licenses=\"Apache-2.0\""));
    let ports: BTreeSet<u16> = all("EXPOSE")
        .iter()
        .flat_map(|v| v.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
        .collect();
    // The ports are the server's defaults.
    let defaults = Config::parse_from(["discovery-service"]);
    let default_ports: BTreeSet<u16> = [
        &defaults.addr,
        &defaults.landing_addr,
        &defaults.metrics_addr,
    ]
    .into_iter()
    .map(|a| port_of(a))
    .collect();
    assert_eq!(ports, default_ports, "EXPOSE the default ports");
    let volume = all("VOLUME").pop().expect("a VOLUME");
    let volume: Vec<String> = serde_json::from_str(&volume).expect("VOLUME in JSON form");
    let snapshot_dir = defaults.snapshot_path.parent().unwrap().to_str().unwrap();
    assert_eq!(
        volume,
        [snapshot_dir],
        "the volume holds the default snapshot"
    );
    let entrypoint = all("ENTRYPOINT").pop().expect("an ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoint).unwrap();
    assert_eq!(entrypoint, ["/usr/local/bin/discovery-service"]);
    Image {
        ports,
        volume: volume[0].clone(),
    }
}

/// Every YAML file under `examples/`, with all of its documents.
fn yaml_documents() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&Path::new(ROOT).join("examples"), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            docs.push((file.clone(), value));
        }
    }
    docs
}

/// Every mapping inside `v` (itself included) that has `key`.
fn find_with<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Mapping(m) => {
            if m.contains_key(key) {
                out.push(v);
            }
            for (_, child) in m {
                find_with(child, key, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|c| find_with(c, key, out)),
        Value::Tagged(t) => find_with(&t.value, key, out),
        _ => {}
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v:?}"))
}

/// The server's flags in a manifest, parsed as the binary parses them.
fn parse_args(args: &[String], what: &str) -> Config {
    let argv = std::iter::once("discovery-service".to_owned()).chain(args.iter().cloned());
    Config::try_parse_from(normalize_args(argv)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// A container running our image: its ports by name, and its parsed flags.
struct Ours<'a> {
    file: PathBuf,
    container: &'a Value,
    args: Vec<String>,
    config: Config,
    ports: Vec<(String, u16)>,
}

#[test]
fn examples_match_the_container_file() {
    let image_spec = containerfile();
    let docs = yaml_documents();
    assert!(docs.len() >= 10, "{} documents", docs.len());

    // Every container that runs a discovery-service image runs this one.
    let mut ours = Vec::new();
    for (file, doc) in &docs {
        let mut found = Vec::new();
        find_with(doc, "image", &mut found);
        for c in found {
            let img = str_of(c, "image");
            if !img.contains("discovery-service") {
                continue;
            }
            assert_eq!(img, image(), "{}", file.display());
            let args = strings(&c["args"]);
            let what = format!("{} args", file.display());
            let config = parse_args(&args, &what);
            let ports: Vec<(String, u16)> = c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| {
                    let port = p["containerPort"].as_u64().unwrap() as u16;
                    (str_of(p, "name").to_owned(), port)
                })
                .collect();
            // Exactly the exposed ports, each where the flags make the server listen.
            let set: BTreeSet<u16> = ports.iter().map(|p| p.1).collect();
            assert_eq!(set, image_spec.ports, "{what}");
            let listening: BTreeSet<u16> =
                [&config.addr, &config.landing_addr, &config.metrics_addr]
                    .into_iter()
                    .map(|a| port_of(a))
                    .collect();
            assert_eq!(listening, image_spec.ports, "{what}");
            ours.push(Ours {
                file: file.clone(),
                container: c,
                args,
                config,
                ports,
            });
        }
    }
    let in_dir = |dir: &str| -> Vec<&Ours> {
        ours.iter()
            .filter(|o| o.file.parent().unwrap().ends_with(dir))
            .collect()
    };
    let kube = in_dir("examples/discovery-service");
    let talos = in_dir("examples/talos");
    assert_eq!(kube.len(), 1, "one Deployment");
    assert_eq!(talos.len(), 1, "one static pod");

    check_kubernetes(&docs, kube[0], &image_spec);
    check_talos(&docs, talos[0], &image_spec);
}

fn kind<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| d["kind"].as_str() == Some(kind))
        .map(|(_, d)| d)
        .collect()
}

fn check_kubernetes(docs: &[(PathBuf, Value)], ours: &Ours, image_spec: &Image) {
    let deployment = kind(docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "discovery-service")
        .expect("the Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let namespace = str_of(&deployment["metadata"], "namespace");

    // --state-backend etcd, and every member of the etcd StatefulSet as an endpoint.
    assert_eq!(flag(&ours.args, "state-backend"), Some("etcd"));
    assert!(flag(&ours.args, "etcd-prefix").is_some());
    let etcd = kind(docs, "StatefulSet")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "etcd")
        .expect("the etcd StatefulSet");
    let replicas = etcd["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 3);
    let service = str_of(&etcd["spec"], "serviceName");
    let etcd_container = &etcd["spec"]["template"]["spec"]["containers"][0];
    let client_port = etcd_container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "client")
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    let want: Vec<String> = (0..replicas)
        .map(|i| format!("http://etcd-{i}.{service}.{namespace}.svc:{client_port}"))
        .collect();
    let endpoints: Vec<&str> = flag(&ours.args, "etcd-endpoints")
        .expect("--etcd-endpoints")
        .split(',')
        .collect();
    assert_eq!(endpoints, want);
    // The headless Service that gives the members those names.
    assert!(
        kind(docs, "Service")
            .iter()
            .any(|s| s["metadata"]["name"] == service && s["spec"]["clusterIP"] == "None")
    );

    // No snapshot with etcd, so nothing to mount; the pod runs as the image's user.
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(65532));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        ours.container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );

    // Services that select the pods send traffic to ports it exposes.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let mut routed = BTreeSet::new();
    for svc in kind(docs, "Service") {
        let selector = svc["spec"]["selector"].as_mapping().unwrap();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        for p in svc["spec"]["ports"].as_sequence().unwrap() {
            let target = match &p["targetPort"] {
                Value::Number(n) => n.as_u64().unwrap() as u16,
                Value::String(name) => {
                    ours.ports
                        .iter()
                        .find(|(n, _)| n == name)
                        .unwrap_or_else(|| panic!("no container port {name}"))
                        .1
                }
                other => panic!("targetPort {other:?}"),
            };
            assert!(image_spec.ports.contains(&target), "{target}");
            routed.insert(target);
        }
    }
    assert_eq!(routed, image_spec.ports, "every port is reachable");
}

fn check_talos(docs: &[(PathBuf, Value)], ours: &Ours, image_spec: &Image) {
    // A machine.pods entry with host networking, each port on the host.
    let patch = docs
        .iter()
        .find(|(f, _)| *f == ours.file)
        .map(|(_, d)| d)
        .unwrap();
    let pod = &patch["machine"]["pods"][0];
    assert_eq!(pod["kind"], "Pod");
    let spec = &pod["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    for p in ours.container["ports"].as_sequence().unwrap() {
        assert_eq!(p["hostPort"], p["containerPort"]);
    }

    // The snapshot directory is the image's volume, mounted from the host.
    assert!(ours.config.snapshots_enabled);
    let dir = ours
        .config
        .snapshot_path
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(dir, image_spec.volume);
    let mount = ours.container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .expect("the snapshot directory is mounted");
    let volume = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(
        str_of(&volume["hostPath"], "path"),
        "/var/discovery-service"
    );

    // The document the nodes use reaches the gRPC port over the host network.
    let configs = kind(docs, "DiscoveryServiceConfig");
    assert_eq!(configs.len(), 1);
    let c = configs[0];
    assert_eq!(c["apiVersion"], "v1alpha1");
    assert!(!str_of(c, "name").is_empty());
    let endpoint = str_of(c, "endpoint");
    let rest = endpoint.strip_prefix("http://").expect("http://");
    let host_port = rest.strip_suffix('/').expect("trailing slash");
    let (host, port) = host_port.rsplit_once(':').unwrap();
    assert!(host.parse::<std::net::IpAddr>().is_ok(), "{host}");
    assert_eq!(port.parse::<u16>().unwrap(), port_of(&ours.config.addr));
}

/// `Key=value` settings of a unit file's `[Service]` section, continuation lines joined.
fn unit_service(rel: &str) -> Vec<(String, String)> {
    let (mut out, mut current, mut in_service) = (Vec::new(), String::new(), false);
    for line in read(rel).lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_service = t == "[Service]";
            continue;
        }
        if !in_service || t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (k, v) = current.split_once('=').unwrap();
                out.push((k.to_owned(), v.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

fn setting<'a>(unit: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn systemd_units_run_the_binaries_with_their_state_directories() {
    let server = unit_service("examples/systemd/discovery-service.service");
    let exec = setting(&server, "ExecStart");
    let argv: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    assert_eq!(argv[0], "/usr/local/bin/discovery-service");
    let config = parse_args(&argv[1..], "discovery-service.service");
    let state = setting(&server, "StateDirectory");
    assert_eq!(
        config.snapshot_path.parent().unwrap(),
        Path::new("/var/lib").join(state[0])
    );
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
    ] {
        assert_eq!(setting(&server, key), [value], "{key}");
    }

    let daemon = unit_service("examples/systemd/discoveryd.service");
    assert_eq!(
        setting(&daemon, "ExecStart"),
        ["/usr/local/bin/discoveryd run --config /etc/discoveryd/config.yaml"]
    );
    // The daemon's default node.stateDir.
    assert_eq!(setting(&daemon, "StateDirectory"), ["discoveryd"]);
    assert_eq!(setting(&daemon, "User"), ["discoveryd"]);
    let sysusers = read("examples/systemd/discoveryd.sysusers.conf");
    assert!(
        sysusers
            .lines()
            .any(|l| l.starts_with("u discoveryd ") && l.ends_with(" /var/lib/discoveryd")),
        "{sysusers}"
    );
    for (key, value) in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict")] {
        assert_eq!(setting(&daemon, key), [value], "{key}");
    }
}

#[test]
fn the_license_is_apache_2_0() {
    let license = read("LICENSE");
    assert!(
        license.contains("Apache License\n                           Version 2.0, January 2004")
    );
    assert!(license.contains("END OF TERMS AND CONDITIONS"));
    assert_eq!(env!("CARGO_PKG_LICENSE"), "Apache-2.0");
}
