//! The `files` capability: directories an operator lets a plugin read, served
//! through standard WASI filesystem calls with three guards on top of wasmtime's
//! read-only preopens:
//!
//! - Only regular files and directories open. A FIFO, a device or a socket in a
//!   granted directory could block a host thread forever (opening a FIFO waits for
//!   a writer) or stream without end; such an open fails with `not-permitted`.
//! - A plugin whose resource table is full (it holds its limit of files, streams
//!   and pollables) gets an error from `open-at` instead of a host descriptor.
//! - Every blocking call runs on the plugin's own small blocking pool (see
//!   `runtime::plugin_thread`), so a call that hangs on a dead mount pins at most
//!   that pool's threads, never the daemon's; and it counts as busy time, so the
//!   CPU budget is its deadline.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self as fs, DescriptorFlags, DescriptorType, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::runtime::PluginState;

/// A host directory the plugin may read, and where it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileGrant {
    pub host: PathBuf,
    pub guest: String,
}

/// The WASI filesystem interface as wasmtime-wasi registers it; guests built
/// against any earlier 0.2.x link to it.
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Opens the granted directories, read-only, in a plugin's WASI context.
pub fn preopen(wasi: &mut WasiCtxBuilder, grants: &[FileGrant]) -> Result<()> {
    for grant in grants {
        wasi.preopened_dir(&grant.host, &grant.guest, FsPerms::ReadOnly)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("granting {}", grant.host.display()))?;
    }
    Ok(())
}

/// Replaces wasmtime-wasi's `open-at` with the guarded one. Call after adding
/// WASI to the linker.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> Result<()> {
    linker.allow_shadowing(true);
    linker.instance(FILESYSTEM_TYPES)?.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, PluginState>,
         (dir, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let opened =
                    open_at(store.data_mut(), dir, path_flags, path, open_flags, flags).await?;
                Ok((opened,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

async fn open_at(
    state: &mut PluginState,
    dir: Resource<Descriptor>,
    path_flags: PathFlags,
    path: String,
    open_flags: OpenFlags,
    flags: DescriptorFlags,
) -> wasmtime::Result<Result<Resource<Descriptor>, ErrorCode>> {
    // wasmtime-wasi traps when the table is full after the file is open; refuse
    // before, as an error the plugin can handle.
    let table = state.table();
    match table.push(()) {
        Ok(probe) => {
            table.delete(probe)?;
        }
        Err(_) => return Ok(Err(ErrorCode::InsufficientMemory)),
    }
    let mut view = state.filesystem();
    let probe_dir = Resource::new_borrow(dir.rep());
    if let Ok(stat) = view.stat_at(probe_dir, path_flags, path.clone()).await
        && !matches!(
            stat.type_,
            DescriptorType::RegularFile | DescriptorType::Directory | DescriptorType::SymbolicLink
        )
    {
        let message = format!(
            "refused to open {path:?}: only regular files and directories are served, it is {:?}",
            stat.type_
        );
        state.ctx.log.emit(tracing::Level::WARN, "files", &message);
        return Ok(Err(ErrorCode::NotPermitted));
    }
    match view.open_at(dir, path_flags, path, open_flags, flags).await {
        Ok(descriptor) => Ok(Ok(descriptor)),
        // An error code for the plugin, or a trap wasmtime-wasi meant.
        Err(error) => Ok(Err(fs::Host::convert_error_code(&mut view, error)?)),
    }
}
