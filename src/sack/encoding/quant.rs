//! 8-bit and 4-bit asymmetric quantization with one (min, scale) pair per group.
//!
//! Following KIVI and KVQuant, keys are grouped per channel (a group is up to
//! [`GROUP_SIZE`] consecutive tokens of one channel: key outliers live in
//! fixed channels, so a channel shares a range) and values per token (a group
//! is up to [`GROUP_SIZE`] consecutive channels of one token). Either grouping
//! works on any tensor, viewed as `[outer, tokens, channels]`.
//!
//! `min` and `scale` are f16 to keep the overhead at 4 bytes per group. They
//! are rounded outward (min down, scale up) so that `[min, min + levels·scale]`
//! still covers the group, which keeps every element within half a step of its
//! original. Values must therefore be finite and within the f16 range.
//!
//! Payload: `min[groups]` (f16 LE) ‖ `scale[groups]` (f16 LE) ‖ codes in
//! row-major element order, 8-bit one per byte, 4-bit two per byte low nibble
//! first (a trailing unused nibble is 0). Decoding is `min + code · scale` in f32.

use half::f16;

/// Group size the writer uses for both axes; 32 is KIVI's choice, and with f16
/// parameters costs 1 bit per element (8-bit: 9 bits, 4-bit: 5 bits).
pub const GROUP_SIZE: u32 = 32;
/// Largest group size a reader accepts.
pub const MAX_GROUP_SIZE: u32 = 1 << 16;

/// Code width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    /// 256 levels.
    Eight,
    /// 16 levels.
    Four,
}

impl Bits {
    /// The largest code, as the float the arithmetic uses.
    fn levels(self) -> f32 {
        match self {
            Self::Eight => 255.0,
            Self::Four => 15.0,
        }
    }

    fn code_bytes(self, elements: usize) -> usize {
        match self {
            Self::Eight => elements,
            Self::Four => elements.div_ceil(2),
        }
    }
}

/// Which elements share a (min, scale) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// Up to `group` consecutive tokens of one channel (keys).
    Channel,
    /// Up to `group` consecutive channels of one token (values).
    Token,
}

/// A tensor viewed as `[outer, tokens, channels]`: channels is the last
/// dimension, tokens the one before (1 for a vector), outer the product of the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims3 {
    /// Product of the leading dimensions.
    pub outer: usize,
    /// Second-to-last dimension.
    pub tokens: usize,
    /// Last dimension.
    pub channels: usize,
}

impl Dims3 {
    /// Views `shape`; `None` for a scalar or if a product overflows.
    pub fn of_shape(shape: &[u64]) -> Option<Self> {
        let (&channels, lead) = shape.split_last()?;
        let (tokens, outer) = match lead.split_last() {
            Some((&t, rest)) => (t, rest),
            None => (1, lead),
        };
        let outer = outer.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        let dims = Self {
            outer: usize::try_from(outer).ok()?,
            tokens: usize::try_from(tokens).ok()?,
            channels: usize::try_from(channels).ok()?,
        };
        dims.elements()?;
        Some(dims)
    }

    /// Number of elements, `None` on overflow.
    pub fn elements(self) -> Option<usize> {
        self.outer
            .checked_mul(self.tokens)?
            .checked_mul(self.channels)
    }
}

/// The grouping of one tensor: how many groups and which group an element is in.
#[derive(Clone, Copy, Debug)]
struct Groups {
    dims: Dims3,
    axis: Axis,
    size: usize,
}

impl Groups {
    /// `None` if the group size is 0 or the count overflows.
    fn new(dims: Dims3, axis: Axis, size: u32) -> Option<Self> {
        let size = usize::try_from(size).ok().filter(|&s| s > 0)?;
        let groups = Self { dims, axis, size };
        groups.count()?;
        Some(groups)
    }

    /// Channel axis: `outer × ⌈tokens/size⌉ × channels`, ordered so the groups
    /// of one block of tokens form a row of `channels`. Token axis:
    /// `outer × tokens × ⌈channels/size⌉`.
    fn count(self) -> Option<usize> {
        let Dims3 {
            outer,
            tokens,
            channels,
        } = self.dims;
        match self.axis {
            Axis::Channel => outer
                .checked_mul(tokens.div_ceil(self.size))?
                .checked_mul(channels),
            Axis::Token => outer
                .checked_mul(tokens)?
                .checked_mul(channels.div_ceil(self.size)),
        }
    }

    /// Group of the element at row-major index `i` (which is below the element count).
    fn of(self, i: usize) -> usize {
        let Dims3 {
            tokens, channels, ..
        } = self.dims;
        let c = i % channels;
        let row = i / channels;
        let (o, t) = (row / tokens, row % tokens);
        match self.axis {
            Axis::Channel => (o * tokens.div_ceil(self.size) + t / self.size) * channels + c,
            Axis::Token => row * channels.div_ceil(self.size) + c / self.size,
        }
    }
}

/// A quantized encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quant {
    /// Code width.
    pub bits: Bits,
    /// Grouping axis.
    pub axis: Axis,
}

