//! Attention masks. Kept apart from the model so that callers can say which
//! tokens see which: causal decoding, a fully visible chunk (the SAC
//! compressor), or any additive mask a test or a selector needs.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Who attends to whom in one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub enum AttentionMask<'a> {
    /// Each new token sees the past and the new tokens up to itself.
    #[default]
    Causal,
    /// Every new token sees the past and all new tokens (bidirectional).
    Full,
    /// An additive mask of shape `[seq, past + seq]` or `[batch, seq, past + seq]`:
    /// 0 where attention is allowed, `-inf` where it is not.
    Additive(&'a Tensor),
}

/// The additive causal mask `[seq, past + seq]`. The past, which every new
/// token sees, is zeros made where the mask lives; only the new tokens'
/// triangle is built on the host and copied there (a chunk after a long
/// past would otherwise copy megabytes of zeros to a GPU each pass).
pub fn causal(seq: usize, past: usize, device: &Device) -> Result<Tensor> {
    let own = additive_from_fn(seq, seq, device, |i, j| j <= i)?;
    if past == 0 {
        return Ok(own);
    }
    let seen = Tensor::zeros((seq, past), DType::F32, device)?;
    Ok(Tensor::cat(&[&seen, &own], 1)?)
}

/// The additive causal mask `[rows, seq, past + seq]` for a batch whose rows
/// are left-padded: row r's first `pads[r]` positions (counted over past and
/// new together) are padding that no later token sees. A padding token sees
/// itself, so no row of scores is all `-inf`.
pub fn left_padded_causal(
    pads: &[usize],
    seq: usize,
    past: usize,
    device: &Device,
) -> Result<Tensor> {
    let rows = pads
        .iter()
        .map(|&pad| {
            additive_from_fn(seq, past + seq, device, |i, j| {
                j == past + i || (pad <= j && j < past + i)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Builds an f32 additive mask from a visibility predicate `(query, key) -> bool`.
pub fn additive_from_fn(
    rows: usize,
    cols: usize,
    device: &Device,
    visible: impl Fn(usize, usize) -> bool,
) -> Result<Tensor> {
    let data: Vec<f32> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| (i, j)))
        .map(|(i, j)| {
            if visible(i, j) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Ok(Tensor::from_vec(data, (rows, cols), device)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_with_past_sees_past_and_self() -> Result<()> {
        let m = causal(2, 3, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0][..4], [0.0; 4]);
        assert_eq!(m[0][4], f32::NEG_INFINITY);
        assert_eq!(m[1], [0.0; 5]);
        Ok(())
    }

    #[test]
    fn left_padding_is_hidden_from_later_tokens() -> Result<()> {
        let m = left_padded_causal(&[0, 2], 3, 0, &Device::Cpu)?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m.get(0)?.to_vec2::<f32>()?,
            causal(3, 0, &Device::Cpu)?.to_vec2::<f32>()?
        );
        assert_eq!(
            m.get(1)?.to_vec2::<f32>()?,
            [[0.0, inf, inf], [inf, 0.0, inf], [inf, inf, 0.0]]
        );
        let step = left_padded_causal(&[1], 1, 3, &Device::Cpu)?.to_vec3::<f32>()?;
        assert_eq!(step, [[[inf, 0.0, 0.0, 0.0]]]);
        Ok(())
    }
}
