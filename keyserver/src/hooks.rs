//! Running service-address hooks (issue 19, scale to zero): the driver of
//! the [`HookJob`]s the registry decides ([`crate::registry::Registry::request_wake`],
//! [`crate::registry::Registry::idle_sweep`]).
//!
//! [`HookRunner`] is the seam: [`Runner`] runs hooks for real, on the async
//! runtime, never on the caller's thread (the caller holds no lock, and
//! the session that asked goes on at once); tests and the simulator count
//! jobs with a stub of their own.
//!
//! A command hook runs without a shell, its arguments as given, with
//! `ISTM_HOOK` (`wake` or `idle`), `ISTM_HOOK_NETWORK` (the id),
//! `ISTM_HOOK_NETWORK_NAME`, `ISTM_HOOK_SERVICE` and `ISTM_HOOK_ADDRESS`
//! set (prefixed so that a hook starting a sidecar passes none of them on
//! as the sidecar's own `ISTM_SERVICE…` settings) and
//! stdin closed; only on a keyserver started with `--allow-wake-commands`
//! (as the gateway's). A URL hook gets an HTTP/1.1 `POST` with
//! `{"event", "network", "network_name", "service", "address"}` as JSON.
//! Either is given the job's timeout (the wake timeout for a wake hook,
//! [`crate::registry::IDLE_HOOK_TIMEOUT`] for an idle hook); a command
//! still running then is killed. The outcome is logged and counted
//! ([`HookStats`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use meshlib::services::WakeHook;

use crate::registry::{HookJob, HookKind};

/// Runs the hooks the registry decides. Must return at once: the caller
/// may be a session's or the sweep's thread.
pub trait HookRunner: Send + Sync + 'static {
    /// Starts `job` (its outcome is the runner's to log and count).
    fn run(&self, job: HookJob);
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Command hooks are off on this keyserver.
    #[error("command hooks are off on this keyserver (start it with --allow-wake-commands)")]
    CommandsOff,
    /// The command could not start or exited with an error.
    #[error("command: {0}")]
    Command(String),
    /// The URL could not be reached or answered an error.
    #[error("url: {0}")]
    Url(String),
    /// The hook did not finish within its timeout.
    #[error("did not finish within {0} s")]
    Timeout(u64),
}

/// Hooks started and failed, by kind (`/metrics`).
#[derive(Debug, Default)]
pub struct HookStats {
    /// Hooks started: wake, idle.
    started: [AtomicU64; 2],
    /// Hooks that failed (error or timeout): wake, idle.
    failed: [AtomicU64; 2],
}

fn slot(kind: HookKind) -> usize {
    match kind {
        HookKind::Wake => 0,
        HookKind::Idle => 1,
    }
}

impl HookStats {
    /// Counts a started hook.
    pub fn started(&self, kind: HookKind) {
        self.started[slot(kind)].fetch_add(1, Relaxed);
    }

    /// Counts a failed hook.
    pub fn failed(&self, kind: HookKind) {
        self.failed[slot(kind)].fetch_add(1, Relaxed);
    }

    /// Hooks of `kind` started so far.
    pub fn started_count(&self, kind: HookKind) -> u64 {
        self.started[slot(kind)].load(Relaxed)
    }

    /// Hooks of `kind` failed so far.
    pub fn failed_count(&self, kind: HookKind) -> u64 {
        self.failed[slot(kind)].load(Relaxed)
    }
}

/// The real runner: each job on a task of the runtime it was made on.
#[derive(Debug, Clone)]
pub struct Runner {
    handle: tokio::runtime::Handle,
    allow_commands: bool,
    stats: Arc<HookStats>,
}

impl Runner {
    /// A runner on the current runtime (call from inside it); command
    /// hooks run only when `allow_commands`.
    pub fn new(allow_commands: bool, stats: Arc<HookStats>) -> Self {
        Self {
            handle: tokio::runtime::Handle::current(),
            allow_commands,
            stats,
        }
    }
}

