//! End-to-end tests of rust-build-agent: they start the real binaries (`cache-server`, `rba`)
//! and talk to them the way users do. The tests live in `tests/tests/`.
