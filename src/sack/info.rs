//! `sac info`: what a `.sack` holds and what it costs, from the header and the
//! directory alone (no payload is read, so this is instant on any file size).

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::sack::encoding::Compression;
use crate::sack::error::{Result, SackError};
use crate::sack::format::directory::TensorName;
use crate::sack::format::header::{KeptLayout, KeyRope, SackHeader};
use crate::sack::reader::SackReader;

/// Output style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfoFormat {
    /// Aligned text for people.
    Human,
    /// One JSON object for programs.
    Json,
}

/// Everything `sac info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary<'a> {
    /// The file's name.
    pub file: &'a str,
    /// Size in bytes.
    pub file_bytes: u64,
    /// Format version, `major.minor`.
    pub format_version: String,
    /// The header as stored.
    pub header: &'a SackHeader,
    /// Number of segments (compressor chunks).
    pub segments: u32,
    /// Number of tensors in the directory.
    pub tensors: usize,
    /// Mean number of tokens a KV head keeps (equal for all heads unless the
    /// layout is ragged); 0 for a file of soft tokens.
    pub kept_per_head: f64,
    /// Soft tokens, for a file that holds them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_tokens: Option<u64>,
    /// Stored bytes per (role, encoding, compression).
    pub storage: Vec<StorageLine>,
    /// Stored bytes of keys and values together (or of the soft tokens).
    pub kv_bytes: u64,
    /// File bytes per token of the source document.
    pub bytes_per_document_token: f64,
    /// File bytes per kept position (per [`Summary::kept_per_head`]), or
    /// per soft token.
    pub bytes_per_kept_position: f64,
    /// Bytes of the full bf16 KV cache of the document (see [`SackHeader::full_bf16_kv_bytes`]).
    pub full_bf16_kv_bytes: u64,
    /// `full_bf16_kv_bytes / file_bytes`.
    pub compression_ratio: f64,
}

/// Stored size of the tensors of one role with one encoding.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct StorageLine {
    /// `keys`, `values` or `positions`.
    pub role: &'static str,
    /// Encoding name.
    pub encoding: &'static str,
    /// Whether zstd is applied.
    pub zstd: bool,
    /// Number of tensors.
    pub tensors: u64,
    /// Bytes in the file.
    pub stored_bytes: u64,
    /// Bytes before compression.
    pub payload_bytes: u64,
}

impl<'a> Summary<'a> {
    /// Summarises an open file.
    pub fn of<R>(reader: &'a SackReader<R>) -> Self {
        let header = reader.header();
        let m = &header.model;
        let mut lines: BTreeMap<(&'static str, &'static str, bool), StorageLine> = BTreeMap::new();
        let mut kv_bytes = 0u64;
        let mut key_vectors = 0u64;
        let mut soft = 0u64;
        for e in reader.tensors() {
            let role = match e.name {
                TensorName::Positions { .. } => "positions",
                TensorName::Key { .. } => "keys",
                TensorName::Value { .. } => "values",
                TensorName::Soft { .. } => {
                    soft = soft.saturating_add(e.kept(header.kv.layout));
                    "soft"
                }
            };
            if let TensorName::Key { .. } = e.name {
                // [kv_heads, n, head_dim] covers every head; [n, head_dim] one.
                let heads = match e.shape.as_slice() {
                    [heads, _, _] => *heads,
                    _ => 1,
                };
                key_vectors =
                    key_vectors.saturating_add(heads.saturating_mul(e.kept(header.kv.layout)));
            }
            if role != "positions" {
                kv_bytes = kv_bytes.saturating_add(e.stored_len);
            }
            let zstd = e.compression == Compression::Zstd;
            let line = lines
                .entry((role, e.encoding.name(), zstd))
                .or_insert_with(|| StorageLine {
                    role,
                    encoding: e.encoding.name(),
                    zstd,
                    tensors: 0,
                    stored_bytes: 0,
                    payload_bytes: 0,
                });
            line.tensors += 1;
            line.stored_bytes = line.stored_bytes.saturating_add(e.stored_len);
            line.payload_bytes = line
                .payload_bytes
                .saturating_add(e.payload_len().map_or(0, |l| l as u64));
        }
        let kept_per_head = key_vectors as f64 / (f64::from(m.layers) * f64::from(m.kv_heads));
        let file_bytes = reader.file_len();
        let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
        let (major, minor) = reader.format_version();
        let soft_tokens = header.soft_tokens.map(|_| soft);
        let kept = soft_tokens.map_or(kept_per_head, |n| n as f64);
        Self {
            file: reader.file_name(),
            file_bytes,
            format_version: format!("{major}.{minor}"),
            header,
            segments: reader.segments(),
            tensors: reader.tensors().len(),
            kept_per_head,
            soft_tokens,
            storage: lines.into_values().collect(),
            kv_bytes,
            bytes_per_document_token: ratio(file_bytes as f64, header.document.tokens as f64),
            bytes_per_kept_position: ratio(file_bytes as f64, kept),
            full_bf16_kv_bytes: header.full_bf16_kv_bytes(),
            compression_ratio: ratio(header.full_bf16_kv_bytes() as f64, file_bytes as f64),
        }
    }
}

