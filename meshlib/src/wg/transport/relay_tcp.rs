//! The relay over TLS on TCP, for a member whose UDP is blocked: one thread
//! drives a rustls client connection (pinned certificate, ALPN
//! [`crate::proto::ALPN_RELAY`]) on a non-blocking socket. The frames are
//! the UDP relay's, each behind a 2-byte length. What it reads goes to
//! [`Frames`] (the transport's: registrations, probes, and WireGuard
//! datagrams for the engine, as if they had come from the relay's
//! address); this module knows only the connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nat::relay;

/// What the connection's thread does with what it reads.
pub(super) trait Frames: Send + 'static {
    /// The relay confirmed our registration.
    fn registered(&mut self, token: [u8; 8], keepalive: u16);
    /// A packet the relay delivered (WireGuard or a probe).
    fn deliver(&mut self, packet: &[u8]);
    /// The end of what one read brought.
    fn flush(&mut self);
    /// The latest ticket (the keyserver renews it every 2 min).
    fn ticket(&self) -> Option<Vec<u8>>;
    /// The engine stopped.
    fn stopped(&self) -> bool;
}

/// Frames waiting for the connection (more are dropped, as UDP would).
const QUEUE: usize = 1024;
/// Registrations are renewed this often.
const RENEW: Duration = Duration::from_secs(15);

/// A running TCP relay client.
pub(crate) struct TcpRelay {
    /// The relay's TCP address (what peers' endpoints show).
    pub addr: SocketAddr,
    tx: SyncSender<Vec<u8>>,
    wake: UnixDatagram,
    dead: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpRelay {
    /// Connects (in its own thread) and registers with `ticket`; what it
    /// reads goes to `frames`.
    pub fn start<F: Frames>(
        addr: SocketAddr,
        fingerprint: [u8; 32],
        ticket: Vec<u8>,
        frames: F,
    ) -> io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let (wake, wake_rx) = UnixDatagram::pair()?;
        wake.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let dead = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dead.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("wg-relay-tcp".into())
            .spawn(move || {
                let mut ctx = Ctx {
                    frames,
                    addr,
                    rx,
                    wake: wake_rx,
                    stop: s,
                };
                if let Err(e) = ctx.session(fingerprint, &ticket) {
                    tracing::warn!(relay = %addr, "relay over TCP: {e}");
                }
                d.store(true, Relaxed);
            })?;
        Ok(Self {
            addr,
            tx,
            wake,
            dead,
            stop,
            thread: Some(thread),
        })
    }

    /// Queues one relay frame (dropped when the queue is full).
    pub fn send(&self, frame: &[u8]) {
        if self.tx.try_send(frame.to_vec()).is_ok() {
            let _ = self.wake.send(&[0]);
        }
    }

    /// The connection ended.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Relaxed)
    }
}

impl Drop for TcpRelay {
    /// Tells the thread to stop, without waiting: it may be waiting for a
    /// lock the dropper holds; it ends within a second by itself.
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = self.wake.send(&[0]);
        drop(self.thread.take());
    }
}

struct Ctx<F> {
    frames: F,
    addr: SocketAddr,
    rx: Receiver<Vec<u8>>,
    wake: UnixDatagram,
    stop: Arc<AtomicBool>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Writes one frame behind its length, as one write (rustls makes a TLS
/// record of each write: the length and the frame apart would be two).
fn put_frame(tls: &mut rustls::ClientConnection, frame: &[u8]) -> io::Result<()> {
    let mut batch = Vec::with_capacity(frame.len() + 2);
    push_frame(&mut batch, frame);
    tls.writer().write_all(&batch)
}

/// Appends a frame behind its 2-byte big-endian length.
fn push_frame(batch: &mut Vec<u8>, frame: &[u8]) {
    batch.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    batch.extend_from_slice(frame);
}

impl<F: Frames> Ctx<F> {
    fn session(&mut self, fingerprint: [u8; 32], ticket: &[u8]) -> io::Result<()> {
        let mut sock = TcpStream::connect_timeout(&self.addr, Duration::from_secs(3))?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        let config =
            crate::pinned::client_config(fingerprint, crate::proto::ALPN_RELAY).map_err(other)?;
        let name =
            rustls::pki_types::ServerName::try_from(crate::proto::SERVER_NAME).map_err(other)?;
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).map_err(other)?;
        tls.set_buffer_limit(None);
        put_frame(&mut tls, &relay::register(ticket))?;
        let mut renewed = Instant::now();
        let mut inbox: Vec<u8> = Vec::new();
        let mut plain = vec![0u8; 65_536];
        let mut batch: Vec<u8> = Vec::with_capacity(64 * 1500);
        while !self.stop.load(Relaxed) && !self.frames.stopped() {
            if renewed.elapsed() >= RENEW {
                renewed = Instant::now();
                let fresh = self.frames.ticket();
                put_frame(
                    &mut tls,
                    &relay::register(fresh.as_deref().unwrap_or(ticket)),
                )?;
            }
            // New frames only once the earlier ones reached the socket.
            // Frames waiting go as one write: full TLS records, not two
            // small ones per frame.
            if !tls.wants_write() {
                batch.clear();
                for _ in 0..64 {
                    match self.rx.try_recv() {
                        Ok(f) => push_frame(&mut batch, &f),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return Ok(()),
                    }
                }
                if !batch.is_empty() {
                    tls.writer().write_all(&batch)?;
                }
            }
            while tls.wants_write() {
                match tls.write_tls(&mut sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            self.wait(&sock, tls.wants_write());
            loop {
                match tls.read_tls(&mut sock) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {
                        tls.process_new_packets().map_err(other)?;
                        loop {
                            match tls.reader().read(&mut plain) {
                                Ok(0) => break,
                                Ok(n) => inbox.extend_from_slice(&plain[..n]),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            let mut at = 0;
            while inbox.len() >= at + 2 {
                let len = usize::from(u16::from_be_bytes([inbox[at], inbox[at + 1]]));
                if inbox.len() < at + 2 + len {
                    break;
                }
                match relay::parse(&inbox[at + 2..at + 2 + len]) {
                    Some(relay::Frame::Registered {
                        token, keepalive, ..
                    }) => self.frames.registered(token, keepalive),
                    Some(relay::Frame::Deliver { packet, .. }) => self.frames.deliver(packet),
                    _ => {}
                }
                at += 2 + len;
            }
            inbox.drain(..at);
            self.frames.flush();
        }
        Ok(())
    }

    /// Waits (at most 1 s) for the socket, or for frames to send.
    fn wait(&self, sock: &TcpStream, want_write: bool) {
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN | if want_write { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, count 2.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        let mut b = [0u8; 64];
        while self.wake.recv(&mut b).is_ok() {}
    }
}
