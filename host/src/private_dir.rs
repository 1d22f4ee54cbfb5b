//! Directories that must be private to the daemon's user: the state dir holds the
//! identity and the API socket, and the compile cache holds native code the daemon
//! loads without validation.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Creates `dir` (mode 0700) if missing, and refuses one that another user owns or
/// that group or others may write.
pub fn ensure(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != me {
        bail!(
            "{} is owned by uid {}, not by this user (uid {me}); the daemon keeps its identity and compiled plugins there",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{} is writable by group or others (mode {:o}); run `chmod go-w {}`",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_private_dirs_and_refuses_shared_ones() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        ensure(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ensure(&dir).unwrap_err().to_string();
        assert!(
            error.contains("writable by group or others (mode 777)"),
            "{error}"
        );
    }
}