impl Quant {
    /// Payload length for `dims` with groups of `group`; `None` on a zero group
    /// size or overflow.
    pub fn payload_len(self, dims: Dims3, group: u32) -> Option<usize> {
        let groups = Groups::new(dims, self.axis, group)?.count()?;
        groups
            .checked_mul(4)?
            .checked_add(self.bits.code_bytes(dims.elements()?))
    }

    /// Quantizes `values` (row-major, `dims`). Errors name the first value the
    /// f16 parameters cannot cover.
    pub fn encode(self, values: &[f32], dims: Dims3, group: u32) -> Result<Vec<u8>, String> {
        let groups = Groups::new(dims, self.axis, group)
            .filter(|_| dims.elements() == Some(values.len()))
            .ok_or("tensor size does not match its shape")?;
        let count = groups.count().ok_or("too many groups")?;
        let mut lo = vec![f32::INFINITY; count];
        let mut hi = vec![f32::NEG_INFINITY; count];
        for (i, &v) in values.iter().enumerate() {
            if !v.is_finite() || v.abs() > f16::MAX.to_f32() {
                return Err(format!(
                    "element {i} is {v}, outside the finite f16 range the scales can cover"
                ));
            }
            let g = groups.of(i);
            lo[g] = lo[g].min(v);
            hi[g] = hi[g].max(v);
        }
        let levels = self.bits.levels();
        let mins: Vec<f16> = lo.iter().map(|&l| f16_at_or_below(l)).collect();
        let scales: Vec<f16> = hi
            .iter()
            .zip(&mins)
            .map(|(&h, m)| f16_at_or_above((h - m.to_f32()) / levels))
            .collect();
        let mut out = Vec::with_capacity(4 * count + self.bits.code_bytes(values.len()));
        for p in mins.iter().chain(&scales) {
            out.extend_from_slice(&p.to_le_bytes());
        }
        let code = |i: usize, v: f32| {
            let g = groups.of(i);
            let (min, scale) = (mins[g].to_f32(), scales[g].to_f32());
            if scale == 0.0 {
                0
            } else {
                // In range by construction, so the cast only drops the fraction `round` left.
                ((v - min) / scale).round().clamp(0.0, levels) as u8
            }
        };
        match self.bits {
            Bits::Eight => out.extend(values.iter().enumerate().map(|(i, &v)| code(i, v))),
            Bits::Four => {
                for (pair, chunk) in values.chunks(2).enumerate() {
                    let low = code(2 * pair, chunk[0]);
                    let high = chunk.get(1).map_or(0, |&v| code(2 * pair + 1, v));
                    out.push(low | (high << 4));
                }
            }
        }
        Ok(out)
    }

    /// Dequantizes a payload; rejects a wrong length, non-finite or negative
    /// parameters and a non-zero padding nibble.
    pub fn decode(self, payload: &[u8], dims: Dims3, group: u32) -> Result<Vec<f32>, String> {
        let groups = Groups::new(dims, self.axis, group).ok_or("invalid group size")?;
        let elements = dims.elements().ok_or("too many elements")?;
        let count = groups.count().ok_or("too many groups")?;
        let expected = self.payload_len(dims, group).ok_or("too many elements")?;
        if payload.len() != expected {
            return Err(format!(
                "quantized payload is {} bytes, expected {expected}",
                payload.len()
            ));
        }
        let (params, codes) = payload.split_at(4 * count);
        let halves: Vec<f32> = params
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let (mins, scales) = halves.split_at(count);
        if mins.iter().any(|m| !m.is_finite())
            || scales.iter().any(|s| !(s.is_finite() && *s >= 0.0))
        {
            return Err("quantization parameters are not finite, or a scale is negative".into());
        }
        let value = |i: usize, q: u8| {
            let g = groups.of(i);
            mins[g] + f32::from(q) * scales[g]
        };
        match self.bits {
            Bits::Eight => Ok(codes
                .iter()
                .enumerate()
                .map(|(i, &q)| value(i, q))
                .collect()),
            Bits::Four => {
                if elements % 2 == 1 && codes.last().is_some_and(|b| b >> 4 != 0) {
                    return Err("4-bit padding nibble is not zero".into());
                }
                Ok((0..elements)
                    .zip(codes.iter().flat_map(|&b| [b & 0x0f, b >> 4]))
                    .map(|(i, q)| value(i, q))
                    .collect())
            }
        }
    }
}

/// The largest f16 not above `x` (`x` finite and within the f16 range).
fn f16_at_or_below(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        h
    } else if h.to_bits() & 0x7fff == 0 {
        // ±0 above a tiny negative x: the next value down is the smallest negative subnormal.
        f16::from_bits(0x8001)
    } else if h.is_sign_negative() {
        f16::from_bits(h.to_bits() + 1)
    } else {
        f16::from_bits(h.to_bits() - 1)
    }
}

