//! Decompression of one compressed cluster: raw deflate (QEMU's "zlib", no header) or zstd
//! (frames without a length prefix, possibly followed by a neighbour's bytes). The output must
//! be exactly one cluster, as QEMU requires.

use super::header::CompressionType;
use crate::error::{Error, Result};

/// Decompress `input` (the sector-rounded span of the stream) into `out` (one cluster).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut d = flate2::Decompress::new(false);
    let status = d
        .decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| Error::corrupt(format!("compressed cluster: deflate error: {e}")))?;
    // QEMU accepts a stream that filled the cluster, whether or not it saw the end marker.
    if d.total_out() as usize != out.len() {
        return Err(Error::corrupt(format!(
            "compressed cluster decompressed to {} bytes, expected {} ({status:?})",
            d.total_out(),
            out.len()
        )));
    }
    Ok(())
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| Error::io("zstd decoder", e))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    // Like QEMU's qcow2_zstd_decompress: keep decoding (across frames) until the cluster is full.
    while outb.pos() < outb.capacity() {
        let before = (inb.pos(), outb.pos());
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| Error::corrupt(format!("compressed cluster: zstd error: {e}")))?;
        if hint == 0 && outb.pos() < outb.capacity() {
            // End of a frame: the next frame (if any) continues the cluster.
            dec.reinit().map_err(|e| Error::io("zstd decoder", e))?;
        }
        if (inb.pos(), outb.pos()) == before && inb.pos() >= input.len() {
            break;
        }
    }
    if outb.pos() != outb.capacity() {
        return Err(Error::corrupt(format!(
            "compressed cluster decompressed to {} bytes, expected {}",
            outb.pos(),
            outb.capacity()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut stream = enc.finish().unwrap();
        stream.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Deflate, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; 70000];
        assert!(decompress(CompressionType::Deflate, &stream, &mut short).is_err());
        assert!(decompress(CompressionType::Deflate, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn zstd_with_trailing_neighbour() {
        let data = vec![b'x'; 65536];
        let mut stream = zstd::bulk::compress(&data, 3).unwrap();
        stream.extend_from_slice(&zstd::bulk::compress(&[7u8; 65536], 3).unwrap());
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zstd, &stream[..5], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0u8; 100], &mut out).is_err());
    }
}
