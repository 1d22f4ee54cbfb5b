//! `discoveryd cluster create`: the README's main job. A discovery service and N
//! daemons on loopback, every node sees every member, the table is printed, and
//! stopping it (Ctrl-C or `cluster destroy`) leaves no process behind.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Lines, wait_exit};

/// The pids of `parent`'s children, from `/proc/<pid>/stat`.
fn children_of(parent: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The parent pid is the second field after the parenthesised command.
        let ppid = stat
            .rfind(')')
            .and_then(|end| stat[end + 2..].split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn create_forms_the_cluster_and_both_ways_of_stopping_leave_nothing_behind() {
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().to_str().unwrap().to_string();
    for stop_with_destroy in [true, false] {
        let mut create = Command::new(BIN)
            .args(["cluster", "create", "--nodes", "3", "--state", &state_arg])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = Lines::spawn(create.stdout.take().unwrap());
        out.wait_for("the members table", Duration::from_secs(60), |l| {
            l.starts_with("3 nodes on loopback")
        });
        let table = out.dump();
        for node in ["node-1", "node-2", "node-3"] {
            assert!(
                table
                    .lines()
                    .any(|l| l.starts_with(node) && l.contains("127.0.0.1")),
                "{node} missing from:\n{table}"
            );
        }
        // Every node, not just the first, sees the whole cluster.
        let node3 = state.path().join("discoveryd-demo/node-3/config.yaml");
        let members = Command::new(BIN)
            .args(["get", "members", "-o", "json", "--config"])
            .arg(&node3)
            .output()
            .unwrap();
        assert_eq!(
            common::ids(&String::from_utf8(members.stdout).unwrap()),
            ["node-1", "node-2", "node-3"]
        );
        let children = children_of(create.id());
        assert_eq!(children.len(), 4, "the service and 3 nodes: {children:?}");
        if stop_with_destroy {
            let destroyed = Command::new(BIN)
                .args(["cluster", "destroy", "--state", &state_arg])
                .output()
                .unwrap();
            assert!(destroyed.status.success(), "{destroyed:?}");
        } else {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(create.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
        }
        assert!(wait_exit(&mut create, Duration::from_secs(30)).success());
        let left: Vec<i32> = children.into_iter().filter(|pid| alive(*pid)).collect();
        assert!(left.is_empty(), "processes left behind: {left:?}");
    }
}
