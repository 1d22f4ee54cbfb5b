//! The fake against kubectl, an independent client-go client.
//!
//! kubectl comes from `$FAKE_KUBE_KUBECTL` if set, else from `PATH`; when there is none, the
//! test installs Debian's `kubernetes-client` (kubectl 1.20) with apt-get, non-interactively
//! (`sudo -n` when not root). If kubectl still cannot be had, the test says so loudly on
//! stderr, with the reason, and passes without checking anything.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Duration;

use fake_kube_apiserver::{AuthMode, FakeApiServer, FakeOptions, NodeBuilder, Verb};
use serde_json::Value;
use tokio::process::Command;

fn works(kubectl: &Path) -> bool {
    StdCommand::new(kubectl)
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    StdCommand::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn apt_get(args: &[&str]) -> Result<(), String> {
    let mut cmd = if is_root() {
        StdCommand::new("apt-get")
    } else {
        let mut c = StdCommand::new("sudo");
        c.args(["-n", "apt-get"]);
        c
    };
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "apt-get {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A working kubectl, installing Debian's when there is none.
fn kubectl() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FAKE_KUBE_KUBECTL") {
        let p = PathBuf::from(p);
        return if works(&p) {
            Ok(p)
        } else {
            Err(format!("FAKE_KUBE_KUBECTL={} does not run", p.display()))
        };
    }
    if let Some(p) = on_path("kubectl").filter(|p| works(p)) {
        return Ok(p);
    }
    let install = [
        "install",
        "-y",
        "--no-install-recommends",
        "kubernetes-client",
    ];
    if let Err(first) = apt_get(&install) {
        apt_get(&["update"]).map_err(|e| format!("{first}; then {e}"))?;
        apt_get(&install).map_err(|e| format!("{first}; after apt-get update: {e}"))?;
    }
    on_path("kubectl")
        .filter(|p| works(p))
        .ok_or_else(|| "kubernetes-client installed, but no working kubectl on PATH".into())
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--request-timeout=20s")
            .args(args)
            .env("HOME", &self.cache)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish in 90 s"))
            .expect("run kubectl");
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.ok, "kubectl {args:?} failed:\n{}", out.stderr);
        out.stdout
    }
}

#[tokio::test]
async fn kubectl_gets_and_annotates_nodes() {
    let bin = match kubectl() {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!(
                "\n*** kubectl_gets_and_annotates_nodes: NOT RUN — no kubectl could be found or installed: {why}\n"
            );
            return;
        }
    };
    let version = StdCommand::new(&bin)
        .args(["version", "--client"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("using {} ({version})", bin.display());

    let fake = FakeApiServer::start(FakeOptions::default()).await;
    fake.put_node(
        NodeBuilder::new("n1")
            .label("node-role.kubernetes.io/control-plane", "")
            .annotation("cluster.talos.dev/node-id", "id-1")
            .internal_ip("10.0.0.1")
            .hostname("n1")
            .os_image("Talos (v1.9.0)"),
    );
    fake.put_node(NodeBuilder::new("n2").internal_ip("10.0.0.2"));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig).unwrap();
    let k = Kubectl {
        bin,
        kubeconfig,
        cache: dir.path().join("cache"),
    };

    // get nodes -o json
    let list: Value = serde_json::from_str(&k.ok(&["get", "nodes", "-o", "json"]).await)
        .expect("kubectl printed JSON");
    let items = list["items"].as_array().expect("items");
    let names: Vec<&str> = items
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n1", "n2"]);
    assert_eq!(items[0]["kind"], "Node");
    assert_eq!(
        items[0]["metadata"]["annotations"]["cluster.talos.dev/node-id"],
        "id-1"
    );
    assert_eq!(items[0]["status"]["addresses"][0]["address"], "10.0.0.1");
    let os = k
        .ok(&[
            "get",
            "node",
            "n1",
            "-o",
            "jsonpath={.status.nodeInfo.osImage}",
        ])
        .await;
    assert_eq!(os, "Talos (v1.9.0)");

    // annotate k=v, then k-
    let rv = fake.resource_version();
    let out = k.ok(&["annotate", "node", "n1", "example.com/k=v"]).await;
    assert!(out.contains("node/n1 annotated"), "{out}");
    let n1 = fake.node("n1").unwrap();
    assert_eq!(n1["metadata"]["annotations"]["example.com/k"], "v");
    assert_eq!(
        n1["metadata"]["annotations"]["cluster.talos.dev/node-id"],
        "id-1"
    );
    assert_eq!(fake.resource_version(), rv + 1);
    let patch = fake.patches().pop().expect("a PATCH");
    assert_eq!(patch.status, 200);
    assert_eq!(patch.content_type, "application/merge-patch+json");
    eprintln!(
        "kubectl annotate sent {}: {}",
        patch.content_type, patch.body
    );

    let out = k.ok(&["annotate", "node", "n1", "example.com/k-"]).await;
    assert!(out.contains("node/n1 annotated"), "{out}");
    let n1 = fake.node("n1").unwrap();
    assert!(n1["metadata"]["annotations"].get("example.com/k").is_none());
    assert_eq!(
        n1["metadata"]["annotations"]["cluster.talos.dev/node-id"],
        "id-1"
    );

    // Overwriting needs --overwrite, as kubectl checks against the Node it GETs.
    let out = k
        .run(&["annotate", "node", "n1", "cluster.talos.dev/node-id=other"])
        .await;
    assert!(
        !out.ok && out.stderr.contains("already has a value"),
        "{}",
        out.stderr
    );

    // Errors from the server reach kubectl's output as the real server's would.
    let out = k.run(&["get", "node", "missing"]).await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("(NotFound): nodes \"missing\" not found"),
        "{}",
        out.stderr
    );
    let out = k.run(&["get", "pods"]).await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("the server doesn't have a resource type \"pods\""),
        "{}",
        out.stderr
    );
    fake.set_auth(Verb::List, AuthMode::NodeCredential { node: "n1".into() });
    let out = k.run(&["get", "nodes", "-o", "json"]).await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains(
            "Error from server (Forbidden): nodes is forbidden: User \"system:node:n1\" cannot list resource \"nodes\" in API group \"\" at the cluster scope: node 'n1' cannot read all nodes, only its own Node object"
        ),
        "{}",
        out.stderr
    );
}
