//! Kernel attach (placeholder).
