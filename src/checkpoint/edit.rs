//! Checkpoint-editing policy (`-o rw` mkdir/rmdir): which scheme the chain uses (cumulative,
//! delta, `child^parent` names), what the new bitmap is called and how fine it is, what stops
//! recording, what a deleted checkpoint's bits merge into and what gets renamed, and what is
//! refused. Plain functions from `Facts` to a `Plan`; `chain::plan` carries the plan out.

use super::model::{Kind, Model};
use crate::chain::bitmap_dir::ckpt_part;
use crate::chain::plan::{DirEdit, Fate};
use crate::error::{Error, ErrorKind, Result};

/// One bitmap of the top image, as the policy sees it (index = the image's bitmap index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopBitmap {
    pub name: String,
    /// Deleted through the tree while mounted.
    pub removed: bool,
    /// Its bits can be used (no reason to distrust them).
    pub trusted: bool,
    /// Recording (QEMU's "auto" flag).
    pub auto: bool,
}

/// A checkpoint of the model, as the policy sees it (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ckpt {
    pub name: String,
    pub dir_name: String,
    pub kind: Kind,
    /// Chain index of the layer that carries it (0 = the top image).
    pub layer: Option<usize>,
    pub granularity: u64,
}

/// What the policy decides from: a summary of the model and its images' bitmaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub top: Vec<TopBitmap>,
    /// Names of the live bitmaps of every layer, top layer first.
    pub bitmap_names: Vec<String>,
    pub checkpoints: Vec<Ckpt>,
    pub cluster_size: u64,
}

/// A decided edit: the directory update and a line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub edit: DirEdit,
    pub log: String,
}

impl Facts {
    pub fn of(model: &Model) -> Result<Facts> {
        let top = model
            .chain
            .top()
            .qcow2()
            .ok_or_else(|| Error::unsupported("top is not qcow2"))?;
        Ok(Facts {
            top: top
                .bitmaps()
                .iter()
                .map(|b| TopBitmap {
                    name: b.entry.name.clone(),
                    removed: b.removed,
                    trusted: b.distrust.is_none(),
                    auto: b.entry.auto(),
                })
                .collect(),
            bitmap_names: model
                .chain
                .layers
                .iter()
                .filter_map(|l| l.qcow2())
                .flat_map(|q| q.bitmaps())
                .filter(|b| !b.removed)
                .map(|b| b.entry.name.clone())
                .collect(),
            checkpoints: model
                .checkpoints
                .iter()
                .map(|c| Ckpt {
                    name: c.name.clone(),
                    dir_name: c.dir_name.clone(),
                    kind: c.kind,
                    layer: c.layer,
                    granularity: c.granularity,
                })
                .collect(),
            cluster_size: top.geo.cluster_size(),
        })
    }

    /// Does the chain name its bitmaps `child^parent`?
    fn uses_carets(&self) -> bool {
        self.bitmap_names.iter().any(|n| n.contains('^'))
    }

    /// Indexes of the top image's usable bitmaps, and how many of them record.
    fn live(&self) -> (Vec<usize>, usize) {
        let live: Vec<usize> = (0..self.top.len())
            .filter(|&i| !self.top[i].removed && self.top[i].trusted)
            .collect();
        let enabled = live.iter().filter(|&&i| self.top[i].auto).count();
        (live, enabled)
    }

    /// The top image's bitmap of checkpoint `ck`.
    fn top_bitmap(&self, ck: &str) -> Option<usize> {
        self.top
            .iter()
            .position(|b| !b.removed && ckpt_part(&b.name) == ck)
    }

    /// Bitmap checkpoints carried by a layer, oldest first.
    fn bitmap_checkpoints(&self) -> Vec<&Ckpt> {
        self.checkpoints
            .iter()
            .filter(|c| c.kind == Kind::Bitmap && c.layer.is_some())
            .collect()
    }
}

