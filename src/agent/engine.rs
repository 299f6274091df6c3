//! The engine's public API under its historical path: everything lives in [`super::cut`].

pub use super::cut::*;
