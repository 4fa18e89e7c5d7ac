//! The tensor directory: one entry per stored tensor, written after the last
//! payload so that tensors can be streamed out as they are produced.
//!
//! Tensor names carry their role, so the directory is self-describing:
//!
//! ```text
//! pos.s{S}            kept positions of segment S, layout shared
//! pos.l{L}.s{S}       … of layer L, layout per_layer
//! pos.l{L}.h{H}.s{S}  … of layer L, KV head H, layout per_head
//! key.l{L}.s{S}       keys of layer L, segment S: [kv_heads, n, head_dim]
//! key.l{L}.h{H}.s{S}  keys of layer L, head H, segment S: [n, head_dim] (per_head)
//! value.…             values, named like keys
//! soft.s{S}           soft tokens of segment S: [n, hidden] (files with
//!                     header `soft_tokens`, which hold nothing else)
//! ```
//!
//! A segment is a slice of every kept set written together (a compressor
//! chunk); concatenating segments 0, 1, … gives the whole set.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::header::{KeptLayout, SackHeader};
use crate::sack::encoding::compress::expansion_allowed;
use crate::sack::encoding::quant::MAX_GROUP_SIZE;
use crate::sack::encoding::{Compression, Dtype, Encoding};

/// Most tensors a directory may list (the directory is at most 256 MiB).
pub const MAX_TENSORS: usize = 1 << 22;

/// A set of kept positions: which layers and heads it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeptSet {
    /// All layers and heads (layout `shared`).
    Shared,
    /// One layer, all its heads (layout `per_layer`).
    Layer(u32),
    /// One head of one layer (layout `per_head`).
    Head {
        /// Layer index.
        layer: u32,
        /// KV head index.
        head: u32,
    },
}

/// Where a key or value tensor belongs: a layer, and a head in the `per_head` layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvSlot {
    /// Layer index.
    pub layer: u32,
    /// KV head index; `Some` exactly when the layout is `per_head`.
    pub head: Option<u32>,
}

impl KeptLayout {
    /// The kept set whose positions apply to `slot`, if `slot` fits this layout.
    pub fn set_of(self, slot: KvSlot) -> Option<KeptSet> {
        match (self, slot.head) {
            (Self::Shared, None) => Some(KeptSet::Shared),
            (Self::PerLayer, None) => Some(KeptSet::Layer(slot.layer)),
            (Self::PerHead, Some(head)) => Some(KeptSet::Head {
                layer: slot.layer,
                head,
            }),
            _ => None,
        }
    }

    /// Whether `set` is a set of this layout.
    pub fn holds(self, set: KeptSet) -> bool {
        matches!(
            (self, set),
            (Self::Shared, KeptSet::Shared)
                | (Self::PerLayer, KeptSet::Layer(_))
                | (Self::PerHead, KeptSet::Head { .. })
        )
    }
}

/// What a tensor is, and so its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorName {
    /// Kept positions (`u32`, strictly increasing, below the document's token count).
    Positions {
        /// The kept set.
        set: KeptSet,
        /// Segment index.
        segment: u32,
    },
    /// Keys.
    Key {
        /// Layer and head.
        slot: KvSlot,
        /// Segment index.
        segment: u32,
    },
    /// Values.
    Value {
        /// Layer and head.
        slot: KvSlot,
        /// Segment index.
        segment: u32,
    },
    /// Soft tokens.
    Soft {
        /// Segment index.
        segment: u32,
    },
}

impl TensorName {
    /// The segment the tensor belongs to.
    pub fn segment(self) -> u32 {
        match self {
            Self::Positions { segment, .. }
            | Self::Key { segment, .. }
            | Self::Value { segment, .. }
            | Self::Soft { segment } => segment,
        }
    }
}

impl fmt::Display for TensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, layer, head, segment) = match *self {
            Self::Positions { set, segment } => match set {
                KeptSet::Shared => ("pos", None, None, segment),
                KeptSet::Layer(l) => ("pos", Some(l), None, segment),
                KeptSet::Head { layer, head } => ("pos", Some(layer), Some(head), segment),
            },
            Self::Key { slot, segment } => ("key", Some(slot.layer), slot.head, segment),
            Self::Value { slot, segment } => ("value", Some(slot.layer), slot.head, segment),
            Self::Soft { segment } => ("soft", None, None, segment),
        };
        f.write_str(kind)?;
        if let Some(l) = layer {
            write!(f, ".l{l}")?;
        }
        if let Some(h) = head {
            write!(f, ".h{h}")?;
        }
        write!(f, ".s{segment}")
    }
}

impl FromStr for TensorName {
    type Err = String;

