#![no_main]
use ckptfs::qcow2::snapshot::parse_table;
use ckptfs_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    // Header::parse refuses more than 65536 snapshots.
    let nb = inp.u32() % 65537;
    let buf = inp.rest();
    if let Ok((entries, used)) = parse_table(buf, nb) {
        assert_eq!(entries.len(), nb as usize);
        assert!(used <= buf.len() + 7, "used {used} of {} bytes", buf.len());
    }
});
