//! The node identity: 32 random bytes in jxskiss base62, kept in
//! `node-identity.yaml` in the state directory exactly as Talos keeps it.
//!
//! It is created once, exclusively, and only an explicit reset removes it: a
//! damaged file is an error, never a reason to mint a new identity (that would
//! make the node appear twice to its peers).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::base62;
use crate::limits;

pub const FILE_NAME: &str = "node-identity.yaml";
/// Talos's `DefaultNodeIdentitySize`.
const ID_BYTES: usize = 32;

#[derive(Deserialize)]
struct IdentityFile {
    #[serde(rename = "nodeId", default)]
    node_id: String,
}

/// Whether `load_or_create` found the identity or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Loaded,
    Created,
}

/// Returns the node ID stored in `state_dir`, creating the file if it is absent.
pub fn load_or_create(state_dir: &Path) -> Result<(String, Origin)> {
    let path = path(state_dir);
    if let Some(id) = load(&path)? {
        return Ok((id, Origin::Loaded));
    }
    let id = base62::encode(&rand::random::<[u8; ID_BYTES]>());
    match create(&path, &id) {
        Ok(()) => Ok((id, Origin::Created)),
        // Another process created it first: theirs wins.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let id = load(&path)?.context("node identity vanished while being created")?;
            Ok((id, Origin::Loaded))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Removes the stored identity so the next start creates a new one. Returns
/// whether there was one.
pub fn reset(state_dir: &Path) -> Result<bool> {
    let path = path(state_dir);
    match fs::remove_file(&path) {
        Ok(()) => {
            sync_dir(state_dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

fn load(path: &Path) -> Result<Option<String>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: IdentityFile = serde_norway::from_str(&text)
        .with_context(|| format!("{} is not a node identity file", path.display()))?;
    if file.node_id.is_empty() {
        // Talos's message; the file is kept for the operator to inspect or reset.
        bail!(
            "value of {FILE_NAME:?} is still zero after unmarshaling ({}); run `discoveryd reset` to create a new identity",
            path.display()
        );
    }
    // The ID becomes part of resource IDs and of discovery-service requests.
    if file.node_id.len() > limits::NODE_ID_MAX || base62::decode(&file.node_id).is_err() {
        bail!(
            "{}: nodeId {:?} is not a base62 node ID of at most {} characters; run `discoveryd reset` to create a new identity",
            path.display(),
            file.node_id,
            limits::NODE_ID_MAX
        );
    }
    Ok(Some(file.node_id))
}

/// Writes the identity to a temp file, makes it durable, then links it into
/// place: the name appears only with complete contents (a crash leaves no empty
/// file), and `link` fails if the name exists (the create stays exclusive).
fn create(path: &Path, id: &str) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".node-identity")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    // Exactly Talos's one line; base62 needs no YAML quoting.
    tmp.write_all(format!("nodeId: {id}\n").as_bytes())?;
    tmp.as_file().sync_all()?;
    fs::hard_link(tmp.path(), path)?;
    drop(tmp);
    sync_dir(dir)
}

/// Makes a create or remove in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Where the identity of a state directory lives.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let (id, origin) = load_or_create(dir.path()).unwrap();
        assert_eq!(origin, Origin::Created);
        assert!((43..=52).contains(&id.len()), "{id}");
        assert_eq!(base62::decode(&id).unwrap().len(), ID_BYTES);
        let text = fs::read_to_string(path(dir.path())).unwrap();
        assert_eq!(text, format!("nodeId: {id}\n"));
        let mode = fs::metadata(path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), (id, Origin::Loaded));
    }

    #[test]
    fn reads_a_talos_file_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            path(dir.path()),
            "nodeId: sou7yy34ykX3n373Zw1DXKb8zD7UnyKT6HT3QDsGH6L\n",
        )
        .unwrap();
        let (id, _) = load_or_create(dir.path()).unwrap();
        assert_eq!(id, "sou7yy34ykX3n373Zw1DXKb8zD7UnyKT6HT3QDsGH6L");
    }

    #[test]
    fn an_empty_id_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(path(dir.path()), "nodeId: \"\"\n").unwrap();
        let error = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("is still zero after unmarshaling"),
            "{error}"
        );
        assert_eq!(
            fs::read_to_string(path(dir.path())).unwrap(),
            "nodeId: \"\"\n"
        );
    }

    #[test]
    fn a_damaged_id_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(path(dir.path()), "nodeId: has/slash\n").unwrap();
        let error = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(error.contains("is not a base62 node ID"), "{error}");
    }

    #[test]
    fn creation_leaves_no_temp_files_and_never_replaces_an_identity() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        let error = create(&path(dir.path()), "other").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn reset_removes_it_and_the_next_start_makes_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = load_or_create(dir.path()).unwrap();
        assert!(reset(dir.path()).unwrap());
        assert!(!reset(dir.path()).unwrap());
        let (second, origin) = load_or_create(dir.path()).unwrap();
        assert_eq!(origin, Origin::Created);
        assert_ne!(first, second);
    }

    #[test]
    fn generated_ids_are_unique() {
        let ids: std::collections::HashSet<String> = (0..200)
            .map(|_| base62::encode(&rand::random::<[u8; ID_BYTES]>()))
            .collect();
        assert_eq!(ids.len(), 200);
    }
}
