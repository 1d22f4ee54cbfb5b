//! Misbehaving plugins, compiled to wasm from `tests/plugins/`, run next to the
//! good static-file plugin in the real daemon. Each one must be stopped and
//! restarted with its reason shown in `discoveryd plugins`, while the daemon
//! stays up and the good plugin keeps publishing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Daemon, RAW_AFFILIATES, SECRET, ids, json, json_lines, plugin};
use serde_json::Value;

const PEERS: &str = r#"
- {nodeId: peer-a, nodename: peer-a, machineType: worker, addresses: [10.9.0.1]}
- {nodeId: peer-b, nodename: peer-b, machineType: worker, addresses: [10.9.0.2]}
"#;

#[test]
fn faulty_plugins_restart_while_the_daemon_and_good_plugins_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("peers")).unwrap();
    std::fs::write(d.join("peers/peers.yaml"), PEERS).unwrap();
    // What the escape plugin must not reach: a secret beside its granted dir,
    // and a symlink inside the granted dir pointing at it.
    std::fs::create_dir(d.join("granted")).unwrap();
    std::fs::write(d.join("granted/visible.txt"), "fine").unwrap();
    std::fs::write(d.join("secret.txt"), "s3cr3t").unwrap();
    std::os::unix::fs::symlink(d.join("secret.txt"), d.join("granted/link")).unwrap();
    let config = format!(
        r#"
cluster: {{id: faults, secret: {SECRET}}}
node: {{stateDir: state, nodename: self-node}}
plugins:
  static:
    path: {static_file}
    config: {{path: /peers/peers.yaml}}
    grants: {{files: [{{host: {d}/peers, guest: /peers}}]}}
  trap:
    path: {trap}
  spin:
    path: {spin}
    limits: {{cpuBudgetMs: 200}}
  membomb:
    path: {membomb}
    limits: {{memoryMiB: 16}}
  block-sleep:
    path: {block}
    prefix: block-sleep
    config: {{mode: sleep}}
    limits: {{cpuBudgetMs: 300}}
  block-log:
    path: {block}
    prefix: block-log
    config: {{mode: log-loop}}
    limits: {{cpuBudgetMs: 300}}
  block-poll:
    path: {block}
    prefix: block-poll
    config: {{mode: poll-loop}}
    limits: {{cpuBudgetMs: 300}}
  hoard-pollables:
    path: {hostile}
    prefix: hoard-pollables
    config: {{mode: hoard-pollables}}
    limits: {{resources: 64}}
  escape:
    path: {escape}
    config:
      read: [/etc/hostname, /granted/../secret.txt, /granted/link, /proc/self/environ]
      write: [/granted/new.txt, /granted/visible.txt]
    grants: {{files: [{{host: {d}/granted, guest: /granted}}]}}
"#,
        static_file = plugin("static-file").display(),
        trap = plugin("fault-trap").display(),
        spin = plugin("fault-spin").display(),
        membomb = plugin("fault-membomb").display(),
        escape = plugin("fault-escape").display(),
        block = plugin("fault-block").display(),
        hostile = plugin("fault-hostile").display(),
        d = d.display(),
    );
    let mut daemon = Daemon::start_in(dir, &config);

    // Follow `discoveryd plugins -w` until every faulty plugin has been restarted
    // with the reason it was stopped for.
    let expected_errors = [
        ("trap", "unreachable"),
        ("spin", "CPU budget exceeded"),
        ("membomb", "memory limit exceeded"),
        ("block-sleep", "CPU budget exceeded"),
        ("block-log", "CPU budget exceeded"),
        ("block-poll", "CPU budget exceeded"),
        (
            "hoard-pollables",
            "resource limit exceeded: the plugin holds 64 host resources",
        ),
        ("escape", "read /granted/../secret.txt"),
    ];
    let (mut watcher, updates) = daemon.cli_stream(&["plugins", "-o", "json", "-w"]);
    let mut plugins: BTreeMap<String, Value> = BTreeMap::new();
    updates.wait_for(
        "every faulty plugin to be restarted",
        Duration::from_secs(60),
        |line| {
            let p = json(line);
            plugins.insert(p["name"].as_str().unwrap().to_string(), p);
            expected_errors.iter().all(|(name, error)| {
                plugins.get(*name).is_some_and(|p| {
                    p["restarts"].as_u64().unwrap() >= 1
                        && p["lastError"].as_str().unwrap().contains(error)
                })
            }) && plugins.get("static").is_some_and(|p| p["published"] == 2)
        },
    );
    let _ = watcher.kill();
    let _ = watcher.wait();

    // The chatty plugin's flood was cut to its rate.
    daemon
        .log
        .wait_for("the log flood to be cut", Duration::from_secs(10), |l| {
            l.contains("dropped")
                && l.contains("log lines over the rate limit")
                && l.contains("block-log")
        });

    // The trap plugin's 2100 bad entries (2047 refused one by one, the rest past
    // the limit in one) are logged as a few lines and a count, through its
    // rate-limited log.
    let log = daemon.log.dump();
    assert!(
        log.contains("2038 more affiliates rejected in the same publish"),
        "{log}"
    );
    let rejection_lines = log
        .lines()
        .filter(|l| l.contains("rejected affiliate"))
        .count() as u64;
    let trap_runs = json_lines(&daemon.cli(&["plugins", "-o", "json"]))
        .into_iter()
        .find(|p| p["name"] == "trap")
        .map(|p| p["restarts"].as_u64().unwrap() + 1)
        .unwrap();
    assert!(
        (1..=10 * trap_runs).contains(&rejection_lines),
        "{rejection_lines} rejection lines for {trap_runs} runs"
    );

    let good = &plugins["static"];
    assert_eq!(good["restarts"], 0, "{good}");
    assert_eq!(good["state"], "running");
    // The sandbox held: every read and write failed, and the environment was empty.
    let escape_error = plugins["escape"]["lastError"].as_str().unwrap();
    for attempt in [
        "read /etc/hostname",
        "read /granted/link",
        "read /proc/self/environ",
        "write /granted/new.txt",
        "write /granted/visible.txt",
    ] {
        assert!(
            escape_error.contains(attempt),
            "{attempt} not refused: {escape_error}"
        );
    }
    assert!(!daemon.dir.path().join("granted/new.txt").exists());
    assert_eq!(
        std::fs::read_to_string(daemon.dir.path().join("granted/visible.txt")).unwrap(),
        "fine"
    );

    // The good plugin's peers are members; the trap plugin's last publication
    // survives its crashes; nothing from the escape plugin got in.
    let members = ids(&daemon.cli(&["get", "members", "-o", "json"]));
    assert_eq!(members, ["peer-a", "peer-b", "self-node", "trap-peer"]);
    let raw = ids(&daemon.cli(RAW_AFFILIATES));
    assert_eq!(raw, ["static/peer-a", "static/peer-b", "trap/trap-peer"]);

    assert!(daemon.is_running());
    assert!(
        daemon.resident_kib() < 200 * 1024,
        "daemon memory grew with the memory bomb"
    );
    let (status, _dir) = daemon.shutdown();
    assert!(
        status.success(),
        "the daemon stops cleanly even with plugins mid-failure"
    );
}
