//! The JSON body of a request, read as the OpenAPI document describes it
//! and refused in our own words.
//!
//! - A number with no fractional part is an integer whatever its spelling
//!   (`554.0`, `5.54e2`): JSON does not tell them apart, and many clients
//!   (JavaScript, jq) write integers that way.
//! - 415: not `application/json`; 400: not JSON at all; 422: JSON of the
//!   wrong shape, naming the field (`ports[0].port: expected a whole number
//!   from 0 to 65535, got -1`).

use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// A JSON request body of type `T` (see the module docs).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim().to_ascii_lowercase();
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        if !json {
            return Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be JSON, sent with content-type: application/json".into(),
            ));
        }
        // The body was read within the API's limits already (`read_body`).
        let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
            .await
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses a body (see the module docs).
pub(super) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON ({e})"),
        )
    })?;
    // Every body of the API is an object (serde would also take a struct
    // written as an array of its fields).
    if !value.is_object() {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid body: expected an object".into(),
        ));
    }
    integral(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let why = in_our_words(&e.into_inner().to_string());
        let message = if path == "." || path.is_empty() {
            format!("invalid body: {why}")
        } else {
            format!("invalid {path}: {why}")
        };
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, message)
    })
}

/// Turns every number with no fractional part into an integer.
fn integral(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                // Exactly representable integers only (|f| < 2^53).
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    *v = if f >= 0.0 {
                        Value::from(f as u64)
                    } else {
                        Value::from(f as i64)
                    };
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral),
        Value::Object(map) => map.values_mut().for_each(integral),
        _ => {}
    }
}

/// serde's wording, with Rust's type names said for a reader of the API.
fn in_our_words(text: &str) -> String {
    const TYPES: [(&str, &str); 12] = [
        ("u8", "a whole number from 0 to 255"),
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number from 0"),
        ("usize", "a whole number from 0"),
        ("i8", "a whole number"),
        ("i16", "a whole number"),
        ("i32", "a whole number"),
        ("i64", "a whole number"),
        ("f64", "a number"),
        ("a boolean", "true or false"),
        ("a sequence", "an array"),
    ];
    let mut out = text
        .replace("invalid type: ", "")
        .replace("invalid value: ", "")
        .replace("floating point", "the number")
        .replace("integer", "the number")
        .replace("a map", "an object");
    // `struct CreateToken` (a Rust name) is an object to the reader.
    while let Some(at) = out.find("struct ") {
        let rest = &out[at + 7..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        out = format!("{}an object{}", &out[..at], &rest[end..]);
    }
    out = out.replace("got sequence", "got an array");
    for (rust, ours) in TYPES {
        out = out.replace(&format!("expected {rust}"), &format!("expected {ours}"));
    }
    // "the number `-1`, expected ..." reads better as "expected ..., got -1".
    let about_a_field = ["unknown", "missing", "duplicate"]
        .iter()
        .any(|w| out.starts_with(w));
    if let (false, Some((got, expected))) = (about_a_field, out.split_once(", expected ")) {
        return format!("expected {expected}, got {}", got.replace('`', ""));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        port: u16,
        uses: Option<u32>,
        list: Option<Vec<u16>>,
    }

    #[test]
    fn integral_floats_are_integers() {
        let b: Body = parse(br#"{"port": 554.0, "uses": 2e0, "list": [1.0, 2]}"#).unwrap();
        assert_eq!((b.port, b.uses, b.list), (554, Some(2), Some(vec![1, 2])));
    }

    #[test]
    fn errors_name_the_field_in_our_words() {
        let e = parse::<Body>(br#"{"port": 1.5}"#).unwrap_err();
        assert_eq!(e.0, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            e.1,
            "invalid port: expected a whole number from 0 to 65535, got the number 1.5"
        );
        let e = parse::<Body>(br#"{"port": 1, "list": [1, -1]}"#).unwrap_err();
        assert!(
            e.1.starts_with("invalid list[1]: expected a whole number from 0 to 65535"),
            "{}",
            e.1
        );
        let e = parse::<Body>(br#"{"port": 1, "nope": 1}"#).unwrap_err();
        assert!(e.1.contains("unknown field `nope`"), "{}", e.1);
        assert!(!e.1.contains("Failed to deserialize"));
        let e = parse::<Body>(b"[]").unwrap_err();
        assert_eq!(e.1, "invalid body: expected an object");
        let e = parse::<Body>(br#"{"port": "#).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
    }
}
