//! How tensor values become payload bytes and back.
//!
//! An encoding turns values into a raw payload (little-endian floats, or
//! quantization parameters plus codes); the directory then says whether that
//! payload is stored as is or as one zstd frame.

pub mod compress;
pub mod quant;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

use quant::{Axis, Bits, Dims3, Quant};

/// Element type of a tensor once decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
    /// Unsigned 32-bit integer (positions).
    U32,
}

/// How a tensor's values are laid out in its payload (see `man/sack.5`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// Raw little-endian f32.
    #[serde(rename = "f32")]
    F32,
    /// Raw little-endian bf16.
    #[serde(rename = "bf16")]
    Bf16,
    /// Raw little-endian f16.
    #[serde(rename = "f16")]
    F16,
    /// 8-bit, groups along tokens within a channel (keys).
    #[serde(rename = "q8-channel")]
    Q8Channel,
    /// 8-bit, groups along channels within a token (values).
    #[serde(rename = "q8-token")]
    Q8Token,
    /// 4-bit, groups along tokens within a channel (keys).
    #[serde(rename = "q4-channel")]
    Q4Channel,
    /// 4-bit, groups along channels within a token (values).
    #[serde(rename = "q4-token")]
    Q4Token,
    /// Raw little-endian u32 (positions).
    #[serde(rename = "u32")]
    U32,
}

impl Encoding {
    /// The element type this encoding decodes to; quantized encodings decode to f32.
    pub fn dtype(self) -> Dtype {
        match self {
            Self::F32 | Self::Q8Channel | Self::Q8Token | Self::Q4Channel | Self::Q4Token => {
                Dtype::F32
            }
            Self::Bf16 => Dtype::Bf16,
            Self::F16 => Dtype::F16,
            Self::U32 => Dtype::U32,
        }
    }

    /// The quantization, for the quantized encodings.
    pub fn quant(self) -> Option<Quant> {
        let (bits, axis) = match self {
            Self::Q8Channel => (Bits::Eight, Axis::Channel),
            Self::Q8Token => (Bits::Eight, Axis::Token),
            Self::Q4Channel => (Bits::Four, Axis::Channel),
            Self::Q4Token => (Bits::Four, Axis::Token),
            Self::F32 | Self::Bf16 | Self::F16 | Self::U32 => return None,
        };
        Some(Quant { bits, axis })
    }

    /// The name used in the file and in `sac info`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Q8Channel => "q8-channel",
            Self::Q8Token => "q8-token",
            Self::Q4Channel => "q4-channel",
            Self::Q4Token => "q4-token",
            Self::U32 => "u32",
        }
    }

    /// Bytes per element of the raw encodings.
    fn width(self) -> Option<usize> {
        match self {
            Self::F32 | Self::U32 => Some(4),
            Self::Bf16 | Self::F16 => Some(2),
            Self::Q8Channel | Self::Q8Token | Self::Q4Channel | Self::Q4Token => None,
        }
    }

    /// Payload length (before compression) of a tensor of `shape`; `None` if
    /// the shape is empty, a product overflows, or a quantized encoding lacks a
    /// valid group size.
    pub fn payload_len(self, shape: &[u64], group: Option<u32>) -> Option<usize> {
        let dims = Dims3::of_shape(shape)?;
        match (self.quant(), self.width()) {
            (Some(q), _) => q.payload_len(dims, group?),
            (None, Some(w)) => dims.elements()?.checked_mul(w),
            (None, None) => None,
        }
    }
}

/// Whether the payload is stored as is or as one zstd frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Stored as is.
    None,
    /// One zstd frame.
    Zstd,
}

/// Float values handed to the writer, in the precision the model produced.
#[derive(Clone, Copy, Debug)]
pub enum Floats<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
    /// f16 values.
    F16(&'a [f16]),
}

impl<'a> Floats<'a> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn to_f32(self) -> Cow<'a, [f32]> {
        match self {
            Self::F32(v) => Cow::Borrowed(v),
            Self::Bf16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Self::F16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }
}

/// The storage precision the writer uses for keys and values; quantized
/// choices use per-channel groups for keys and per-token groups for values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvEncoding {
    /// Raw f32.
    F32,
    /// Raw bf16: lossless for bf16 models, half the bytes of f32.
    #[default]
    Bf16,
    /// Raw f16.
    F16,
    /// 8-bit codes, f16 (min, scale) per group of 32.
    Q8,
    /// 4-bit codes, f16 (min, scale) per group of 32.
    Q4,
}

impl KvEncoding {
    /// Every storage precision, lossless first.
    pub const ALL: [KvEncoding; 5] = [Self::F32, Self::Bf16, Self::F16, Self::Q8, Self::Q4];

    /// The file encoding for keys.
    pub fn for_keys(self) -> Encoding {
        match self {
            Self::Q8 => Encoding::Q8Channel,
            Self::Q4 => Encoding::Q4Channel,
            raw => raw.raw(),
        }
    }

    /// The file encoding for values.
    pub fn for_values(self) -> Encoding {
        match self {
            Self::Q8 => Encoding::Q8Token,
            Self::Q4 => Encoding::Q4Token,
            raw => raw.raw(),
        }
    }

    fn raw(self) -> Encoding {
        match self {
            Self::F32 => Encoding::F32,
            Self::F16 => Encoding::F16,
            Self::Bf16 | Self::Q8 | Self::Q4 => Encoding::Bf16,
        }
    }
}

/// Values of a decoded tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorValues {
    /// Keys and values, whatever their encoding (bf16 and f16 widen exactly).
    F32(Vec<f32>),
    /// Positions.
    U32(Vec<u32>),
}

