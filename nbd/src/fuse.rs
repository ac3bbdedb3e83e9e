//! FUSE (placeholder).
