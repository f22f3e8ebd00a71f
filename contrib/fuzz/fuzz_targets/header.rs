#![no_main]
use ckptfs::qcow2::header::Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As Qcow2Image::open calls it: the start of the file and the file's length.
    if let Ok(h) = Header::parse(data, data.len() as u64) {
        let _ = (h.cluster_size(), h.extended_l2());
    }
    // The same bytes as the head of a much longer file (tables past the buffer).
    let _ = Header::parse(data, u64::MAX);
});
