//! The instance's resolver configuration: which upstreams the private DNS
//! forwards to, and (optionally) pointing `/etc/resolv.conf` at the sidecar.
//!
//! The first time the sidecar takes `resolv.conf` over it saves the original
//! in the state directory; upstreams always come from that original, so a
//! restarted sidecar never forwards to itself. [`restore`] puts it back.

use std::net::SocketAddr;
use std::path::Path;

use meshlib::dns::parse_resolv_conf;
use meshlib::fsutil::{read_limited, read_text_limited, write_atomic, WriteError, MAX_CONFIG_FILE};

/// The saved original, in the state directory.
pub const ORIGINAL_FILE: &str = "resolv.conf.orig";

/// Why the resolver could not be pointed at the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// resolv.conf cannot name a port: the DNS server must be on port 53.
    #[error("dns.set-resolver needs the DNS server on port 53 (resolv.conf cannot name a port); it listens on {0}")]
    NotPort53(SocketAddr),
    /// Reading or writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Reading failed (or the file is not a regular file, or too large).
    #[error("{0}")]
    Read(meshlib::fsutil::ReadError),
}

/// The upstreams to forward to: the configured ones, else the saved
/// original's, else the current `resolv.conf`'s, never `own` itself.
pub fn upstreams(
    configured: &[SocketAddr],
    state_dir: &Path,
    resolv_conf: &Path,
    own: SocketAddr,
) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let text = read_text_limited(&state_dir.join(ORIGINAL_FILE), MAX_CONFIG_FILE)
        .or_else(|_| read_text_limited(resolv_conf, MAX_CONFIG_FILE))
        .unwrap_or_default();
    parse_resolv_conf(&text)
        .into_iter()
        .filter(|a| a.ip() != own.ip())
        .collect()
}

/// Points `resolv_conf` at `listen`, keeping its `search`/`options` lines,
/// after saving the original (once). Returns whether the file changed.
pub fn take_over(
    resolv_conf: &Path,
    listen: SocketAddr,
    state_dir: &Path,
) -> Result<bool, ResolverError> {
    if listen.port() != 53 {
        return Err(ResolverError::NotPort53(listen));
    }
    let current = match read_text_limited(resolv_conf, MAX_CONFIG_FILE) {
        Ok(text) => text,
        Err(e) if e.is_not_found() => String::new(),
        Err(e) => return Err(ResolverError::Read(e)),
    };
    let saved = state_dir.join(ORIGINAL_FILE);
    if !saved.exists() {
        write_atomic(&saved, current.as_bytes(), 0o644)?;
    }
    let mut text = format!(
        "# managed by the IST Mesh sidecar; the original is {}\nnameserver {}\n",
        saved.display(),
        listen.ip()
    );
    for line in current.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if matches!(word, "search" | "domain" | "options") {
            text.push_str(line);
            text.push('\n');
        }
    }
    Ok(write_atomic(resolv_conf, text.as_bytes(), 0o644)?)
}

/// Puts the saved original back (if the sidecar took over) and forgets it.
pub fn restore(resolv_conf: &Path, state_dir: &Path) -> Result<(), ResolverError> {
    let saved = state_dir.join(ORIGINAL_FILE);
    match read_limited(&saved, MAX_CONFIG_FILE) {
        Ok(original) => {
            write_atomic(resolv_conf, &original, 0o644)?;
            let _ = std::fs::remove_file(&saved);
            Ok(())
        }
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(ResolverError::Read(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_over_and_restore() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        let original = "search corp.example\nnameserver 192.0.2.53\noptions ndots:2\n";
        std::fs::write(&resolv, original).unwrap();
        let own: SocketAddr = "127.0.0.77:53".parse().unwrap();
        assert!(matches!(
            take_over(&resolv, "127.0.0.77:5353".parse().unwrap(), dir.path()),
            Err(ResolverError::NotPort53(_))
        ));
        assert!(take_over(&resolv, own, dir.path()).unwrap());
        let now = std::fs::read_to_string(&resolv).unwrap();
        assert!(
            now.contains("nameserver 127.0.0.77\n")
                && now.contains("search corp.example\n")
                && now.contains("options ndots:2\n")
        );
        assert!(!now.contains("192.0.2.53"));
        // Upstreams come from the saved original, never from ourselves; a
        // second take-over (restart) keeps the first original.
        assert_eq!(
            upstreams(&[], dir.path(), &resolv, own),
            ["192.0.2.53:53".parse().unwrap()]
        );
        assert!(!take_over(&resolv, own, dir.path()).unwrap());
        assert_eq!(
            upstreams(&[], dir.path(), &resolv, own),
            ["192.0.2.53:53".parse().unwrap()]
        );
        restore(&resolv, dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&resolv).unwrap(), original);
        assert!(!dir.path().join(ORIGINAL_FILE).exists());
        restore(&resolv, dir.path()).unwrap();
        // Configured upstreams win.
        let conf: Vec<SocketAddr> = vec!["198.51.100.1:53".parse().unwrap()];
        assert_eq!(upstreams(&conf, dir.path(), &resolv, own), conf);
    }
}
