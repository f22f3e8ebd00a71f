//! Integration tests: one binary, one module per area.
mod backup;
mod checkpoints_rw;
mod common;
mod contrib;
mod faults;
mod hostile;
mod libvirt;
mod mount;
mod mountutil;
mod props;
mod reader;
mod reliability;
mod rw;
