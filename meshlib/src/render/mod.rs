//! Rendering to text, no I/O: the managed section of `/etc/hosts`
//! ([`hosts`]), environment files ([`env`](mod@env)), and text from the network made
//! safe for a terminal or a log line ([`text`]). [`crate::fsutil`] writes
//! the results atomically.

pub mod env;
pub mod hosts;
pub mod text;
