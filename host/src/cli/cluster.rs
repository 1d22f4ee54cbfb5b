//! `discoveryd cluster create|destroy`: a local cluster on loopback in one
//! command (talosctl's spelling). `create` starts our discovery service and N
//! daemons, each with its own state dir, nodename (`node-<i>`) and fixed address
//! (`127.0.0.<10+i>`), waits until every node lists all N members, prints the
//! members table from one node, then keeps running until Ctrl-C. `destroy` stops
//! a running `create` from another terminal.
//!
//! No process outlives `create`: the children get SIGTERM when it stops, and
//! the kernel sends them SIGTERM if it dies (`PR_SET_PDEATHSIG`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Args, Subcommand};

use crate::api::{client, proto};
use crate::limits;
use crate::store::{Kind, Namespace};

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start a discovery service and N daemons on loopback, wait until every
    /// node sees all members, print them, and keep running until Ctrl-C.
    Create(CreateArgs),
    /// Stop a cluster that `cluster create` runs (from another terminal).
    Destroy(DestroyArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=200))]
    pub nodes: u8,
    /// The cluster's name: its directory under --state.
    #[arg(long, default_value = "discoveryd-demo")]
    pub name: String,
    /// Where clusters keep their state dirs and logs.
    #[arg(long, default_value_os_t = default_state_root())]
    pub state: PathBuf,
}

#[derive(Args, Debug)]
pub struct DestroyArgs {
    #[arg(long, default_value = "discoveryd-demo")]
    pub name: String,
    #[arg(long, default_value_os_t = default_state_root())]
    pub state: PathBuf,
}

fn default_state_root() -> PathBuf {
    std::env::temp_dir().join("discoveryd-clusters")
}

/// The file that names the `create` process of a running cluster.
const PID_FILE: &str = "cluster.pid";

pub async fn run(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Create(args) => create(args).await,
        ClusterCommand::Destroy(args) => destroy(args).await,
    }
}

