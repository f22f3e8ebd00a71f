#![no_main]
use ckptfs::qcow2::bitmaps::{decode_table_entry, TableEntry};
use ckptfs_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let e = inp.u64();
    let cs = 1u64 << inp.cluster_bits();
    if let Ok(TableEntry::Data(off)) = decode_table_entry(e, cs) {
        assert!(
            off.0 != 0 && off.0 % cs == 0,
            "data cluster {off} for entry {e:#x}"
        );
    }
});
