//! `keyserver`: the IST Mesh control plane.
fn main() {}