/// `mkdir NAME`: a new enabled bitmap in the top image. `taken`: the name is already in the
/// top directory of the tree. Delta scheme (carets, or one recording bitmap among several):
/// the recording one stops; caret scheme: the bitmap is named `NAME^newest`.
pub fn plan_mkdir(f: &Facts, name: &str, taken: bool) -> Result<Plan> {
    if name.contains('^') {
        // '^' separates child and parent in delta-scheme bitmap names.
        return Err(Error::invalid(format!(
            "checkpoint name '{name}': '^' is reserved"
        )));
    }
    if taken {
        return Err(Error::new(ErrorKind::Exists, format!("'{name}' exists")));
    }
    let caret = f.uses_carets();
    let (live, enabled) = f.live();
    let delta = caret || (enabled == 1 && live.len() > 1);
    let newest = f.bitmap_checkpoints().pop();
    let gran = newest.map_or(f.cluster_size.max(65536), |c| c.granularity);
    let bitmap = match (caret, newest) {
        (true, Some(p)) => format!("{name}^{}", p.name),
        _ => name.to_string(),
    };
    let disable = if delta {
        live.into_iter().find(|&i| f.top[i].auto)
    } else {
        None
    };
    Ok(Plan {
        log: format!("checkpoint '{name}' created (bitmap '{bitmap}')"),
        edit: DirEdit::Add {
            name: bitmap,
            granularity_bits: gran.trailing_zeros() as u8,
            disable,
        },
    })
}

