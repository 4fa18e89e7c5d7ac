//! Streaming writer: the header goes out at creation, each tensor as soon as it
//! is added, and the directory and footer at [`SackWriter::finish`]. Nothing is
//! ever sought or rewritten, so the sink may be a pipe, and memory holds only
//! the tensor being written plus one small directory entry per tensor.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;

use crate::atomic::AtomicFile;
use crate::sack::encoding::compress::{self, LEVELS};
use crate::sack::encoding::quant::GROUP_SIZE;
use crate::sack::encoding::{self as enc, Compression, Encoding, Floats, KvEncoding};
use crate::sack::error::{Result, SackError, io_err};
use crate::sack::format::directory::{self, Directory, KeptSet, KvSlot, TensorEntry, TensorName};
use crate::sack::format::header::{KeptLayout, SackHeader};
use crate::sack::format::{FORMAT_MAJOR, Footer, MAX_HEADER_LEN, Preamble, crc32};

/// Choices that affect size and speed but not meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Storage precision of keys and values.
    pub encoding: KvEncoding,
    /// zstd level (1..=19) for every payload, or `None` to store payloads as is.
    pub zstd_level: Option<i32>,
}

impl Default for WriteOptions {
    /// bf16 and zstd level 3: lossless for bf16 models and fast.
    fn default() -> Self {
        Self {
            encoding: KvEncoding::Bf16,
            zstd_level: Some(3),
        }
    }
}

/// A destination for a `.sack`. [`Sink::complete`] runs once after the last
/// byte: it is where a file becomes durable and appears under its name.
pub trait Sink: Write {
    /// Makes the written bytes final.
    fn complete(self) -> io::Result<()>;
}

/// A `.sack` written to a path appears under its name only once complete and
/// fsynced (see [`AtomicFile`]).
impl Sink for AtomicFile {
    fn complete(self) -> io::Result<()> {
        self.commit()
    }
}

/// Any writer used as a stream (stdout, a socket, a `Vec<u8>`): completing it flushes.
#[derive(Debug)]
pub struct StreamSink<W: Write>(pub W);

