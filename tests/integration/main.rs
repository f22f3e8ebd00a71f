//! Integration tests: one binary, one module per area.
mod common;
mod hostile;
mod mount;
mod mountutil;
mod props;
mod reader;
