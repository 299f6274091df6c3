//! Reconciles GroupRestores (placeholder until the controller branch lands).

mod fence;
mod in_place;
