//! libvirt checkpoint metadata: one `<name>.xml` per checkpoint in
//! /var/lib/libvirt/qemu/checkpoint/<domain>/ (docs/formatcheckpoint.rst).

use crate::error::{Error, Result};
use std::path::Path;

/// The parts of a `<domaincheckpoint>` ckptfs uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointXml {
    pub name: String,
    pub parent: Option<String>,
    pub creation_time: Option<u64>,
    /// Bitmap names of the `<disk checkpoint='bitmap'>` entries (one per disk of the domain).
    pub bitmaps: Vec<String>,
}

/// Parse one checkpoint XML document.
pub fn parse(text: &str) -> Result<CheckpointXml> {
    let doc =
        roxmltree::Document::parse(text).map_err(|e| Error::invalid(format!("not XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domaincheckpoint" {
        return Err(Error::invalid(format!(
            "root element is <{}>, not <domaincheckpoint>",
            root.tag_name().name()
        )));
    }
    let child = |name: &str| root.children().find(|n| n.has_tag_name(name));
    let name = child("name")
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::invalid("checkpoint has no <name>"))?;
    let parent = child("parent")
        .and_then(|p| p.children().find(|n| n.has_tag_name("name")))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string());
    let creation_time = child("creationTime")
        .and_then(|n| n.text())
        .and_then(|t| t.trim().parse().ok());
    let bitmaps = child("disks")
        .map(|d| {
            d.children()
                .filter(|n| n.has_tag_name("disk"))
                .filter(|n| n.attribute("checkpoint").is_none_or(|c| c == "bitmap"))
                .map(|n| n.attribute("bitmap").unwrap_or(&name).to_string())
                .collect()
        })
        .unwrap_or_default();
    Ok(CheckpointXml {
        name,
        parent,
        creation_time,
        bitmaps,
    })
}

/// Read every `*.xml` in `dir`. A file that does not parse is an error naming it.
pub fn read_dir(dir: &Path) -> Result<Vec<CheckpointXml>> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        Error::io(
            format!("{}: cannot read checkpoint directory", dir.display()),
            e,
        )
    })?;
    let mut out = Vec::new();
    let mut paths: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.extension().and_then(|e| e.to_str()) != Some("xml") {
            continue;
        }
        let text =
            std::fs::read_to_string(&p).map_err(|e| Error::io(format!("{}", p.display()), e))?;
        out.push(parse(&text).map_err(|e| e.context(p.display()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libvirt_checkpoint() {
        let x = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE.
-->
<domaincheckpoint>
  <name>c2</name>
  <parent>
    <name>c1</name>
  </parent>
  <creationTime>1763000000</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='c2'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
  <domain type='kvm'><name>vm1</name></domain>
</domaincheckpoint>"#;
        let c = parse(x).unwrap();
        assert_eq!(c.name, "c2");
        assert_eq!(c.parent.as_deref(), Some("c1"));
        assert_eq!(c.creation_time, Some(1763000000));
        assert_eq!(c.bitmaps, vec!["c2".to_string()]);
        assert!(parse("<domain/>").is_err());
        assert!(parse("<domaincheckpoint>").is_err());
    }
}
