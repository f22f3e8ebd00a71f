//! Property test: random backing chains of 1-3 layers (random cluster sizes, extended L2, v2,
//! zlib/zstd, sometimes a raw bottom, layers smaller or larger than their backing) shaped by
//! random qemu-io ops; every layer read through ckptfs must equal `qemu-img convert -O raw`
//! of that layer, and allocation must agree with `qemu-img map`.
//!
//! Deterministic: a fixed proptest seed (printed; override with CKPTFS_PROP_SEED), 12 cases
//! (override with CKPTFS_PROP_CASES). A failure reports the command log that built the chain.

use crate::common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::collections::BTreeSet;
use std::path::Path;

const DEFAULT_SEED: u64 = 0x636b_7074_6673;

/// (cluster_bits, extended L2)
const GEOMETRIES: [(u32, bool); 5] = [(9, false), (12, false), (16, false), (14, true), (16, true)];
/// Virtual sizes in bytes.
const SIZES: [u64; 4] = [512 << 10, 1 << 20, (3 << 20) / 2, 2 << 20];

#[derive(Debug, Clone)]
enum OpSpec {
    Write { pat: u8, at: u32, len: u32 },
    Compressed { pat: u8, at: u32, n: u8 },
    Zero { at: u32, len: u32, unmap: bool },
    Discard { at: u32, len: u32 },
}

#[derive(Debug, Clone)]
struct LayerSpec {
    geometry: usize,
    size: usize,
    zstd: bool,
    v2: bool,
    ops: Vec<OpSpec>,
}

#[derive(Debug, Clone)]
struct ChainSpec {
    /// Bottom first.
    layers: Vec<LayerSpec>,
    /// Replace the bottom layer by a raw file (only with 2 or more layers: the top must be
    /// qcow2).
    raw_bottom: bool,
}

fn op() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        3 => (any::<u8>(), any::<u32>(), any::<u32>())
            .prop_map(|(pat, at, len)| OpSpec::Write { pat, at, len }),
        2 => (any::<u8>(), any::<u32>(), any::<u8>())
            .prop_map(|(pat, at, n)| OpSpec::Compressed { pat, at, n }),
        2 => (any::<u32>(), any::<u32>(), any::<bool>())
            .prop_map(|(at, len, unmap)| OpSpec::Zero { at, len, unmap }),
        1 => (any::<u32>(), any::<u32>()).prop_map(|(at, len)| OpSpec::Discard { at, len }),
    ]
}

fn layer() -> impl Strategy<Value = LayerSpec> {
    (
        0..GEOMETRIES.len(),
        0..SIZES.len(),
        any::<bool>(),
        prop::bool::weighted(0.15),
        prop::collection::vec(op(), 0..8),
    )
        .prop_map(|(geometry, size, zstd, v2, ops)| LayerSpec {
            geometry,
            size,
            zstd,
            v2,
            ops,
        })
}

fn chain() -> impl Strategy<Value = ChainSpec> {
    (
        prop::collection::vec(layer(), 1..=3),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(layers, raw_bottom)| ChainSpec { layers, raw_bottom })
}

/// Turn one abstract op into a qemu-io command for a layer of `size` bytes and cluster size
/// `cs`. Compressed writes need whole, never-touched clusters (QEMU refuses to compress over
/// an allocated cluster); when none fit, the op becomes a plain write.
fn materialize(op: &OpSpec, size: u64, cs: u64, touched: &mut BTreeSet<u64>) -> String {
    let touch = |touched: &mut BTreeSet<u64>, off: u64, len: u64| {
        for c in off / cs..(off + len).div_ceil(cs) {
            touched.insert(c);
        }
    };
    match *op {
        OpSpec::Write { pat, at, len } => {
            let off = u64::from(at) % size;
            let len = 1 + u64::from(len) % (size - off).min(200_000);
            touch(touched, off, len);
            format!("write -P {pat:#x} {off} {len}")
        }
        OpSpec::Compressed { pat, at, n } => {
            let clusters = size / cs;
            let n = (1 + u64::from(n) % 3).min(clusters);
            let first = u64::from(at) % (clusters - n + 1);
            let free = (first..first + n).all(|c| !touched.contains(&c));
            touch(touched, first * cs, n * cs);
            if free {
                format!("write -c -P {pat:#x} {} {}", first * cs, n * cs)
            } else {
                format!("write -P {pat:#x} {} {}", first * cs, n * cs)
            }
        }
        OpSpec::Zero { at, len, unmap } => {
            let off = (u64::from(at) % size) / 512 * 512;
            let len = (1 + u64::from(len) % (size - off).min(300_000)).div_ceil(512) * 512;
            touch(touched, off, len);
            let u = if unmap { "-u " } else { "" };
            format!("write -z {u}{off} {len}")
        }
        OpSpec::Discard { at, len } => {
            let off = (u64::from(at) % size) / 512 * 512;
            let len = (1 + u64::from(len) % (size - off).min(300_000)).div_ceil(512) * 512;
            touch(touched, off, len);
            format!("discard {off} {len}")
        }
    }
}