/// The smallest f16 not below `x` (`x` non-negative and within the f16 range).
fn f16_at_or_above(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const Q8K: Quant = Quant {
        bits: Bits::Eight,
        axis: Axis::Channel,
    };
    const Q4V: Quant = Quant {
        bits: Bits::Four,
        axis: Axis::Token,
    };

    fn dims(outer: usize, tokens: usize, channels: usize) -> Dims3 {
        Dims3 {
            outer,
            tokens,
            channels,
        }
    }

    #[test]
    fn outward_rounding_brackets_the_value() {
        for x in [
            0.1f32, -0.1, 1e-9, -1e-9, 2.71, -65504.0, 65504.0, 0.0, 1000.3,
        ] {
            assert!(f16_at_or_below(x).to_f32() <= x, "{x}");
        }
        for x in [0.1f32, 1e-9, 2.71, 0.0, 1000.3, 65504.0] {
            assert!(f16_at_or_above(x).to_f32() >= x, "{x}");
        }
    }

    #[test]
    fn group_indices_follow_the_documented_order() {
        let g = Groups::new(dims(2, 3, 4), Axis::Channel, 2).unwrap();
        assert_eq!(g.count(), Some(2 * 2 * 4));
        // outer 1, token 2, channel 3: token block 1 of outer 1, channel 3.
        assert_eq!(g.of(12 + 2 * 4 + 3), (2 + 1) * 4 + 3);
        let g = Groups::new(dims(2, 3, 4), Axis::Token, 3).unwrap();
        assert_eq!(g.count(), Some(2 * 3 * 2));
        assert_eq!(g.of(12 + 2 * 4 + 3), (3 + 2) * 2 + 1);
    }

    #[test]
    fn constant_groups_decode_exactly() {
        let values = vec![0.1f32; 64];
        let d = dims(1, 8, 8);
        for q in [Q8K, Q4V] {
            let out = q.decode(&q.encode(&values, d, 32).unwrap(), d, 32).unwrap();
            for v in out {
                assert!((v - 0.1).abs() < 1e-4, "{v}");
            }
        }
    }

    #[test]
    fn out_of_range_and_nan_are_refused() {
        let d = dims(1, 1, 2);
        assert!(Q8K.encode(&[1.0, 70000.0], d, 32).is_err());
        assert!(Q8K.encode(&[1.0, f32::NAN], d, 32).is_err());
        assert!(Q8K.encode(&[1.0], d, 32).is_err());
    }

    #[test]
    fn odd_4bit_padding_must_be_zero() {
        let d = dims(1, 1, 3);
        let mut bytes = Q4V.encode(&[1.0, 2.0, 3.0], d, 32).unwrap();
        Q4V.decode(&bytes, d, 32).unwrap();
        *bytes.last_mut().unwrap() |= 0xf0;
        assert!(Q4V.decode(&bytes, d, 32).is_err());
    }

    #[test]
    fn hostile_parameters_and_lengths_are_refused() {
        let d = dims(1, 2, 2);
        let mut bytes = Q8K.encode(&[1.0, 2.0, 3.0, 4.0], d, 32).unwrap();
        assert!(Q8K.decode(&bytes[1..], d, 32).is_err());
        assert!(Q8K.decode(&bytes, d, 0).is_err());
        // First scale := -1.0 (f16 0xbc00).
        bytes[4..6].copy_from_slice(&0xbc00u16.to_le_bytes());
        assert!(Q8K.decode(&bytes, d, 32).is_err());
    }

    fn quant_strategy() -> impl Strategy<Value = Quant> {
        (prop::bool::ANY, prop::bool::ANY).prop_map(|(eight, channel)| Quant {
            bits: if eight { Bits::Eight } else { Bits::Four },
            axis: if channel { Axis::Channel } else { Axis::Token },
        })
    }

    proptest! {
        /// Every element decodes to within half a step of its group (plus f32
        /// rounding of the arithmetic), for random shapes, group sizes and scales.
        #[test]
        fn error_is_within_half_a_step(
            q in quant_strategy(),
            (d, values) in (1usize..3, 0usize..40, 1usize..70).prop_flat_map(|(o, t, c)| {
                let n = o * t * c;
                (Just(dims(o, t, c)), prop::collection::vec(-1.0e4f32..1.0e4, n))
            }),
            scale_exp in -12i32..2,
            group in 1u32..70,
        ) {
            let values: Vec<f32> = values.iter().map(|v| v * 2f32.powi(scale_exp)).collect();
            let bytes = q.encode(&values, d, group).unwrap();
            prop_assert_eq!(Some(bytes.len()), q.payload_len(d, group));
            let out = q.decode(&bytes, d, group).unwrap();
            let groups = Groups::new(d, q.axis, group).unwrap();
            let count = groups.count().unwrap();
            let param = |k: usize| f16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]]).to_f32();
            for (i, (&x, &y)) in values.iter().zip(&out).enumerate() {
                let g = groups.of(i);
                let (min, step) = (param(g), param(count + g));
                let rounding = 4.0 * f32::EPSILON * x.abs().max(min.abs()).max(y.abs());
                prop_assert!(
                    (x - y).abs() <= 0.5 * step + rounding,
                    "element {} = {} decoded {} (min {}, step {})", i, x, y, min, step
                );
            }
        }
    }
}
