//! Reading and writing files safely: bounded reads that never block on a
//! FIFO or a device, atomic replacement that keeps permissions, secret files
//! with mode 0600, private directories with mode 0700, and the hosts-file
//! update built on [`crate::render::hosts`].
//!
//! Every file read from a path someone else chose (a config, a hosts file,
//! a cache) goes through [`read_limited`]: it opens with `O_NONBLOCK`,
//! refuses anything but a regular file, and refuses files over a size
//! limit, so a FIFO, `/dev/zero` or a multi-gigabyte file gives a clear
//! error instead of a hang or an exhausted memory.
//!
//! Atomic replacement writes a temporary file in the same directory, syncs
//! it, gives it the old file's mode and owner, and renames it over the
//! target: a reader sees the old or the new file, never a mix. Where rename
//! is impossible because the target is a mount point (`/etc/hosts` in a
//! container is a bind mount: `EBUSY`), the file is rewritten in place.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::render::hosts::{replace_section, HostsError};

/// Size limit of small files: keys, credentials, tokens (64 KiB).
pub const MAX_SMALL_FILE: u64 = 64 << 10;
/// Size limit of configuration files: TOML config, `warp.config.js`,
/// hosts files, `resolv.conf` (4 MiB).
pub const MAX_CONFIG_FILE: u64 = 4 << 20;
/// Size limit of cached state: a network map of the largest range (64 MiB).
pub const MAX_STATE_FILE: u64 = 64 << 20;

/// Why a file could not be read.
///
/// Display includes the system error; no `source()` is exposed, so a chain
/// printer (`{:#}`) shows it once.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed (the file may be missing: see
    /// [`ReadError::is_not_found`]).
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        error: io::Error,
    },
    /// The path is a FIFO, a device, a socket or a directory.
    #[error("{path}: is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead ("FIFO", "directory", ...).
        kind: &'static str,
    },
    /// The file is larger than the limit for its kind.
    #[error("{path}: {len} bytes, over the limit of {max} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (or the bytes read before giving up).
        len: u64,
        /// The limit.
        max: u64,
    },
}

impl ReadError {
    /// What is wrong, without the path (for messages that name it already).
    pub fn reason(&self) -> String {
        match self {
            ReadError::Io { error, .. } => error.to_string(),
            ReadError::NotRegular { kind, .. } => format!("is a {kind}, not a regular file"),
            ReadError::TooLarge { len, max, .. } => {
                format!("{len} bytes, over the limit of {max} bytes")
            }
        }
    }

    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { error, .. } if error.kind() == io::ErrorKind::NotFound)
    }
}

/// What a non-regular file is, for messages.
fn file_kind(t: fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Checks that `path` (following symlinks) is a regular file of at most
/// `max` bytes, without opening it. A missing file is an
/// [`ReadError::Io`] with `NotFound`.
pub fn check_regular(path: &Path, max: u64) -> Result<fs::Metadata, ReadError> {
    let meta = fs::metadata(path).map_err(|error| ReadError::Io {
        path: path.to_owned(),
        error,
    })?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(meta.file_type()),
        });
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge {
            path: path.to_owned(),
            len: meta.len(),
            max,
        });
    }
    Ok(meta)
}

/// Reads a regular file of at most `max` bytes. Opens with `O_NONBLOCK`
/// (a FIFO never blocks the open), checks the type and size of what was
/// opened, and stops reading past `max` (a file growing meanwhile).
pub fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let io = |error| ReadError::Io {
        path: path.to_owned(),
        error,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(meta.file_type()),
        });
    }
    let too_large = |len| ReadError::TooLarge {
        path: path.to_owned(),
        len,
        max,
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > max {
        return Err(too_large(buf.len() as u64));
    }
    Ok(buf)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_text_limited(path: &Path, max: u64) -> Result<String, ReadError> {
    String::from_utf8(read_limited(path, max)?).map_err(|_| ReadError::Io {
        path: path.to_owned(),
        error: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

/// Why a file could not be updated.
///
/// Display includes the underlying error; no `source()` is exposed, so a
/// chain printer (`{:#}`) shows it once.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Reading, writing, syncing or renaming failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        error: io::Error,
    },
    /// The current file cannot be read safely (a FIFO, a device, too large).
    #[error("{0}")]
    Read(ReadError),
    /// The hosts file's managed section is malformed; the file was not touched.
    #[error("{path}: {error}")]
    Hosts {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: HostsError,
    },
    /// The file is not UTF-8 text.
    #[error("{0}: not UTF-8 text; not touched")]
    NotText(PathBuf),
}

impl WriteError {
    fn io(path: &Path, error: io::Error) -> Self {
        WriteError::Io {
            path: path.to_owned(),
            error,
        }
    }

    /// Whether the failure is a permission or read-only problem (the caller
    /// may warn and carry on).
    pub fn is_permission(&self) -> bool {
        let error = match self {
            WriteError::Io { error, .. } | WriteError::Read(ReadError::Io { error, .. }) => error,
            _ => return false,
        };
        error.kind() == io::ErrorKind::PermissionDenied || error.raw_os_error() == Some(libc::EROFS)
    }
}

/// The current contents of a file about to be replaced: `None` when it does
/// not exist. Refuses FIFOs, devices and files over [`MAX_STATE_FILE`].
fn read_existing(path: &Path) -> Result<Option<Vec<u8>>, WriteError> {
    match read_limited(path, MAX_STATE_FILE) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(WriteError::Read(e)),
    }
}

/// Replaces `path` with `contents` unless it already holds exactly that.
/// Returns whether the file changed. A new file gets `default_mode`; an
/// existing one keeps its mode and (when permitted) owner. An existing
/// path that is not a regular file (or is over [`MAX_STATE_FILE`]) is an
/// error and is left alone.
pub fn write_atomic(path: &Path, contents: &[u8], default_mode: u32) -> Result<bool, WriteError> {
    let existing = match read_existing(path)? {
        Some(old) if old == contents => return Ok(false),
        Some(_) => Some(fs::metadata(path).map_err(|e| WriteError::io(path, e))?),
        None => None,
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

/// Creates a directory for secrets, mode 0700, and its missing parents as
/// `mkdir -p` does (mode 0777 less the umask: only the last one holds
/// secrets); an existing one open to others is tightened to 0700. Returns
/// the mode it had when it was tightened (so the caller can say so), `None`
/// otherwise.
pub fn create_private_dir(path: &Path) -> Result<Option<u32>, WriteError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| WriteError::io(parent, e))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(WriteError::io(path, e)),
    }
    let mode = fs::metadata(path)
        .map_err(|e| WriteError::io(path, e))?
        .mode()
        & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(path, Permissions::from_mode(0o700))
        .map_err(|e| WriteError::io(path, e))?;
    Ok(Some(mode))
}

