//! Writing files safely: atomic replacement that keeps permissions, secret
//! files with mode 0600, and the hosts-file update built on
//! [`crate::render::hosts`].
//!
//! Atomic replacement writes a temporary file in the same directory, syncs
//! it, gives it the old file's mode and owner, and renames it over the
//! target: a reader sees the old or the new file, never a mix. Where rename
//! is impossible because the target is a mount point (`/etc/hosts` in a
//! container is a bind mount: `EBUSY`), the file is rewritten in place.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::render::hosts::{replace_section, HostsError};

/// Why a file could not be updated.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Reading, writing, syncing or renaming failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The hosts file's managed section is malformed; the file was not touched.
    #[error("{path}: {source}")]
    Hosts {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: HostsError,
    },
    /// The file is not UTF-8 text.
    #[error("{0}: not UTF-8 text; not touched")]
    NotText(PathBuf),
}

impl WriteError {
    fn io(path: &Path, source: io::Error) -> Self {
        WriteError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Whether the failure is a permission or read-only problem (the caller
    /// may warn and carry on).
    pub fn is_permission(&self) -> bool {
        matches!(self, WriteError::Io { source, .. }
            if source.kind() == io::ErrorKind::PermissionDenied || source.raw_os_error() == Some(30 /* EROFS */))
    }
}

/// Replaces `path` with `contents` unless it already holds exactly that.
/// Returns whether the file changed. A new file gets `default_mode`; an
/// existing one keeps its mode and (when permitted) owner.
pub fn write_atomic(path: &Path, contents: &[u8], default_mode: u32) -> Result<bool, WriteError> {
    let existing = match fs::read(path) {
        Ok(old) if old == contents => return Ok(false),
        Ok(_) => Some(fs::metadata(path).map_err(|e| WriteError::io(path, e))?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(WriteError::io(path, e)),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mode = existing
        .as_ref()
        .map_or(default_mode, |m| m.mode() & 0o7777);
    let mut tmp = tempfile::Builder::new()
        .prefix(".ist-mesh.")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| WriteError::io(path, e))?;
    tmp.write_all(contents)
        .map_err(|e| WriteError::io(path, e))?;
    // The umask may have narrowed the mode at creation.
    fs::set_permissions(tmp.path(), Permissions::from_mode(mode))
        .map_err(|e| WriteError::io(path, e))?;
    if let Some(meta) = &existing {
        // Only root can give a file away; elsewhere the owner is already us.
        let _ = std::os::unix::fs::chown(tmp.path(), Some(meta.uid()), Some(meta.gid()));
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| WriteError::io(path, e))?;
    match tmp.persist(path) {
        Ok(_) => {}
        Err(e) if e.error.raw_os_error() == Some(16 /* EBUSY: a mount point */) => {
            write_in_place(path, contents)?;
        }
        Err(e) => return Err(WriteError::io(path, e.error)),
    }
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// Rewrites a file that cannot be renamed over (a bind mount).
fn write_in_place(path: &Path, contents: &[u8]) -> Result<(), WriteError> {
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| WriteError::io(path, e))?;
    f.write_all(contents).map_err(|e| WriteError::io(path, e))?;
    f.sync_all().map_err(|e| WriteError::io(path, e))
}

/// Writes a secret (a private key, a credential) atomically with mode 0600,
/// whatever the umask and whatever mode an older file had.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<(), WriteError> {
    if path.exists() {
        fs::set_permissions(path, Permissions::from_mode(0o600))
            .map_err(|e| WriteError::io(path, e))?;
    }
    write_atomic(path, contents, 0o600)?;
    Ok(())
}

/// Creates a directory (and parents) for secrets, mode 0700.
pub fn create_private_dir(path: &Path) -> Result<(), WriteError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| WriteError::io(path, e))
}

/// Replaces the managed section `tag` of the hosts file at `path` with
/// `section` (from [`crate::render::hosts::render_section`]); every other
/// line is kept. Returns whether the file changed. A missing file is created
/// (mode 0644).
pub fn update_hosts_file(path: &Path, tag: &str, section: &str) -> Result<bool, WriteError> {
    let original = match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| WriteError::NotText(path.to_owned()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(WriteError::io(path, e)),
    };
    let updated = replace_section(&original, tag, section).map_err(|source| WriteError::Hosts {
        path: path.to_owned(),
        source,
    })?;
    if updated == original {
        return Ok(false);
    }
    write_atomic(path, updated.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::hosts::render_section;

    #[test]
    fn atomic_write_keeps_mode_and_reports_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(write_atomic(&p, b"one", 0o640).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        fs::set_permissions(&p, Permissions::from_mode(0o604)).unwrap();
        assert!(!write_atomic(&p, b"one", 0o600).unwrap());
        assert!(write_atomic(&p, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o604);
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn secrets_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        fs::write(&p, "old").unwrap();
        fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        write_secret(&p, b"secret").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let d = dir.path().join("state/sub");
        create_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn hosts_file_update() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        let original = "127.0.0.1 localhost\n# keep\tme\n\n::1 x";
        fs::write(&p, original).unwrap();
        let section = render_section("pn-a", &[([10, 240, 0, 1].into(), vec!["a.warp".into()])]);
        assert!(update_hosts_file(&p, "pn-a", &section).unwrap());
        assert!(!update_hosts_file(&p, "pn-a", &section).unwrap());
        let text = fs::read_to_string(&p).unwrap();
        assert_eq!(text, format!("{original}\n{section}"));
        // A broken section: error, file untouched.
        fs::write(&p, "# BEGIN ist-mesh pn-a\nx\n").unwrap();
        let err = update_hosts_file(&p, "pn-a", &section).unwrap_err();
        assert!(matches!(err, WriteError::Hosts { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "# BEGIN ist-mesh pn-a\nx\n"
        );
        // Not text: untouched.
        fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(matches!(
            update_hosts_file(&p, "pn-a", &section),
            Err(WriteError::NotText(_))
        ));
    }

    #[test]
    fn read_only_directory_is_a_permission_error() {
        if is_root() {
            eprintln!("skipped: root ignores directory permissions");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        fs::write(&p, "x\n").unwrap();
        fs::set_permissions(dir.path(), Permissions::from_mode(0o500)).unwrap();
        let err = update_hosts_file(&p, "t", &render_section("t", &[])).unwrap_err();
        fs::set_permissions(dir.path(), Permissions::from_mode(0o700)).unwrap();
        assert!(err.is_permission(), "{err}");
    }

    fn is_root() -> bool {
        fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }
}
