//! Fuzzes the `.sack` reader with untrusted bytes: opening, `sac info`,
//! reading every tensor by name and every layer must return errors, never
//! panic, hang or allocate without bound.
//!
//! Random bytes rarely get past the CRCs, so each input is read twice: as
//! is, and with every checksum (header, directory, footer and each tensor's)
//! repaired, which lets mutations reach the JSON, the directory rules and the
//! decoders behind them. The corpus is therefore plain `.sack` files.
//!
//! Run from the repository root (cargo-fuzz needs nightly features):
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run sack_reader -- -max_total_time=600 \
//!     -timeout=10 -max_len=16384 -malloc_limit_mb=512
//! ```
//!
//! `-malloc_limit_mb` turns "never allocate without bound" into a crash: no
//! input of at most 16 KiB may make the reader ask for 512 MiB at once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sac::sack::format::{CRC_LEN, FOOTER_LEN, Footer, PREAMBLE_LEN, crc32};
use sac::sack::{InfoFormat, SackReader, info};

fuzz_target!(|file: &[u8]| {
    exercise(file.to_vec());
    let repaired = repair_checksums(file);
    if repaired != file {
        exercise(repaired);
    }
});

/// Everything a user can make the reader do with a file.
fn exercise(bytes: Vec<u8>) {
    let Ok(mut reader) = SackReader::from_bytes(bytes, "fuzz") else {
        return;
    };
    let _ = info::render(&reader, &mut std::io::sink(), InfoFormat::Human);
    let _ = info::render(&reader, &mut std::io::sink(), InfoFormat::Json);
    let names: Vec<String> = reader.tensors().iter().map(|e| e.name.to_string()).collect();
    for name in names {
        let _ = reader.read_tensor(&name);
    }
    let _ = reader.read_soft_tokens();
    let _ = reader.verify();
}

/// Recomputes every CRC of `file` where the framing is intact enough to find it;
/// the directory is re-serialized with fixed tensor CRCs and a new footer.
fn repair_checksums(file: &[u8]) -> Vec<u8> {
    let mut out = file.to_vec();
    let Some(len_bytes) = out.get(12..16) else {
        return out;
    };
    let header_len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let header_end = PREAMBLE_LEN as usize + header_len as usize;
    if out.len() < header_end + CRC_LEN as usize + FOOTER_LEN as usize {
        return out;
    }
    let crc = crc32(&out[..header_end]);
    out[header_end..header_end + 4].copy_from_slice(&crc.to_le_bytes());
    let footer_at = out.len() - FOOTER_LEN as usize;
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&out[footer_at + at..footer_at + at + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (dir_at, dir_len) = (word(0), word(8));
    if dir_at < header_end || dir_at.checked_add(dir_len) != Some(footer_at) {
        return out;
    }
    let mut directory = out[dir_at..footer_at].to_vec();
    if let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&directory) {
        if let Some(tensors) = json.get_mut("tensors").and_then(|t| t.as_array_mut()) {
            for t in tensors {
                let span = t["offset"].as_u64().zip(t["stored_len"].as_u64());
                let stored = span.and_then(|(o, l)| out.get(o as usize..(o as usize).checked_add(l as usize)?));
                if let Some(stored) = stored {
                    t["crc32"] = crc32(stored).into();
                }
            }
        }
        directory = serde_json::to_vec(&json).unwrap_or(directory);
    }
    out.truncate(dir_at);
    let footer = Footer {
        directory_offset: dir_at as u64,
        directory_len: directory.len() as u64,
        directory_crc: crc32(&directory),
    };
    out.extend_from_slice(&directory);
    out.extend_from_slice(&footer.to_bytes());
    out
}
