#![no_main]
use ckptfs::qcow2::bitmaps::parse_directory;
use ckptfs_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let nb = inp.u32() % 70000;
    let cs = 1u64 << inp.cluster_bits();
    let size = inp.u64() & (i64::MAX as u64);
    if let Ok(entries) = parse_directory(inp.rest(), nb) {
        for e in entries {
            let _ = (
                e.granularity(),
                e.in_use(),
                e.auto(),
                e.distrust(size, cs),
                e.violation(size, cs),
            );
            let _ = e.table_size_for(size, cs);
        }
    }
});
