//! The admin API client used by the `keyserver network|token|member`
//! subcommands: they talk to a running keyserver over HTTP (the store is
//! locked by the server, and revocations must reach the server to be pushed).

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The request could not be built (bad URL).
    #[error("bad request: {0}")]
    Build(String),
    /// The server could not be reached.
    #[error("cannot reach the keyserver API: {0}")]
    Transport(String),
    /// The server answered with an error status.
    #[error("keyserver answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The `error` field of the answer, or its body.
        message: String,
    },
    /// The answer is not JSON.
    #[error("answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A client of one keyserver's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client for `base` (`http://127.0.0.1:7480`) with a bearer token.
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request; returns the JSON answer (`null` for an empty body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, AdminClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b)?,
            None => vec![],
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| AdminClientError::Build(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| AdminClientError::Transport(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| AdminClientError::Transport(e.to_string()))?
            .to_bytes();
        let value: serde_json::Value = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| String::from_utf8_lossy(&body).into())
        };
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(|e| e.as_str())
                .map_or_else(|| value.to_string(), str::to_owned);
            return Err(AdminClientError::Status {
                status: status.as_u16(),
                message,
            });
        }
        Ok(value)
    }
}