    /// Parses the grammar of the module docs exactly: decimal numbers without
    /// leading zeros, so every tensor has one spelling.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid tensor name {:?}",
                s.chars().take(80).collect::<String>()
            )
        };
        let number = |part: &str, tag: char| -> Option<u32> {
            let digits = part.strip_prefix(tag)?;
            let canonical = digits == "0" || (!digits.starts_with('0') && !digits.is_empty());
            if canonical && digits.bytes().all(|b| b.is_ascii_digit()) {
                digits.parse().ok()
            } else {
                None
            }
        };
        let parts: Vec<&str> = s.split('.').collect();
        let (kind, rest) = parts.split_first().ok_or_else(bad)?;
        let (segment, middle) = rest.split_last().ok_or_else(bad)?;
        let segment = number(segment, 's').ok_or_else(bad)?;
        let (layer, head) = match middle {
            [] => (None, None),
            [l] => (Some(number(l, 'l').ok_or_else(bad)?), None),
            [l, h] => (
                Some(number(l, 'l').ok_or_else(bad)?),
                Some(number(h, 'h').ok_or_else(bad)?),
            ),
            _ => return Err(bad()),
        };
        match (*kind, layer, head) {
            ("pos", None, None) => Ok(Self::Positions {
                set: KeptSet::Shared,
                segment,
            }),
            ("pos", Some(l), None) => Ok(Self::Positions {
                set: KeptSet::Layer(l),
                segment,
            }),
            ("pos", Some(layer), Some(head)) => Ok(Self::Positions {
                set: KeptSet::Head { layer, head },
                segment,
            }),
            ("key", Some(layer), head) => Ok(Self::Key {
                slot: KvSlot { layer, head },
                segment,
            }),
            ("value", Some(layer), head) => Ok(Self::Value {
                slot: KvSlot { layer, head },
                segment,
            }),
            ("soft", None, None) => Ok(Self::Soft { segment }),
            _ => Err(bad()),
        }
    }
}

impl Serialize for TensorName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TensorName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// What the tensor is.
    pub name: TensorName,
    /// Element type once decoded; must be the one the encoding implies.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Payload layout.
    pub encoding: Encoding,
    /// Elements per quantization group; present exactly for quantized encodings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u32>,
    /// Whether the payload is zstd-compressed.
    pub compression: Compression,
    /// Offset of the stored bytes from the start of the file.
    pub offset: u64,
    /// Number of stored bytes.
    pub stored_len: u64,
    /// CRC-32 of the stored bytes.
    pub crc32: u32,
}

impl TensorEntry {
    /// Length of the payload once decompressed; valid for entries that passed
    /// [`validate`] (which checks it exists).
    pub fn payload_len(&self) -> Option<usize> {
        self.encoding.payload_len(&self.shape, self.group_size)
    }

    /// Number of kept tokens the tensor covers (`n` in its shape).
    pub fn kept(&self, layout: KeptLayout) -> u64 {
        let axis = match (self.name, layout) {
            (TensorName::Positions { .. } | TensorName::Soft { .. }, _)
            | (_, KeptLayout::PerHead) => 0,
            _ => 1,
        };
        self.shape.get(axis).copied().unwrap_or(0)
    }
}

/// The directory as stored: a JSON object so that later minor versions can add keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// Entries in file order.
    pub tensors: Vec<TensorEntry>,
}

/// Lookup structure built by [`validate`].
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Entry index by name.
    pub by_name: HashMap<TensorName, usize>,
    /// Number of segments; every kept set and slot has one tensor per segment.
    pub segments: u32,
}

/// Checks every rule of the directory against the header and the byte range the
/// payloads must tile exactly (`data` = end of header CRC .. directory offset).
/// Nothing here allocates more than the directory's own size.
pub fn validate(
    header: &SackHeader,
    tensors: &[TensorEntry],
    data: std::ops::Range<u64>,
) -> Result<Index, String> {
    if tensors.len() > MAX_TENSORS {
        return Err(format!(
            "directory lists {} tensors, more than {MAX_TENSORS}",
            tensors.len()
        ));
    }
    let mut index = Index::default();
    for (i, entry) in tensors.iter().enumerate() {
        check_entry(header, entry).map_err(|e| format!("tensor {}: {e}", entry.name))?;
        if index.by_name.insert(entry.name, i).is_some() {
            return Err(format!("tensor {} is listed twice", entry.name));
        }
        index.segments = index.segments.max(entry.name.segment().saturating_add(1));
    }
    check_tiling(tensors, data)?;
    check_grid(header, tensors, &index)?;
    Ok(index)
}

