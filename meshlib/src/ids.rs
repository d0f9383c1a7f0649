//! Parsed identifiers: once a value of one of these types exists, it is valid.
//!
//! Every type here implements `FromStr` (with a [`IdError`] naming what was
//! wrong), `Display` (the canonical text form) and serde as that text form, so
//! config files, the control protocol and the admin API all share one parser.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a piece of text is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// What was being parsed ("instance name", "network id", ...).
        kind: &'static str,
    },
    /// The text is longer than a DNS label allows (63 bytes).
    #[error("{kind} {text:?} is longer than 63 characters")]
    TooLong {
        /// What was being parsed.
        kind: &'static str,
        /// The rejected text.
        text: String,
    },
    /// The text holds a character outside `[a-z0-9-]`, or starts or ends with `-`.
    #[error("{kind} {text:?} must be lowercase letters, digits and inner '-' only")]
    BadLabel {
        /// What was being parsed.
        kind: &'static str,
        /// The rejected text.
        text: String,
    },
    /// A network id is not `pn-` followed by a UUID.
    #[error("network id {0:?} must be 'pn-' followed by a UUID")]
    BadNetworkId(String),
    /// A key is not 32 bytes in standard base64 (44 characters, as `wg` prints).
    #[error("key {0:?} is not 32 bytes of standard base64")]
    BadKey(String),
}

/// Checks that `text` is one DNS label in our strict form: 1–63 characters of
/// `[a-z0-9-]`, not starting or ending with `-`.
fn check_label(kind: &'static str, text: &str) -> Result<(), IdError> {
    if text.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if text.len() > 63 {
        return Err(IdError::TooLong {
            kind,
            text: text.to_owned(),
        });
    }
    let ok_chars = text
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || text.starts_with('-') || text.ends_with('-') {
        return Err(IdError::BadLabel {
            kind,
            text: text.to_owned(),
        });
    }
    Ok(())
}

/// Serde through `Display`/`FromStr`, so the wire and file forms are the text form.
macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Declares a newtype over `String` holding one strict DNS label.
macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The label as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                check_label($kind, s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        serde_via_str!($name);
    };
}

label_type!(
    /// An instance name, unique within its network: the `<instance>` of
    /// `<instance>.internal` (seeds 000/001). One DNS label.
    InstanceName,
    "instance name"
);

label_type!(
    /// An application id: the `<app-id>` of
    /// `<app-id>.<pn-id>.private-network.internal.` (seed 003). One DNS label;
    /// the keyserver assigns `ap-<uuid>`, but any label is accepted.
    AppId,
    "app id"
);

label_type!(
    /// A process type (`web`, `worker`, ...): the `<type>` of the seed-003
    /// names. Defaults to `web`, the type answered by the bare app name.
    ProcessType,
    "process type"
);

impl Default for ProcessType {
    fn default() -> Self {
        Self("web".to_owned())
    }
}

impl ProcessType {
    /// Whether this is the default `web` type.
    pub fn is_web(&self) -> bool {
        self.0 == "web"
    }
}

impl AppId {
    /// A fresh random `ap-<uuid>` id.
    pub fn random() -> Self {
        Self(format!("ap-{}", Uuid::new_v4()))
    }
}

/// A private network's id: `pn-<uuid>` (lowercase, hyphenated), as in seed 003.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetworkId(Uuid);

impl NetworkId {
    /// A fresh random network id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    /// The UUID inside the id.
    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl FromStr for NetworkId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadNetworkId(s.to_owned());
        let rest = s.strip_prefix("pn-").ok_or_else(bad)?;
        // Only the canonical hyphenated lowercase form, so the DNS name of a
        // network has exactly one spelling.
        let uuid = Uuid::try_parse(rest).map_err(|_| bad())?;
        if uuid.hyphenated().to_string() != rest {
            return Err(bad());
        }
        Ok(Self(uuid))
    }
}

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pn-{}", self.0.hyphenated())
    }
}

serde_via_str!(NetworkId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_accept_and_reject() {
        assert!("web-1".parse::<InstanceName>().is_ok());
        assert!("a".parse::<InstanceName>().is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "é", &"x".repeat(64)] {
            assert!(bad.parse::<InstanceName>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(ProcessType::default().as_str(), "web");
    }

    #[test]
    fn network_id_round_trip() {
        let text = "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c";
        let id: NetworkId = text.parse().unwrap();
        assert_eq!(id.to_string(), text);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<NetworkId>(&json).unwrap(), id);
        for bad in [
            "ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c",
            "pn-AD0FD6A1-D05E-40EA-BF63-C4F8A75A9D8C",
            "pn-ad0fd6a1d05e40eabf63c4f8a75a9d8c",
            "pn-",
            "pn-xyz",
        ] {
            assert!(bad.parse::<NetworkId>().is_err(), "{bad:?} accepted");
        }
    }
}
