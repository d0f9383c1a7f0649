//! The UAPI socket server (driver): `/var/run/wireguard/<ifname>.sock`,
//! speaking [`super::uapi`] so the stock `wg show` / `wg set` work. It
//! behaves as wireguard-go's (`ipc/uapi_unix.go`, `device/uapi.go`
//! `IpcHandle`): the socket is mode 0700, and an unknown operation closes
//! the connection without an answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::engine::Engine;
use super::uapi::{SetRequest, ERRNO_INVALID};

/// Directory of the UAPI sockets, shared by every namespace.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Longest request line accepted.
const MAX_LINE: u64 = 4096;
/// Most lines in one `set=1` request.
const MAX_SET_LINES: usize = 65_536;
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// A client that sends nothing for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Mode of the socket file: wireguard-go binds under umask 077, which
/// leaves `srwx------`. Only the owner (root) may connect.
pub const SOCKET_MODE: u32 = 0o700;

/// Why the UAPI server could not start.
#[derive(Debug, thiserror::Error)]
pub enum UapiServerError {
    /// Another live process already serves this interface's socket.
    #[error("UAPI socket {0} is in use")]
    InUse(PathBuf),
    /// Creating the directory or binding the socket failed.
    #[error("cannot bind UAPI socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The UAPI socket path of interface `ifname`.
pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// A running UAPI server; dropping it stops it and removes the socket.
pub struct UapiServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UapiServer {
    /// Binds `path` (removing a stale socket, refusing a live one) and serves
    /// `engine` on it from a thread.
    pub fn start(engine: Arc<Engine>, path: &Path) -> Result<Self, UapiServerError> {
        let bind_err = |source| UapiServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(UapiServerError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
        let listener = Arc::new(bind_private(path).map_err(bind_err)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, listener2) = (stop.clone(), listener.clone());
        let thread = std::thread::Builder::new()
            .name("wg-uapi".into())
            .spawn(move || accept_loop(&listener2, engine, stop2))
            .map_err(bind_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Wake the blocking accept (shutdown makes it fail at once, even if
        // the socket file was removed meanwhile); it sees the flag and returns.
        let _ = socket2::SockRef::from(&*self.listener).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds and listens on `path` with [`SOCKET_MODE`] from the start: the
/// mode of an unbound socket's inode is the one `bind(2)` gives the file
/// (less the umask), so no other user can connect in a moment between
/// `bind` and `chmod` (wireguard-go sets the umask instead, which would
/// touch every thread of the process); the `chmod` after makes the mode
/// exact whatever the umask.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    // SAFETY: fchmod(2) on a descriptor we own.
    if unsafe { libc::fchmod(socket.as_raw_fd(), SOCKET_MODE) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SockAddr::unix(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    socket.listen(128)?;
    Ok(UnixListener::from(OwnedFd::from(socket)))
}

fn accept_loop(listener: &UnixListener, engine: Arc<Engine>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stop.load(Relaxed) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                // e.g. EMFILE: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Relaxed) >= MAX_CONNECTIONS {
            continue; // dropped: the client sees the connection closed
        }
        active.fetch_add(1, Relaxed);
        let (engine, active) = (engine.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("wg-uapi-conn".into())
            .spawn(move || {
                let _ = serve(&engine, stream);
                active.fetch_sub(1, Relaxed);
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a UAPI connection thread");
        }
    }
}

/// Reads one line (without its newline); `None` at end of stream.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    let n = r.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    line.pop();
    Ok(Some(line))
}

/// Serves requests on one connection until it closes or misbehaves. As
/// wireguard-go: `get=1` must be followed by the empty line at once
/// (otherwise `errno=-22`), and an unknown operation closes the connection
/// without reading further or answering.
fn serve(engine: &Engine, stream: UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    while let Some(op) = read_line(&mut reader)? {
        let answer = match op.as_str() {
            "get=1" => match read_line(&mut reader)? {
                Some(end) if end.is_empty() => engine.interface_info(engine.private_key()).render(),
                Some(_) => format!("errno={ERRNO_INVALID}\n\n"),
                None => return Ok(()),
            },
            "set=1" => {
                let Some(body) = read_body(&mut reader)? else {
                    return w.write_all(format!("errno={ERRNO_INVALID}\n\n").as_bytes());
                };
                let errno = match SetRequest::parse(body.iter().map(String::as_str)) {
                    Ok(req) => engine.apply_set(&req).err().map_or(0, |e| e.errno()),
                    Err(e) => e.errno(),
                };
                format!("errno={errno}\n\n")
            }
            _ => {
                let shown: String = op.chars().take(64).collect();
                tracing::warn!("invalid UAPI operation {shown:?}: connection closed");
                return Ok(());
            }
        };
        w.write_all(answer.as_bytes())?;
    }
    Ok(())
}

/// Reads a `set=1` body up to its empty line (or the end of the stream);
/// `None` past [`MAX_SET_LINES`] lines.
fn read_body(r: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut body = Vec::new();
    while let Some(line) = read_line(r)? {
        if line.is_empty() {
            break;
        }
        if body.len() >= MAX_SET_LINES {
            return Ok(None);
        }
        body.push(line);
    }
    Ok(Some(body))
}
