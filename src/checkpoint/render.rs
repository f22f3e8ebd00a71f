//! JSON renderings of the chain and the checkpoints (checkpoints.json, info.json, `ls --json`)
//! and the human table of `ckptfs ls`.

use super::engine::Engine;
use super::model::{Order, Source};
use crate::chain::Chain;
use crate::qcow2::Table;
use serde_json::{json, Value};

fn layer_name(chain: &Chain, li: usize) -> String {
    let p = &chain.layers[li].path;
    p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

/// The chain, top first, as a JSON array.
pub fn chain_json(chain: &Chain) -> Value {
    let layers: Vec<Value> = chain
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let resolved = chain
                .layers
                .get(i + 1)
                .map(|b| b.path.display().to_string());
            json!({
                "file": l.path.display().to_string(),
                "format": l.format(),
                "virtual_size": l.size(Table::Active),
                "cluster_size": l.cluster_size(),
                "backing_file": l.backing_name.as_ref().map(ToString::to_string),
                "backing_file_resolved": resolved,
                "backing_format": l.backing_format,
                "bitmaps": l.qcow2().map_or(0, |q| q.bitmaps().len()),
                "snapshots": l.qcow2().map_or(0, |q| q.snapshots.len()),
            })
        })
        .collect();
    Value::Array(layers)
}

/// current/info.json: the top image, the disk size, the chain and the mount's options.
pub fn current_json(e: &Engine, mount_options: &Value) -> Value {
    json!({
        "image": e.model.chain.top().path.display().to_string(),
        "virtual_size": e.model.disk_size(),
        "chain": chain_json(&e.model.chain),
        "mount_options": mount_options,
    })
}

/// One checkpoint as JSON; `detail` adds parent, sources and creation time (info.json).
pub fn checkpoint_json(e: &Engine, ci: usize, detail: bool) -> Value {
    let m = &e.model;
    let c = &m.checkpoints[ci];
    let changed = if c.invalid.is_some() {
        Value::Null
    } else {
        e.changed_bytes(ci).map_or(Value::Null, Value::from)
    };
    let reason = c
        .invalid
        .clone()
        .or_else(|| e.changed_bytes(ci).err().map(|err| err.to_string()));
    let mut v = json!({
        "name": c.name,
        "kind": c.kind.as_str(),
        "layer": c.layer.map(|l| layer_name(&m.chain, l)),
        "granularity": c.granularity,
        "valid": reason.is_none(),
        "reason": reason,
        "changed_bytes": changed,
        "directory": c.dir_name,
    });
    if detail {
        let sources: Vec<Value> = c
            .sources
            .iter()
            .map(|s| match s {
                Source::Bitmap {
                    layer,
                    image,
                    bitmap,
                } => {
                    let b = &image.bitmaps()[*bitmap].entry;
                    json!({"type": "bitmap", "layer": layer_name(&m.chain, *layer),
                           "file": m.chain.layers[*layer].path.display().to_string(),
                           "bitmap": b.name, "granularity": b.granularity(), "enabled": b.auto(),
                           "in_use": b.in_use()})
                }
                Source::Allocation { layer } => json!({"type": "allocation", "layer": layer_name(&m.chain, *layer),
                           "file": m.chain.layers[*layer].path.display().to_string()}),
                Source::SnapshotDiff {
                    layer,
                    image,
                    snapshot,
                } => {
                    let s = &image.snapshots[*snapshot];
                    json!({"type": "snapshot-diff", "layer": layer_name(&m.chain, *layer), "snapshot": s.entry.name})
                }
            })
            .collect();
        let obj = v.as_object_mut().expect("object");
        obj.insert("sources".into(), Value::Array(sources));
        obj.insert("parent".into(), json!(c.parent));
        obj.insert("creation_time".into(), json!(c.creation_time));
        obj.insert("disk_image".into(), json!(c.disk.is_some()));
        obj.insert("size".into(), json!(m.disk_size()));
    }
    v
}

pub fn checkpoints_json(e: &Engine) -> Value {
    let order = match e.model.order {
        Order::Metadata => "metadata",
        Order::Guessed => "guessed",
    };
    let list: Vec<Value> = (0..e.model.checkpoints.len())
        .map(|i| checkpoint_json(e, i, false))
        .collect();
    json!({"order": order, "checkpoints": list})
}

/// JSON text with a trailing newline.
pub fn to_text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialize");
    s.push('\n');
    s
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The human form of `ckptfs ls`.
pub fn ls_text(e: &Engine) -> String {
    let chain = &e.model.chain;
    let mut rows = vec![vec![
        "DEPTH".to_string(),
        "FILE".into(),
        "FORMAT".into(),
        "SIZE".into(),
        "CLUSTER".into(),
        "BACKING (as written -> resolved)".into(),
    ]];
    for (i, l) in chain.layers.iter().enumerate() {
        let backing = match (&l.backing_name, chain.layers.get(i + 1)) {
            (Some(n), Some(b)) => format!("{n} -> {}", b.path.display()),
            _ => "-".into(),
        };
        rows.push(vec![
            i.to_string(),
            l.path.display().to_string(),
            l.format().into(),
            human(l.size(Table::Active)),
            l.cluster_size().map_or("-".into(), human),
            backing,
        ]);
    }
    let mut out = format!("chain ({} layers, top first):\n", chain.layers.len());
    out.push_str(&table(&rows));
    let order = match e.model.order {
        Order::Metadata => "libvirt metadata",
        Order::Guessed => "guessed from the chain",
    };
    out.push_str(&format!(
        "\ncheckpoints ({}, oldest first; order {order}):\n",
        e.model.checkpoints.len()
    ));
    let mut rows = vec![vec![
        "NAME".to_string(),
        "KIND".into(),
        "LAYER".into(),
        "GRANULARITY".into(),
        "VALID".into(),
        "CHANGED".into(),
    ]];
    for (ci, c) in e.model.checkpoints.iter().enumerate() {
        let (valid, changed) = match (&c.invalid, e.changed_bytes(ci)) {
            (Some(r), _) => (format!("no: {r}"), "-".to_string()),
            (None, Ok(b)) => ("yes".into(), format!("{} ({b})", human(b))),
            (None, Err(err)) => (format!("no: {err}"), "-".into()),
        };
        rows.push(vec![
            c.name.clone(),
            c.kind.as_str().into(),
            c.layer.map_or("-".into(), |l| layer_name(chain, l)),
            human(c.granularity),
            if valid == "yes" {
                valid
            } else {
                valid.replace('\n', " ")
            },
            changed,
        ]);
    }
    if e.model.checkpoints.is_empty() {
        out.push_str("(none)\n");
    } else {
        out.push_str(&table(&rows));
    }
    out
}
