//! Lazy reader: opening reads and checks the preamble, header, footer and
//! directory only; payloads are read, checksummed and decoded one tensor at a
//! time, so a layer can be loaded without touching the rest of a large file.
//!
//! Every size is checked against the file length and the format's limits
//! before anything is allocated, so hostile input costs at most its own size
//! in memory (plus a bounded zstd window).

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use crate::sack::encoding::compress::decompress;
use crate::sack::encoding::{self as enc, Compression, TensorValues};
use crate::sack::error::{Result, SackError, io_err};
use crate::sack::format::directory::{
    self, Directory, Index, KeptSet, KvSlot, TensorEntry, TensorName,
};
use crate::sack::format::header::{KeptLayout, SackHeader};
use crate::sack::format::{
    CRC_LEN, FOOTER_LEN, Footer, MAGIC, MIN_FILE_LEN, PREAMBLE_LEN, Preamble, crc32, malformed,
};

/// One decoded tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedTensor {
    /// What it is.
    pub name: TensorName,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: TensorValues,
}

/// The kept tokens of one KV head of one layer, all segments concatenated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadKv {
    /// Kept positions, strictly increasing.
    pub positions: Vec<u32>,
    /// Keys, row-major `[positions.len(), head_dim]`.
    pub keys: Vec<f32>,
    /// Values, row-major `[positions.len(), head_dim]`.
    pub values: Vec<f32>,
}

/// All KV heads of one layer. Heads are kept apart because in the `per_head`
/// layout each has its own positions and count.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredLayer {
    /// Layer index.
    pub layer: u32,
    /// Size of one key or value vector.
    pub head_dim: usize,
    /// One entry per KV head.
    pub heads: Vec<HeadKv>,
}

/// An open `.sack`: header and directory in memory, payloads on demand.
#[derive(Debug)]
pub struct SackReader<R> {
    source: R,
    file: String,
    file_len: u64,
    version: (u16, u16),
    header: SackHeader,
    tensors: Vec<TensorEntry>,
    index: Index,
}

impl SackReader<File> {
    /// Opens a file; payloads are read lazily.
    pub fn open(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let source = File::open(path).map_err(io_err(&file, "opening the file"))?;
        let len = source
            .metadata()
            .map_err(io_err(&file, "reading the file's size"))?
            .len();
        Self::from_source(source, len, file)
    }
}

impl SackReader<Cursor<Vec<u8>>> {
    /// Reads a `.sack` held in memory (e.g. slurped from stdin); `name` appears in errors.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<String>) -> Result<Self> {
        let len = bytes.len() as u64;
        Self::from_source(Cursor::new(bytes), len, name.into())
    }
}

impl<R> SackReader<R> {
    /// The header.
    pub fn header(&self) -> &SackHeader {
        &self.header
    }

    /// Format version of the file, (major, minor).
    pub fn format_version(&self) -> (u16, u16) {
        self.version
    }

    /// The name errors use: the path, or the name given to [`SackReader::from_bytes`].
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// Total size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The directory, in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Number of segments (compressor chunks) each kept set is split into.
    pub fn segments(&self) -> u32 {
        self.index.segments
    }
}

impl<R: Read + Seek> SackReader<R> {
    /// Reads and checks everything but the payloads from a source of `file_len` bytes.
    pub fn from_source(mut source: R, file_len: u64, file: String) -> Result<Self> {
        if file_len < MIN_FILE_LEN {
            let head_len = usize::try_from(file_len.min(MAGIC.len() as u64)).unwrap_or(0);
            let head = read_at(&mut source, &file, 0, head_len, "the magic bytes")?;
            if head.is_empty() || !MAGIC.starts_with(&head) {
                return Err(SackError::NotSack { file });
            }
            return Err(malformed(
                &file,
                format!(
                    "file is truncated: {file_len} bytes, the smallest .sack has {MIN_FILE_LEN}"
                ),
            ));
        }
        let preamble = read_array(&mut source, &file, 0, "the preamble")?;
        let p = Preamble::parse(&preamble, &file, file_len)?;
        let header_len = usize::try_from(p.header_len).unwrap_or(usize::MAX);
        let json = read_at(&mut source, &file, PREAMBLE_LEN, header_len, "the header")?;
        let header_end = PREAMBLE_LEN + u64::from(p.header_len);
        let stored = u32::from_le_bytes(read_array(
            &mut source,
            &file,
            header_end,
            "the header CRC",
        )?);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&preamble);
        hasher.update(&json);
        check_crc(&file, "header", stored, hasher.finalize())?;
        let header: SackHeader = serde_json::from_slice(&json)
            .map_err(|e| malformed(&file, format!("header JSON is invalid: {e}")))?;
        header.validate().map_err(|e| malformed(&file, e))?;

