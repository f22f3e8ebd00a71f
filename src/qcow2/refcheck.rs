//! Before writing, the part of `qemu-img check` that keeps a writer from damaging data: every
//! host cluster an active L2 entry references must lie inside the file and be counted at least
//! as often as it is referenced. A cluster referenced but counted free would be handed out
//! again, and freeing a dangling reference would take the cluster from its real owner.

use super::image::Qcow2Image;
use super::l2::{L2E_OFFSET_MASK, OFLAG_COMPRESSED};
use super::refcount::Refcounts;
use super::Table;
use crate::error::{Error, Result};
use std::collections::HashSet;

/// Above this many host clusters the check is skipped (its bitmap would exceed 512 MiB).
const MAX_CLUSTERS: u64 = 1 << 32;

/// Refuse `q` for writing if an L2 entry references a cluster past the end of the file, or a
/// cluster whose refcount is lower than the number of references to it.
pub fn check_references(q: &Qcow2Image, rc: &mut Refcounts) -> Result<()> {
    let cb = q.geo.cluster_bits;
    let cs = q.geo.cluster_size();
    let clusters = q.file_len().div_ceil(cs);
    if clusters > MAX_CLUSTERS {
        log::warn!(
            "{}: {clusters} host clusters: reference check skipped",
            q.path.display()
        );
        return Ok(());
    }
    let mut once = vec![0u64; clusters.div_ceil(64) as usize];
    let mut twice: HashSet<u64> = HashSet::new();
    let words = if q.geo.extended { 2 } else { 1 };
    for i in 0..u64::from(q.header.l1_size) {
        let l2 = q.l2_offset(Table::Active, i)?;
        if l2 == 0 {
            continue;
        }
        let table = q.l2_table(l2)?;
        for (k, &e) in table.iter().step_by(words).enumerate() {
            let (host, len) = if e & OFLAG_COMPRESSED != 0 {
                q.geo.compressed_span(e)
            } else {
                (e & L2E_OFFSET_MASK, cs)
            };
            if host == 0 {
                continue;
            }
            let gc = i * q.geo.l2_entries() + k as u64;
            let (c0, c1) = (host >> cb, (host + len - 1) >> cb);
            if c1 >= clusters {
                return Err(Error::corrupt(format!(
                    "guest cluster {gc} references {host:#x}, past the end of the file"
                )));
            }
            for c in c0..=c1 {
                let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
                if once[w] & bit != 0 {
                    twice.insert(c);
                }
                once[w] |= bit;
            }
        }
    }
    let file = q.file();
    for (w, &bits) in once.iter().enumerate() {
        let mut b = bits;
        while b != 0 {
            let c = w as u64 * 64 + u64::from(b.trailing_zeros());
            b &= b - 1;
            let need = if twice.contains(&c) { 2 } else { 1 };
            let refs = rc.get(file, c)?;
            if refs < need {
                return Err(Error::corrupt(format!(
                    "host cluster {:#x} is referenced {}but its refcount is {refs} \
                     (qemu-img check -r all)",
                    c << cb,
                    if need == 2 { "more than once " } else { "" }
                )));
            }
        }
    }
    Ok(())
}
