//! Unit tests of the cut with injected syscalls (no root needed).
