//! (being written)

/// Placeholder until the IST module lands.
pub fn hostname_label(name: &str) -> Option<String> {
    Some(name.to_lowercase())
}
