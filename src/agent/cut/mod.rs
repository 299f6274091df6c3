//! The agent's cut: a pure lifecycle and the I/O around it.

pub mod lifecycle;
