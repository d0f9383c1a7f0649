//! The IST Mesh sidecar as a library: the drivers the `sidecar` binary runs,
//! exposed so tests (and embedders) run them in-process.
//!
//! ## Layout
//! - [`dns`] — the private DNS server: answers from the current name index,
//!   forwards everything else to the machine's upstream resolvers.

#![warn(missing_docs)]

pub mod dns;
