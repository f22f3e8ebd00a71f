#![no_main]
use ckptfs::qcow2::l2::{Geometry, L2Entry};
use ckptfs::qcow2::Mapping;
use ckptfs_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let cluster_bits = inp.cluster_bits();
    // Header::parse only allows extended L2 with clusters of 16 KiB or more.
    let extended = inp.u8() & 1 == 1 && cluster_bits >= 14;
    let g = Geometry {
        cluster_bits,
        extended,
    };
    let cs = g.cluster_size();
    let entry = inp.u64();
    let bitmap = if extended { inp.u64() } else { 0 };
    let e = L2Entry { entry, bitmap };
    let in_off = inp.u64() % cs;
    let (host, len) = g.compressed_span(e);
    assert!(
        len > 0 && len <= 2 * cs,
        "span {host}+{len} for {entry:#x}"
    );
    let _ = (g.l2_entries(), g.l2_coverage(), g.alloc_unit());
    if let Ok((m, run)) = g.decode(e, in_off) {
        assert!(
            run > 0 && run <= cs - in_off,
            "run {run} at {in_off} of a {cs}-byte cluster ({entry:#x}, {bitmap:#x})"
        );
        if let Mapping::Data(h) = m {
            assert_eq!(h.0 % cs, in_off, "data mapping {h} at {in_off}");
        }
    }
});