/// `rmdir NAME`: delete a bitmap checkpoint that lives only in the top image. Delta scheme:
/// its bits go to the next older checkpoint (merged into its bitmap, or kept under its name
/// when that bitmap lives below); caret scheme: the next newer bitmap is renamed to point at
/// the older one.
pub fn plan_rmdir(f: &Facts, name: &str) -> Result<Plan> {
    let not_found = || Error::new(ErrorKind::NotFound, "no such file or directory");
    let c = f
        .checkpoints
        .iter()
        .find(|c| c.dir_name == name)
        .ok_or_else(not_found)?;
    if c.kind != Kind::Bitmap || c.layer != Some(0) {
        return Err(Error::new(
            ErrorKind::Refused,
            format!(
                "rmdir {name}: refused: only bitmap checkpoints that live only in the top image \
                 can be deleted (this one is a {} checkpoint{})",
                c.kind.as_str(),
                if c.kind == Kind::Bitmap {
                    " carried by a backing layer"
                } else {
                    ""
                }
            ),
        ));
    }
    let bi = f.top_bitmap(&c.name).ok_or_else(not_found)?;
    let caret = f.uses_carets();
    let (live, enabled) = f.live();
    let delta = caret || !f.top[bi].auto || (enabled == 1 && live.len() > 1);
    let ckpts = f.bitmap_checkpoints();
    let pos = ckpts
        .iter()
        .position(|x| x.name == c.name)
        .ok_or_else(not_found)?;
    let prev = pos.checked_sub(1).map(|p| ckpts[p]);
    let next = ckpts.get(pos + 1).copied();
    let mut renames = Vec::new();
    if caret {
        if let Some(n) = next.and_then(|n| f.top_bitmap(&n.name)) {
            let child = ckpt_part(&f.top[n].name).to_string();
            let renamed = match prev {
                Some(p) => format!("{child}^{}", p.name),
                None => child,
            };
            renames.push((n, renamed));
        }
    }
    let fate = match prev.filter(|_| delta) {
        None => Fate::Drop,
        Some(p) => match f.top_bitmap(&p.name) {
            Some(into) => Fate::MergeInto {
                into,
                enable: f.top[bi].auto,
            },
            // The parent's bitmap lives below: this bitmap becomes the parent's in the top
            // image (its bits are exactly what the parent gains here).
            None => Fate::Rename(
                f.bitmap_names
                    .iter()
                    .find(|b| ckpt_part(b) == p.name)
                    .map_or(p.name.clone(), Clone::clone),
            ),
        },
    };
    Ok(Plan {
        edit: DirEdit::Remove {
            bitmap: bi,
            fate,
            renames,
        },
        log: format!("checkpoint '{name}' deleted"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bm(name: &str, auto: bool) -> TopBitmap {
        TopBitmap {
            name: name.to_string(),
            removed: false,
            trusted: true,
            auto,
        }
    }

    fn ck(name: &str, kind: Kind, layer: usize, granularity: u64) -> Ckpt {
        Ckpt {
            name: name.to_string(),
            dir_name: name.to_string(),
            kind,
            layer: Some(layer),
            granularity,
        }
    }

    /// A top image with `top` bitmaps, each a checkpoint of the top layer in that order,
    /// after checkpoints of lower layers' bitmaps `below` (oldest first).
    fn facts(top: &[(&str, bool)], below: &[&str]) -> Facts {
        let mut checkpoints: Vec<Ckpt> = below
            .iter()
            .map(|n| ck(ckpt_part(n), Kind::Bitmap, 1, 65536))
            .collect();
        checkpoints.extend(
            top.iter()
                .map(|(n, _)| ck(ckpt_part(n), Kind::Bitmap, 0, 65536)),
        );
        let mut bitmap_names: Vec<String> = top.iter().map(|(n, _)| n.to_string()).collect();
        bitmap_names.extend(below.iter().map(|n| n.to_string()));
        Facts {
            top: top.iter().map(|(n, a)| bm(n, *a)).collect(),
            bitmap_names,
            checkpoints,
            cluster_size: 65536,
        }
    }

    fn add(p: &Plan) -> (&str, u8, Option<usize>) {
        match &p.edit {
            DirEdit::Add {
                name,
                granularity_bits,
                disable,
            } => (name, *granularity_bits, *disable),
            e => panic!("not an add: {e:?}"),
        }
    }

    fn remove(p: &Plan) -> (usize, &Fate, &[(usize, String)]) {
        match &p.edit {
            DirEdit::Remove {
                bitmap,
                fate,
                renames,
            } => (*bitmap, fate, renames),
            e => panic!("not a remove: {e:?}"),
        }
    }

    #[test]
    fn mkdir_refuses_carets_and_taken_names() {
        let f = facts(&[], &[]);
        let e = plan_mkdir(&f, "a^b", false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.msg.contains("'^' is reserved"), "{e}");
        assert_eq!(
            plan_mkdir(&f, "current", true).unwrap_err().kind,
            ErrorKind::Exists
        );
    }

    #[test]
    fn mkdir_first_checkpoint_takes_the_cluster_size_at_least_64k() {
        let mut f = facts(&[], &[]);
        assert_eq!(add(&plan_mkdir(&f, "c1", false).unwrap()), ("c1", 16, None));
        f.cluster_size = 2 << 20;
        let p = plan_mkdir(&f, "c1", false).unwrap();
        assert_eq!(add(&p), ("c1", 21, None));
        assert_eq!(p.log, "checkpoint 'c1' created (bitmap 'c1')");
    }

    #[test]
    fn mkdir_cumulative_keeps_every_bitmap_recording() {
        let mut f = facts(&[("a", true), ("b", true)], &[]);
        f.checkpoints[1].granularity = 1 << 20;
        // The newest bitmap checkpoint's granularity; nothing disabled.
        assert_eq!(add(&plan_mkdir(&f, "c", false).unwrap()), ("c", 20, None));
        // One bitmap alone is cumulative too.
        let f = facts(&[("a", true)], &[]);
        assert_eq!(add(&plan_mkdir(&f, "c", false).unwrap()), ("c", 16, None));
    }

    #[test]
    fn mkdir_delta_stops_the_recording_bitmap() {
        let f = facts(&[("a", false), ("b", true)], &[]);
        assert_eq!(
            add(&plan_mkdir(&f, "c", false).unwrap()),
            ("c", 16, Some(1))
        );
        // Distrusted and removed bitmaps do not count: one live bitmap is cumulative.
        let mut f = facts(&[("a", false), ("b", true)], &[]);
        f.top[0].trusted = false;
        assert_eq!(add(&plan_mkdir(&f, "c", false).unwrap()), ("c", 16, None));
        f.top[0].trusted = true;
        f.top[0].removed = true;
        assert_eq!(add(&plan_mkdir(&f, "c", false).unwrap()), ("c", 16, None));
    }

    #[test]
    fn mkdir_caret_names_the_parent() {
        let f = facts(&[("b^a", true)], &["a"]);
        let p = plan_mkdir(&f, "c", false).unwrap();
        assert_eq!(add(&p), ("c^b", 16, Some(0)));
        assert_eq!(p.log, "checkpoint 'c' created (bitmap 'c^b')");
        // A caret anywhere in the chain, no bitmap checkpoint yet in the model: plain name.
        let mut f = facts(&[], &["b^a"]);
        f.checkpoints.clear();
        assert_eq!(add(&plan_mkdir(&f, "c", false).unwrap()), ("c", 16, None));
    }

    #[test]
    fn rmdir_refuses_what_is_not_a_top_bitmap() {
        let mut f = facts(&[("b", true)], &["a"]);
        assert_eq!(plan_rmdir(&f, "zz").unwrap_err().kind, ErrorKind::NotFound);
        let e = plan_rmdir(&f, "a").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(
            e.msg
                .contains("bitmap checkpoint carried by a backing layer"),
            "{e}"
        );
        f.checkpoints.push(ck("s", Kind::Snapshot, 0, 65536));
        f.checkpoints.push(ck("l", Kind::Layer, 1, 65536));
        for n in ["s", "l"] {
            let e = plan_rmdir(&f, n).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Refused);
            assert!(e.msg.contains(" checkpoint)"), "{e}");
        }
        // Listed by the model but without a bitmap in the top image.
        f.top[0].removed = true;
        assert_eq!(plan_rmdir(&f, "b").unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn rmdir_cumulative_drops_the_bitmap() {
        let f = facts(&[("a", true), ("b", true), ("c", true)], &[]);
        let p = plan_rmdir(&f, "b").unwrap();
        assert_eq!(remove(&p), (1, &Fate::Drop, &[][..]));
        assert_eq!(p.log, "checkpoint 'b' deleted");
    }

    #[test]
    fn rmdir_delta_merges_into_the_older_checkpoint() {
        let f = facts(&[("a", false), ("b", false), ("c", true)], &[]);
        // A disabled bitmap: its bits go to the older one, which stays disabled.
        let into = Fate::MergeInto {
            into: 0,
            enable: false,
        };
        assert_eq!(remove(&plan_rmdir(&f, "b").unwrap()), (1, &into, &[][..]));
        // The recording bitmap: the older one takes over recording.
        let into = Fate::MergeInto {
            into: 1,
            enable: true,
        };
        assert_eq!(remove(&plan_rmdir(&f, "c").unwrap()), (2, &into, &[][..]));
        // The oldest has nothing older to give its bits to.
        assert_eq!(
            remove(&plan_rmdir(&f, "a").unwrap()),
            (0, &Fate::Drop, &[][..])
        );
        // One disabled bitmap among enabled ones still merges (it is a delta itself).
        let f = facts(&[("a", true), ("b", false), ("c", true)], &[]);
        let into = Fate::MergeInto {
            into: 0,
            enable: false,
        };
        assert_eq!(remove(&plan_rmdir(&f, "b").unwrap()), (1, &into, &[][..]));
    }

    #[test]
    fn rmdir_delta_keeps_the_bits_under_a_lower_parents_name() {
        let f = facts(&[("b", false), ("c", true)], &["a"]);
        let keep = Fate::Rename("a".to_string());
        assert_eq!(remove(&plan_rmdir(&f, "b").unwrap()), (0, &keep, &[][..]));
    }

    #[test]
    fn rmdir_caret_renames_the_child() {
        let f = facts(&[("b^a", false), ("c^b", true)], &["a"]);
        // b's bits become a's (a lives below, named plainly); c now points at a.
        let keep = Fate::Rename("a".to_string());
        let renames = [(1, "c^a".to_string())];
        assert_eq!(
            remove(&plan_rmdir(&f, "b").unwrap()),
            (0, &keep, &renames[..])
        );
        // Deleting the oldest: its child loses its parent part.
        let f = facts(&[("a", false), ("b^a", true)], &[]);
        let renames = [(1, "b".to_string())];
        assert_eq!(
            remove(&plan_rmdir(&f, "a").unwrap()),
            (0, &Fate::Drop, &renames[..])
        );
        // A lower parent named with a caret keeps its full name.
        let f = facts(&[("c^b", true)], &["a", "b^a"]);
        let keep = Fate::Rename("b^a".to_string());
        assert_eq!(remove(&plan_rmdir(&f, "c").unwrap()), (0, &keep, &[][..]));
    }
}
