//! Decompression of one compressed cluster: raw deflate (QEMU's "zlib", no header) or zstd
//! (frames without a length prefix, possibly followed by a neighbour's bytes). The output must
//! be exactly one cluster, as QEMU requires.
//!
//! Decoder state is kept per thread and reset between clusters (creating it costs more than
//! decoding a small cluster). Each format has a one-call path for the common case and falls
//! back to the streaming path QEMU uses, which decides everything else: a zstd frame that
//! states its content size as one cluster; a deflate stream that ends exactly at the end of
//! the cluster, decoded by libdeflate (1.8x zlib-rs on 64 KiB clusters here).

use super::header::CompressionType;
use crate::error::{Error, Result};
use std::cell::RefCell;

thread_local! {
    static INFLATE: RefCell<Option<flate2::Decompress>> = const { RefCell::new(None) };
    static LIBDEFLATE: RefCell<Option<libdeflater::Decompressor>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Decompress `input` (the sector-rounded span of the stream) into `out` (one cluster).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    // A stream whose final block ends with the cluster full: QEMU's inflate reads the same
    // bytes (a deflate stream has one meaning). A shorter or longer stream, or one libdeflate
    // refuses, goes through zlib as QEMU's does.
    let whole = LIBDEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(libdeflater::Decompressor::new);
        matches!(d.deflate_decompress(input, out), Ok(n) if n == out.len())
    });
    if whole {
        return Ok(());
    }
    INFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => {
                d.reset(false);
                d
            }
            None => slot.insert(flate2::Decompress::new(false)),
        };
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
    })
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::zstd_safe::{self, DCtx, InBuffer, OutBuffer, ResetDirective};
    let zerr = |e: zstd_safe::ErrorCode| {
        Error::corrupt(format!(
            "compressed cluster: zstd error: {}",
            zstd_safe::get_error_name(e)
        ))
    };
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = slot.get_or_insert_with(DCtx::create);
        // One frame that says it holds exactly one cluster: decode it in one call. On any
        // surprise fall through to the streaming loop, which decides (as it always did).
        if matches!(zstd_safe::get_frame_content_size(input), Ok(Some(n)) if n == out.len() as u64)
        {
            if let Ok(n) = zstd_safe::find_frame_compressed_size(input) {
                if n <= input.len() {
                    let _ = dctx.reset(ResetDirective::SessionOnly);
                    if dctx.decompress(out, &input[..n]) == Ok(out.len()) {
                        return Ok(());
                    }
                }
            }
        }
        dctx.reset(ResetDirective::SessionOnly).map_err(zerr)?;
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        // Like QEMU's qcow2_zstd_decompress: keep decoding (across frames) until the cluster
        // is full.
        while outb.pos() < outb.capacity() {
            let before = (inb.pos(), outb.pos());
            let hint = dctx.decompress_stream(&mut outb, &mut inb).map_err(zerr)?;
            if hint == 0 && outb.pos() < outb.capacity() {
                // End of a frame: the next frame (if any) continues the cluster.
                dctx.reset(ResetDirective::SessionOnly).map_err(zerr)?;
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
    })
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

    #[test]
    fn zstd_multi_frame_and_unknown_size() {
        // Two frames of half a cluster each fill one cluster (QEMU's loop continues across
        // frames); the single-call path must not take the first frame for the whole cluster.
        let a = vec![1u8; 32768];
        let b: Vec<u8> = (0..32768u32).map(|i| (i % 7) as u8).collect();
        let mut stream = zstd::bulk::compress(&a, 3).unwrap();
        stream.extend_from_slice(&zstd::bulk::compress(&b, 3).unwrap());
        stream.extend_from_slice(&[0x55; 40]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &stream, &mut out).unwrap();
        assert_eq!(&out[..32768], &a[..]);
        assert_eq!(&out[32768..], &b[..]);
        // A frame without a content size (streaming encoder) takes the streaming path.
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 3) as u8).collect();
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&data).unwrap();
        let mut stream = enc.finish().unwrap();
        stream.extend_from_slice(&[0xaa; 100]);
        out.fill(0);
        decompress(CompressionType::Zstd, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        // A frame larger than the cluster: its first cluster's worth (as QEMU's loop stops).
        let big = vec![9u8; 131072];
        let stream = zstd::bulk::compress(&big, 3).unwrap();
        decompress(CompressionType::Zstd, &stream, &mut out).unwrap();
        assert_eq!(out, &big[..65536]);
        // A cluster too short for its frame is an error, and the state is reusable after it.
        let stream = zstd::bulk::compress(&data[..60000], 3).unwrap();
        assert!(decompress(CompressionType::Zstd, &stream, &mut out).is_err());
        let stream = zstd::bulk::compress(&data, 3).unwrap();
        decompress(CompressionType::Zstd, &stream, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn deflate_state_reused_after_error() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let stream = enc.finish().unwrap();
        let mut out = vec![0u8; 65536];
        for _ in 0..3 {
            assert!(decompress(CompressionType::Deflate, &[0xff; 64], &mut out).is_err());
            assert!(decompress(
                CompressionType::Deflate,
                &stream[..stream.len() / 2],
                &mut out
            )
            .is_err());
            out.fill(0);
            decompress(CompressionType::Deflate, &stream, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }
}