        let data_start = header_end + CRC_LEN;
        let footer = read_array(&mut source, &file, file_len - FOOTER_LEN, "the footer")?;
        let footer = Footer::parse(&footer, &file, file_len, data_start)?;
        let dir_len = usize::try_from(footer.directory_len)
            .map_err(|_| malformed(&file, "directory is too large"))?;
        let dir = read_at(
            &mut source,
            &file,
            footer.directory_offset,
            dir_len,
            "the directory",
        )?;
        check_crc(&file, "directory", footer.directory_crc, crc32(&dir))?;
        let Directory { tensors } = serde_json::from_slice(&dir)
            .map_err(|e| malformed(&file, format!("directory JSON is invalid: {e}")))?;
        let index = directory::validate(&header, &tensors, data_start..footer.directory_offset)
            .map_err(|e| malformed(&file, format!("directory: {e}")))?;
        Ok(Self {
            source,
            file,
            file_len,
            version: (p.major, p.minor),
            header,
            tensors,
            index,
        })
    }

    /// Reads, checks and decodes the tensor called `name` (e.g. `key.l3.s0`).
    pub fn read_tensor(&mut self, name: &str) -> Result<DecodedTensor> {
        let parsed: Option<TensorName> = name.parse().ok();
        let i = parsed
            .and_then(|n| self.index.by_name.get(&n).copied())
            .ok_or_else(|| SackError::NoSuchTensor {
                file: self.file.clone(),
                name: name.into(),
            })?;
        self.read_entry(i)
    }

    /// Reads one layer: every segment of its keys, values and kept positions,
    /// split per KV head. Positions are checked to increase across segments.
    pub fn read_layer(&mut self, layer: u32) -> Result<StoredLayer> {
        if self.header.soft_tokens.is_some() {
            return Err(SackError::InvalidArgument {
                file: self.file.clone(),
                what: "the file holds soft tokens, not K/V".into(),
            });
        }
        let m = &self.header.model;
        if layer >= m.layers {
            return Err(SackError::InvalidArgument {
                file: self.file.clone(),
                what: format!("layer {layer} does not exist; the model has {}", m.layers),
            });
        }
        let kv_heads = m.kv_heads;
        let head_dim = m.head_dim as usize;
        let layout = self.header.kv.layout;
        let mut heads = vec![HeadKv::default(); kv_heads as usize];
        for segment in 0..self.index.segments {
            match layout {
                KeptLayout::PerHead => {
                    for (h, head) in (0..kv_heads).zip(heads.iter_mut()) {
                        let slot = KvSlot {
                            layer,
                            head: Some(h),
                        };
                        let set = KeptSet::Head { layer, head: h };
                        let (pos, keys, values) = self.read_cell(set, slot, segment)?;
                        head.positions.extend(pos);
                        head.keys.extend(keys);
                        head.values.extend(values);
                    }
                }
                KeptLayout::Shared | KeptLayout::PerLayer => {
                    let slot = KvSlot { layer, head: None };
                    let set = if layout == KeptLayout::Shared {
                        KeptSet::Shared
                    } else {
                        KeptSet::Layer(layer)
                    };
                    let (pos, keys, values) = self.read_cell(set, slot, segment)?;
                    let per_head = pos.len() * head_dim;
                    for ((head, k), v) in heads
                        .iter_mut()
                        .zip(keys.chunks(per_head.max(1)))
                        .zip(values.chunks(per_head.max(1)))
                    {
                        head.positions.extend_from_slice(&pos);
                        head.keys.extend_from_slice(k);
                        head.values.extend_from_slice(v);
                    }
                }
            }
        }
        for head in &heads {
            if head.positions.windows(2).any(|w| w[0] >= w[1]) {
                return Err(malformed(
                    &self.file,
                    format!(
                        "layer {layer}: kept positions do not increase from segment to segment"
                    ),
                ));
            }
        }
        Ok(StoredLayer {
            layer,
            head_dim,
            heads,
        })
    }

    /// Reads and decodes every tensor, checking every checksum: a full
    /// integrity check of the file.
    /// Every tensor belongs to some layer, or is a soft token, so reading all
    /// layers (or the soft tokens) covers the file.
    pub fn verify(&mut self) -> Result<()> {
        if self.header.soft_tokens.is_some() {
            return self.read_soft_tokens().map(drop);
        }
        for layer in 0..self.header.model.layers {
            self.read_layer(layer)?;
        }
        Ok(())
    }

    /// Reads the soft tokens of every segment in order: row-major
    /// `[n, hidden]` and `n`.
    pub fn read_soft_tokens(&mut self) -> Result<(Vec<f32>, usize)> {
        let Some(soft) = self.header.soft_tokens else {
            return Err(SackError::InvalidArgument {
                file: self.file.clone(),
                what: "the file holds K/V, not soft tokens".into(),
            });
        };
        let mut values = Vec::new();
        for segment in 0..self.index.segments {
            match self.read_named(TensorName::Soft { segment })? {
                TensorValues::F32(v) => values.extend(v),
                TensorValues::U32(_) => {
                    return Err(malformed(&self.file, "soft tokens of the wrong kind"));
                }
            }
        }
        let n = values.len() / (soft.hidden as usize).max(1);
        Ok((values, n))
    }

    /// Positions, keys and values of one (set, slot) in one segment.
    fn read_cell(
        &mut self,
        set: KeptSet,
        slot: KvSlot,
        segment: u32,
    ) -> Result<(Vec<u32>, Vec<f32>, Vec<f32>)> {
        let pos = self.read_named(TensorName::Positions { set, segment })?;
        let keys = self.read_named(TensorName::Key { slot, segment })?;
        let values = self.read_named(TensorName::Value { slot, segment })?;
        match (pos, keys, values) {
            (TensorValues::U32(p), TensorValues::F32(k), TensorValues::F32(v)) => Ok((p, k, v)),
            _ => Err(malformed(
                &self.file,
                "tensor of the wrong kind in a segment",
            )),
        }
    }

    fn read_named(&mut self, name: TensorName) -> Result<TensorValues> {
        let i = self
            .index
            .by_name
            .get(&name)
            .copied()
            .ok_or_else(|| malformed(&self.file, format!("tensor {name} is missing")))?;
        Ok(self.read_entry(i)?.values)
    }

    fn read_entry(&mut self, i: usize) -> Result<DecodedTensor> {
        let e = self
            .tensors
            .get(i)
            .cloned()
            .ok_or_else(|| malformed(&self.file, "directory index out of range"))?;
        let what = format!("tensor {}", e.name);
        let len =
            usize::try_from(e.stored_len).map_err(|_| malformed(&self.file, "tensor too large"))?;
        let stored = read_at(&mut self.source, &self.file, e.offset, len, &what)?;
        check_crc(&self.file, &what, e.crc32, crc32(&stored))?;
        let bad = |m: String| malformed(&self.file, format!("{what}: {m}"));
        let payload_len = e
            .payload_len()
            .ok_or_else(|| bad("shape is too large".into()))?;
        let payload = match e.compression {
            Compression::None => stored,
            Compression::Zstd => decompress(&stored, payload_len).map_err(bad)?,
        };
        let values = enc::decode(&payload, e.encoding, &e.shape, e.group_size).map_err(bad)?;
        if let TensorValues::U32(p) = &values {
            let tokens = self.header.document.tokens;
            if p.windows(2).any(|w| w[0] >= w[1]) || p.iter().any(|&x| u64::from(x) >= tokens) {
                return Err(bad(format!(
                    "positions must increase strictly and stay below the document's {tokens} tokens"
                )));
            }
        }
        let shape = e
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad("shape does not fit in memory".into()))?;
        Ok(DecodedTensor {
            name: e.name,
            shape,
            values,
        })
    }
}

