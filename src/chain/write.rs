//! Writing the current disk into the top image as QEMU would: in place where the cluster is
//! allocated and unshared, else a new cluster holding the copy-on-write of the current content
//! (backing data, zeros, a decompressed cluster, unallocated subclusters) plus the new bytes.
//! Zeroing whole clusters sets zero flags. Every enabled trusted bitmap of the top image is
//! marked in memory and stored at close.
//!
//! One request is planned first (which guest clusters are written in place, which get a new
//! host cluster, which need copy-on-write), then written: new clusters come from the reserve
//! (reserve.rs) as contiguous runs, the data goes out as one write per contiguous host run (a
//! long one's device write started at once, stream.rs), and the changed entries of each L2
//! table as one write of their range.
//!
//! Ordering (QEMU's, with cache=writeback; a crash leaves at most leaks): a new cluster's
//! refcount is durable before any entry points at it (the reserve is flushed when refilled); a
//! new L2 table's content is flushed before the L1 entry points at it; an entry no longer
//! pointing at a cluster is flushed before that cluster's refcount drops. Data is written before
//! its entry but not flushed first: as in QEMU, a write is durable after the user's
//! fsync/flush, which makes everything durable. A kill -9 loses nothing written, since every
//! write reached the kernel in that order.

use super::open::Chain;
use super::read::Disk;
use super::reserve::Reserve;
use super::stream::Stream;
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::bitmaps::{self, TableEntry, FLAG_IN_USE};
use crate::qcow2::header::{store_autoclear, AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::qcow2::l2::{l1_entry, L2Entry, L2Table};
use crate::qcow2::refcount::Refcounts;
use crate::qcow2::{guard, refcheck};
use crate::qcow2::{BitmapCluster, HostCluster, HostOffset, Qcow2Image, Table};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

pub struct Writer {
    pub(super) chain: Arc<Chain>,
    /// The top image of `chain`, the one written (qcow2, checked at open).
    pub(super) q: Arc<Qcow2Image>,
    pub(super) rc: Refcounts,
    /// Where the bitmap directory is now (offset, size); it moves when rewritten.
    pub(super) dir: Option<(HostOffset, u64)>,
    /// The bitmaps extension is consistent (autoclear bit set, or ckptfs created it).
    pub(super) bitmaps_ok: bool,
    /// Host clusters the write or directory update in progress allocated and nothing points
    /// at yet: released if it fails (ENOSPC on a device), so a failed update leaks nothing.
    pub(super) fresh: Vec<HostOffset>,
    /// Clusters counted ahead for the data of later writes.
    pub(super) reserve: Reserve,
    /// Long data runs whose device write was started (stream.rs).
    stream: Stream,
    closed: bool,
}

/// What one guest cluster's L2 entry becomes.
struct Update {
    gc: u64,
    entry: L2Entry,
}

/// Where the bytes written to one guest cluster come from.
enum Bytes {
    /// This range of the request, written at the piece's `in_off`.
    Request(Range<usize>),
    /// The whole cluster: its current content (copy-on-write) with the new bytes on top.
    Whole(Vec<u8>),
}

/// One guest cluster a write touches, planned before anything is written.
struct Piece {
    gc: u64,
    /// Where in the cluster `bytes` go (0 for a whole cluster).
    in_off: u64,
    bytes: Bytes,
    /// The host cluster it owns, where it has one the write keeps.
    host: Option<HostOffset>,
    /// The entry changes to name `host` as a plain data cluster.
    remap: bool,
}

impl Writer {
    /// Prepare the top image for writing: refuse what cannot be written safely, mark the
    /// bitmaps in use (as QEMU does on a read-write open).
    pub fn open(chain: Arc<Chain>) -> Result<Writer> {
        let q = chain.top_qcow2()?;
        let name = q.path.display().to_string();
        let h = &q.header;
        let refuse = |m: &str| {
            Err(Error::unsupported(format!(
                "{name}: cannot mount read-write: {m}"
            )))
        };
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return refuse("the image is marked corrupt (qemu-img check -r all)");
        }
        if h.incompatible_features & INCOMPAT_DIRTY != 0 {
            return refuse("the image is dirty (lazy refcounts); run qemu-img check -r all first");
        }
        if h.nb_snapshots > 0 {
            return refuse("it has internal snapshots (shared clusters are not written by ckptfs)");
        }
        let mut rc = Refcounts::load(&q)?;
        let protected = rc
            .protect_blocks(q.file())
            .and_then(|()| {
                guard::metadata(&q)?
                    .into_iter()
                    .try_for_each(|(off, len, what)| rc.protect(q.file(), off, len, what))
            })
            .and_then(|()| refcheck::check_references(&q, &mut rc));
        if let Err(e) = protected {
            return refuse(&e.msg);
        }
        let autoclear_ok = h.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        let fix_autoclear = autoclear_ok && h.autoclear_features != AUTOCLEAR_BITMAPS;
        let dir = h.bitmaps.map(|b| {
            (
                HostOffset(b.bitmap_directory_offset),
                b.bitmap_directory_size,
            )
        });
        let mut w = Writer {
            chain: chain.clone(),
            q: q.clone(),
            rc,
            dir,
            bitmaps_ok: autoclear_ok,
            fresh: Vec::new(),
            reserve: Reserve::default(),
            stream: Stream::default(),
            closed: false,
        };
        if fix_autoclear {
            // A writer must clear the autoclear bits it does not know.
            store_autoclear(w.file(), AUTOCLEAR_BITMAPS)?;
        }
        w.set_in_use(true)?;
        Ok(w)
    }

    fn file(&self) -> &std::fs::File {
        self.q.file()
    }

    /// Set or clear in_use on every trusted bitmap of the top image, in the directory in place.
    fn set_in_use(&mut self, on: bool) -> Result<()> {
        let q = &self.q;
        let Some((dir_off, _)) = self.dir else {
            return Ok(());
        };
        if !self.bitmaps_ok {
            return Ok(());
        }
        for b in q
            .bitmaps()
            .iter()
            .filter(|b| b.distrust.is_none() && !b.removed)
        {
            let flags = if on {
                b.entry.flags | FLAG_IN_USE
            } else {
                b.entry.flags & !FLAG_IN_USE
            };
            bitmaps::store_flags(q.file(), dir_off, &b.entry, flags)?;
        }
        q.flush()
    }

    fn size(&self) -> u64 {
        self.q.size()
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(Error::new(
                ErrorKind::Refused,
                format!("write at {off}+{len} goes past the end of the disk ({} bytes): size changes are refused", self.size()),
            ));
        }
        Ok(())
    }

    /// Current L2 entry of guest cluster `gc`.
    fn entry(&self, gc: u64) -> Result<L2Entry> {
        let q = &self.q;
        let per = q.geo.l2_entries();
        match q.l2_offset(Table::Active, gc / per)? {
            Some(l2) => Ok(q.l2_table(l2)?.get(gc % per)),
            None => Ok(L2Entry::default()),
        }
    }

    /// Refuse guest data at `[host, host+len)` (written there, or referenced from guest cluster
    /// `gc`) where the image keeps metadata: a corrupt or hostile image.
    fn not_metadata(&self, gc: u64, host: HostOffset, len: u64) -> Result<()> {
        match self.rc.metadata_at(host, len) {
            Some(meta) => Err(Error::corrupt(format!(
                "{}: guest cluster {gc} has its data at {host}, where the image keeps its \
                 {meta}; refusing to write (qemu-img check -r all)",
                self.q.path.display()
            ))),
            None => Ok(()),
        }
    }

    /// Host clusters to release when guest cluster `gc`'s entry stops pointing at them.
    fn freed_by(&self, gc: u64, e: L2Entry) -> Result<Vec<HostCluster>> {
        let q = &self.q;
        let cb = q.geo.cluster_bits;
        if e.is_compressed() {
            let (host, len) = q.geo.compressed_span(e);
            self.not_metadata(gc, host, len)?;
            q.forget_cluster(host);
            let (c0, c1) = host.clusters(len, cb);
            return Ok((c0.0..c1.0).map(HostCluster).collect());
        }
        let off = e.offset();
        if off.0 != 0 {
            self.not_metadata(gc, off, q.geo.cluster_size())?;
            Ok(vec![off.cluster(cb)])
        } else {
            Ok(Vec::new())
        }
    }

    /// A new host cluster (refcount 1), released again if the write fails before it is used.
    fn alloc(&mut self) -> Result<HostOffset> {
        self.alloc_run(1)
    }

    /// `n` new contiguous host clusters (refcount 1, written but not flushed), released again
    /// if the update they are for fails before anything points at them (see `settle`). Where
    /// they do not fit, the reserve is given back first.
    pub(super) fn alloc_run(&mut self, n: u64) -> Result<HostOffset> {
        let q = self.q.clone();
        let cs = q.geo.cluster_size();
        let off = match self.rc.alloc_run(q.file(), n) {
            Err(e) if e.kind == ErrorKind::NoSpace && self.has_reserve() => {
                self.release_reserve()?;
                self.rc.alloc_run(q.file(), n)?
            }
            r => r?,
        };
        q.note_file_end(off + n * cs);
        self.fresh.extend((0..n).map(|k| off + k * cs));
        Ok(off)
    }

    /// After a write or directory update: on failure, give back the clusters it allocated
    /// that nothing points at, and the reserve.
    pub(super) fn settle(&mut self, r: Result<()>) -> Result<()> {
        let fresh = std::mem::take(&mut self.fresh);
        if r.is_err() {
            let q = self.q.clone();
            for off in fresh {
                if let Err(e) = self.rc.decrement(q.file(), off.cluster(q.geo.cluster_bits)) {
                    log::error!("{}: releasing cluster {off}: {e}", q.path.display());
                }
            }
            if let Err(e) = self.release_reserve() {
                log::error!("{}: releasing reserved clusters: {e}", q.path.display());
            }
        }
        r
    }

    /// An unshared, allocated, non-compressed host cluster guest cluster `gc`'s entry owns, if
    /// any. The COPIED flag is checked against the refcount: an owned cluster counted free would
    /// be handed out again, and two guest clusters would share it.
    fn owned_host(&mut self, gc: u64, e: L2Entry) -> Result<Option<HostOffset>> {
        let off = e.offset();
        if e.is_compressed() || !e.is_copied() || off.0 == 0 {
            return Ok(None);
        }
        let q = &self.q;
        let refs = self.rc.get(q.file(), off.cluster(q.geo.cluster_bits))?;
        if refs != 1 {
            return Err(Error::corrupt(format!(
                "{}: guest cluster {gc} owns the cluster at {off}, whose refcount is {refs}; \
                 refusing to write (qemu-img check -r all)",
                q.path.display()
            )));
        }
        Ok(Some(off))
    }

    /// Write `data` at guest offset `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let r = self.write_clusters(off, data);
        self.settle(r)
    }

    fn write_clusters(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.check_range(off, data.len() as u64)?;
        let (pieces, frees) = self.plan(off, data)?;
        let hosts = self.place(&pieces)?;
        let mut updates = Vec::new();
        for (p, &host) in pieces.iter().zip(&hosts) {
            self.not_metadata(p.gc, host, self.q.geo.cluster_size())?;
            if p.remap {
                updates.push(Update {
                    gc: p.gc,
                    entry: L2Entry::data(host, &self.q.geo),
                });
            }
        }
        self.write_pieces(&pieces, &hosts, data)?;
        self.commit(updates, frees)?;
        self.mark(off, data.len() as u64)
    }

    /// The guest clusters `data` at `off` touches, each with the bytes it gets: written in
    /// place where the cluster is allocated, unshared and all data; else the whole cluster
    /// (copy-on-write where the request covers part of it) into the owned cluster or a new one.
    /// Also the host clusters the new entries stop pointing at.
    fn plan(&mut self, off: u64, data: &[u8]) -> Result<(Vec<Piece>, Vec<HostCluster>)> {
        let cs = self.q.geo.cluster_size();
        let mut pieces = Vec::new();
        let mut frees = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let (gc, in_off) = (at / cs, at % cs);
            let n = ((cs - in_off) as usize).min(data.len() - pos);
            let range = pos..pos + n;
            pos += n;
            let e = self.entry(gc)?;
            let fully_mapped = e.all_data(&self.q.geo);
            let owned = self.owned_host(gc, e)?;
            if owned.is_some() && fully_mapped {
                pieces.push(Piece {
                    gc,
                    in_off,
                    bytes: Bytes::Request(range),
                    host: owned,
                    remap: false,
                });
                continue;
            }
            let bytes = if n as u64 == cs {
                Bytes::Request(range)
            } else {
                let mut buf = vec![0u8; cs as usize];
                Disk::new(self.chain.clone(), 0, Table::Active).read(gc * cs, &mut buf)?;
                buf[in_off as usize..in_off as usize + n].copy_from_slice(&data[range]);
                Bytes::Whole(buf)
            };
            if owned.is_none() {
                frees.extend(self.freed_by(gc, e)?);
            }
            pieces.push(Piece {
                gc,
                in_off: 0,
                bytes,
                host: owned,
                remap: true,
            });
        }
        Ok((pieces, frees))
    }

    /// The host cluster of each piece: its own, or a new one from the reserve, in order.
    fn place(&mut self, pieces: &[Piece]) -> Result<Vec<HostOffset>> {
        let need = pieces.iter().filter(|p| p.host.is_none()).count() as u64;
        let cs = self.q.geo.cluster_size();
        let mut new = self
            .take_clusters(need)?
            .into_iter()
            .flat_map(|(off, k)| (0..k).map(move |i| off + i * cs));
        pieces
            .iter()
            .map(|p| {
                p.host
                    .or_else(|| new.next())
                    .ok_or_else(|| Error::no_space("the reserve ran short of clusters"))
            })
            .collect()
    }

    /// Write the pieces' bytes at `hosts`: one write per run of request bytes contiguous on
    /// the host, one per copy-on-write cluster.
    fn write_pieces(&mut self, pieces: &[Piece], hosts: &[HostOffset], data: &[u8]) -> Result<()> {
        let q = self.q.clone();
        let mut run: Option<(HostOffset, Range<usize>)> = None;
        for (p, &host) in pieces.iter().zip(hosts) {
            let at = host + p.in_off;
            match &p.bytes {
                Bytes::Whole(buf) => q.write_at(at, buf, "data")?,
                Bytes::Request(r) => match &mut run {
                    Some((start, cur)) if *start + cur.len() as u64 == at && cur.end == r.start => {
                        cur.end = r.end;
                    }
                    _ => {
                        if let Some((start, cur)) = run.replace((at, r.clone())) {
                            self.write_run(start, &data[cur])?;
                        }
                    }
                },
            }
        }
        if let Some((start, cur)) = run {
            self.write_run(start, &data[cur])?;
        }
        Ok(())
    }

    /// Write one run of request bytes through the page cache; a long one's device write starts
    /// at once (stream.rs).
    fn write_run(&mut self, at: HostOffset, bytes: &[u8]) -> Result<()> {
        self.q.write_at(at, bytes, "data")?;
        self.stream.written(self.q.file(), at.0, bytes.len() as u64);
        Ok(())
    }

    /// Make `[off, off+len)` read as zeros: whole clusters become zero clusters (v3), edges and
    /// v2 images are written with zeros.
    pub fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        let q = &self.q;
        let cs = q.geo.cluster_size();
        let v3 = q.header.version >= 3;
        let end = off + len;
        let first_full = off.div_ceil(cs) * cs;
        let last_full = (end / cs) * cs;
        if !v3 || first_full >= last_full {
            return self.write_zeros(off, len);
        }
        self.write_zeros(off, first_full - off)?;
        let mut updates = Vec::new();
        let mut frees = Vec::new();
        for gc in first_full / cs..last_full / cs {
            let e = self.entry(gc)?;
            let new = match self.owned_host(gc, e)? {
                // Keep the allocation, as `write -z` does; the data is no longer read.
                Some(host) => L2Entry::zero(Some(host), &self.q.geo),
                None => {
                    frees.extend(self.freed_by(gc, e)?);
                    L2Entry::zero(None, &self.q.geo)
                }
            };
            if new != e {
                updates.push(Update { gc, entry: new });
            }
        }
        self.commit(updates, frees)?;
        self.write_zeros(last_full, end - last_full)?;
        self.mark(off, len)
    }

    fn write_zeros(&mut self, off: u64, len: u64) -> Result<()> {
        let mut at = off;
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        while at < off + len {
            let n = (off + len - at).min(zeros.len() as u64) as usize;
            self.write(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Point L2 entries at their new clusters (whose refcounts are durable), creating L2 tables
    /// where needed, in crash-safe order, then release what they no longer reference. The
    /// changed entries of one table are stored as one write of their range.
    fn commit(&mut self, updates: Vec<Update>, frees: Vec<HostCluster>) -> Result<()> {
        if updates.is_empty() {
            return Ok(());
        }
        let q = self.q.clone();
        let file = q.file();
        let per = q.geo.l2_entries();
        // Group by L2 table.
        let mut by_table: BTreeMap<u64, Vec<&Update>> = BTreeMap::new();
        for u in &updates {
            by_table.entry(u.gc / per).or_default().push(u);
        }
        let mut new_tables = Vec::new();
        let mut edits = Vec::new();
        for (l1_idx, ups) in by_table {
            let changes = ups.iter().map(|u| (u.gc % per, u.entry));
            match q.l2_offset(Table::Active, l1_idx)? {
                None => {
                    // From the reserve, after the data: the tables sit among the data they map.
                    let t = self.take_cluster()?;
                    self.rc.protect(file, t, q.geo.cluster_size(), "L2 table")?;
                    let table = L2Table::empty(&q.geo).with(changes);
                    q.store_l2_table(t, &table)?;
                    new_tables.push((l1_idx, t, table));
                }
                Some(l2) => {
                    let table = q.l2_table(l2)?.with(changes);
                    let first = ups.iter().map(|u| u.gc % per).min().unwrap_or(0);
                    let end = ups.iter().map(|u| u.gc % per + 1).max().unwrap_or(0);
                    edits.push((l2, first..end, table));
                }
            }
        }
        if !new_tables.is_empty() {
            q.flush()?;
        }
        // From here entries point at the new clusters: a failure leaves leaks at most.
        self.fresh.clear();
        for (l2, range, table) in edits {
            q.store_l2_entries(l2, &table, range)?;
            q.l2_updated(l2, table);
        }
        for (l1_idx, l2, table) in new_tables {
            q.store_l1_entry(l1_idx, l1_entry(l2))?;
            q.l2_updated(l2, table);
        }
        if !frees.is_empty() {
            q.flush()?;
            for c in frees {
                self.rc.decrement(file, c)?;
            }
        }
        Ok(())
    }

    /// Record `[off, off+len)` in every enabled bitmap of the top image (in memory).
    fn mark(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let q = &self.q;
        let bits_per_cluster = q.geo.cluster_size() * 8;
        // Enabled, trusted, live bitmaps record writes (checked per write: mkdir/rmdir change them).
        if !self.bitmaps_ok {
            return Ok(());
        }
        let marks: Vec<usize> = q
            .bitmaps()
            .iter()
            .enumerate()
            .filter(|(_, b)| b.entry.auto() && b.distrust.is_none() && !b.removed)
            .map(|(i, _)| i)
            .collect();
        for bi in marks {
            let g = q.bitmaps()[bi].entry.granularity();
            let (k0, k1) = (off / g, (off + len).div_ceil(g));
            let mut k = k0;
            while k < k1 {
                let idx = k / bits_per_cluster;
                let end = ((idx + 1) * bits_per_cluster).min(k1);
                let mut data = match q.bitmap_cluster(bi, idx)? {
                    BitmapCluster::Fill(true) => {
                        k = end;
                        continue;
                    }
                    BitmapCluster::Fill(false) => vec![0u8; q.geo.cluster_size() as usize],
                    BitmapCluster::Data(d) => d.to_vec(),
                };
                for j in k..end {
                    let r = j - idx * bits_per_cluster;
                    data[(r / 8) as usize] |= 1 << (r % 8);
                }
                q.bitmap_overlay_set(bi, idx, data.into());
                k = end;
            }
        }
        Ok(())
    }

    /// Make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        self.q.flush()
    }

    /// Give the reserve back, store the marked bitmap clusters, then clear in_use (a clean
    /// close). If they cannot be stored (ENOSPC on a device), the bitmaps stay in_use, as QEMU
    /// leaves them, and the cluster taken for the one that failed is given back.
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let released = self.release_reserve();
        let r = self.store_bitmaps();
        self.settle(r)?;
        released?;
        self.set_in_use(false)
    }

    fn store_bitmaps(&mut self) -> Result<()> {
        let q = self.q.clone();
        let file = q.file();
        let cs = q.geo.cluster_size();
        let cb = q.geo.cluster_bits;
        for ((bi, idx), data) in q.bitmap_overlay_take() {
            let bm = q.bitmaps()[bi].clone();
            if bm.removed {
                continue;
            }
            let b = &bm.entry;
            let host = match bitmaps::load_table_entry(file, b, idx, cs)? {
                TableEntry::Data(off) if self.rc.get(file, off.cluster(cb))? == 1 => off,
                _ => {
                    let off = self.alloc()?;
                    self.rc.protect(file, off, cs, "bitmap data")?;
                    q.write_at(off, &data, "bitmap data")?;
                    q.flush()?;
                    // From here the table may name the cluster: a failure leaves a leak at most.
                    self.fresh.clear();
                    bitmaps::store_table_entry(file, b, idx, off)?;
                    continue;
                }
            };
            q.write_at(host, &data, "bitmap data")?;
        }
        q.flush()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("{}: closing the image failed: {e}", self.q.path.display());
        }
    }
}