/// Encodes float values of `shape` into a payload.
pub fn encode_floats(
    values: Floats<'_>,
    encoding: Encoding,
    shape: &[u64],
    group: Option<u32>,
) -> Result<Vec<u8>, String> {
    let dims = Dims3::of_shape(shape).ok_or("invalid shape")?;
    if dims.elements() != Some(values.len()) {
        return Err(format!("{} values given for shape {shape:?}", values.len()));
    }
    let le = |bytes: &mut Vec<u8>, b: &[u8]| bytes.extend_from_slice(b);
    let mut out = Vec::with_capacity(values.len() * encoding.width().unwrap_or(1));
    match (encoding, values) {
        (Encoding::F32, v) => v
            .to_f32()
            .iter()
            .for_each(|x| le(&mut out, &x.to_le_bytes())),
        (Encoding::Bf16, Floats::Bf16(v)) => v.iter().for_each(|x| le(&mut out, &x.to_le_bytes())),
        (Encoding::Bf16, v) => v
            .to_f32()
            .iter()
            .for_each(|&x| le(&mut out, &bf16::from_f32(x).to_le_bytes())),
        (Encoding::F16, Floats::F16(v)) => v.iter().for_each(|x| le(&mut out, &x.to_le_bytes())),
        (Encoding::F16, v) => v
            .to_f32()
            .iter()
            .for_each(|&x| le(&mut out, &f16::from_f32(x).to_le_bytes())),
        (Encoding::U32, _) => return Err("u32 is not a float encoding".into()),
        (e, v) => {
            let q = e.quant().ok_or("not a quantized encoding")?;
            out = q.encode(&v.to_f32(), dims, group.ok_or("missing group size")?)?;
        }
    }
    Ok(out)
}

/// Encodes positions (always `u32`).
pub fn encode_u32(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes a payload whose length the caller has checked against
/// [`Encoding::payload_len`]; a mismatch is still an error, never a panic.
pub fn decode(
    payload: &[u8],
    encoding: Encoding,
    shape: &[u64],
    group: Option<u32>,
) -> Result<TensorValues, String> {
    let expected = encoding
        .payload_len(shape, group)
        .ok_or("invalid shape or group size")?;
    if payload.len() != expected {
        return Err(format!(
            "payload is {} bytes, expected {expected}",
            payload.len()
        ));
    }
    let words = || payload.chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]);
    let halves = || payload.chunks_exact(2).map(|b| [b[0], b[1]]);
    Ok(match encoding {
        Encoding::F32 => TensorValues::F32(words().map(f32::from_le_bytes).collect()),
        Encoding::U32 => TensorValues::U32(words().map(u32::from_le_bytes).collect()),
        Encoding::Bf16 => {
            TensorValues::F32(halves().map(|b| bf16::from_le_bytes(b).to_f32()).collect())
        }
        Encoding::F16 => {
            TensorValues::F32(halves().map(|b| f16::from_le_bytes(b).to_f32()).collect())
        }
        e => {
            let q = e.quant().ok_or("not a quantized encoding")?;
            let dims = Dims3::of_shape(shape).ok_or("invalid shape")?;
            TensorValues::F32(q.decode(payload, dims, group.ok_or("missing group size")?)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_encodings_round_trip_exactly_within_their_precision() {
        let v = [1.0f32, -2.5, 0.333_333_34, 1e-3, 65504.0, -0.0];
        let shape = [2, 3];
        for e in [Encoding::F32, Encoding::Bf16, Encoding::F16] {
            let bytes = encode_floats(Floats::F32(&v), e, &shape, None).unwrap();
            assert_eq!(Some(bytes.len()), e.payload_len(&shape, None));
            let TensorValues::F32(out) = decode(&bytes, e, &shape, None).unwrap() else {
                panic!("floats decode to f32");
            };
            for (a, b) in v.iter().zip(&out) {
                let tol = match e {
                    Encoding::F32 => 0.0,
                    Encoding::F16 => a.abs() * 1e-3,
                    _ => a.abs() * 1e-2,
                };
                assert!((a - b).abs() <= tol, "{e:?}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn half_inputs_are_copied_bit_for_bit() {
        let v: Vec<bf16> = [0.1f32, 7.0, -3.3]
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        let bytes = encode_floats(Floats::Bf16(&v), Encoding::Bf16, &[3], None).unwrap();
        let expect: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(bytes, expect);
    }

    #[test]
    fn u32_round_trips() {
        let v = [0u32, 7, u32::MAX];
        let TensorValues::U32(out) = decode(&encode_u32(&v), Encoding::U32, &[3], None).unwrap()
        else {
            panic!("u32 decodes to u32");
        };
        assert_eq!(out, v);
    }

    #[test]
    fn lengths_and_shapes_are_checked() {
        assert!(encode_floats(Floats::F32(&[1.0]), Encoding::F32, &[2], None).is_err());
        assert!(decode(&[0; 7], Encoding::F32, &[2], None).is_err());
        assert!(decode(&[], Encoding::F32, &[], None).is_err());
        assert!(decode(&[0; 8], Encoding::Q8Token, &[2], None).is_err());
        assert_eq!(Encoding::F32.payload_len(&[u64::MAX, 2], None), None);
    }

    #[test]
    fn names_match_the_json_spelling() {
        for e in [Encoding::Q4Channel, Encoding::Bf16, Encoding::U32] {
            assert_eq!(
                serde_json::to_string(&e).unwrap(),
                format!("\"{}\"", e.name())
            );
        }
    }
}
