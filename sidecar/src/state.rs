//! The state directory: the member's private key (generated here on first
//! start, mode 0600, never sent anywhere) and the last network map (so a
//! restart brings the tunnels back with the keyserver down).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use meshlib::fsutil::{create_private_dir, write_atomic, write_secret, WriteError};
use meshlib::keys::PrivateKey;
use meshlib::netmap::NetworkMap;

/// File of the private key (base64, as `wg genkey` writes it).
pub const KEY_FILE: &str = "private.key";
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
    pub control: meshlib::control::Membership,
    /// The network's range (so the interface can be addressed before any map).
    pub range: ipnet::Ipv4Net,
    /// The member's private IP.
    pub ip: std::net::Ipv4Addr,
    /// The member's index within (app, type).
    pub index: u32,
    /// The member's instance name.
    pub instance: meshlib::ids::InstanceName,
}

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating, reading or writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Reading failed.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
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
    /// Opens (creating with mode 0700 if needed) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        create_private_dir(dir)?;
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
        match fs::read_to_string(&path) {
            Ok(text) => {
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
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = PrivateKey::generate();
                write_secret(&path, format!("{}\n", key.to_base64()).as_bytes())?;
                Ok((key, true))
            }
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Reads a JSON state file; `None` if it does not exist.
    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        file: &str,
    ) -> Result<Option<T>, StateError> {
        let path = self.dir.join(file);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::BadFile {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
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
        self.read_json(MEMBERSHIP_FILE)
    }

    /// Saves the membership (mode 0600).
    pub fn save_membership(&self, m: &Membership) -> Result<(), StateError> {
        let (path, json) = self.to_json(MEMBERSHIP_FILE, m)?;
        write_secret(&path, &json)?;
        Ok(())
    }

    /// Forgets the membership and the map (after a revocation).
    pub fn forget_membership(&self) {
        let _ = fs::remove_file(self.dir.join(MEMBERSHIP_FILE));
        let _ = fs::remove_file(self.dir.join(MAP_FILE));
    }

    /// Caches `map` (atomically; unchanged maps are not rewritten).
    pub fn save_map(&self, map: &NetworkMap) -> Result<(), StateError> {
        let (path, json) = self.to_json(MAP_FILE, map)?;
        write_atomic(&path, &json, 0o600)?;
        Ok(())
    }

    /// The cached map, if any.
    pub fn load_map(&self) -> Result<Option<NetworkMap>, StateError> {
        self.read_json(MAP_FILE)
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
    }

    #[test]
    fn map_cache_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load_map().unwrap().is_none());
        let mut map = NetworkMap::new(
            meshlib::ids::NetworkId::random(),
            "prod",
            meshlib::ipam::DEFAULT_RANGE,
        );
        map.generation = 7;
        state.save_map(&map).unwrap();
        assert_eq!(state.load_map().unwrap(), Some(map));
        fs::write(state.path().join(MAP_FILE), "{").unwrap();
        assert!(matches!(state.load_map(), Err(StateError::BadFile { .. })));
    }
}
