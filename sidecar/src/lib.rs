//! The IST Mesh sidecar as a library: the drivers the `sidecar` binary runs,
//! exposed so tests (and embedders) run them in-process.
//!
//! ## Layout
//! - [`agent`] — `sidecar up`/`run`: a [`meshlib::node::Node`] plus outputs
//!   (DNS, hosts, env), userspace listeners, status, control socket.
//! - the state directory is [`meshlib::node::state`].
//! - [`cli`] — flags and `ISTM_*` variables of `up`/`run`, over the config.
//! - [`config`] — the configuration (TOML, kebab-case), with defaults.
//! - [`dns`] — the private DNS server: answers from the current name index,
//!   forwards everything else to the machine's upstream resolvers.
//! - [`outputs`] — what a map turns into: DNS index, hosts section, env files.
//! - [`publish`] — service groups an instance joins and the ports it
//!   publishes (`--service-group`, `--publish`, `deployment.port`).
//! - [`gateway`] — `sidecar gateway`: serves the published ports of a
//!   network's service groups on its public addresses (seed 002).
//! - [`ports`] — which ports this instance serves: declared, those of
//!   `sidecar run`'s process tree, or (opt-in) every listener of the host.
//! - [`resolver`] — upstream resolvers, and pointing resolv.conf at the sidecar.
//! - [`status`] — `sidecar status` (unix socket, JSON) and Prometheus metrics.
//! - [`supervise`] — `sidecar run`: the child process, its env and signals.
//! - [`tunnel`] — `sidecar tunnel`: a short-lived rootless member forwarding
//!   one local port to a private name.
//! - [`userspace`] — userspace mode: the smoltcp stack under the engine and
//!   loopback listeners for the services this instance reaches.

#![warn(missing_docs)]

pub mod agent;
pub mod cli;
pub mod config;
pub mod dns;
pub mod gateway;
pub mod outputs;
pub mod ports;
pub mod publish;
pub mod resolver;
pub mod status;
pub mod supervise;
pub mod tunnel;
pub mod userspace;
