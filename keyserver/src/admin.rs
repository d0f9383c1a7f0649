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
    /// The server could not be reached, or the connection failed.
    #[error("cannot reach the keyserver API at {url}: {cause}")]
    Transport {
        /// The URL of the request.
        url: String,
        /// What failed, with its causes.
        cause: String,
    },
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
        let url = format!("{}{path}", self.base);
        let transport = |e: &dyn std::error::Error| AdminClientError::Transport {
            url: url.clone(),
            cause: chain(e),
        };
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| AdminClientError::Build(e.to_string()))?;
        let resp = self.client.request(req).await.map_err(|e| transport(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(&e))?
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

/// An error and its causes, `outer: inner: ...`, each said once (hyper's
/// errors say "client error (Connect)" on top and the reason below).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

/// `text` as one URL path segment: every byte outside the unreserved set
/// (`A-Z a-z 0-9 - . _ ~`) percent-encoded, and dots too when the segment
/// is only dots (`.` and `..` would be read as path steps).
pub fn path_segment(text: &str) -> String {
    let all_dots = text.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'~')
            || (b == b'.' && !all_dots);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(path_segment("prod"), "prod");
        assert_eq!(path_segment("a/b"), "a%2Fb");
        assert_eq!(path_segment("my net"), "my%20net");
        assert_eq!(path_segment("x+y=="), "x%2By%3D%3D");
        assert_eq!(path_segment("é"), "%C3%A9");
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("a.b"), "a.b");
        assert_eq!(path_segment("?#%"), "%3F%23%25");
    }
}
