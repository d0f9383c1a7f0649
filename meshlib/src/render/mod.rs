//! Rendering to text, no I/O: the managed section of `/etc/hosts`
//! ([`hosts`]) and environment files ([`env`]). [`crate::fsutil`] writes the
//! results atomically.

pub mod env;
pub mod hosts;
