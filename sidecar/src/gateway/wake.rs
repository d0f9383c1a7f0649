//! Scale to zero (seeds 000/001): a group's wake hook, run by the gateway
//! when a connection arrives and none of the group's instances is online.
//! A command runs with `ISTM_SERVICE_GROUP` and `ISTM_SERVICE_FQDN` set
//! (only on gateways started with `--allow-wake-commands`); a URL gets an
//! HTTP/1.1 `POST` with a small JSON body naming the group.

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use meshlib::services::WakeHook;

/// Why a wake hook failed.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    /// Command hooks are not allowed on this gateway.
    #[error("command wake hooks are off on this gateway (--allow-wake-commands)")]
    CommandsOff,
    /// The command could not start or exited with an error.
    #[error("command: {0}")]
    Command(String),
    /// The URL could not be reached or answered an error.
    #[error("url: {0}")]
    Url(String),
}

/// Runs `hook` for group `name` once.
pub async fn run(
    hook: &WakeHook,
    name: &str,
    fqdn: &str,
    allow_commands: bool,
) -> Result<(), WakeError> {
    match hook {
        WakeHook::Command(argv) => {
            if !allow_commands {
                return Err(WakeError::CommandsOff);
            }
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| WakeError::Command("empty command".into()))?;
            let status = tokio::process::Command::new(program)
                .args(args)
                .env("ISTM_SERVICE_GROUP", name)
                .env("ISTM_SERVICE_FQDN", fqdn)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| WakeError::Command(format!("{program}: {e}")))?;
            if status.success() {
                Ok(())
            } else {
                Err(WakeError::Command(format!("{program}: {status}")))
            }
        }
        WakeHook::Url(url) => post(url, name, fqdn).await,
    }
}

/// `POST url` with `{"service_group": name, "fqdn": fqdn}`.
async fn post(url: &str, name: &str, fqdn: &str) -> Result<(), WakeError> {
    let bad = |e: &dyn std::fmt::Display| WakeError::Url(format!("{url}: {e}"));
    let uri: hyper::Uri = url.parse().map_err(|e| bad(&e))?;
    let host = uri.host().ok_or_else(|| bad(&"no host"))?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream =
        tokio::net::TcpStream::connect((host.trim_matches(|c| c == '[' || c == ']'), port))
            .await
            .map_err(|e| bad(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| bad(&e))?;
    tokio::spawn(conn);
    let body = serde_json::json!({ "service_group": name, "fqdn": fqdn }).to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = hyper::Request::post(path)
        .header(
            hyper::header::HOST,
            uri.authority().map_or(host.clone(), |a| a.to_string()),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| bad(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| bad(&e))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(bad(&status))
    }
}