/// Rules one entry must follow on its own.
fn check_entry(header: &SackHeader, e: &TensorEntry) -> Result<(), String> {
    let m = &header.model;
    let layout = header.kv.layout;
    let in_model =
        |layer: u32, head: Option<u32>| layer < m.layers && head.is_none_or(|h| h < m.kv_heads);
    let n = e.kept(layout);
    let soft = header.soft_tokens;
    if soft.is_some() != matches!(e.name, TensorName::Soft { .. }) {
        return Err("a file holds either soft tokens (header soft_tokens) or K/V, not both".into());
    }
    let expected_shape: Vec<u64> = match e.name {
        TensorName::Soft { .. } => {
            if matches!(
                e.encoding,
                Encoding::U32 | Encoding::Q8Channel | Encoding::Q4Channel
            ) {
                return Err("soft tokens need a float or per-token quantized encoding".into());
            }
            vec![n, u64::from(soft.map_or(0, |s| s.hidden))]
        }
        TensorName::Positions { set, .. } => {
            let (layer, head) = match set {
                KeptSet::Shared => (0, None),
                KeptSet::Layer(l) => (l, None),
                KeptSet::Head { layer, head } => (layer, Some(head)),
            };
            if !layout.holds(set) || !in_model(layer, head) {
                return Err("kept set does not fit the header's layout and model".into());
            }
            if e.encoding != Encoding::U32 {
                return Err("positions must use the u32 encoding".into());
            }
            vec![n]
        }
        TensorName::Key { slot, .. } | TensorName::Value { slot, .. } => {
            if layout.set_of(slot).is_none() || !in_model(slot.layer, slot.head) {
                return Err("layer or head does not fit the header's layout and model".into());
            }
            if e.encoding == Encoding::U32 {
                return Err("keys and values need a float encoding".into());
            }
            match slot.head {
                Some(_) => vec![n, u64::from(m.head_dim)],
                None => vec![u64::from(m.kv_heads), n, u64::from(m.head_dim)],
            }
        }
    };
    if e.shape != expected_shape {
        return Err(format!("shape {:?}, expected {expected_shape:?}", e.shape));
    }
    if n > header.document.tokens {
        return Err(format!(
            "keeps {n} tokens of a {}-token document",
            header.document.tokens
        ));
    }
    if e.dtype != e.encoding.dtype() {
        return Err(format!(
            "dtype {:?} does not match encoding {}",
            e.dtype,
            e.encoding.name()
        ));
    }
    match (e.encoding.quant(), e.group_size) {
        (Some(_), Some(g)) if (1..=MAX_GROUP_SIZE).contains(&g) => {}
        (None, None) => {}
        _ => {
            return Err(
                "group_size must be 1..=65536 for quantized encodings and absent otherwise".into(),
            );
        }
    }
    let payload = e.payload_len().ok_or("shape is too large")? as u64;
    match e.compression {
        Compression::None if e.stored_len != payload => Err(format!(
            "uncompressed payload is {} bytes, expected {payload}",
            e.stored_len
        )),
        Compression::Zstd if !expansion_allowed(e.stored_len, payload) => Err(format!(
            "{} zstd bytes cannot expand to the {payload} bytes the shape needs",
            e.stored_len
        )),
        Compression::None | Compression::Zstd => Ok(()),
    }
}

/// Payloads must follow each other without gaps or overlap and exactly fill `data`:
/// a byte inserted or lost anywhere is caught here, before any payload is read.
fn check_tiling(tensors: &[TensorEntry], data: std::ops::Range<u64>) -> Result<(), String> {
    let mut spans: Vec<(u64, u64, TensorName)> = tensors
        .iter()
        .map(|e| (e.offset, e.stored_len, e.name))
        .collect();
    spans.sort_unstable();
    let mut at = data.start;
    for (offset, len, name) in spans {
        if offset != at {
            return Err(format!(
                "tensor {name} starts at byte {offset}, expected {at} (payloads must be contiguous)"
            ));
        }
        at = offset
            .checked_add(len)
            .filter(|&end| end <= data.end)
            .ok_or_else(|| format!("tensor {name} runs past the start of the directory"))?;
    }
    if at != data.end {
        return Err(format!(
            "payloads end at byte {at} but the directory starts at {}",
            data.end
        ));
    }
    Ok(())
}

