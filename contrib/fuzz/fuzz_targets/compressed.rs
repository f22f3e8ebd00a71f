#![no_main]
use ckptfs::qcow2::compress::decompress;
use ckptfs::qcow2::header::CompressionType;
use ckptfs_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let kind = if inp.u8() & 1 == 0 {
        CompressionType::Deflate
    } else {
        CompressionType::Zstd
    };
    // One cluster of 512 B .. 2 MiB, the sizes Header::parse allows.
    let mut out = vec![0u8; 1 << inp.cluster_bits()];
    let _ = decompress(kind, inp.rest(), &mut out);
});
