//! WireGuard keys: Curve25519 key pairs in the base64 text form `wg` uses.
//!
//! A member's private key is generated on the instance ([`PrivateKey::generate`])
//! and never leaves it: only [`PublicKey`] is serializable.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::IdError;

/// Decodes 44 characters of standard base64 into 32 bytes.
fn decode_key(text: &str) -> Result<[u8; 32], IdError> {
    let bad = || IdError::BadKey(text.chars().take(64).collect());
    let bytes = STANDARD.decode(text.trim()).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// A WireGuard (X25519) public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as the `x25519-dalek` type boringtun takes.
    pub fn to_dalek(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }

    /// The key as lowercase hex (the UAPI form).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the 64-character hex form used by the UAPI.
    pub fn from_hex(text: &str) -> Result<Self, IdError> {
        parse_hex(text).map(Self)
    }
}

/// Parses 64 hex digits into 32 bytes.
pub(crate) fn parse_hex(text: &str) -> Result<[u8; 32], IdError> {
    let bad = || IdError::BadKey(text.chars().take(80).collect());
    if text.len() != 64 || !text.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl FromStr for PublicKey {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        decode_key(s).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(Self)
        }
    }
}

impl From<x25519_dalek::PublicKey> for PublicKey {
    fn from(k: x25519_dalek::PublicKey) -> Self {
        Self(k.to_bytes())
    }
}

/// A WireGuard (X25519) private key. Not serializable and not `Debug`-printed,
/// so it cannot leak into a message or a log by accident.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(x25519_dalek::PublicKey::from(&self.0))
    }

    /// The key as the `x25519-dalek` type boringtun takes.
    pub fn to_dalek(&self) -> x25519_dalek::StaticSecret {
        self.0.clone()
    }

    /// The 32 raw bytes (for the UAPI and the key file; handle with care).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The base64 text form, as `wg genkey` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    /// Parses the base64 text form (`wg genkey` output).
    pub fn from_base64(text: &str) -> Result<Self, IdError> {
        decode_key(text).map(Self::from_bytes)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_wg_pubkey() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let private =
            PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            private.public_key().to_string(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn text_and_hex_round_trip() {
        let key = PrivateKey::generate().public_key();
        assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
        assert_eq!(PublicKey::from_hex(&key.to_hex()).unwrap(), key);
        assert!("abc".parse::<PublicKey>().is_err());
        assert!(PublicKey::from_hex(&"g".repeat(64)).is_err());
        assert!(PublicKey::from_hex("é").is_err());
    }
}
