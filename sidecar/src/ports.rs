//! Which ports this instance serves: what the member announces to its
//! peers (userspace-mode peers listen on them) and, in userspace mode, the
//! only ports inbound traffic from the tunnel reaches.
//!
//! In order:
//! 1. `ports` declared in the config (`--port`): exactly those;
//! 2. `sidecar run`: the TCP ports its command's process tree listens on —
//!    the sockets behind `/proc/<pid>/fd/*` of the child and every
//!    descendant, matched by inode against `/proc/net/tcp{,6}`; another
//!    program's listener on the same host is never announced;
//! 3. `discover-ports` (`sidecar up`): every TCP port listening on the
//!    host's loopback or any address, except the sidecar's own;
//! 4. otherwise none.
//!
//! Every walk is bounded ([`MAX_PROCESSES`], [`MAX_FDS`]); the parsing is in
//! [`meshlib::userspace::ports`].

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use meshlib::userspace::ports::{
    children, listeners, socket_inode, stat_ppid, Listener, MAX_ANNOUNCED,
};

use crate::config::Config;

/// Most processes of a tree looked at.
pub const MAX_PROCESSES: usize = 1024;
/// Most file descriptors looked at, over the whole tree.
pub const MAX_FDS: usize = 65_536;

/// The pid of `sidecar run`'s child (0: none yet), shared with the task
/// that re-announces ports.
pub type PortOwner = Arc<AtomicU32>;

/// The ports to announce now for `config` (sorted, without duplicates, at
/// most [`MAX_ANNOUNCED`]); `owner` is `sidecar run`'s child, if any.
pub fn announced_ports(config: &Config, owner: Option<&PortOwner>) -> Vec<u16> {
    let mut ports: Vec<u16> = if !config.ports.is_empty() {
        config.ports.clone()
    } else if let Some(owner) = owner {
        match owner.load(Ordering::Relaxed) {
            0 => Vec::new(),
            pid => tree_ports(Path::new("/proc"), pid, config.service_address),
        }
    } else if config.discover_ports {
        host_ports(config)
    } else {
        Vec::new()
    };
    ports.sort_unstable();
    ports.dedup();
    ports.truncate(MAX_ANNOUNCED);
    ports
}

/// The text of `/proc/net/tcp` and `/proc/net/tcp6` under `proc`.
fn proc_net_tcp(proc: &Path) -> String {
    ["net/tcp", "net/tcp6"]
        .iter()
        .filter_map(|f| {
            meshlib::fsutil::read_text_limited(&proc.join(f), meshlib::fsutil::MAX_STATE_FILE).ok()
        })
        .collect()
}

/// Whether a connection to `target` reaches `l` (with the IPv6-loopback
/// fallback the userspace stack makes for `127.0.0.1`).
fn reachable(l: &Listener, target: IpAddr) -> bool {
    l.reachable_from(target)
        || (target == IpAddr::V4(Ipv4Addr::LOCALHOST)
            && l.reachable_from(IpAddr::V6(Ipv6Addr::LOCALHOST)))
}

/// The listening ports of the process tree of `root`, reachable at `target`.
pub fn tree_ports(proc: &Path, root: u32, target: IpAddr) -> Vec<u16> {
    let inodes = socket_inodes(proc, &process_tree(proc, root));
    listeners(&proc_net_tcp(proc))
        .into_iter()
        .filter(|l| inodes.contains(&l.inode) && reachable(l, target))
        .map(|l| l.port)
        .collect()
}

/// Every listening port of the host reachable at `config.service_address`,
/// except the sidecar's own (DNS, metrics).
fn host_ports(config: &Config) -> Vec<u16> {
    let own: Vec<u16> = config
        .metrics
        .iter()
        .chain([&config.dns.listen])
        .map(|a| a.port())
        .collect();
    let ports: BTreeSet<u16> = listeners(&proc_net_tcp(Path::new("/proc")))
        .iter()
        .filter(|l| reachable(l, config.service_address) && !own.contains(&l.port))
        .map(|l| l.port)
        .collect();
    ports.into_iter().collect()
}

/// `root` and its descendants (at most [`MAX_PROCESSES`]), from
/// `/proc/<pid>/task/*/children`, or from every process's parent pid when
/// the kernel has no `children` files.
pub fn process_tree(proc: &Path, root: u32) -> Vec<u32> {
    let has_children_files = proc.join(format!("{root}/task/{root}/children")).exists();
    let parents = (!has_children_files).then(|| parent_map(proc));
    let mut seen = HashSet::from([root]);
    let mut order = vec![root];
    let mut queue = VecDeque::from([root]);
    while let Some(pid) = queue.pop_front() {
        let kids: Vec<u32> = match &parents {
            Some(map) => map
                .iter()
                .filter(|(_, ppid)| *ppid == pid)
                .map(|(p, _)| *p)
                .collect(),
            None => task_children(proc, pid),
        };
        for kid in kids {
            if order.len() >= MAX_PROCESSES {
                return order;
            }
            if seen.insert(kid) {
                order.push(kid);
                queue.push_back(kid);
            }
        }
    }
    order
}