impl<W: Write> Write for StreamSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Sink for StreamSink<W> {
    fn complete(mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Progress of one kept set: the segment written last and what it held.
#[derive(Clone, Copy, Debug)]
struct SetState {
    segment: u32,
    kept: usize,
    last_position: Option<u32>,
}

/// Writes a `.sack` tensor by tensor.
///
/// For each segment (compressor chunk) `s`, in order 0, 1, …: add the kept
/// positions of every kept set with [`add_positions`](Self::add_positions),
/// then the keys and values of every slot with [`add_kv`](Self::add_kv). Any
/// order within a segment works as long as a set's positions come before its
/// keys and values. [`finish`](Self::finish) refuses an incomplete file.
#[derive(Debug)]
pub struct SackWriter<S: Sink> {
    out: BufWriter<S>,
    file: String,
    header: SackHeader,
    options: WriteOptions,
    offset: u64,
    data_start: u64,
    entries: Vec<TensorEntry>,
    names: HashSet<TensorName>,
    sets: HashMap<KeptSet, SetState>,
    /// Segments of soft tokens written.
    soft_segments: u32,
}

impl SackWriter<AtomicFile> {
    /// Starts writing `path` atomically (see [`AtomicFile`]).
    pub fn create(path: &Path, header: &SackHeader, options: WriteOptions) -> Result<Self> {
        let file = path.display().to_string();
        let sink = AtomicFile::create(path).map_err(io_err(
            &file,
            "creating a temporary file in the target directory",
        ))?;
        Self::new(sink, file, header, options)
    }
}

impl<W: Write> SackWriter<StreamSink<W>> {
    /// Starts writing to a stream; `name` (e.g. `<stdout>`) appears in errors.
    pub fn to_stream(
        stream: W,
        name: impl Into<String>,
        header: &SackHeader,
        options: WriteOptions,
    ) -> Result<Self> {
        Self::new(StreamSink(stream), name.into(), header, options)
    }
}

impl<S: Sink> SackWriter<S> {
    /// Validates the header and options and writes the preamble and header.
    pub fn new(sink: S, file: String, header: &SackHeader, options: WriteOptions) -> Result<Self> {
        let invalid = |what: String| SackError::InvalidArgument {
            file: file.clone(),
            what,
        };
        header.validate().map_err(invalid)?;
        if let Some(level) = options.zstd_level.filter(|l| !LEVELS.contains(l)) {
            return Err(invalid(format!(
                "zstd level {level} is outside {}..={}",
                LEVELS.start(),
                LEVELS.end()
            )));
        }
        let json = serde_json::to_vec(header).map_err(|e| invalid(e.to_string()))?;
        let header_len = u32::try_from(json.len())
            .ok()
            .filter(|&l| u64::from(l) <= MAX_HEADER_LEN)
            .ok_or_else(|| invalid(format!("header JSON is {} bytes, too large", json.len())))?;
        let preamble = Preamble {
            major: FORMAT_MAJOR,
            minor: header.minor_version(),
            header_len,
        }
        .to_bytes();
        let mut framed = preamble.to_vec();
        framed.extend_from_slice(&json);
        let crc = crc32(&framed);
        framed.extend_from_slice(&crc.to_le_bytes());
        let mut out = BufWriter::new(sink);
        out.write_all(&framed)
            .map_err(io_err(&file, "writing the preamble and header"))?;
        let data_start = framed.len() as u64;
        Ok(Self {
            out,
            file,
            header: header.clone(),
            options,
            offset: data_start,
            data_start,
            entries: Vec::new(),
            names: HashSet::new(),
            sets: HashMap::new(),
            soft_segments: 0,
        })
    }

    fn invalid(&self, what: impl Into<String>) -> SackError {
        SackError::InvalidArgument {
            file: self.file.clone(),
            what: what.into(),
        }
    }

    /// Writes the kept positions of `set` for `segment`: strictly increasing,
    /// above those of the set's previous segment, below the document's token count.
    /// Segments of a set must come in order 0, 1, 2, ….
    pub fn add_positions(&mut self, segment: u32, set: KeptSet, positions: &[u32]) -> Result<()> {
        let name = TensorName::Positions { set, segment };
        if self.header.soft_tokens.is_some() {
            return Err(self.invalid(format!("{name}: the header declares soft tokens, not K/V")));
        }
        let m = &self.header.model;
        let fits = self.header.kv.layout.holds(set)
            && match set {
                KeptSet::Shared => true,
                KeptSet::Layer(l) => l < m.layers,
                KeptSet::Head { layer, head } => layer < m.layers && head < m.kv_heads,
            };
        if !fits {
            return Err(self.invalid(format!(
                "{name} does not fit layout {:?} of a {}-layer, {}-head model",
                self.header.kv.layout, m.layers, m.kv_heads
            )));
        }
        let previous = self.sets.get(&set).copied();
        let expected_segment = previous.map_or(0, |p| p.segment.saturating_add(1));
        if segment != expected_segment {
            return Err(self.invalid(format!("{name}: expected segment {expected_segment} next")));
        }
        let mut last = previous.and_then(|p| p.last_position);
        for &p in positions {
            if last.is_some_and(|l| p <= l) || u64::from(p) >= self.header.document.tokens {
                return Err(self.invalid(format!(
                    "{name}: position {p} is not above {last:?} and below the document's {} tokens",
                    self.header.document.tokens
                )));
            }
            last = Some(p);
        }
        let shape = vec![positions.len() as u64];
        let payload = enc::encode_u32(positions);
        let sealed = seal(
            self.options,
            &self.file,
            name,
            Encoding::U32,
            shape,
            None,
            payload,
        )?;
        self.write_sealed(sealed)?;
        self.sets.insert(
            set,
            SetState {
                segment,
                kept: positions.len(),
                last_position: last,
            },
        );
        Ok(())
    }

    /// Writes the keys and values of `slot` for `segment`, row-major
    /// `[kv_heads, n, head_dim]` (or `[n, head_dim]` in the `per_head` layout),
    /// where `n` is the number of positions added for the slot's kept set in
    /// this segment.
    pub fn add_kv(
        &mut self,
        segment: u32,
        slot: KvSlot,
        keys: Floats<'_>,
        values: Floats<'_>,
    ) -> Result<()> {
        self.add_kvs(segment, &[SlotKv { slot, keys, values }])
    }

    /// [`add_kv`](Self::add_kv) for many slots of `segment` at once: all are
    /// checked first, then their tensors are encoded and compressed in
    /// parallel and written in the order given.
    pub fn add_kvs(&mut self, segment: u32, slots: &[SlotKv<'_>]) -> Result<()> {
        let layout = self.header.kv.layout;
        let m = &self.header.model;
        let kv = self.options.encoding;
        let mut jobs = Vec::with_capacity(2 * slots.len());
        let mut batch = HashSet::new();
        for &SlotKv { slot, keys, values } in slots {
            let key_name = TensorName::Key { slot, segment };
            let set = layout
                .set_of(slot)
                .filter(|_| slot.layer < m.layers && slot.head.is_none_or(|h| h < m.kv_heads))
                .ok_or_else(|| {
                    self.invalid(format!(
                        "{key_name} does not fit layout {layout:?} and the model"
                    ))
                })?;
            let kept = match self.sets.get(&set) {
                Some(s) if s.segment == segment => s.kept as u64,
                _ => {
                    return Err(self.invalid(format!(
                        "{key_name}: add the positions of segment {segment} first"
                    )));
                }
            };
            let shape = match layout {
                KeptLayout::PerHead => vec![kept, u64::from(m.head_dim)],
                KeptLayout::Shared | KeptLayout::PerLayer => {
                    vec![u64::from(m.kv_heads), kept, u64::from(m.head_dim)]
                }
            };
            let elements: u64 = shape.iter().product();
            for (name, data, encoding) in [
                (key_name, keys, kv.for_keys()),
                (TensorName::Value { slot, segment }, values, kv.for_values()),
            ] {
                if data.len() as u64 != elements {
                    return Err(self.invalid(format!(
                        "{name}: {} values given, shape {shape:?} needs {elements}",
                        data.len()
                    )));
                }
                if self.names.contains(&name) || !batch.insert(name) {
                    return Err(self.invalid(format!("{name} was already written")));
                }
                jobs.push((name, data, encoding, shape.clone()));
            }
        }
        let (options, file) = (self.options, self.file.as_str());
        let sealed = jobs
            .into_par_iter()
            .map(|(name, data, encoding, shape)| {
                seal_floats(options, file, name, data, encoding, shape)
            })
            .collect::<Result<Vec<_>>>()?;
        sealed.into_iter().try_for_each(|t| self.write_sealed(t))
    }

    /// Writes the soft tokens of `segment`, row-major `[n, hidden]`, in a
    /// file whose header declares them. Segments come in order 0, 1, 2, ….
    pub fn add_soft_tokens(&mut self, segment: u32, tokens: Floats<'_>) -> Result<()> {
        let name = TensorName::Soft { segment };
        let Some(soft) = self.header.soft_tokens else {
            return Err(self.invalid(format!("{name}: the header declares K/V, not soft tokens")));
        };
        let expected = self.soft_segments;
        if segment != expected {
            return Err(self.invalid(format!("{name}: expected segment {expected} next")));
        }
        let hidden = u64::from(soft.hidden);
        let len = tokens.len() as u64;
        if !len.is_multiple_of(hidden) {
            return Err(self.invalid(format!(
                "{name}: {len} values are not whole rows of {hidden}"
            )));
        }
        let shape = vec![len / hidden, hidden];
        let encoding = self.options.encoding.for_values();
        let sealed = seal_floats(self.options, &self.file, name, tokens, encoding, shape)?;
        self.write_sealed(sealed)?;
        self.soft_segments += 1;
        Ok(())
    }

    fn write_sealed(&mut self, tensor: Sealed) -> Result<()> {
        let Sealed {
            name,
            encoding,
            shape,
            group_size,
            stored,
            compression,
            crc32,
        } = tensor;
        if !self.names.insert(name) {
            return Err(self.invalid(format!("{name} was already written")));
        }
        self.out.write_all(&stored).map_err(io_err(
            &self.file,
            format!(
                "writing {} bytes of {name} at offset {}",
                stored.len(),
                self.offset
            ),
        ))?;
        self.entries.push(TensorEntry {
            name,
            dtype: encoding.dtype(),
            shape,
            encoding,
            group_size,
            compression,
            offset: self.offset,
            stored_len: stored.len() as u64,
            crc32,
        });
        self.offset += stored.len() as u64;
        Ok(())
    }

    /// Checks that every segment is complete, writes the directory and footer,
    /// and completes the sink (for a file: fsync and rename into place).
    pub fn finish(self) -> Result<()> {
        let Self {
            mut out,
            file,
            header,
            offset,
            data_start,
            entries,
            ..
        } = self;
        directory::validate(&header, &entries, data_start..offset).map_err(|what| {
            SackError::InvalidArgument {
                file: file.clone(),
                what,
            }
        })?;
        let json = serde_json::to_vec(&Directory { tensors: entries }).map_err(|e| {
            SackError::InvalidArgument {
                file: file.clone(),
                what: e.to_string(),
            }
        })?;
        let footer = Footer {
            directory_offset: offset,
            directory_len: json.len() as u64,
            directory_crc: crc32(&json),
        };
        out.write_all(&json)
            .and_then(|()| out.write_all(&footer.to_bytes()))
            .map_err(io_err(&file, "writing the directory and footer"))?;
        let sink = out
            .into_inner()
            .map_err(|e| io_err(&file, "flushing the end of the file")(e.into_error()))?;
        sink.complete().map_err(io_err(
            &file,
            "syncing and moving the finished file into place",
        ))
    }
}

/// Keys and values of one slot, for [`SackWriter::add_kvs`].
#[derive(Clone, Copy, Debug)]
pub struct SlotKv<'a> {
    pub slot: KvSlot,
    pub keys: Floats<'a>,
    pub values: Floats<'a>,
}

/// A tensor ready to be written: its payload encoded, compressed and
/// checksummed.
struct Sealed {
    name: TensorName,
    encoding: Encoding,
    shape: Vec<u64>,
    group_size: Option<u32>,
    stored: Vec<u8>,
    compression: Compression,
    crc32: u32,
}

/// Encodes `data`, whose length fits `shape`, as `encoding` and seals it.
fn seal_floats(
    options: WriteOptions,
    file: &str,
    name: TensorName,
    data: Floats<'_>,
    encoding: Encoding,
    shape: Vec<u64>,
) -> Result<Sealed> {
    let group = encoding.quant().map(|_| GROUP_SIZE);
    // With the length right, only quantization can fail: a value the f16
    // scales cannot cover.
    let payload = enc::encode_floats(data, encoding, &shape, group).map_err(|reason| {
        SackError::Unquantizable {
            file: file.to_string(),
            tensor: name.to_string(),
            reason,
        }
    })?;
    seal(options, file, name, encoding, shape, group, payload)
}

/// Compresses `payload` as `options` say, unless zstd would shrink it past
/// what a reader accepts.
fn seal(
    options: WriteOptions,
    file: &str,
    name: TensorName,
    encoding: Encoding,
    shape: Vec<u64>,
    group_size: Option<u32>,
    payload: Vec<u8>,
) -> Result<Sealed> {
    let compressed = match options.zstd_level {
        Some(level) => Some(
            compress::compress(&payload, level)
                .map_err(io_err(file, format!("compressing {name}")))?,
        )
        .filter(|c| compress::expansion_allowed(c.len() as u64, payload.len() as u64)),
        None => None,
    };
    let (stored, compression) = match compressed {
        Some(c) => (c, Compression::Zstd),
        None => (payload, Compression::None),
    };
    Ok(Sealed {
        name,
        encoding,
        shape,
        group_size,
        crc32: crc32(&stored),
        stored,
        compression,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sack::format::header::tests::sample;
    use crate::sack::reader::SackReader;

    fn small(layout: KeptLayout) -> SackHeader {
        let mut h = sample(layout);
        h.model.layers = 2;
        h.model.kv_heads = 2;
        h.model.head_dim = 4;
        h
    }

    fn misuse(result: Result<()>) -> String {
        let err = result.unwrap_err();
        assert!(matches!(err, SackError::InvalidArgument { .. }), "{err}");
        err.to_string()
    }

    #[test]
    fn calls_that_would_make_an_invalid_file_are_refused() {
        let h = small(KeptLayout::Shared);
        let mut w = SackWriter::to_stream(Vec::new(), "mem", &h, WriteOptions::default()).unwrap();
        let kv = [0.5f32; 2 * 2 * 4];
        let slot = KvSlot {
            layer: 0,
            head: None,
        };
        let r = w.add_kv(0, slot, Floats::F32(&kv), Floats::F32(&kv));
        assert!(misuse(r).contains("positions of segment 0 first"));
        let r = w.add_positions(1, KeptSet::Shared, &[1]);
        assert!(misuse(r).contains("expected segment 0"));
        let r = w.add_positions(0, KeptSet::Layer(0), &[1]);
        assert!(misuse(r).contains("does not fit"));
        let r = w.add_positions(0, KeptSet::Shared, &[3, 3]);
        assert!(misuse(r).contains("position 3"));
        let r = w.add_positions(0, KeptSet::Shared, &[4000]);
        assert!(misuse(r).contains("position 4000"));
        w.add_positions(0, KeptSet::Shared, &[1, 2]).unwrap();
        let r = w.add_positions(1, KeptSet::Shared, &[2]);
        assert!(misuse(r).contains("position 2"));
        let r = w.add_kv(0, slot, Floats::F32(&kv[1..]), Floats::F32(&kv));
        assert!(misuse(r).contains("values given"));
        let r = w.add_kv(
            0,
            KvSlot {
                layer: 2,
                head: None,
            },
            Floats::F32(&kv),
            Floats::F32(&kv),
        );
        assert!(misuse(r).contains("does not fit"));
        w.add_kv(0, slot, Floats::F32(&kv), Floats::F32(&kv))
            .unwrap();
        let r = w.add_kv(0, slot, Floats::F32(&kv), Floats::F32(&kv));
        assert!(misuse(r).contains("already written"));
        let err = w.finish().unwrap_err();
        assert!(err.to_string().contains("incomplete"), "{err}");
    }

    #[test]
    fn bad_options_and_headers_are_refused_before_writing() {
        let h = small(KeptLayout::Shared);
        let options = WriteOptions {
            zstd_level: Some(22),
            ..WriteOptions::default()
        };
        assert!(SackWriter::to_stream(Vec::new(), "mem", &h, options).is_err());
        let mut bad = h.clone();
        bad.model.head_dim = 0;
        assert!(SackWriter::to_stream(Vec::new(), "mem", &bad, WriteOptions::default()).is_err());
    }

    #[test]
    fn unquantizable_values_name_the_tensor() {
        let h = small(KeptLayout::PerHead);
        let options = WriteOptions {
            encoding: KvEncoding::Q4,
            zstd_level: None,
        };
        let mut w = SackWriter::to_stream(Vec::new(), "mem", &h, options).unwrap();
        let set = KeptSet::Head { layer: 1, head: 1 };
        w.add_positions(0, set, &[7]).unwrap();
        let slot = KvSlot {
            layer: 1,
            head: Some(1),
        };
        let err = w
            .add_kv(
                0,
                slot,
                Floats::F32(&[1e6, 0.0, 0.0, 0.0]),
                Floats::F32(&[0.0; 4]),
            )
            .unwrap_err();
        assert!(matches!(err, SackError::Unquantizable { .. }), "{err}");
        assert!(err.to_string().contains("key.l1.h1.s0"), "{err}");
    }

    #[test]
    fn soft_tokens_round_trip_in_a_file_of_their_own() {
        let mut h = small(KeptLayout::Shared);
        h.soft_tokens = Some(crate::sack::format::header::SoftTokensInfo { hidden: 3 });
        h.decoder.first_position = 0;
        let options = WriteOptions {
            encoding: KvEncoding::F32,
            zstd_level: Some(3),
        };
        let mut bytes = Vec::new();
        let mut w = SackWriter::to_stream(&mut bytes, "mem", &h, options).unwrap();
        let refused = misuse(w.add_positions(0, KeptSet::Shared, &[0]));
        assert!(refused.contains("soft tokens, not K/V"), "{refused}");
        let tokens: Vec<f32> = (0..9).map(|i| i as f32 / 4.0).collect();
        let refused = misuse(w.add_soft_tokens(1, Floats::F32(&tokens[..6])));
        assert!(refused.contains("expected segment 0"), "{refused}");
        let refused = misuse(w.add_soft_tokens(0, Floats::F32(&tokens[..5])));
        assert!(refused.contains("not whole rows of 3"), "{refused}");
        w.add_soft_tokens(0, Floats::F32(&tokens[..6])).unwrap();
        w.add_soft_tokens(1, Floats::F32(&tokens[6..])).unwrap();
        w.finish().unwrap();

        let mut r = SackReader::from_bytes(bytes, "mem").unwrap();
        assert_eq!(r.format_version(), (FORMAT_MAJOR, 3));
        assert_eq!(r.read_soft_tokens().unwrap(), (tokens, 3));
        let refused = r.read_layer(0).unwrap_err().to_string();
        assert!(refused.contains("soft tokens, not K/V"), "{refused}");
        r.verify().unwrap();
        let mut shown = Vec::new();
        crate::sack::info::render(&r, &mut shown, crate::sack::InfoFormat::Human).unwrap();
        let shown = String::from_utf8(shown).unwrap();
        assert!(shown.contains("3 soft tokens of width 3"), "{shown}");

        let mut kv = Vec::new();
        let w = SackWriter::to_stream(&mut kv, "mem", &small(KeptLayout::Shared), options);
        let refused = misuse(w.unwrap().add_soft_tokens(0, Floats::F32(&[0.0; 3])));
        assert!(refused.contains("declares K/V"), "{refused}");
    }

    #[test]
    fn tensors_zstd_would_shrink_beyond_the_expansion_limit_are_stored_raw() {
        let mut h = small(KeptLayout::Shared);
        h.model.head_dim = 4096;
        h.model.layers = 1;
        let mut bytes = Vec::new();
        let mut w = SackWriter::to_stream(&mut bytes, "mem", &h, WriteOptions::default()).unwrap();
        w.add_positions(0, KeptSet::Shared, &[1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        let zeros = vec![0f32; 2 * 8 * 4096];
        let noise: Vec<f32> = (0..zeros.len())
            .map(|i| ((i * 7919) % 1000) as f32)
            .collect();
        let slot = KvSlot {
            layer: 0,
            head: None,
        };
        w.add_kv(0, slot, Floats::F32(&zeros), Floats::F32(&noise))
            .unwrap();
        w.finish().unwrap();
        let mut r = SackReader::from_bytes(bytes, "mem").unwrap();
        let compression = |name: &str| {
            r.tensors()
                .iter()
                .find(|e| e.name.to_string() == name)
                .unwrap()
                .compression
        };
        assert_eq!(compression("key.l0.s0"), Compression::None);
        assert_eq!(compression("value.l0.s0"), Compression::Zstd);
        r.verify().unwrap();
    }

    /// A pipe cannot seek: the writer must never need to.
    #[test]
    fn writes_through_an_os_pipe() {
        let h = small(KeptLayout::PerLayer);
        let (mut rx, tx) = std::io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut rx, &mut bytes).map(|_| bytes)
        });
        let mut w = SackWriter::to_stream(tx, "<pipe>", &h, WriteOptions::default()).unwrap();
        for layer in 0..2 {
            w.add_positions(0, KeptSet::Layer(layer), &[layer, 10])
                .unwrap();
            let kv: Vec<f32> = (0..16).map(|i| i as f32).collect();
            let slot = KvSlot { layer, head: None };
            w.add_kv(0, slot, Floats::F32(&kv), Floats::F32(&kv))
                .unwrap();
        }
        w.finish().unwrap();
        let bytes = reader.join().unwrap().unwrap();
        let mut r = SackReader::from_bytes(bytes, "<pipe>").unwrap();
        r.verify().unwrap();
        assert_eq!(r.read_layer(1).unwrap().heads[1].positions, [1, 10]);
    }

    /// A batch of slots is checked whole before anything is written, and
    /// writes what the same slots added one by one write.
    #[test]
    fn a_batch_of_slots_writes_what_slot_by_slot_writes() {
        let h = small(KeptLayout::Shared);
        let keys: Vec<Vec<f32>> = (0..2)
            .map(|l| (0..16).map(|i| (l * 16 + i) as f32 * 0.37).collect())
            .collect();
        let slot = |layer| KvSlot { layer, head: None };
        let slots: Vec<SlotKv> = (0..2)
            .map(|l| SlotKv {
                slot: slot(l),
                keys: Floats::F32(&keys[l as usize]),
                values: Floats::F32(&keys[1 - l as usize]),
            })
            .collect();
        let start = || {
            let mut w =
                SackWriter::to_stream(Vec::new(), "mem", &h, WriteOptions::default()).unwrap();
            w.add_positions(0, KeptSet::Shared, &[1, 2]).unwrap();
            w
        };
        let mut batch = start();
        let twice = [slots[1], slots[1]];
        assert!(misuse(batch.add_kvs(0, &twice)).contains("already written"));
        batch.add_kvs(0, &slots).unwrap();
        let mut one_by_one = start();
        for s in &slots {
            one_by_one.add_kv(0, s.slot, s.keys, s.values).unwrap();
        }
        let bytes = |w: SackWriter<StreamSink<Vec<u8>>>| w.out.into_inner().unwrap().0;
        assert_eq!(bytes(batch), bytes(one_by_one));
    }

    fn write_one_segment(w: &mut SackWriter<AtomicFile>) {
        w.add_positions(0, KeptSet::Shared, &[5]).unwrap();
        for layer in 0..2 {
            let kv = [1.0f32; 8];
            let slot = KvSlot { layer, head: None };
            w.add_kv(0, slot, Floats::F32(&kv), Floats::F32(&kv))
                .unwrap();
        }
    }

    #[test]
    fn file_appears_only_when_finished_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.sack");
        let h = small(KeptLayout::Shared);
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };

        // Interrupted (dropped) mid-way: nothing under the final name, no debris.
        let mut w = SackWriter::create(&path, &h, WriteOptions::default()).unwrap();
        write_one_segment(&mut w);
        assert!(!path.exists());
        drop(w);
        assert!(listing().is_empty(), "{:?}", listing());

        // Finished: the file is there and complete.
        let mut w = SackWriter::create(&path, &h, WriteOptions::default()).unwrap();
        write_one_segment(&mut w);
        w.finish().unwrap();
        assert_eq!(listing(), ["doc.sack"]);
        let before = std::fs::read(&path).unwrap();
        SackReader::open(&path).unwrap().verify().unwrap();

        // A failed rewrite leaves the old file untouched.
        let mut w = SackWriter::create(&path, &h, WriteOptions::default()).unwrap();
        w.add_positions(0, KeptSet::Shared, &[5]).unwrap();
        assert!(w.finish().is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(listing(), ["doc.sack"]);
    }

    #[cfg(unix)]
    #[test]
    fn finished_files_get_the_usual_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.sack");
        let mut w =
            SackWriter::create(&path, &small(KeptLayout::Shared), WriteOptions::default()).unwrap();
        write_one_segment(&mut w);
        w.finish().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        assert_eq!(
            mode(&path),
            mode(&plain),
            "differs from a file created normally"
        );
    }
}