/// Replaces the managed section `tag` of the hosts file at `path` with
/// `section` (from [`crate::render::hosts::render_section`]); every other
/// line is kept. Returns whether the file changed. A missing file is created
/// (mode 0644). A path that is not a regular file (a FIFO, a device) or is
/// over [`MAX_CONFIG_FILE`] is an error, never a hang.
pub fn update_hosts_file(path: &Path, tag: &str, section: &str) -> Result<bool, WriteError> {
    let original = match read_limited(path, MAX_CONFIG_FILE) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| WriteError::NotText(path.to_owned()))?,
        Err(e) if e.is_not_found() => String::new(),
        Err(e) => return Err(WriteError::Read(e)),
    };
    let updated = replace_section(&original, tag, section).map_err(|error| WriteError::Hosts {
        path: path.to_owned(),
        error,
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
        assert_eq!(create_private_dir(&d).unwrap(), None);
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        // An existing directory open to others is tightened.
        fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        assert_eq!(create_private_dir(&d).unwrap(), Some(0o755));
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        // Missing parents are made as `mkdir -p` makes them: 0777 less the
        // umask; only the last directory is private.
        let umask = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
            .unwrap();
        let deep = dir.path().join("home/.config/ist-mesh");
        assert_eq!(create_private_dir(&deep).unwrap(), None);
        assert_eq!(fs::metadata(&deep).unwrap().mode() & 0o777, 0o700);
        for parent in ["home", "home/.config"] {
            let mode = fs::metadata(dir.path().join(parent)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o777 & !umask, "{parent}");
        }
        // A file in the way is an error, not a directory.
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(create_private_dir(&file).is_err());
        assert!(create_private_dir(&file.join("sub")).is_err());
    }

    /// Runs `f` on a thread; fails if it takes more than 5 s (a hang).
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("hung on a non-regular file")
    }

    #[test]
    fn fifos_devices_and_huge_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("hosts");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let f = fifo.clone();
        let err = within_5s(move || update_hosts_file(&f, "t", &render_section("t", &[])));
        let err = err.unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::Read(ReadError::NotRegular { kind: "FIFO", .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("is a FIFO, not a regular file"),
            "{err}"
        );
        let f = fifo.clone();
        assert!(within_5s(move || write_atomic(&f, b"x", 0o600)).is_err());
        let f = fifo.clone();
        assert!(matches!(
            within_5s(move || read_limited(&f, 10)),
            Err(ReadError::NotRegular { .. })
        ));
        assert!(
            fs::metadata(&fifo).unwrap().file_type().is_fifo(),
            "left alone"
        );
        let err = within_5s(|| read_limited(Path::new("/dev/zero"), 10)).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        assert_eq!(err.reason(), "is a character device, not a regular file");
        assert!(matches!(
            read_limited(dir.path(), 10),
            Err(ReadError::NotRegular {
                kind: "directory",
                ..
            })
        ));
        // Size limits: a sparse 5 GB file is refused from its size alone.
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(5 << 30).unwrap();
        let err = read_limited(&big, MAX_CONFIG_FILE).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { .. }), "{err}");
        assert!(matches!(
            update_hosts_file(&big, "t", &render_section("t", &[])),
            Err(WriteError::Read(ReadError::TooLarge { .. }))
        ));
        fs::write(&big, b"12345").unwrap();
        assert_eq!(read_limited(&big, 5).unwrap(), b"12345");
        assert!(read_limited(&big, 4).is_err());
        assert!(read_limited(&dir.path().join("missing"), 4)
            .unwrap_err()
            .is_not_found());
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
