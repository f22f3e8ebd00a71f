//! What `fs/` holds on `-o rw` mounts: the writer of the top image behind a small handle.
//! Guest writes pass through; mkdir/rmdir are decided by `edit` and applied by the chain in one
//! directory update.

use super::edit::{plan_mkdir, plan_rmdir, Facts};
use super::model::Model;
use crate::chain::write::Writer;
use crate::chain::Chain;
use crate::error::{ErrorKind, Result};
use std::sync::Arc;

pub struct Editor {
    writer: Writer,
}

impl Editor {
    /// Open the top image for writing (marks its bitmaps in use).
    pub fn open(chain: Arc<Chain>) -> Result<Editor> {
        Ok(Editor {
            writer: Writer::open(chain)?,
        })
    }

    /// Write guest bytes at `off` (copy-on-write through the chain).
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.writer.write(off, data)
    }

    /// Make a guest range read as zeros.
    pub fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        self.writer.zero(off, len)
    }

    pub fn flush(&self) -> Result<()> {
        self.writer.flush()
    }

    /// Store bitmaps and clear in_use (clean unmount).
    pub fn close(&mut self) -> Result<()> {
        self.writer.close()
    }

    /// A new checkpoint `name` of `model`'s chain; `taken`: the name is already in the tree.
    pub fn mkdir(&mut self, model: &Model, name: &str, taken: bool) -> Result<()> {
        let plan = plan_mkdir(&Facts::of(model)?, name, taken)?;
        self.writer.apply(&plan.edit)?;
        log::info!("{}", plan.log);
        Ok(())
    }

    /// Delete checkpoint `name` of `model`'s chain.
    pub fn rmdir(&mut self, model: &Model, name: &str) -> Result<()> {
        let plan = plan_rmdir(&Facts::of(model)?, name).inspect_err(|e| {
            if e.kind == ErrorKind::Refused {
                log::warn!("{}", e.msg);
            }
        })?;
        self.writer.apply(&plan.edit)?;
        log::info!("{}", plan.log);
        Ok(())
    }
}
