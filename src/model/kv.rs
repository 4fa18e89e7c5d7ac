//! Per-layer key/value tensors: what a forward pass computes and what a later
//! pass reads as its past. Plain tensors the caller owns, so the compressor can
//! pick positions out of them and the decoder can load them from a .sack.

use candle_core::Tensor;

use crate::error::Result;

/// One layer's keys and values, each `[batch, kv_heads, seq, head_dim]`.
/// Keys carry RoPE at their own position ids.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

impl LayerKv {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.k.dims().get(2).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `other`'s positions after ours.
    pub fn concat(&self, other: &LayerKv) -> Result<LayerKv> {
        Ok(LayerKv {
            k: Tensor::cat(&[&self.k, &other.k], 2)?,
            v: Tensor::cat(&[&self.v, &other.v], 2)?,
        })
    }
}

/// A growing cache for incremental decoding: every layer's K/V so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// A cache that starts from `layers` (e.g. the K/V loaded from a .sack).
    pub fn from_layers(layers: Vec<LayerKv>) -> Self {
        KvCache { layers }
    }

    /// Positions held (0 for an empty cache).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache as the `past` of a forward pass; `None` while empty.
    pub fn as_past(&self) -> Option<&[LayerKv]> {
        (!self.layers.is_empty()).then_some(self.layers.as_slice())
    }

    pub fn layers(&self) -> &[LayerKv] {
        &self.layers
    }

    /// Appends one forward pass's new K/V.
    pub fn append(&mut self, new: Vec<LayerKv>) -> Result<()> {
        self.layers = if self.layers.is_empty() {
            new
        } else {
            self.layers
                .iter()
                .zip(&new)
                .map(|(old, new)| old.concat(new))
                .collect::<Result<_>>()?
        };
        Ok(())
    }
}
