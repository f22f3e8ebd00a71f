//! Integration tests: one binary, one module per area.
// Test helpers fail loudly on unexpected host errors: unwrap is the idiom here.
#![allow(clippy::unwrap_used)]
mod backup;
mod blockdev;
mod checkpoints_rw;
mod common;
mod confine;
mod contrib;
mod faults;
mod hostile;
mod libvirt;
mod mount;
mod mountutil;
mod package;
mod props;
mod reader;
mod refusals;
mod reliability;
mod restore;
mod rw;
mod shape;
mod signals;
