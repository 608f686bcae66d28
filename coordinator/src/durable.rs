//! Small files written durably (temporary file, fsync, rename, fsync of the directory), and the
//! lock that keeps a second `serve` off a data directory. The blob store and SQLite have their
//! own durability; this is for the handful of small files beside them (keys, operator state).

use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

/// Name of the lock file in the data directory.
const LOCK_FILE: &str = "serve.lock";

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one,
/// and the new one survives a power cut once this returns. A `secret` file is created with mode
/// 0600 on unix (before any byte is written to it).
pub fn write_atomically(path: &Path, contents: &[u8], secret: bool) -> io::Result<()> {
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp = path.with_file_name(temp_name);

    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if secret { 0o600 } else { 0o644 });
    #[cfg(not(unix))]
    let _ = secret;
    let written = options.open(&temp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(error) = written {
        // Best effort: the temporary file is garbage either way.
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    fs::rename(&temp, path)?;
    // Make the rename itself durable. Directories cannot be opened this way on Windows.
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// An exclusive lock on a data directory, held until dropped (or the process ends, however it
/// ends: the operating system releases it).
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process serves it.
    #[error("another coordinator is serving {0} (its lock file {LOCK_FILE} is held)")]
    Busy(String),
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The lock file.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// Takes the data directory's lock without waiting.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(fs::TryLockError::WouldBlock) => Err(LockError::Busy(data_dir.display().to_string())),
        Err(fs::TryLockError::Error(source)) => Err(io(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path()).unwrap();
        assert!(matches!(lock_data_dir(dir.path()), Err(LockError::Busy(_))));
        drop(first);
        lock_data_dir(dir.path()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_are_private_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomically(&path, b"one", true).unwrap();
        write_atomically(&path, b"two", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}
