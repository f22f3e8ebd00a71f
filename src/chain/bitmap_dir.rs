//! Checkpoints through the tree (`-o rw`): adding and deleting persistent bitmaps of the top
//! image. The directory is rewritten into new clusters, flushed, then switched in by one header
//! write (so a crash leaves the old or the new directory), and the old clusters are freed.

use super::plan::{DirEdit, Fate};
use super::write::Writer;
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::bitmaps::{self, BitmapEntry, TableEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::qcow2::header::{store_bitmaps_ext, BitmapsExt};
use crate::qcow2::image::Bitmap;
use crate::qcow2::{BitmapCluster, HostOffset};

fn refused(msg: String) -> Error {
    Error::new(ErrorKind::Refused, msg)
}

/// A bitmap name in the delta scheme's form: `child^parent` -> (`child`, Some(`parent`)).
pub fn split_name(name: &str) -> (&str, Option<&str>) {
    match name.split_once('^') {
        Some((c, p)) => (c, Some(p)),
        None => (name, None),
    }
}

/// The bitmap's checkpoint name: `child^parent` -> `child`.
pub fn ckpt_part(name: &str) -> &str {
    split_name(name).0
}

impl Writer {
    /// Names QEMU refuses for bitmaps, and names already taken.
    fn check_new_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::invalid(format!(
                "checkpoint name of {} bytes (QEMU takes 1..1023)",
                name.len()
            )));
        }
        if self
            .q
            .bitmaps()
            .iter()
            .any(|b| !b.removed && (b.entry.name == name || ckpt_part(&b.entry.name) == name))
        {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("a bitmap named '{name}' exists"),
            ));
        }
        Ok(())
    }

    /// Write `entries` as the new directory and switch the header to it.
    fn switch_directory(&mut self, entries: &[BitmapEntry]) -> Result<Vec<usize>> {
        let q = self.q.clone();
        let file = q.file();
        let cs = q.geo.cluster_size();
        let (bytes, pos) = bitmaps::serialize_directory(entries);
        let (new_off, new_len) = if entries.is_empty() {
            (HostOffset(0), 0)
        } else {
            let n = (bytes.len() as u64).div_ceil(cs);
            let off = self.alloc_run(n)?;
            self.rc.protect(file, off, n * cs, "bitmap directory")?;
            q.write_at(off, &bytes, "bitmap directory")?;
            q.flush()?;
            (off, bytes.len() as u64)
        };
        let ext = (!entries.is_empty()).then_some(BitmapsExt {
            nb_bitmaps: entries.len() as u32,
            bitmap_directory_size: new_len,
            bitmap_directory_offset: new_off.0,
        });
        // One header write switches to the new directory (as QEMU's header update). From here
        // the header may name the new clusters: a failure leaves leaks at most.
        self.fresh.clear();
        store_bitmaps_ext(file, &q.header, ext)?;
        self.bitmaps_ok = !entries.is_empty() || self.bitmaps_ok;
        q.flush()?;
        if let Some((old_off, old_len)) = self.dir.take() {
            let first = old_off.cluster(q.geo.cluster_bits);
            for k in 0..old_len.div_ceil(cs) {
                self.rc.decrement(file, first + k)?;
            }
        }
        self.dir = (!entries.is_empty()).then_some((new_off, new_len));
        Ok(pos)
    }

    /// The current trusted entries of the top image, with the flags they have on disk now
    /// (in_use while mounted). Returns (bitmap index, entry). (Entries QEMU refuses, such as
    /// extra data, made the mount refuse read-write.)
    fn live_entries(&self) -> Vec<(usize, BitmapEntry)> {
        let q = &self.q;
        let mut out = Vec::new();
        for (i, b) in q.bitmaps().iter().enumerate().filter(|(_, b)| !b.removed) {
            let mut e = b.entry.clone();
            if b.distrust.is_none() {
                e.flags |= FLAG_IN_USE;
            }
            out.push((i, e));
        }
        out
    }

    /// Publish new in-memory entries (flags without in_use) at their new positions.
    fn publish(&self, kept: &[(Option<usize>, BitmapEntry, Option<String>)], pos: &[usize]) {
        let q = &self.q;
        for ((idx, e, distrust), p) in kept.iter().zip(pos) {
            let mut e = e.clone();
            if distrust.is_none() {
                e.flags &= !FLAG_IN_USE;
            }
            e.dir_pos = *p;
            q.set_bitmap(*idx, Bitmap::new(e, distrust.clone()));
        }
    }

    /// Add an enabled bitmap `name` with `granularity_bits`; `disable` (a bitmap index) stops
    /// recording in the same directory update (delta scheme).
    pub fn add_bitmap(
        &mut self,
        name: &str,
        granularity_bits: u8,
        disable: Option<usize>,
    ) -> Result<()> {
        self.check_new_name(name)?;
        let q = self.q.clone();
        if q.header.version < 3 {
            return Err(Error::unsupported("qcow2 v2 images cannot store bitmaps"));
        }
        if q.header.bitmaps.is_some() && !self.bitmaps_ok {
            return Err(Error::unsupported(
                "the image's bitmaps are inconsistent (autoclear bit clear)",
            ));
        }
        let cs = q.geo.cluster_size();
        let file = q.file();
        let mut entry = BitmapEntry {
            name: name.to_string(),
            bitmap_table_offset: 0,
            bitmap_table_size: 0,
            flags: FLAG_AUTO | FLAG_IN_USE,
            bitmap_type: 1,
            granularity_bits,
            extra_data_size: 0,
            dir_pos: 0,
        };
        let n = entry.table_size_for(q.size(), cs);
        entry.bitmap_table_size = u32::try_from(n).unwrap_or(u32::MAX);
        // QEMU's constraints, before anything is allocated (the table goes to a new cluster).
        let placed = BitmapEntry {
            bitmap_table_offset: cs,
            ..entry.clone()
        };
        if let Some(why) = placed.violation(q.size(), cs) {
            return Err(Error::invalid(format!("{why}: QEMU would refuse it")));
        }
        if n > 0 {
            let clusters = (n * 8).div_ceil(cs);
            let off = self.alloc_run(clusters)?;
            self.rc.protect(file, off, clusters * cs, "bitmap table")?;
            q.write_at(off, &vec![0u8; (clusters * cs) as usize], "bitmap table")?;
            entry.bitmap_table_offset = off.0;
        }
        let mut kept: Vec<(Option<usize>, BitmapEntry, Option<String>)> = Vec::new();
        let bms = q.bitmaps();
        for (i, mut e) in self.live_entries() {
            if Some(i) == disable {
                e.flags &= !FLAG_AUTO;
            }
            kept.push((Some(i), e, bms[i].distrust.clone()));
        }
        kept.push((None, entry, None));
        let entries: Vec<BitmapEntry> = kept.iter().map(|(_, e, _)| e.clone()).collect();
        let pos = self.switch_directory(&entries)?;
        self.publish(&kept, &pos);
        Ok(())
    }

    /// Delete bitmap `bi` of the top image. With `merge_into`, its bits are ORed into that
    /// bitmap first (delta scheme) and `enable` makes it the recording one; `rename` gives
    /// other bitmaps new names (`child^parent` schemes). Without a merge target but with
    /// `rename_self`, the bitmap is kept under that name instead (its parent had no bitmap in
    /// the top image).
    pub fn remove_bitmap(
        &mut self,
        bi: usize,
        merge_into: Option<usize>,
        enable: bool,
        renames: &[(usize, String)],
        rename_self: Option<String>,
    ) -> Result<()> {
        if !self.bitmaps_ok {
            // QEMU ignores a stale extension; its tables may name clusters others own now.
            return Err(Error::unsupported(
                "the image's bitmaps are inconsistent (autoclear bit clear)",
            ));
        }
        let q = self.q.clone();
        let bms = q.bitmaps();
        let cs = q.geo.cluster_size();
        if let Some(t) = merge_into {
            let table = q.bitmap_table(bi)?;
            for idx in 0..table.len() as u64 {
                let src = q.bitmap_cluster(bi, idx)?;
                let dst = q.bitmap_cluster(t, idx)?;
                let merged: Option<Vec<u8>> = match (src, dst) {
                    (BitmapCluster::Fill(false), _) | (_, BitmapCluster::Fill(true)) => None,
                    (BitmapCluster::Fill(true), _) => Some(vec![0xff; cs as usize]),
                    (BitmapCluster::Data(s), BitmapCluster::Fill(false)) => Some(s.to_vec()),
                    (BitmapCluster::Data(s), BitmapCluster::Data(d)) => {
                        Some(s.iter().zip(d.iter()).map(|(a, b)| a | b).collect())
                    }
                };
                if let Some(m) = merged {
                    q.bitmap_overlay_set(t, idx, m.into());
                }
            }
        }
        let keep_self = merge_into.is_none() && rename_self.is_some();
        let mut kept: Vec<(Option<usize>, BitmapEntry, Option<String>)> = Vec::new();
        for (i, mut e) in self.live_entries() {
            if i == bi && !keep_self {
                continue;
            }
            if i == bi {
                e.name = rename_self.clone().expect("checked");
            }
            if let Some((_, n)) = renames.iter().find(|(r, _)| *r == i) {
                e.name = n.clone();
            }
            if enable && Some(i) == merge_into {
                e.flags |= FLAG_AUTO;
            }
            kept.push((Some(i), e, bms[i].distrust.clone()));
        }
        let entries: Vec<BitmapEntry> = kept.iter().map(|(_, e, _)| e.clone()).collect();
        let pos = self.switch_directory(&entries)?;
        self.publish(&kept, &pos);
        if !keep_self {
            let old = &bms[bi];
            let mut gone = Bitmap::new(old.entry.clone(), old.distrust.clone());
            gone.removed = true;
            q.set_bitmap(Some(bi), gone);
            self.free_bitmap_clusters(&old.entry)?;
        }
        Ok(())
    }

    fn free_bitmap_clusters(&mut self, e: &BitmapEntry) -> Result<()> {
        let q = self.q.clone();
        let file = q.file();
        let cs = q.geo.cluster_size();
        let cb = q.geo.cluster_bits;
        if e.bitmap_table_size == 0 {
            return Ok(());
        }
        for v in bitmaps::load_table(file, e)? {
            if let Ok(TableEntry::Data(off)) = bitmaps::decode_table_entry(v, cs) {
                self.rc.decrement(file, off.cluster(cb))?;
            }
        }
        let table = HostOffset(e.bitmap_table_offset).cluster(cb);
        for k in 0..(u64::from(e.bitmap_table_size) * 8).div_ceil(cs) {
            self.rc.decrement(file, table + k)?;
        }
        Ok(())
    }

    /// Refuse an operation with a reason (for the FUSE layer's EPERM).
    pub fn refuse(msg: String) -> Error {
        refused(msg)
    }
}

impl Writer {
    /// Carry out a checkpoint edit decided by `checkpoint::edit`: one directory update. If it
    /// fails before the header switches (ENOSPC on a device), the clusters it took are given
    /// back and the old directory stays in force.
    pub fn apply(&mut self, edit: &DirEdit) -> Result<()> {
        let r = self.apply_edit(edit);
        self.settle(r)
    }

    fn apply_edit(&mut self, edit: &DirEdit) -> Result<()> {
        match edit {
            DirEdit::Add {
                name,
                granularity_bits,
                disable,
            } => self.add_bitmap(name, *granularity_bits, *disable),
            DirEdit::Remove {
                bitmap,
                fate,
                renames,
            } => match fate {
                Fate::Drop => self.remove_bitmap(*bitmap, None, false, renames, None),
                Fate::MergeInto { into, enable } => {
                    self.remove_bitmap(*bitmap, Some(*into), *enable, renames, None)
                }
                Fate::Rename(name) => {
                    self.remove_bitmap(*bitmap, None, false, renames, Some(name.clone()))
                }
            },
        }
    }
}