/// The children of every thread of `pid`.
fn task_children(proc: &Path, pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(proc.join(format!("{pid}/task"))) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .take(MAX_PROCESSES)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| children(&text).collect::<Vec<_>>())
        .collect()
}

/// (pid, parent pid) of every process (at most 65,536 looked at).
fn parent_map(proc: &Path) -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    dir.flatten()
        .take(65_536)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(proc.join(format!("{pid}/stat"))).ok()?;
            Some((pid, stat_ppid(&stat)?))
        })
        .collect()
}

/// The socket inodes open in `pids` (at most [`MAX_FDS`] descriptors looked
/// at in all).
pub fn socket_inodes(proc: &Path, pids: &[u32]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    let mut budget = MAX_FDS;
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(proc.join(format!("{pid}/fd"))) else {
            continue;
        };
        for fd in fds.flatten() {
            if budget == 0 {
                return inodes;
            }
            budget -= 1;
            if let Some(inode) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(&l.to_string_lossy()))
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// Kills the child on drop.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn declared_ports_win_and_nothing_is_discovered_by_default() {
        // Something listens on this host's loopback.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut c = Config {
            metrics: None,
            ..Config::default()
        };
        assert_eq!(announced_ports(&c, None), Vec::<u16>::new());
        c.discover_ports = true;
        assert!(announced_ports(&c, None).contains(&port), "opt-in");
        c.ports = vec![9000, 80, 9000];
        assert_eq!(announced_ports(&c, None), [80, 9000]);
    }

    #[test]
    fn a_process_tree_announces_its_own_listeners_only() {
        // Our own listener: not in the child's tree.
        let unrelated = TcpListener::bind("127.0.0.1:0").unwrap();
        let unrelated = unrelated.local_addr().unwrap().port();
        // A child shell whose own child (socat) listens on a free port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = format!(
            "timeout 30 socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr EXEC:/bin/cat; exit 0"
        );
        let child = Kill(
            Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let owner: PortOwner = Arc::new(AtomicU32::new(0));
        let c = Config::default();
        assert!(announced_ports(&c, Some(&owner)).is_empty(), "no child yet");
        owner.store(child.0.id(), Ordering::Relaxed);
        let start = Instant::now();
        let mut got = announced_ports(&c, Some(&owner));
        while got.is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
            got = announced_ports(&c, Some(&owner));
        }
        assert_eq!(got, [port], "the listener of the child's child only");
        assert!(!got.contains(&unrelated));
        let tree = process_tree(Path::new("/proc"), child.0.id());
        assert!(tree.len() >= 2, "sh, timeout, socat: {tree:?}");
        // A service address the listener is not bound to: not reachable.
        assert!(tree_ports(
            Path::new("/proc"),
            child.0.id(),
            "10.0.0.1".parse().unwrap()
        )
        .is_empty());
    }

    #[test]
    fn fake_proc_without_children_files_uses_parent_pids() {
        let proc = tempfile::tempdir().unwrap();
        let p = proc.path();
        // 10 -> 11 -> 12, and 20 (unrelated); 12 holds socket 500, 20 holds 600.
        for (pid, ppid) in [(10, 1), (11, 10), (12, 11), (20, 1)] {
            std::fs::create_dir_all(p.join(format!("{pid}/fd"))).unwrap();
            std::fs::write(
                p.join(format!("{pid}/stat")),
                format!("{pid} (a b) S {ppid} 0 0"),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink("socket:[500]", p.join("12/fd/3")).unwrap();
        std::os::unix::fs::symlink("/dev/null", p.join("12/fd/0")).unwrap();
        std::os::unix::fs::symlink("socket:[600]", p.join("20/fd/3")).unwrap();
        std::fs::create_dir_all(p.join("net")).unwrap();
        let line = |sl: u32, addr: &str, port: u16, inode: u64| {
            format!("{sl:4}: {addr}:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0\n")
        };
        std::fs::write(
            p.join("net/tcp"),
            format!(
                "  sl  local_address rem_address   st\n{}{}{}",
                line(0, "0100007F", 8080, 500),
                line(1, "0100007F", 9477, 600),
                line(2, "00000000", 22, 700)
            ),
        )
        .unwrap();
        let mut tree = process_tree(p, 10);
        tree.sort_unstable();
        assert_eq!(tree, [10, 11, 12]);
        assert_eq!(socket_inodes(p, &tree), HashSet::from([500]));
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(tree_ports(p, 10, local), [8080]);
        assert_eq!(tree_ports(p, 20, local), [9477]);
        assert!(tree_ports(p, 99, local).is_empty(), "no such process");
    }
}
