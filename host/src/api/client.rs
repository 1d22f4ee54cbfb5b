//! Connects the CLI to a running daemon's socket.

use std::path::Path;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::proto::local_client::LocalClient;

pub async fn connect(socket: &Path) -> Result<LocalClient<Channel>> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: every connection is the socket.
    let channel = Endpoint::from_static("http://discoveryd.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach discoveryd at {} (is it running? pass --socket or --config)",
                socket.display()
            )
        })?;
    Ok(LocalClient::new(channel))
}
