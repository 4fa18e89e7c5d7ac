//! The zstd layer under every encoding.
//!
//! Decompression is bounded twice: the window a frame may ask for is capped
//! (a 100-byte frame cannot make the decoder allocate 128 MiB of window), and
//! output stops one byte past the length the shape implies, so memory only
//! grows with output that really decodes and never past what the directory
//! promised.

use std::io::Read;

/// Compression levels a writer may use. Above 19 zstd's "ultra" levels want
/// windows of up to 128 MiB, which readers refuse (see [`MAX_WINDOW_LOG`]).
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=19;
/// Largest window (log2 bytes) a reader accepts; level 19 uses at most 2^23.
pub const MAX_WINDOW_LOG: u32 = 23;

/// A zstd payload may decompress to at most this many times its stored size
/// plus [`EXPANSION_SLACK`]. The directory can then be checked against the file
/// length before anything is decompressed; writers store a tensor uncompressed
/// in the (absurd, for KV data) case that zstd would shrink it further.
pub const MAX_EXPANSION: u64 = 1024;
/// See [`MAX_EXPANSION`]: lets small constant tensors stay compressed.
pub const EXPANSION_SLACK: u64 = 1 << 16;

/// Whether a zstd payload of `stored` bytes may decompress to `payload` bytes.
pub fn expansion_allowed(stored: u64, payload: u64) -> bool {
    payload
        <= stored
            .saturating_mul(MAX_EXPANSION)
            .saturating_add(EXPANSION_SLACK)
}

/// Compresses `raw` into one zstd frame that records its content size.
pub fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(raw, level)
}

/// Decompresses exactly one zstd frame that must yield exactly `expected` bytes
/// and be followed by nothing.
pub fn decompress(stored: &[u8], expected: usize) -> Result<Vec<u8>, String> {
    if stored.is_empty() {
        return Err("zstd data is empty (expected one frame)".into());
    }
    let fail = |e: std::io::Error| format!("zstd data is corrupt: {e}");
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stored)
        .map_err(fail)?
        .single_frame();
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(fail)?;
    let mut out = Vec::new();
    let limit = u64::try_from(expected).map_err(|_| "tensor too large".to_string())? + 1;
    (&mut decoder)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(fail)?;
    if out.len() != expected {
        return Err(format!(
            "zstd data decompresses to {}{} bytes, expected {expected}",
            out.len(),
            if out.len() > expected { " or more" } else { "" }
        ));
    }
    if !decoder.finish().is_empty() {
        return Err("bytes follow the zstd frame".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_the_length() {
        let raw: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let stored = compress(&raw, 3).unwrap();
        assert_eq!(decompress(&stored, raw.len()).unwrap(), raw);
        assert!(decompress(&stored, raw.len() - 1).is_err());
        assert!(decompress(&stored, raw.len() + 1).is_err());
    }

    #[test]
    fn trailing_bytes_and_garbage_are_refused() {
        let mut stored = compress(b"hello hello hello", 3).unwrap();
        assert!(decompress(&stored[..stored.len() - 1], 17).is_err());
        stored.push(0);
        assert!(decompress(&stored, 17).is_err());
        assert!(decompress(b"not zstd at all", 17).is_err());
        assert!(decompress(b"", 0).is_err());
    }

    #[test]
    fn expansion_limit_has_slack_for_small_tensors() {
        assert!(expansion_allowed(9, EXPANSION_SLACK));
        assert!(expansion_allowed(
            100,
            100 * MAX_EXPANSION + EXPANSION_SLACK
        ));
        assert!(!expansion_allowed(
            100,
            100 * MAX_EXPANSION + EXPANSION_SLACK + 1
        ));
        assert!(expansion_allowed(u64::MAX, u64::MAX));
    }

    #[test]
    fn bomb_stops_at_the_expected_length() {
        let stored = compress(&vec![0u8; 50_000_000], 19).unwrap();
        assert!(stored.len() < 10_000);
        let err = decompress(&stored, 1000).unwrap_err();
        assert!(err.contains("or more"), "{err}");
    }
}