/// Every segment must hold a positions tensor for every kept set and a key and
/// a value for every slot, with the same `n` as their positions, and no kept
/// set may hold more tokens than the document.
fn check_grid(header: &SackHeader, tensors: &[TensorEntry], index: &Index) -> Result<(), String> {
    let m = &header.model;
    let layout = header.kv.layout;
    if header.soft_tokens.is_some() {
        // Names are unique and every one is a soft tensor (`check_entry`).
        let total = tensors
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.kept(layout)));
        if total > header.document.tokens {
            return Err(format!(
                "{total} soft tokens for a {}-token document",
                header.document.tokens
            ));
        }
        if tensors.len() as u64 != u64::from(index.segments) {
            return Err(format!(
                "directory is incomplete: {} segments need a soft tensor each; found {}",
                index.segments,
                tensors.len()
            ));
        }
        return Ok(());
    }
    let (sets, slots) = match layout {
        KeptLayout::Shared => (1, u64::from(m.layers)),
        KeptLayout::PerLayer => (u64::from(m.layers), u64::from(m.layers)),
        KeptLayout::PerHead => {
            let n = u64::from(m.layers) * u64::from(m.kv_heads);
            (n, n)
        }
    };
    let segments = u64::from(index.segments);
    let (mut pos, mut keys, mut values) = (0u64, 0u64, 0u64);
    let mut totals: HashMap<KeptSet, u64> = HashMap::new();
    for e in tensors {
        let n = e.kept(layout);
        match e.name {
            TensorName::Positions { set, .. } => {
                pos += 1;
                let total = totals.entry(set).or_default();
                *total = total.saturating_add(n);
                if *total > header.document.tokens {
                    return Err(format!(
                        "kept set of {} holds more positions than the document has tokens",
                        e.name
                    ));
                }
            }
            // Refused in a K/V file by `check_entry`.
            TensorName::Soft { .. } => {}
            TensorName::Key { slot, segment } | TensorName::Value { slot, segment } => {
                if matches!(e.name, TensorName::Key { .. }) {
                    keys += 1;
                } else {
                    values += 1;
                }
                let set = layout.set_of(slot).ok_or("slot does not fit the layout")?;
                let positions = index
                    .by_name
                    .get(&TensorName::Positions { set, segment })
                    .and_then(|&i| tensors.get(i))
                    .ok_or_else(|| format!("tensor {} has no positions tensor", e.name))?;
                if positions.kept(layout) != n {
                    return Err(format!(
                        "tensor {} holds {n} tokens but its positions hold {}",
                        e.name,
                        positions.kept(layout)
                    ));
                }
            }
        }
    }
    // Names are unique and in range, so matching counts mean no cell is missing.
    let complete = segments.checked_mul(sets) == Some(pos)
        && segments.checked_mul(slots) == Some(keys)
        && segments.checked_mul(slots) == Some(values);
    if !complete {
        return Err(format!(
            "directory is incomplete: {segments} segments need {sets} positions tensors and \
             {slots} key and value tensors each; found {pos} positions, {keys} keys, {values} values"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            "pos.s0",
            "pos.l3.s12",
            "pos.l3.h7.s1",
            "key.l0.s0",
            "key.l15.h7.s4294967295",
            "value.l2.s9",
            "soft.s3",
        ] {
            let name: TensorName = s.parse().unwrap();
            assert_eq!(name.to_string(), s);
        }
    }

    #[test]
    fn non_canonical_names_are_refused() {
        for s in [
            "",
            "pos",
            "pos.s",
            "pos.s01",
            "pos.s-1",
            "pos.s+1",
            "key.s0",
            "key.h1.s0",
            "key.l1.h1.x.s0",
            "bias.l0.s0",
            "pos.s4294967296",
            "pos.l1.h2",
            "key.l٣.s0",
            "value.l0.h.s0",
            "pos.S0",
        ] {
            assert!(s.parse::<TensorName>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn layouts_map_slots_to_sets() {
        let slot = KvSlot {
            layer: 2,
            head: None,
        };
        assert_eq!(KeptLayout::Shared.set_of(slot), Some(KeptSet::Shared));
        assert_eq!(KeptLayout::PerLayer.set_of(slot), Some(KeptSet::Layer(2)));
        assert_eq!(KeptLayout::PerHead.set_of(slot), None);
        let slot = KvSlot {
            layer: 2,
            head: Some(1),
        };
        assert_eq!(
            KeptLayout::PerHead.set_of(slot),
            Some(KeptSet::Head { layer: 2, head: 1 })
        );
        assert_eq!(KeptLayout::Shared.set_of(slot), None);
    }

    #[test]
    fn tiling_must_be_exact() {
        let entry = |name: &str, offset, stored_len| TensorEntry {
            name: name.parse().unwrap(),
            dtype: Dtype::U32,
            shape: vec![1],
            encoding: Encoding::U32,
            group_size: None,
            compression: Compression::None,
            offset,
            stored_len,
            crc32: 0,
        };
        let ok = [entry("pos.s1", 14, 4), entry("pos.s0", 10, 4)];
        check_tiling(&ok, 10..18).unwrap();
        assert!(check_tiling(&ok, 10..19).is_err());
        assert!(check_tiling(&ok, 9..18).is_err());
        let overlap = [entry("pos.s0", 10, 4), entry("pos.s1", 13, 5)];
        assert!(check_tiling(&overlap, 10..18).is_err());
        let wrap = [entry("pos.s0", 10, u64::MAX)];
        assert!(check_tiling(&wrap, 10..18).is_err());
    }
}
