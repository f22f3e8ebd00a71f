//! Integration tests: one binary, one module per area.
mod common;
mod contrib;
mod hostile;
mod mount;
mod mountutil;
mod props;
mod reader;
mod rw;
