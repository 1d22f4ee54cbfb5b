//! The `discoveryd` command line: run the daemon, query it, reset the identity.

pub mod cluster;
pub mod output;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::{client, proto};
use crate::config;
use crate::store::{Kind, Namespace};
use output::Format;

#[derive(Parser, Debug)]
#[command(
    name = "discoveryd",
    version,
    about = "Cluster-discovery node daemon with WebAssembly registry plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// The config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show this node's identities, affiliates or members.
    Get(GetArgs),
    /// Show each registry plugin's state, restarts and last error.
    Plugins {
        #[command(flatten)]
        target: Target,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
        /// Print the list again after every change.
        #[arg(long, short)]
        watch: bool,
    },
    /// Leave the cluster: every registry withdraws this node (the discovery
    /// services delete its affiliate), then the daemon stops. A plain stop
    /// (SIGTERM, a reboot) does not withdraw the node, so membership does not flap.
    Leave {
        #[command(flatten)]
        target: Target,
    },
    /// A local cluster on loopback: our discovery service and N daemons.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Forget this node's identity; the next start creates a new one.
    Reset {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// What to show.
    #[arg(value_enum)]
    pub what: Resources,
    /// `cluster` (merged) or `cluster-raw` (per registry; affiliates only).
    #[arg(long, default_value = "cluster")]
    pub namespace: String,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Format,
    /// Keep printing changes.
    #[arg(long, short)]
    pub watch: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Resources {
    #[value(alias = "identity")]
    Identities,
    #[value(alias = "affiliate")]
    Affiliates,
    #[value(alias = "member")]
    Members,
    /// The public address a discovery service sees this node at (Talos's
    /// `addressstatuses`, ID `service`).
    #[value(alias = "address", alias = "addressstatuses")]
    Addresses,
}

impl Resources {
    fn kind(self) -> Kind {
        match self {
            Resources::Identities => Kind::Identity,
            Resources::Affiliates => Kind::Affiliate,
            Resources::Members => Kind::Member,
            Resources::Addresses => Kind::AddressStatus,
        }
    }
}

/// How to find the daemon.
#[derive(Args, Debug)]
pub struct Target {
    /// The daemon's config file (its state dir holds the socket).
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        let state_dir = match &self.config {
            Some(file) => config::state_dir_of(file)?,
            None => PathBuf::from(config::DEFAULT_STATE_DIR),
        };
        Ok(state_dir.join(crate::limits::SOCKET_NAME))
    }
}

pub async fn get(args: GetArgs) -> Result<()> {
    let namespace = Namespace::parse(&args.namespace).with_context(|| {
        format!(
            "--namespace {:?}: use cluster or cluster-raw",
            args.namespace
        )
    })?;
    let kind = args.what.kind();
    let request = proto::ListRequest {
        namespace: namespace.as_str().to_string(),
        r#type: kind.type_name().to_string(),
    };
    let mut client = client::connect(&args.target.socket()?).await?;
    let mut out = std::io::stdout().lock();
    if !args.watch {
        let resources = client.list(request).await?.into_inner().resources;
        output::print_list(&mut out, kind, args.output, &resources)?;
        return Ok(());
    }
    let mut stream = client.watch(request).await?.into_inner();
    let mut first = true;
    while let Some(event) = stream.message().await? {
        let Some(resource) = &event.resource else {
            continue;
        };
        output::print_event(&mut out, kind, args.output, event.kind(), resource, first)?;
        first = false;
    }
    Ok(())
}

pub async fn plugins(target: Target, format: Format, watch: bool) -> Result<()> {
    let mut client = client::connect(&target.socket()?).await?;
    let mut out = std::io::stdout().lock();
    if !watch {
        let plugins = client
            .plugins(proto::PluginsRequest {})
            .await?
            .into_inner()
            .plugins;
        return output::print_plugins(&mut out, format, &plugins);
    }
    let mut stream = client
        .watch_plugins(proto::PluginsRequest {})
        .await?
        .into_inner();
    let mut first = true;
    while let Some(update) = stream.message().await? {
        if !first && format == Format::Table {
            writeln!(out)?;
        }
        output::print_plugins(&mut out, format, &update.plugins)?;
        out.flush()?;
        first = false;
    }
    Ok(())
}

/// Asks the daemon to leave, then waits (bounded) until it has stopped.
pub async fn leave(target: Target) -> Result<()> {
    let socket = target.socket()?;
    let mut client = client::connect(&socket).await?;
    client.leave(proto::LeaveRequest {}).await?;
    eprintln!("leaving: the registries withdraw this node, then discoveryd stops");
    let deadline = tokio::time::Instant::now() + crate::limits::LEAVE_WAIT;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::UnixStream::connect(&socket).await.is_err() {
            println!("left the cluster; discoveryd stopped");
            return Ok(());
        }
        // Polling the socket: the daemon offers nothing to wait on once it stops.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!(
        "discoveryd is still running on {} {:?} after being asked to leave",
        socket.display(),
        crate::limits::LEAVE_WAIT
    )
}

pub async fn reset(config_file: &Path) -> Result<()> {
    let state_dir = config::state_dir_of(config_file)?;
    let socket = state_dir.join(crate::limits::SOCKET_NAME);
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        bail!(
            "discoveryd is running on {}; stop it before resetting",
            socket.display()
        );
    }
    if crate::identity::reset(&state_dir)? {
        println!("removed {}", crate::identity::path(&state_dir).display());
    } else {
        println!("no node identity in {}", state_dir.display());
    }
    Ok(())
}