impl HookRunner for Runner {
    fn run(&self, job: HookJob) {
        self.stats.started(job.kind);
        let (allow, stats) = (self.allow_commands, self.stats.clone());
        self.handle.spawn(async move {
            let limit = job.timeout;
            let outcome = tokio::time::timeout(limit, execute(&job, allow))
                .await
                .unwrap_or(Err(HookError::Timeout(limit.as_secs())));
            let (network, service) = (job.network.to_string(), &job.service);
            let service = meshlib::render::text::escape(service);
            match outcome {
                Ok(()) => {
                    tracing::info!(%network, %service, hook = job.kind.as_str(), "service hook ran")
                }
                Err(e) => {
                    stats.failed(job.kind);
                    tracing::warn!(%network, %service, hook = job.kind.as_str(), error = %e, "service hook failed");
                }
            }
        });
    }
}

/// Runs one hook to its end.
pub async fn execute(job: &HookJob, allow_commands: bool) -> Result<(), HookError> {
    match &job.hook {
        WakeHook::Command(argv) => {
            if !allow_commands {
                return Err(HookError::CommandsOff);
            }
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| HookError::Command("empty command".into()))?;
            let status = tokio::process::Command::new(program)
                .args(args)
                .env("ISTM_HOOK", job.kind.as_str())
                .env("ISTM_HOOK_NETWORK", job.network.to_string())
                .env("ISTM_HOOK_NETWORK_NAME", &job.network_name)
                .env("ISTM_HOOK_SERVICE", &job.service)
                .env("ISTM_HOOK_ADDRESS", job.ip.to_string())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| HookError::Command(format!("{program}: {e}")))?;
            if status.success() {
                Ok(())
            } else {
                Err(HookError::Command(format!("{program}: {status}")))
            }
        }
        WakeHook::Url(url) => post(url, job).await,
    }
}

/// `POST url` with the job as JSON.
async fn post(url: &str, job: &HookJob) -> Result<(), HookError> {
    use hyper_util::client::legacy::Client;
    let bad = |e: &dyn std::fmt::Display| HookError::Url(format!("{url}: {e}"));
    let body = serde_json::json!({
        "event": job.kind.as_str(),
        "network": job.network.to_string(),
        "network_name": job.network_name,
        "service": job.service,
        "address": job.ip.to_string(),
    })
    .to_string();
    let req = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| bad(&e))?;
    let client: Client<_, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = client.request(req).await.map_err(|e| bad(&e))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(bad(&status))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn job(hook: WakeHook) -> HookJob {
        HookJob {
            kind: HookKind::Wake,
            network: meshlib::ids::NetworkId::random(),
            network_name: "prod".into(),
            service: "api".into(),
            ip: "10.240.4.1".parse().unwrap(),
            hook,
            timeout: Duration::from_secs(5),
        }
    }

    /// A command runs without a shell, with the job in its environment;
    /// commands are off unless allowed; a failing command is an error.
    #[tokio::test]
    async fn commands_run_with_the_job_in_their_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$ISTM_HOOK $ISTM_HOOK_SERVICE $ISTM_HOOK_ADDRESS $ISTM_HOOK_NETWORK_NAME\" > {}",
            out.display()
        );
        let cmd = WakeHook::Command(vec!["sh".into(), "-c".into(), script]);
        assert!(matches!(
            execute(&job(cmd.clone()), false).await,
            Err(HookError::CommandsOff)
        ));
        assert!(!out.exists());
        execute(&job(cmd), true).await.unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.trim(), "wake api 10.240.4.1 prod");
        let fail = WakeHook::Command(vec!["false".into()]);
        assert!(matches!(
            execute(&job(fail), true).await,
            Err(HookError::Command(_))
        ));
    }

    /// A URL hook posts the job as JSON; an unreachable URL is an error.
    #[tokio::test]
    async fn urls_get_the_job_as_json() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("\"address\"") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        let url = WakeHook::Url(format!("http://{addr}/wake"));
        execute(&job(url), false).await.unwrap();
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /wake HTTP/1.1"), "{request}");
        assert!(request.contains("\"service\":\"api\""), "{request}");
        assert!(request.contains("\"event\":\"wake\""), "{request}");
        // Nothing listens there any more.
        let gone = WakeHook::Url(format!("http://{addr}/wake"));
        assert!(matches!(
            execute(&job(gone), false).await,
            Err(HookError::Url(_))
        ));
    }
}