fn check_crc(file: &str, what: &str, stored: u32, computed: u32) -> Result<()> {
    if stored == computed {
        Ok(())
    } else {
        Err(SackError::Checksum {
            file: file.into(),
            what: what.into(),
            stored,
            computed,
        })
    }
}

/// Reads `N` bytes at `offset`; callers have checked the range lies in the file.
fn read_array<R: Read + Seek, const N: usize>(
    source: &mut R,
    file: &str,
    offset: u64,
    what: &str,
) -> Result<[u8; N]> {
    let action = || format!("reading {what} ({N} bytes at offset {offset})");
    let mut buf = [0u8; N];
    source
        .seek(SeekFrom::Start(offset))
        .and_then(|_| source.read_exact(&mut buf))
        .map_err(|e| io_err(file, action())(e))?;
    Ok(buf)
}

/// Reads `len` bytes at `offset`; callers have checked the range lies in the file.
fn read_at<R: Read + Seek>(
    source: &mut R,
    file: &str,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let action = || format!("reading {what} ({len} bytes at offset {offset})");
    let mut buf = vec![0u8; len];
    source
        .seek(SeekFrom::Start(offset))
        .and_then(|_| source.read_exact(&mut buf))
        .map_err(|e| io_err(file, action())(e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sack::encoding::Floats;
    use crate::sack::format::header::tests::sample;
    use crate::sack::writer::{SackWriter, WriteOptions};

    /// Two layers, two heads, head_dim 2, per-head layout with ragged counts
    /// (head 1 of layer 0 keeps nothing in segment 1), two segments.
    fn ragged() -> Vec<u8> {
        let mut h = sample(KeptLayout::PerHead);
        h.model.layers = 2;
        h.model.kv_heads = 2;
        h.model.head_dim = 2;
        let mut bytes = Vec::new();
        let mut w = SackWriter::to_stream(&mut bytes, "mem", &h, WriteOptions::default()).unwrap();
        for segment in 0..2u32 {
            for layer in 0..2u32 {
                for head in 0..2u32 {
                    let n = if (layer, head, segment) == (0, 1, 1) {
                        0
                    } else {
                        1 + head
                    };
                    let positions: Vec<u32> =
                        (0..n).map(|i| 100 * segment + 10 * layer + i).collect();
                    w.add_positions(segment, KeptSet::Head { layer, head }, &positions)
                        .unwrap();
                    let k: Vec<f32> = (0..2 * n)
                        .map(|i| (layer * 100 + head * 10 + i) as f32)
                        .collect();
                    let v: Vec<f32> = k.iter().map(|x| -x).collect();
                    let slot = KvSlot {
                        layer,
                        head: Some(head),
                    };
                    w.add_kv(segment, slot, Floats::F32(&k), Floats::F32(&v))
                        .unwrap();
                }
            }
        }
        w.finish().unwrap();
        bytes
    }

    #[test]
    fn ragged_layers_read_back_per_head() {
        let mut r = SackReader::from_bytes(ragged(), "mem").unwrap();
        assert_eq!(r.segments(), 2);
        let layer = r.read_layer(0).unwrap();
        assert_eq!(layer.heads[0].positions, [0, 100]);
        assert_eq!(layer.heads[0].keys, [0.0, 1.0, 0.0, 1.0]);
        assert_eq!(layer.heads[1].positions, [0, 1]);
        assert_eq!(layer.heads[1].values, [-10.0, -11.0, -12.0, -13.0]);
        assert_ne!(layer.heads[0].positions, layer.heads[1].positions);
        let t = r.read_tensor("pos.l1.h1.s1").unwrap();
        assert_eq!(t.shape, [2]);
        assert_eq!(t.values, TensorValues::U32(vec![110, 111]));
        r.verify().unwrap();
    }

    #[test]
    fn files_and_buffers_read_the_same() {
        let bytes = ragged();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sack");
        std::fs::write(&path, &bytes).unwrap();
        let mut from_file = SackReader::open(&path).unwrap();
        let mut from_bytes = SackReader::from_bytes(bytes, "mem").unwrap();
        assert_eq!(from_file.header(), from_bytes.header());
        assert_eq!(from_file.tensors(), from_bytes.tensors());
        assert_eq!(
            from_file.read_layer(1).unwrap(),
            from_bytes.read_layer(1).unwrap()
        );
    }

    #[test]
    fn unknown_names_and_layers_are_errors() {
        let mut r = SackReader::from_bytes(ragged(), "mem").unwrap();
        for name in ["key.l0.s0", "key.l9.h0.s0", "nonsense"] {
            assert!(
                matches!(r.read_tensor(name), Err(SackError::NoSuchTensor { .. })),
                "{name}"
            );
        }
        assert!(r.read_layer(2).is_err());
    }

    #[test]
    fn shared_layers_stack() {
        let mut h = sample(KeptLayout::Shared);
        h.model.layers = 1;
        h.model.kv_heads = 2;
        h.model.head_dim = 1;
        let mut bytes = Vec::new();
        let mut w = SackWriter::to_stream(&mut bytes, "mem", &h, WriteOptions::default()).unwrap();
        let slot = KvSlot {
            layer: 0,
            head: None,
        };
        for (segment, positions) in [[1, 2], [5, 6]].iter().enumerate() {
            w.add_positions(segment as u32, KeptSet::Shared, positions)
                .unwrap();
            let base = 4.0 * segment as f32;
            let k = [base, base + 1.0, base + 2.0, base + 3.0];
            w.add_kv(segment as u32, slot, Floats::F32(&k), Floats::F32(&k))
                .unwrap();
        }
        w.finish().unwrap();
        let mut r = SackReader::from_bytes(bytes, "mem").unwrap();
        let layer = r.read_layer(0).unwrap();
        // Each head with segment 0 then segment 1.
        for (h, keys) in layer
            .heads
            .iter()
            .zip([[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]])
        {
            assert_eq!(h.positions, [1, 2, 5, 6]);
            assert_eq!(h.keys, keys);
        }
    }

    #[test]
    fn tiny_inputs_fail_cleanly() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "not a .sack"),
            (b"\x89SAC\r\n", "truncated"),
            (
                b"hello world, this is a text file and not a sack at all ............",
                "not a .sack",
            ),
            (&[0u8; 100], "not a .sack"),
        ];
        for (bytes, expect) in cases {
            let err = SackReader::from_bytes(bytes.to_vec(), "x.sack")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("x.sack: ") && err.contains(expect), "{err}");
        }
    }
}
