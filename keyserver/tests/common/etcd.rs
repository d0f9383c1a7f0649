//! A throwaway etcd cluster on loopback: its own ports and data
//! directories, every node killed and its directory removed on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    initial: String,
    token: String,
}

struct Node {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// Free loopback ports (bound then released; the test owns them next).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Whether the `etcd` binary is here (Debian's etcd-server).
pub fn available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl EtcdCluster {
    /// Starts `n` nodes and waits until the cluster answers (`None` with a
    /// SKIPPED line when etcd is not installed).
    pub fn start(n: usize) -> Option<Self> {
        if !available() {
            println!("SKIPPED: etcd is not installed (Debian package etcd-server)");
            return None;
        }
        let ports = free_ports(2 * n);
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Node> = (0..n)
            .map(|i| Node {
                name: format!("n{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial = nodes
            .iter()
            .map(|n| format!("{}=http://127.0.0.1:{}", n.name, n.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            token: format!("t{}", std::process::id()),
            dir,
            nodes,
            initial,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(30));
        Some(c)
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].name)
    }

    fn spawn(&mut self, i: usize) {
        let (name, client, peer) = {
            let n = &self.nodes[i];
            (n.name.clone(), n.client, n.peer)
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", &name])
            .arg("--data-dir")
            .arg(self.data(i))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "warn"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.nodes[i].child = Some(child);
    }

    /// `etcd://...` of every node, with `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        let eps: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.client))
            .collect();
        format!("etcd://{}/{prefix}", eps.join(","))
    }

    /// Client endpoints (`host:port`).
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.client))
            .collect()
    }

    /// Waits until a quorum read answers.
    pub fn wait_ready(&self, limit: Duration) {
        let conn = keyserver::store::etcd::conn::Conn::new(&self.endpoints()).unwrap();
        let deadline = Instant::now() + limit;
        loop {
            let req = etcd_range(b"/probe");
            if conn.range(req).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9` of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Index of the node that is the leader now (asked over each node's
    /// HTTP gateway, `/v3/maintenance/status`), if one answers.
    pub fn leader(&self) -> Option<usize> {
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(status) = http_post_json(n.client, "/v3/maintenance/status", "{}") else {
                continue;
            };
            let me = status["header"]["member_id"].as_str().map(str::to_owned);
            let leader = status["leader"].as_str().map(str::to_owned);
            if me.is_some() && me == leader {
                return Some(i);
            }
        }
        None
    }

    /// Freezes node `i` (SIGSTOP): its sockets stay open, nothing answers.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// Thaws node `i` (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(c) = &self.nodes[i].child {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// Starts node `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Writes a raw value (bad input tests).
    pub fn put_raw(&self, key: &str, value: &[u8]) {
        let conn = keyserver::store::etcd::conn::Conn::new(&self.endpoints()).unwrap();
        let req = etcdv3client::pb::TxnRequest {
            compare: vec![],
            success: vec![etcdv3client::pb::RequestOp {
                request: Some(etcdv3client::pb::request_op::Request::RequestPut(
                    etcdv3client::pb::PutRequest {
                        key: key.as_bytes().to_vec(),
                        value: value.to_vec(),
                        ..Default::default()
                    },
                )),
            }],
            failure: vec![],
        };
        conn.txn(req).expect("raw put");
    }
}

fn etcd_range(key: &[u8]) -> etcdv3client::pb::RangeRequest {
    etcdv3client::pb::RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A JSON POST to `127.0.0.1:port` (HTTP/1.1, one connection), its JSON
/// answer; `None` on any failure (1 s deadlines).
fn http_post_json(port: u16, path: &str, body: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let (_, json) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(json.trim()).ok()
}
