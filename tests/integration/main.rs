//! Integration tests: one binary, one module per area.
mod blockdev;
mod checkpoints_rw;
mod common;
mod confine;
mod contrib;
mod faults;
mod hostile;
mod mount;
mod mountutil;
mod package;
mod props;
mod reader;
mod reliability;
mod rw;
mod shape;
