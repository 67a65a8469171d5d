//! Files and directories only their owner may read: the node's keys and
//! registration, the simulated-TEE key, the coordinator's database. One place
//! creates them 0600 (directories 0700), writes them atomically, and
//! tightens loose permissions before anything is read, refusing a file whose
//! permissions cannot be tightened.
//!
//! Outside Unix there are no permission bits to set: the functions still
//! write and create, and tightening has nothing to do.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A private file's mode: read and write for the owner only.
pub const FILE_MODE: u32 = 0o600;
/// A private directory's mode.
pub const DIR_MODE: u32 = 0o700;

#[derive(Debug, Error)]
pub enum PrivateFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: permissions {mode:o} are too open and could not be tightened")]
    Permissions { path: PathBuf, mode: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PrivateFileError + '_ {
    move |source| PrivateFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Open options that create a new file with [`FILE_MODE`].
fn new_private_file() -> fs::OpenOptions {
    let mut o = fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(FILE_MODE);
    }
    o
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn mode_of(path: &Path) -> Result<u32, PrivateFileError> {
    use std::os::unix::fs::PermissionsExt;
    Ok(fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode()
        & 0o777)
}

#[cfg(not(unix))]
fn mode_of(path: &Path) -> Result<u32, PrivateFileError> {
    fs::metadata(path).map_err(io_err(path))?;
    Ok(0)
}

/// Write a file readable by its owner only, atomically: a 0600 temporary file
/// in the same directory, synced, then renamed over the target.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), PrivateFileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = new_private_file().open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Create `path` empty and 0600 unless it exists; a file another opener
/// created meanwhile is as good.
pub fn create_empty(path: &Path) -> Result<(), PrivateFileError> {
    match new_private_file().open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Create `dir` (and its parents) and make it 0700.
pub fn create_dir(dir: &Path) -> Result<(), PrivateFileError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    set_mode(dir, DIR_MODE).map_err(io_err(dir))
}

/// Tighten a file or directory that is group- or world-accessible to
/// `wanted`; refuse it if that fails.
pub fn tighten(path: &Path, wanted: u32) -> Result<(), PrivateFileError> {
    let mode = mode_of(path)?;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    tracing::warn!(path = %path.display(), mode = format_args!("{mode:o}"), "tightening loose permissions");
    set_mode(path, wanted).map_err(|_| PrivateFileError::Permissions {
        path: path.to_path_buf(),
        mode,
    })?;
    let now = mode_of(path)?;
    if now & 0o077 != 0 {
        return Err(PrivateFileError::Permissions {
            path: path.to_path_buf(),
            mode: now,
        });
    }
    Ok(())
}

/// Read a secret (a key, a token) from a private file: the file is
/// tightened to [`FILE_MODE`] first, and one larger than `max_bytes` is
/// refused. The bytes are wiped when dropped.
pub fn read_secret(
    path: &Path,
    max_bytes: u64,
) -> Result<zeroize::Zeroizing<Vec<u8>>, PrivateFileError> {
    use std::io::Read;
    tighten(path, FILE_MODE)?;
    let f = fs::File::open(path).map_err(io_err(path))?;
    // Room for the whole read up front: a growing buffer would leave
    // copies of the secret behind in freed memory.
    let cap = usize::try_from(max_bytes.saturating_add(1)).unwrap_or(usize::MAX);
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(cap.min(1 << 20)));
    f.take(max_bytes + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > max_bytes {
        return Err(PrivateFileError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {max_bytes} bytes"),
            ),
        });
    }
    Ok(buf)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_are_owner_only_and_loose_ones_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("private");
        create_dir(&d).unwrap();
        assert_eq!(mode(&d), DIR_MODE);
        let f = d.join("key.json");
        write(&f, b"secret").unwrap();
        assert_eq!(
            (mode(&f), fs::read(&f).unwrap()),
            (FILE_MODE, b"secret".to_vec())
        );
        write(&f, b"rotated").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"rotated");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        tighten(&f, FILE_MODE).unwrap();
        assert_eq!(mode(&f), FILE_MODE);
        let db = d.join("db.sqlite");
        create_empty(&db).unwrap();
        create_empty(&db).unwrap();
        assert_eq!(mode(&db), FILE_MODE);
    }
}