/// Processes started by `create`, stopped (SIGTERM, then SIGKILL) on drop.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &self.0 {
            terminate(child.id());
        }
        let deadline = Instant::now() + limits::CLUSTER_STOP_WAIT;
        for (name, child) in &mut self.0 {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait().ok().flatten().is_none() {
                eprintln!("{name} did not stop; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn terminate(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
}

/// A child that gets SIGTERM if this process dies first.
fn spawn(command: &mut Command, log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

async fn create(args: CreateArgs) -> Result<()> {
    let dir = args.state.join(&args.name);
    let pid_file = dir.join(PID_FILE);
    if let Some(pid) = running_pid(&pid_file) {
        bail!(
            "cluster {:?} is already running (pid {pid}); stop it with `discoveryd cluster destroy --name {0}`",
            args.name
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    crate::private_dir::ensure(&dir)?;
    let me = std::env::current_exe()?;
    let service_binary = me.with_file_name("discovery-service");
    if !service_binary.is_file() {
        bail!(
            "{} is missing: it is built beside discoveryd (cargo build builds both)",
            service_binary.display()
        );
    }
    let mut children = Children(Vec::new());

    // The discovery service, on a loopback port the system picks.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let service_addr = format!("127.0.0.1:{port}");
    let service = spawn(
        Command::new(&service_binary).args([
            "--addr",
            &service_addr,
            "--landing-addr",
            "",
            "--metrics-addr",
            "",
            "--snapshots-enabled=false",
        ]),
        &dir.join("discovery-service.log"),
    )?;
    children.0.push(("discovery-service".into(), service));
    eprintln!(
        "discovery service on {service_addr} (log: {})",
        dir.join("discovery-service.log").display()
    );

    // One identity for the cluster, as `talosctl gen secrets` would make.
    let cluster_id = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let secret = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let mut sockets = Vec::new();
    for i in 1..=args.nodes {
        let node_dir = dir.join(format!("node-{i}"));
        crate::private_dir::ensure(&node_dir)?;
        let config = node_dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "cluster:\n  id: {cluster_id}\n  secret: {secret}\n  discovery:\n    registries:\n      \
                 service: {{endpoint: \"http://{service_addr}\"}}\n\
                 node:\n  stateDir: state\n  nodename: node-{i}\n  hostname: node-{i}\n  \
                 addresses: [127.0.0.{}]\n",
                10 + u16::from(i)
            ),
        )?;
        let daemon = spawn(
            Command::new(&me)
                .args(["run", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn"),
            &node_dir.join("discoveryd.log"),
        )?;
        children.0.push((format!("node-{i}"), daemon));
        sockets.push(node_dir.join("state").join(limits::SOCKET_NAME));
    }
    std::fs::write(&pid_file, std::process::id().to_string())?;
    eprintln!("{} daemons starting in {}", args.nodes, dir.display());

    let outcome = async {
        wait_until_complete(&sockets, args.nodes.into(), &mut children).await?;
        let mut client = client::connect(&sockets[0]).await?;
        let members = client
            .list(proto::ListRequest {
                namespace: Namespace::Cluster.as_str().into(),
                r#type: Kind::Member.type_name().into(),
            })
            .await?
            .into_inner()
            .resources;
        println!();
        super::output::print_list(
            &mut std::io::stdout().lock(),
            Kind::Member,
            super::output::Format::Table,
            &members,
        )?;
        let config = dir.join("node-1/config.yaml");
        println!(
            "\n{nodes} nodes on loopback. Try:\n  discoveryd get members -w --config {config}\n  \
             discoveryd plugins --config {config}\n\
             Ctrl-C (or `discoveryd cluster destroy --name {name}`) stops everything.",
            nodes = args.nodes,
            config = config.display(),
            name = args.name
        );
        stop_requested(&mut children).await
    }
    .await;
    drop(children);
    let _ = std::fs::remove_file(&pid_file);
    eprintln!("cluster {:?} stopped", args.name);
    outcome
}

/// Waits (bounded) until every node lists `count` members, printing progress.
async fn wait_until_complete(
    sockets: &[PathBuf],
    count: usize,
    children: &mut Children,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limits::CLUSTER_CREATE_WAIT;
    let mut last_report = String::new();
    loop {
        let mut seen = Vec::with_capacity(sockets.len());
        for socket in sockets {
            seen.push(members_seen(socket).await);
        }
        let report = seen
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "node-{}: {}/{count}",
                    i + 1,
                    n.map_or("-".into(), |n| n.to_string())
                )
            })
            .collect::<Vec<_>>()
            .join("  ");
        if report != last_report {
            eprintln!("{report}");
            last_report = report;
        }
        if seen.iter().all(|n| *n == Some(count)) {
            return Ok(());
        }
        for (name, child) in &mut children.0 {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited ({status}) before the cluster formed; see its log");
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the cluster did not form within {:?}; see the logs",
                limits::CLUSTER_CREATE_WAIT
            );
        }
        // Progress is polled across N daemons: there is no single event to wait on.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many members a node lists, or `None` while it does not answer.
async fn members_seen(socket: &Path) -> Option<usize> {
    let mut client = client::connect(socket).await.ok()?;
    let list = client
        .list(proto::ListRequest {
            namespace: Namespace::Cluster.as_str().into(),
            r#type: Kind::Member.type_name().into(),
        })
        .await
        .ok()?;
    Some(list.into_inner().resources.len())
}

/// Resolves on Ctrl-C or SIGTERM (what `destroy` sends), or fails when a child
/// dies meanwhile.
async fn stop_requested(children: &mut Children) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = check.tick() => {
                for (name, child) in &mut children.0 {
                    if let Some(status) = child.try_wait()? {
                        bail!("{name} exited ({status}); stopping the cluster");
                    }
                }
            }
        }
    }
}

/// The pid in a cluster's pid file, if that process still runs.
fn running_pid(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .is_ok()
        .then_some(pid)
}

async fn destroy(args: DestroyArgs) -> Result<()> {
    let dir = args.state.join(&args.name);
    let pid_file = dir.join(PID_FILE);
    let Some(pid) = running_pid(&pid_file) else {
        bail!(
            "no cluster {:?} is running (no live pid in {})",
            args.name,
            pid_file.display()
        );
    };
    terminate(pid as u32);
    let deadline = tokio::time::Instant::now() + limits::CLUSTER_STOP_WAIT * 2;
    while running_pid(&pid_file).is_some() {
        if tokio::time::Instant::now() > deadline {
            bail!("cluster {:?} (pid {pid}) did not stop", args.name);
        }
        // The creating process is not ours: polling its pid is all there is.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("cluster {:?} destroyed", args.name);
    Ok(())
}
