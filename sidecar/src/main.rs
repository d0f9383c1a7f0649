//! `sidecar`: the IST Mesh agent beside each instance.
fn main() {}