/// Build the chain in `d`; returns the top image's name. Every step goes to `log`.
fn build(d: &Path, spec: &ChainSpec, log: &mut Vec<String>) -> String {
    let mut below: Option<(String, &str)> = None;
    for (i, l) in spec.layers.iter().enumerate() {
        let size = SIZES[l.size];
        if i == 0 && spec.raw_bottom && spec.layers.len() > 1 {
            // A raw bottom of pseudo-random bytes, its length not a multiple of 512.
            let len = size as usize - 100;
            let mut raw = vec![0u8; len];
            Prng(size ^ 0xabcd).fill(&mut raw);
            std::fs::write(d.join("l0.raw"), &raw).unwrap();
            log.push(format!("# l0.raw: {len} pseudo-random bytes"));
            below = Some(("l0.raw".into(), "raw"));
            continue;
        }
        let (cluster_bits, extended) = GEOMETRIES[l.geometry];
        let cs = 1u64 << cluster_bits;
        let name = format!("l{i}.qcow2");
        let mut opts = format!("cluster_size={cs}");
        if l.v2 && !extended {
            opts.push_str(",compat=0.10");
        } else {
            if extended {
                opts.push_str(",extended_l2=on");
            }
            if l.zstd {
                opts.push_str(",compression_type=zstd");
            }
        }
        let backing = below.as_ref().map(|(n, f)| (n.as_str(), *f));
        let mut cmd = format!("qemu-img create -f qcow2 -o {opts}");
        if let Some((b, f)) = backing {
            cmd.push_str(&format!(" -b {b} -F {f}"));
        }
        log.push(format!("{cmd} {name} {size}"));
        create(d, &name, &size.to_string(), &opts, backing);
        let mut touched = BTreeSet::new();
        let cmds: Vec<String> = l
            .ops
            .iter()
            .map(|o| materialize(o, size, cs, &mut touched))
            .collect();
        // One qemu-io session per compressed write: QEMU 10.0.2 keeps a "next compressed
        // byte" cursor per open image that can point into a host cluster freed meanwhile (by
        // `write -z`/`discard` of an earlier compressed cluster) and reused for metadata; the
        // next `write -c` then fails with "Marking image as corrupt: Preventing invalid write
        // on metadata (overlaps with active L2 table)". A fresh open resets the cursor.
        let mut sessions: Vec<Vec<&str>> = Vec::new();
        for c in &cmds {
            if sessions.is_empty() || c.starts_with("write -c") {
                sessions.push(Vec::new());
            }
            sessions.last_mut().unwrap().push(c.as_str());
        }
        for session in sessions {
            let mut line = "qemu-io".to_string();
            for c in &session {
                line.push_str(&format!(" -c '{c}'"));
            }
            log.push(format!("{line} {name}"));
            qemu_io(d, &name, &session);
        }
        below = Some((name, "qcow2"));
    }
    below.unwrap().0
}

#[test]
fn random_chains_match_qemu() {
    let seed = std::env::var("CKPTFS_PROP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let cases = std::env::var("CKPTFS_PROP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("proptest seed {seed}, {cases} cases (CKPTFS_PROP_SEED / CKPTFS_PROP_CASES)");
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        // Each case runs dozens of QEMU commands: shrink only a little.
        max_shrink_iters: 24,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let case = std::cell::Cell::new(0u32);
    let result = runner.run(&chain(), |spec| {
        case.set(case.get() + 1);
        let case = case.get();
        let t = tempdir();
        let mut log = Vec::new();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let top = build(t.path(), &spec, &mut log);
            check_chain(&t.path().join(top), 10);
        }));
        match outcome {
            Ok(()) => {
                eprintln!("case {case} ok: {}", log.join(" ; "));
                Ok(())
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                Err(TestCaseError::fail(format!(
                    "{msg}\n--- seed {seed}, case {case}; chain built by (run in an empty \
                     directory):\n{}",
                    log.join("\n")
                )))
            }
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