/// Writes the summary of `reader` to `out`.
pub fn render<R>(reader: &SackReader<R>, out: &mut impl Write, format: InfoFormat) -> Result<()> {
    let summary = Summary::of(reader);
    let written = match format {
        InfoFormat::Json => serde_json::to_writer_pretty(&mut *out, &summary)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out)),
        InfoFormat::Human => write_human(&summary, out),
    };
    written.map_err(|source| SackError::Io {
        file: summary.file.into(),
        action: "writing the summary".into(),
        source,
    })
}

/// Strings come from an untrusted file: escape control characters so a
/// crafted name cannot drive the terminal.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Bytes in the largest binary unit that keeps the number at least 1.
fn human(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.1} TiB")
}

fn write_human(s: &Summary<'_>, out: &mut impl Write) -> std::io::Result<()> {
    let h = s.header;
    let m = &h.model;
    let c = &h.compressor;
    let d = &h.document;
    writeln!(out, "file        {}", clean(s.file))?;
    writeln!(
        out,
        "size        {} bytes ({})",
        s.file_bytes,
        human(s.file_bytes)
    )?;
    writeln!(
        out,
        "format      .sack {}, written by {} at {}",
        s.format_version,
        clean(&h.producer),
        clean(&h.created)
    )?;
    let mut revision = m
        .revision
        .as_deref()
        .map(|r| format!(" at revision {}", clean(r)))
        .unwrap_or_default();
    if let Some(file) = &m.file {
        revision.push_str(&format!(", file {}", clean(file)));
    }
    writeln!(
        out,
        "model       {}{revision} ({})",
        clean(&m.id),
        clean(&m.fingerprint)
    )?;
    writeln!(
        out,
        "            {} layers, {} KV heads, head_dim {}",
        m.layers, m.kv_heads, m.head_dim
    )?;
    writeln!(out, "tokenizer   {}", clean(&h.tokenizer.fingerprint))?;
    writeln!(
        out,
        "compressor  {}, ratio {}, chunk {} tokens, adapter {}",
        clean(&c.method),
        c.ratio,
        c.chunk_size,
        c.adapter_fingerprint
            .as_deref()
            .map_or("none".into(), clean)
    )?;
    writeln!(
        out,
        "document    {}{} tokens, {} bytes, sha256 {}",
        d.name
            .as_deref()
            .map_or(String::new(), |n| format!("{}: ", clean(n))),
        d.tokens,
        d.bytes,
        clean(&d.sha256)
    )?;
    match (h.soft_tokens, s.soft_tokens) {
        (Some(soft), Some(n)) => writeln!(
            out,
            "soft        {n} soft tokens of width {}, read as input embeddings from position \
             {}, {} segments",
            soft.hidden, h.decoder.first_position, s.segments
        )?,
        _ => write_kept(s, out)?,
    }
    if let Some(a) = &h.decoder.adapter {
        writeln!(
            out,
            "decoder     with the LoRA of adapter {} ({}), which answers need",
            clean(&a.id),
            clean(&a.fingerprint)
        )?;
    }
    match &h.decoder.prompt {
        None => writeln!(
            out,
            "prompt      raw (### Context / ### Question / ### Answer)"
        )?,
        Some(p) => writeln!(
            out,
            "prompt      {}: question between {:?} and {:?}",
            clean(&p.format),
            p.before_question,
            p.after_question
        )?,
    }
    for (i, line) in s.storage.iter().enumerate() {
        writeln!(
            out,
            "{:<12}{:<10} {:<11} {:<5} {:>6} tensors {:>14} bytes",
            if i == 0 { "storage" } else { "" },
            line.role,
            line.encoding,
            if line.zstd { "zstd" } else { "raw" },
            line.tensors,
            line.stored_bytes
        )?;
    }
    let per = if s.soft_tokens.is_some() {
        "soft token"
    } else {
        "kept position"
    };
    writeln!(
        out,
        "cost        {:.1} bytes per document token, {:.1} bytes per {per}",
        s.bytes_per_document_token, s.bytes_per_kept_position
    )?;
    writeln!(
        out,
        "ratio       {:.1}x smaller than the full bf16 KV cache ({} bytes, {})",
        s.compression_ratio,
        s.full_bf16_kv_bytes,
        human(s.full_bf16_kv_bytes)
    )
}

