//! Byte-level framing of a `.sack` file; `man/sack.5` is the normative text.
//!
//! ```text
//! preamble (16) | header JSON | header CRC (4) | tensor payloads … | directory JSON | footer (32)
//! ```
//!
//! The header goes first so that it can be written before any tensor exists and
//! read without touching the payloads; the directory and the fixed-size footer
//! go last so that a writer on a pipe never has to seek back, and a reader with
//! a seekable file finds everything from the last 32 bytes.

pub mod directory;
pub mod header;

use crate::sack::error::{Result, SackError};

/// First eight bytes of every `.sack`; the PNG-style mix of a high-bit byte,
/// CR LF, ^Z and LF makes text-mode transfers that mangle the file fail at once.
pub const MAGIC: [u8; 8] = *b"\x89SAC\r\n\x1a\n";
/// Last eight bytes of every `.sack`; if they are missing the file was
/// truncated or had bytes appended.
pub const FOOTER_MAGIC: [u8; 8] = *b"SACK-END";
/// Major format version this build writes and reads. A reader refuses other majors.
pub const FORMAT_MAJOR: u16 = 1;
/// Newest minor format version this build writes. Minor versions only add
/// optional header fields, which older readers ignore; a file gets the lowest
/// minor that has the fields it uses ([`SackHeader::minor_version`]).
/// 1 added `model.revision`, 2 `decoder.prompt` and `model.file`, 3
/// `soft_tokens` (with `soft.s{S}` tensors in place of K/V), 4
/// `decoder.adapter`.
pub const FORMAT_MINOR: u16 = 4;

/// Size of the preamble: magic, major, minor, header length.
pub const PREAMBLE_LEN: u64 = 16;
/// Size of a stored CRC-32.
pub const CRC_LEN: u64 = 4;
/// Size of the footer.
pub const FOOTER_LEN: u64 = 32;
/// Smallest possible file: preamble, an empty header, its CRC and the footer.
pub const MIN_FILE_LEN: u64 = PREAMBLE_LEN + CRC_LEN + FOOTER_LEN;
/// The header holds metadata only (no positions, no tensors); anything larger is hostile.
pub const MAX_HEADER_LEN: u64 = 1 << 20;
/// The directory grows with the number of tensors; 256 MiB is ~1M entries.
pub const MAX_DIRECTORY_LEN: u64 = 1 << 28;

/// CRC-32/IEEE (the one of zlib, PNG and Python's `zlib.crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The fixed part at offset 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// Format major version.
    pub major: u16,
    /// Format minor version.
    pub minor: u16,
    /// Length of the header JSON that follows.
    pub header_len: u32,
}

impl Preamble {
    /// The 16 bytes as stored.
    pub fn to_bytes(self) -> [u8; PREAMBLE_LEN as usize] {
        let mut out = [0u8; PREAMBLE_LEN as usize];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&self.major.to_le_bytes());
        out[10..12].copy_from_slice(&self.minor.to_le_bytes());
        out[12..16].copy_from_slice(&self.header_len.to_le_bytes());
        out
    }

    /// Parses and checks the preamble: magic first (is it a `.sack`?), then the
    /// major version (can this build read it?), then the header length.
    pub fn parse(bytes: &[u8; PREAMBLE_LEN as usize], file: &str, file_len: u64) -> Result<Self> {
        let (magic, rest) = bytes.split_at(8);
        if magic != MAGIC {
            return Err(SackError::NotSack { file: file.into() });
        }
        let major = u16::from_le_bytes([rest[0], rest[1]]);
        let minor = u16::from_le_bytes([rest[2], rest[3]]);
        let header_len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if major != FORMAT_MAJOR {
            return Err(SackError::UnsupportedVersion {
                file: file.into(),
                found_major: major,
                found_minor: minor,
                supported: FORMAT_MAJOR,
            });
        }
        if u64::from(header_len) > MAX_HEADER_LEN {
            return Err(malformed(
                file,
                format!("header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes"),
            ));
        }
        if MIN_FILE_LEN + u64::from(header_len) > file_len {
            return Err(malformed(
                file,
                format!(
                    "file is truncated: {file_len} bytes cannot hold a {header_len}-byte header \
                     and the footer"
                ),
            ));
        }
        Ok(Self {
            major,
            minor,
            header_len,
        })
    }
}

/// The fixed part at the end: where the directory is and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the directory JSON from the start of the file.
    pub directory_offset: u64,
    /// Length of the directory JSON.
    pub directory_len: u64,
    /// CRC-32 of the directory JSON.
    pub directory_crc: u32,
}

