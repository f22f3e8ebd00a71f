//! The mounted tree.