/// The kept positions and what the keys carry, for a file of K/V.
fn write_kept(s: &Summary<'_>, out: &mut impl Write) -> std::io::Result<()> {
    let h = s.header;
    let layout = match h.kv.layout {
        KeptLayout::Shared => "one kept set shared by all layers and heads",
        KeptLayout::PerLayer => "one kept set per layer",
        KeptLayout::PerHead => "one kept set per layer and KV head",
    };
    writeln!(
        out,
        "kept        {:.1} positions per head, {layout}, {} segments",
        s.kept_per_head, s.segments
    )?;
    let rope = match h.kv.key_rope {
        KeyRope::None => "stored before RoPE (re-apply at the kept or other positions)",
        KeyRope::Kept => "RoPE applied at the kept positions",
        KeyRope::Sequential => "RoPE applied at 0, 1, 2, … in kept order",
    };
    writeln!(out, "keys        {rope}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sack::format::header::tests::sample;
    use crate::sack::writer::{SackWriter, WriteOptions};

    #[test]
    fn sizes_use_the_largest_fitting_unit() {
        assert_eq!(human(10), "10.0 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn strings_from_the_file_cannot_drive_the_terminal() {
        let mut h = sample(KeptLayout::Shared);
        h.document.name = Some("evil\x1b[2J\u{7}.txt".into());
        let mut bytes = Vec::new();
        SackWriter::to_stream(&mut bytes, "mem", &h, WriteOptions::default())
            .unwrap()
            .finish()
            .unwrap();
        let reader = SackReader::from_bytes(bytes, "mem").unwrap();
        let mut out = Vec::new();
        render(&reader, &mut out, InfoFormat::Human).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r"evil\u{1b}[2J\u{7}.txt"), "{text}");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn empty_files_report_zero_costs_without_dividing_by_zero() {
        let mut bytes = Vec::new();
        SackWriter::to_stream(
            &mut bytes,
            "mem",
            &sample(KeptLayout::PerHead),
            WriteOptions::default(),
        )
        .unwrap()
        .finish()
        .unwrap();
        let reader = SackReader::from_bytes(bytes, "mem").unwrap();
        let s = Summary::of(&reader);
        assert_eq!(
            (s.kept_per_head, s.bytes_per_kept_position, s.kv_bytes),
            (0.0, 0.0, 0)
        );
        assert!(s.compression_ratio > 1.0);
    }
}
