//! IST Mesh, the whole system: this root package only hosts the workspace's
//! `examples/`, `benches/` and `tests/` (so plain `cargo test`, `cargo bench`
//! and `cargo run --example` work from the root). The reusable code lives in
//! [`meshlib`]; the programs are `sidecar` and `keyserver`.

pub use meshlib;
