//! The state directory (mode 0700, tightened if it was open to others): the
//! member's private key (generated here on first start, mode 0600, never
//! sent anywhere), the membership (0600) and the last network map (so a
//! restart brings the tunnels back with the keyserver down).
//!
//! Every file is read with a size limit and only if it is a regular file.
//! The map is a cache: a corrupt or oversized one is reported, moved aside
//! and rebuilt from the keyserver.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::fsutil::{
    create_private_dir, read_limited, write_atomic, write_secret, ReadError, WriteError,
    MAX_SMALL_FILE, MAX_STATE_FILE,
};
use crate::keys::PrivateKey;
use crate::netmap::NetworkMap;

/// File of the private key (base64, as `wg genkey` writes it).
pub const KEY_FILE: &str = "private.key";
/// File of a rotation's new key until the keyserver confirmed it (0600).
pub const NEXT_KEY_FILE: &str = "private.key.next";
/// File of the cached network map (JSON).
pub const MAP_FILE: &str = "map.json";
/// File of the membership: what a restart needs to resume (mode 0600: it
/// holds the reconnect credential).
pub const MEMBERSHIP_FILE: &str = "membership.json";

/// This member's standing in its network, kept across restarts: what the
/// keyserver needs to accept a resume (mode 0600: it holds the reconnect
/// credential) and what the data plane needs before any map arrives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    /// Keyserver addresses, pinned certificate, network, key, credential.
    pub control: crate::member::Membership,
    /// The network's range (so the interface can be addressed before any map).
    pub range: ipnet::Ipv4Net,
    /// The member's private IP.
    pub ip: std::net::Ipv4Addr,
    /// The member's index within (app, type).
    pub index: u32,
    /// The member's instance name.
    pub instance: crate::ids::InstanceName,
}

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating, reading or writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Reading failed (or the file is not a regular file, or too large).
    #[error("{0}")]
    Read(ReadError),
    /// The key file does not hold a key.
    #[error(
        "{0}: not a WireGuard private key (32 bytes of base64); move it away to generate a new one"
    )]
    BadKey(PathBuf),
    /// The cached map or membership is unreadable.
    #[error("{path}: corrupt state file: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens the state directory: creates it with mode 0700 if needed (its
    /// missing parents as `mkdir -p` does), or tightens it to 0700 if
    /// others could enter it.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        if let Some(old) = create_private_dir(dir)? {
            tracing::warn!(path = %dir.display(), mode = format!("{old:o}"), "state directory was open to others; set to mode 0700");
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The member's private key: read, or generated and written (0600) on
    /// first start. Returns whether it was generated. A key file readable by
    /// others is narrowed to 0600.
    pub fn load_or_create_key(&self) -> Result<(PrivateKey, bool), StateError> {
        let path = self.dir.join(KEY_FILE);
        match read_limited(&path, MAX_SMALL_FILE) {
            Ok(bytes) => {
                let text =
                    String::from_utf8(bytes).map_err(|_| StateError::BadKey(path.clone()))?;
                let key = PrivateKey::from_base64(text.trim())
                    .map_err(|_| StateError::BadKey(path.clone()))?;
                let mode = fs::metadata(&path)
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or(0o600);
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "private key readable by others; setting mode 0600");
                    write_secret(&path, text.as_bytes())?;
                }
                Ok((key, false))
            }
            Err(e) if e.is_not_found() => {
                let key = PrivateKey::generate();
                write_secret(&path, format!("{}\n", key.to_base64()).as_bytes())?;
                Ok((key, true))
            }
            Err(e) => Err(StateError::Read(e)),
        }
    }

    /// Reads a JSON state file of at most `max` bytes; `None` if it does not
    /// exist.
    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        file: &str,
        max: u64,
    ) -> Result<Option<T>, StateError> {
        let path = self.dir.join(file);
        match read_limited(&path, max) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::BadFile {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(StateError::Read(e)),
        }
    }

    /// Encodes a state file as JSON; the caller writes it with the right mode.
    fn to_json<T: serde::Serialize>(
        &self,
        file: &str,
        value: &T,
    ) -> Result<(PathBuf, Vec<u8>), StateError> {
        let path = self.dir.join(file);
        let json = serde_json::to_vec_pretty(value).map_err(|e| StateError::BadFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok((path, json))
    }

    /// The membership, if this member joined before.
    pub fn load_membership(&self) -> Result<Option<Membership>, StateError> {
        self.read_json(MEMBERSHIP_FILE, MAX_SMALL_FILE)
    }

    /// Saves the membership (mode 0600).
    pub fn save_membership(&self, m: &Membership) -> Result<(), StateError> {
        let (path, json) = self.to_json(MEMBERSHIP_FILE, m)?;
        write_secret(&path, &json)?;
        Ok(())
    }

    /// Forgets the membership and the map (after a revocation or a leave).
    pub fn forget_membership(&self) {
        let _ = fs::remove_file(self.dir.join(MEMBERSHIP_FILE));
        let _ = fs::remove_file(self.dir.join(MAP_FILE));
    }

    /// Replaces the private key (after a rotation the keyserver confirmed;
    /// atomic, mode 0600) and drops the pending one.
    pub fn save_key(&self, key: &PrivateKey) -> Result<(), StateError> {
        let path = self.dir.join(KEY_FILE);
        write_secret(&path, format!("{}\n", key.to_base64()).as_bytes())?;
        let _ = fs::remove_file(self.dir.join(NEXT_KEY_FILE));
        Ok(())
    }

    /// Keeps a rotation's new key (0600) before the keyserver is asked: a
    /// crash before its answer can still finish the rotation.
    pub fn save_next_key(&self, key: &PrivateKey) -> Result<(), StateError> {
        let path = self.dir.join(NEXT_KEY_FILE);
        write_secret(&path, format!("{}\n", key.to_base64()).as_bytes())?;
        Ok(())
    }

    /// The key of a rotation left unconfirmed, if any.
    pub fn load_next_key(&self) -> Option<PrivateKey> {
        let bytes = read_limited(&self.dir.join(NEXT_KEY_FILE), MAX_SMALL_FILE).ok()?;
        PrivateKey::from_base64(String::from_utf8(bytes).ok()?.trim()).ok()
    }

    /// Forgets a rotation's new key (refused).
    pub fn clear_next_key(&self) {
        let _ = fs::remove_file(self.dir.join(NEXT_KEY_FILE));
    }

    /// Caches `map` (atomically; unchanged maps are not rewritten).
    pub fn save_map(&self, map: &NetworkMap) -> Result<(), StateError> {
        let (path, json) = self.to_json(MAP_FILE, map)?;
        write_atomic(&path, &json, 0o600)?;
        Ok(())
    }

    /// The cached map, if any. A map that cannot be used (corrupt, too
    /// large, not a regular file) is only a lost cache: it is reported,
    /// moved aside to `map.json.bad` and `None` is returned, so the
    /// sidecar resyncs from the keyserver. Only a failure to read a sound
    /// file (e.g. permissions) is an error.
    pub fn load_map(&self) -> Result<Option<NetworkMap>, StateError> {
        match self.read_json(MAP_FILE, MAX_STATE_FILE) {
            Ok(map) => Ok(map),
            Err(
                e @ (StateError::BadFile { .. }
                | StateError::Read(ReadError::TooLarge { .. } | ReadError::NotRegular { .. })),
            ) => {
                let path = self.dir.join(MAP_FILE);
                let aside = self.dir.join(format!("{MAP_FILE}.bad"));
                let _ = fs::remove_file(&aside);
                if fs::rename(&path, &aside).is_err() {
                    let _ = fs::remove_file(&path);
                }
                tracing::warn!(error = %e, moved_to = %aside.display(), "the cached network map is unusable; discarded, resyncing from the keyserver");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn key_is_generated_once_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        assert_eq!(fs::metadata(state.path()).unwrap().mode() & 0o777, 0o700);
        // A state directory others can enter is tightened when opened.
        fs::set_permissions(state.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let state = StateDir::open(state.path()).unwrap();
        assert_eq!(fs::metadata(state.path()).unwrap().mode() & 0o777, 0o700);
        let (k1, new1) = state.load_or_create_key().unwrap();
        let (k2, new2) = state.load_or_create_key().unwrap();
        assert!(new1 && !new2);
        assert_eq!(k1.public_key(), k2.public_key());
        let path = state.path().join(KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // Loosened by someone: narrowed again, same key.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let (k3, _) = state.load_or_create_key().unwrap();
        assert_eq!(k3.public_key(), k1.public_key());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // Garbage: a clear error, the file is kept.
        fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            state.load_or_create_key(),
            Err(StateError::BadKey(_))
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key");
        // Huge or special files are refused, not read.
        fs::File::create(&path)
            .unwrap()
            .set_len(MAX_SMALL_FILE + 1)
            .unwrap();
        assert!(matches!(
            state.load_or_create_key(),
            Err(StateError::Read(ReadError::TooLarge { .. }))
        ));
        let m = state.path().join(MEMBERSHIP_FILE);
        fs::File::create(&m)
            .unwrap()
            .set_len(MAX_SMALL_FILE + 1)
            .unwrap();
        assert!(matches!(
            state.load_membership(),
            Err(StateError::Read(ReadError::TooLarge { .. }))
        ));
    }

    #[test]
    fn map_cache_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load_map().unwrap().is_none());
        let mut map = NetworkMap::new(
            crate::ids::NetworkId::random(),
            "prod",
            crate::ipam::DEFAULT_RANGE,
        );
        map.generation = 7;
        state.save_map(&map).unwrap();
        assert_eq!(state.load_map().unwrap(), Some(map));
        // Corrupt: a cache only, discarded (kept aside for a look).
        fs::write(state.path().join(MAP_FILE), "{").unwrap();
        assert_eq!(state.load_map().unwrap(), None);
        assert!(!state.path().join(MAP_FILE).exists());
        assert_eq!(
            fs::read_to_string(state.path().join("map.json.bad")).unwrap(),
            "{"
        );
        // Too large (sparse): discarded without being read.
        let f = fs::File::create(state.path().join(MAP_FILE)).unwrap();
        f.set_len(MAX_STATE_FILE + 1).unwrap();
        assert_eq!(state.load_map().unwrap(), None);
        assert!(!state.path().join(MAP_FILE).exists());
    }
}