impl Footer {
    /// The 32 bytes as stored, including the footer's own CRC.
    pub fn to_bytes(self) -> [u8; FOOTER_LEN as usize] {
        let mut out = [0u8; FOOTER_LEN as usize];
        out[..8].copy_from_slice(&self.directory_offset.to_le_bytes());
        out[8..16].copy_from_slice(&self.directory_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.directory_crc.to_le_bytes());
        let crc = crc32(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out[24..].copy_from_slice(&FOOTER_MAGIC);
        out
    }

    /// Parses and checks the footer against the file length and the end of the
    /// header (`data_start`): the directory must sit between them and end
    /// exactly where the footer begins.
    pub fn parse(
        bytes: &[u8; FOOTER_LEN as usize],
        file: &str,
        file_len: u64,
        data_start: u64,
    ) -> Result<Self> {
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let half = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        if bytes[24..] != FOOTER_MAGIC {
            return Err(malformed(
                file,
                "no .sack footer at the end of the file (the file is truncated or has bytes \
                 appended)",
            ));
        }
        let stored = half(20);
        let computed = crc32(&bytes[..20]);
        if stored != computed {
            return Err(SackError::Checksum {
                file: file.into(),
                what: "footer".into(),
                stored,
                computed,
            });
        }
        let footer = Self {
            directory_offset: word(0),
            directory_len: word(8),
            directory_crc: half(16),
        };
        let footer_start = file_len.saturating_sub(FOOTER_LEN);
        if footer.directory_len > MAX_DIRECTORY_LEN {
            return Err(malformed(
                file,
                format!(
                    "directory length {} exceeds the limit of {MAX_DIRECTORY_LEN} bytes",
                    footer.directory_len
                ),
            ));
        }
        let fits = footer.directory_offset >= data_start
            && footer.directory_offset.checked_add(footer.directory_len) == Some(footer_start);
        if !fits {
            return Err(malformed(
                file,
                format!(
                    "footer places the directory at {}..+{}, but it must end at byte {footer_start} \
                     and start after the header (byte {data_start}); the file is truncated or has \
                     bytes inserted or appended",
                    footer.directory_offset, footer.directory_len
                ),
            ));
        }
        Ok(footer)
    }
}

/// Shorthand for a [`SackError::Malformed`].
pub(crate) fn malformed(file: &str, what: impl Into<String>) -> SackError {
    SackError::Malformed {
        file: file.into(),
        what: what.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips() {
        let p = Preamble {
            major: FORMAT_MAJOR,
            minor: 7,
            header_len: 300,
        };
        assert_eq!(Preamble::parse(&p.to_bytes(), "f", 1000).unwrap(), p);
    }

    #[test]
    fn newer_major_names_the_supported_version() {
        let p = Preamble {
            major: 2,
            minor: 0,
            header_len: 10,
        };
        let err = Preamble::parse(&p.to_bytes(), "doc.sack", 1000).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("doc.sack"), "{msg}");
        assert!(msg.contains("version 2.0"), "{msg}");
        assert!(msg.contains("reads format version 1.x"), "{msg}");
    }

    #[test]
    fn wrong_magic_is_not_a_sack() {
        let mut b = Preamble {
            major: 1,
            minor: 0,
            header_len: 0,
        }
        .to_bytes();
        b[1] = b'X';
        assert!(matches!(
            Preamble::parse(&b, "f", 1000),
            Err(SackError::NotSack { .. })
        ));
    }

    #[test]
    fn header_longer_than_file_is_truncation() {
        let p = Preamble {
            major: 1,
            minor: 0,
            header_len: 100,
        };
        let err = Preamble::parse(&p.to_bytes(), "f", 120).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn footer_round_trips_and_must_end_the_file() {
        let f = Footer {
            directory_offset: 100,
            directory_len: 50,
            directory_crc: 0xdead_beef,
        };
        let bytes = f.to_bytes();
        assert_eq!(Footer::parse(&bytes, "f", 182, 60).unwrap(), f);
        assert!(Footer::parse(&bytes, "f", 183, 60).is_err());
        assert!(Footer::parse(&bytes, "f", 182, 101).is_err());
    }

    #[test]
    fn footer_bit_flip_is_a_checksum_error() {
        let mut bytes = Footer {
            directory_offset: 100,
            directory_len: 50,
            directory_crc: 1,
        }
        .to_bytes();
        bytes[3] ^= 0x10;
        assert!(matches!(
            Footer::parse(&bytes, "f", 182, 60),
            Err(SackError::Checksum { .. })
        ));
    }
}
