//! `sidecar run`'s child: started with the IST variables in its environment,
//! sent every signal the sidecar receives, and its exit status returned as
//! the sidecar's own (a signal death as `128 + signal`, as shells report it).

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::process::Command;
use tokio::sync::mpsc;

/// Signals forwarded to the child.
pub const FORWARDED: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

/// Runs `program args` with `env` added to the sidecar's environment, tells
/// `started` its pid, sends it each signal received on `signals`, and
/// returns its exit code.
pub async fn run_child(
    program: &OsString,
    args: &[OsString],
    env: &[(String, String)],
    mut signals: mpsc::Receiver<libc::c_int>,
    started: impl FnOnce(u32),
) -> io::Result<i32> {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", program.to_string_lossy()),
            )
        })?;
    if let Some(pid) = child.id() {
        started(pid);
    }
    let pid = child.id().and_then(|p| libc::pid_t::try_from(p).ok());
    loop {
        tokio::select! {
            status = child.wait() => return Ok(exit_code(status?)),
            Some(sig) = signals.recv() => {
                if let Some(pid) = pid {
                    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
                    unsafe { libc::kill(pid, sig) };
                }
            }
        }
    }
}

/// A channel fed by the OS with every [`FORWARDED`] signal the sidecar gets.
pub fn os_signals() -> io::Result<mpsc::Receiver<libc::c_int>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::channel(16);
    for &sig in FORWARDED {
        let mut stream = signal(SignalKind::from_raw(sig))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sh(script: &str) -> (OsString, Vec<OsString>) {
        ("sh".into(), vec!["-c".into(), script.into()])
    }

    #[tokio::test]
    async fn env_and_exit_code() {
        let (p, a) = sh("test \"$WARP_IST_api\" = 10.240.0.1 && exit 7; exit 1");
        let (_tx, rx) = mpsc::channel(1);
        let env = [("WARP_IST_api".to_string(), "10.240.0.1".to_string())];
        assert_eq!(run_child(&p, &a, &env, rx, |_| {}).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn signals_are_forwarded() {
        // The child traps TERM and exits 42; the marker file says it is ready.
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let script = format!(
            "trap 'exit 42' TERM; touch '{}'; for i in $(seq 1 100); do sleep 0.1; done; exit 3",
            ready.display()
        );
        let (p, a) = sh(&script);
        let (tx, rx) = mpsc::channel(1);
        let child = tokio::spawn(async move { run_child(&p, &a, &[], rx, |_| {}).await });
        for _ in 0..100 {
            if ready.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(libc::SIGTERM).await.unwrap();
        assert_eq!(child.await.unwrap().unwrap(), 42);
    }

    #[tokio::test]
    async fn death_by_signal_is_128_plus() {
        let (p, a) = sh("kill -KILL $$");
        let (_tx, rx) = mpsc::channel(1);
        assert_eq!(run_child(&p, &a, &[], rx, |_| {}).await.unwrap(), 128 + 9);
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_error() {
        let (_tx, rx) = mpsc::channel(1);
        let err = run_child(&"/nonexistent/prog".into(), &[], &[], rx, |_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/prog"), "{err}");
    }
}
